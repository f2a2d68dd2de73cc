//! The bind and release sequences of DESIGN.md section 4, with rollback.
//!
//! Bind: load vfio-pci if needed, `driver_override` ← "vfio-pci", unbind from the current
//! driver (through `devices/ADDR/driver/unbind`, so we never name the wrong driver), write the
//! address to `drivers_probe`, then check the `driver` link, because a probe can succeed and
//! bind nothing. Any failure puts the device back: clear the override, probe, and if the old
//! driver did not come back, bind it explicitly.
//!
//! Release: `driver_override` ← "\n" (clears it), unbind from vfio-pci, `drivers_probe`; if the
//! recorded previous driver did not come back, bind it explicitly through `drivers/NAME/bind`.
//!
//! Paths come from a typed [`PciAddress`] or constants; a driver name (the recorded previous
//! driver) is only used to pick an entry out of the `drivers/` listing, never joined as text.
//! Every write runs on its own thread with a time limit: an unbind blocks for as long as a VM
//! holds the device, and one stuck device must not freeze the daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use passthroughd_proto::{Change, PciAddress, PciFunction};

use crate::error::Error;
use crate::kernel::Kernel;
use crate::kernel::sysfs::{SysfsRoot, read_link_name};

pub const VFIO_PCI: &str = "vfio-pci";
/// The module that provides [`VFIO_PCI`], as `sys/module` names it.
const VFIO_PCI_MODULE_DIR: &str = "vfio_pci";

/// How long one sysfs write may take before the request gets Busy.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Binder {
    root: SysfsRoot,
    kernel: Arc<dyn Kernel>,
    timeout: Duration,
}

impl Binder {
    pub fn new(root: SysfsRoot, kernel: Arc<dyn Kernel>, timeout: Duration) -> Self {
        Self {
            root,
            kernel,
            timeout,
        }
    }

    /// The driver bound to `address` now (the `driver` link), `None` when unbound.
    pub fn current_driver(&self, address: PciAddress) -> Result<Option<String>, Error> {
        read_link_name(&self.root.pci_device_attr(address, "driver")).map_err(Error::from)
    }

    pub fn exists(&self, address: PciAddress) -> bool {
        self.root.pci_device_attr(address, "uevent").exists()
    }

