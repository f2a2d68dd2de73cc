//! Kernel uevents about PCI devices, read from the kernel's own netlink group (no udevd needed),
//! so the daemon can share one inventory scan between readers and still see outside changes:
//! a bind, unbind, hotplug or VF creation by anyone raises an event here.

use std::io;
use std::os::fd::AsRawFd;
use std::thread;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tracing::{debug, warn};

/// The multicast group the kernel itself sends uevents to (udevd re-broadcasts on group 2).
const KERNEL_UEVENT_GROUP: u32 = 1;

/// Opens the uevent socket and calls `on_pci_change` for every event about a PCI device or an
/// IOMMU group, on a thread of its own. An error here means the caller must not cache.
pub fn spawn_listener(on_pci_change: impl Fn() + Send + 'static) -> io::Result<()> {
    let socket = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(
        socket.as_raw_fd(),
        &NetlinkAddr::new(std::process::id(), KERNEL_UEVENT_GROUP),
    )?;
    thread::Builder::new()
        .name("uevents".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(n) if concerns_pci(&buf[..n]) => on_pci_change(),
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => {}
                    // ENOBUFS: events were dropped; we cannot know which, so assume a change.
                    Err(nix::errno::Errno::ENOBUFS) => on_pci_change(),
                    Err(e) => {
                        // Without events the cache could go stale: say so and keep invalidating.
                        warn!("uevent socket failed ({e}); every read now rescans");
                        loop {
                            on_pci_change();
                            thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
            }
        })?;
    Ok(())
}

/// Whether a uevent (`ACTION@DEVPATH\0KEY=VALUE\0...`) is about a PCI function or an IOMMU
/// group. Events of child devices (a NIC's net interface) are ignored: they change nothing the
/// inventory shows.
fn concerns_pci(event: &[u8]) -> bool {
    let relevant = event.split(|&b| b == 0).any(|field| {
        field == b"SUBSYSTEM=pci"
            || field == b"SUBSYSTEM=iommu_groups"
            || field == b"SUBSYSTEM=vfio"
    });
    if relevant {
        debug!(event = %String::from_utf8_lossy(event.split(|&b| b == 0).next().unwrap_or_default()), "PCI uevent");
    }
    relevant
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_pci_events_only() {
        let bind = b"bind@/devices/pci0000:00/0000:00:11.0/0000:02:00.0\0ACTION=bind\0\
                     DEVPATH=/devices/pci0000:00/0000:00:11.0/0000:02:00.0\0SUBSYSTEM=pci\0\
                     DRIVER=vfio-pci\0PCI_SLOT_NAME=0000:02:00.0\0";
        assert!(concerns_pci(bind));
        let net = b"add@/devices/pci0000:00/0000:00:11.0/0000:02:00.0/net/enp2s0\0ACTION=add\0\
                    SUBSYSTEM=net\0INTERFACE=enp2s0\0";
        assert!(!concerns_pci(net));
        // A value that merely contains the word does not count.
        assert!(!concerns_pci(b"change@/x\0SUBSYSTEM=pcie_thing\0"));
    }
}
