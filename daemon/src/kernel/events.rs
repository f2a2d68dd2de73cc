//! Device events about PCI functions: added, removed, bound, unbound.
//!
//! With udevd running, from the udev monitor: the events udevd re-broadcasts after its rules
//! ran (so an early-boot rule of ours has already set `driver_override` when the daemon hears
//! of a new function). Without udevd (a minimal host, a container), straight from the kernel's
//! uevent group, through the same library. Either way the monitor runs on a thread of its own,
//! driven by a small tokio runtime, and hands each event to a callback.

use std::io;
use std::path::Path;

use passthroughd_proto::PciAddress;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

/// What happened to a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Add,
    Remove,
    /// bind, unbind, change: the function is the same one, only what the inventory shows moved.
    Other,
}

/// One event about one PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEvent {
    pub action: Action,
    pub address: PciAddress,
}

/// Where events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// udevd's re-broadcast, after its rules.
    Udev,
    /// The kernel's own uevents (no udevd).
    Kernel,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Udev => "udev",
            Self::Kernel => "kernel uevents (no udevd)",
        })
    }
}

/// Whether udevd runs: something listens on its control socket. A udevd that was killed leaves
/// the socket file behind, and its monitor would then never deliver an event; connecting tells
/// them apart without speaking udevd's protocol: a stale socket refuses the connection, a live
/// one (SOCK_SEQPACKET) answers a stream connect with EPROTOTYPE.
pub fn udevd_running(root: &Path) -> bool {
    match std::os::unix::net::UnixStream::connect(root.join("run/udev/control")) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        ),
    }
}

/// Starts listening (udev when `udev`, else the kernel) on a thread of its own and calls
/// `on_event` for every event about a PCI function. An error means nothing listens: the caller
/// must not cache what it reads.
pub fn spawn_monitor(
    source: Source,
    on_event: impl Fn(DeviceEvent) + Send + 'static,
) -> io::Result<()> {
    let (ready, started) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("device-events".into())
        .spawn(move || {
            // The monitor (libudev objects) stays on this thread.
            let monitor = match listen(source) {
                Ok(monitor) => {
                    let _ = ready.send(Ok(()));
                    monitor
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    warn!("device events stopped: {e}");
                    return;
                }
            };
            runtime.block_on(pump(monitor, on_event));
        })?;
    started
        .recv()
        .map_err(|_| io::Error::other("the device-event thread stopped"))?
}

fn listen(source: Source) -> io::Result<udev::MonitorSocket> {
    let builder = match source {
        Source::Udev => udev::MonitorBuilder::new()?,
        Source::Kernel => udev::MonitorBuilder::new_kernel()?,
    };
    builder.match_subsystem("pci")?.listen()
}

/// Reads events as the socket becomes readable, until it fails.
#[allow(unsafe_code)] // tokio's registration of a raw fd; see SAFETY below.
async fn pump(monitor: udev::MonitorSocket, on_event: impl Fn(DeviceEvent)) {
    // SAFETY: the fd is the monitor's own socket (udev_monitor_get_fd), opened by libudev when
    // the monitor was made and closed only when the monitor is dropped. The AsyncFd owns the
    // monitor, so the fd stays open and the same for the AsyncFd's whole life.
    let socket = match unsafe { AsyncFd::register(monitor) } {
        Ok(socket) => socket,
        Err(e) => {
            warn!("device events stopped: {e}");
            return;
        }
    };
    loop {
        let mut ready = match socket.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                warn!("device events stopped: {e}");
                return;
            }
        };
        for event in ready.get_inner().iter() {
            let device = event.device();
            let Some(address) = device
                .sysname()
                .to_str()
                .and_then(|name| name.parse::<PciAddress>().ok())
            else {
                continue;
            };
            let action = match event.event_type() {
                udev::EventType::Add => Action::Add,
                udev::EventType::Remove => Action::Remove,
                _ => Action::Other,
            };
            debug!(%address, ?action, "device event");
            on_event(DeviceEvent { action, address });
        }
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_stale_control_socket_is_not_a_running_udevd() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!udevd_running(dir.path()), "no socket");
        std::fs::create_dir_all(dir.path().join("run/udev")).unwrap();
        let path = dir.path().join("run/udev/control");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(udevd_running(dir.path()), "something listens");
        drop(listener);
        assert!(path.exists());
        assert!(!udevd_running(dir.path()), "the file of a dead udevd");
    }
}