    /// One sysfs write with the time limit. A write still stuck at the limit goes on in the
    /// background (the kernel will not let go of it); the request reports Busy.
    fn write(&self, path: PathBuf, value: String) -> Result<(), Error> {
        let (tx, rx) = mpsc::channel();
        let kernel = Arc::clone(&self.kernel);
        let (p, v) = (path.clone(), value.clone());
        std::thread::Builder::new()
            .name("sysfs-write".into())
            .spawn(move || {
                let _ = tx.send(kernel.write(&p, v.as_bytes()));
            })
            .map_err(|e| Error::Failed(format!("starting a sysfs writer thread: {e}")))?;
        let shown = value.trim_end();
        let shown = if shown.is_empty() {
            "an empty line"
        } else {
            shown
        };
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(Error::Kernel {
                what: format!("writing {shown} to {}", self.display(&path)),
                source,
            }),
            Err(_) => Err(Error::Busy(format!(
                "writing {shown} to {} did not finish within {}s; the kernel is probably waiting \
                 for a process (a VM) to close the device",
                self.display(&path),
                self.timeout.as_secs()
            ))),
        }
    }

    /// A path as the kernel would show it: relative to the root, with a leading slash.
    fn display(&self, path: &std::path::Path) -> String {
        match path.strip_prefix(self.root.root()) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => path.display().to_string(),
        }
    }

    /// Writes `value` to one of the function's own attributes (`sriov_numvfs`,
    /// `sriov_drivers_autoprobe`), with the time limit.
    pub fn write_attr(
        &self,
        address: PciAddress,
        attr: &'static str,
        value: String,
    ) -> Result<(), Error> {
        self.write(self.root.pci_device_attr(address, attr), value)
    }

    /// Takes `address` off its driver without probing another: clears the override, unbinds.
    /// Used before its VF disappears. Returns the driver it had.
    pub fn detach(&self, address: PciAddress) -> Result<Option<String>, Error> {
        let old = self.current_driver(address)?;
        self.set_override(address, "\n")?;
        if old.is_some() {
            self.unbind(address)?;
        }
        Ok(old)
    }

    fn set_override(&self, address: PciAddress, value: &str) -> Result<(), Error> {
        self.write(
            self.root.pci_device_attr(address, "driver_override"),
            value.to_owned(),
        )
    }

    fn unbind(&self, address: PciAddress) -> Result<(), Error> {
        self.write(self.root.pci_device_unbind(address), address.to_string())
    }

    fn probe(&self, address: PciAddress) -> Result<(), Error> {
        self.write(self.root.pci_drivers_probe(), address.to_string())
    }

    /// Binds through `drivers/NAME/bind`, NAME picked out of the directory listing.
    fn bind_explicitly(&self, address: PciAddress, driver: &str) -> Result<(), Error> {
        let dir = self.root.pci_drivers_dir();
        let entry = std::fs::read_dir(&dir)
            .map_err(|e| Error::Failed(format!("listing {}: {e}", self.display(&dir))))?
            .flatten()
            .find(|e| e.file_name().to_str() == Some(driver))
            .ok_or_else(|| {
                Error::Failed(format!(
                    "driver {driver} is not loaded, so {address} cannot be bound to it; \
                     load it (modprobe) and release again"
                ))
            })?;
        self.write(entry.path().join("bind"), address.to_string())
    }

    /// Loads vfio-pci unless `drivers/vfio-pci` or `module/vfio_pci` shows it already is.
    pub fn ensure_vfio_loaded(&self) -> Result<(), Error> {
        let loaded = || {
            self.root.pci_drivers_dir().join(VFIO_PCI).is_dir()
                || self.root.module_dir().join(VFIO_PCI_MODULE_DIR).is_dir()
        };
        if loaded() {
            return Ok(());
        }
        self.kernel
            .load_module(VFIO_PCI)
            .map_err(|source| Error::Kernel {
                what: "loading vfio-pci".into(),
                source,
            })?;
        if self.root.pci_drivers_dir().join(VFIO_PCI).is_dir() {
            Ok(())
        } else {
            Err(Error::Failed(
                "vfio-pci is not available after modprobe; is CONFIG_VFIO_PCI enabled?".into(),
            ))
        }
    }

    /// Moves `function` to vfio-pci. On failure the device is back on its old driver (or the
    /// error says it could not be put back, and why).
    pub fn bind_vfio(&self, function: &PciFunction) -> Result<Change, Error> {
        let current = self.current_driver(function.address)?;
        self.bind_vfio_from(function, current.as_deref())
    }

    /// Like [`Self::bind_vfio`], but a failure restores `previous` rather than whatever is
    /// bound now: after a crash between unbind and probe the device is unbound, and rolling
    /// back to "unbound" would leave it driverless.
    pub fn bind_vfio_from(
        &self,
        function: &PciFunction,
        previous: Option<&str>,
    ) -> Result<Change, Error> {
        let address = function.address;
        // Defense in depth: the guard refuses bridges first; vfio-pci would reject one only
        // after its driver is already gone.
        if function.is_bridge() {
            return Err(Error::Refused {
                address,
                reason: "it is a PCI bridge (class 0x06)".into(),
            });
        }
        let current = self.current_driver(address)?;
        let old = previous.map(str::to_owned);
        if current.as_deref() == Some(VFIO_PCI) {
            return Ok(Change {
                address,
                old_driver: old,
                new_driver: current,
            });
        }
        if let Err(e) = self.set_override(address, VFIO_PCI) {
            return Err(self.vanished_or(address, e));
        }
        let steps = || -> Result<(), Error> {
            if current.is_some() {
                self.unbind(address)?;
            }
            self.probe(address)?;
            match self.current_driver(address)? {
                Some(d) if d == VFIO_PCI => Ok(()),
                now => Err(Error::Failed(format!(
                    "probing {address} with driver_override=vfio-pci bound {}",
                    now.map_or_else(|| "nothing".to_owned(), |d| format!("{d} instead")),
                ))),
            }
        };
        match steps() {
            Ok(()) => Ok(Change {
                address,
                old_driver: old,
                new_driver: Some(VFIO_PCI.into()),
            }),
            Err(e) if !self.exists(address) => Err(self.vanished_or(address, e)),
            Err(e) => Err(self.with_rollback(address, old.as_deref(), e)),
        }
    }

    /// Puts `address` back on `previous` after a failed step, and says how that went.
    fn with_rollback(&self, address: PciAddress, previous: Option<&str>, cause: Error) -> Error {
        let back = match previous {
            Some(d) => format!("it is back on {d}"),
            None => "it is unbound again, as before".into(),
        };
        match self.restore(address, previous) {
            Ok(_) => annotate(cause, &format!("; {back}")),
            Err(undo) => annotate(cause, &format!("; putting it back also failed: {undo}")),
        }
    }

    /// When a step failed because the device is gone, say so instead of the errno.
    fn vanished_or(&self, address: PciAddress, e: Error) -> Error {
        if self.exists(address) {
            e
        } else {
            Error::Failed(format!(
                "{address} disappeared during the operation (hot-unplug?): {e}"
            ))
        }
    }

    /// Brings `address` to `previous` (`None`: whatever the kernel picks, or nothing) from any
    /// intermediate state: override set or not, bound to vfio-pci, to the old driver, or to
    /// nothing. Returns the driver it ends up on.
    pub fn restore(
        &self,
        address: PciAddress,
        previous: Option<&str>,
    ) -> Result<Option<String>, Error> {
        if !self.exists(address) {
            return Err(Error::NoSuchDevice(address));
        }
        self.set_override(address, "\n")?;
        let current = self.current_driver(address)?;
        let wrong = match (&current, previous) {
            (Some(cur), _) if cur == VFIO_PCI && previous != Some(VFIO_PCI) => true,
            (Some(cur), Some(prev)) => cur != prev,
            _ => false,
        };
        if wrong {
            self.unbind(address)?;
        }
        if self.current_driver(address)?.is_none() {
            self.probe(address)?;
        }
        let now = self.current_driver(address)?;
        if let Some(prev) = previous
            && now.is_none()
        {
            // The id table did not pick it (a driver bound by hand, or new_id): bind directly.
            self.bind_explicitly(address, prev)?;
        }
        let now = self.current_driver(address)?;
        match previous {
            Some(prev) if now.as_deref() != Some(prev) => Err(Error::Failed(format!(
                "{address} did not go back to {prev}: it is bound to {}",
                now.as_deref().unwrap_or("nothing")
            ))),
            _ => Ok(now),
        }
    }

    /// Returns `address` from vfio-pci to `previous`. If that fails and the device would be
    /// left driverless, it goes back on vfio-pci: never driverless by accident.
    pub fn release(&self, address: PciAddress, previous: Option<&str>) -> Result<Change, Error> {
        let old = self.current_driver(address)?;
        match self.restore(address, previous) {
            Ok(now) => Ok(Change {
                address,
                old_driver: old,
                new_driver: now,
            }),
            Err(e) => {
                let e = self.vanished_or(address, e);
                if !self.exists(address) || self.current_driver(address)?.is_some() {
                    return Err(e);
                }
                let rebound = self
                    .set_override(address, VFIO_PCI)
                    .and_then(|()| self.probe(address))
                    .and_then(|()| self.current_driver(address));
                Err(match rebound {
                    Ok(Some(d)) => annotate(e, &format!("; it stays on {d}")),
                    _ => annotate(e, "; it is left without a driver"),
                })
            }
        }
    }
}

/// Appends context to an error's message, keeping its kind.
fn annotate(error: Error, more: &str) -> Error {
    match error {
        Error::Kernel { what, source } => Error::Failed(format!("{what}: {source}{more}")),
        Error::Busy(m) => Error::Busy(format!("{m}{more}")),
        Error::Refused { address, reason } => Error::Refused {
            address,
            reason: format!("{reason}{more}"),
        },
        other => Error::Failed(format!("{other}{more}")),
    }
}
