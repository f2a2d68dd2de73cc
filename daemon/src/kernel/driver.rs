//! The driver sequences of the kernel's PCI core, each with its own rollback, over one timed
//! write primitive.
//!
//! Bind to vfio-pci: load vfio-pci if needed, `driver_override` ← "vfio-pci", unbind from the
//! current driver (through `devices/ADDR/driver/unbind`, so we never name the wrong driver),
//! write the address to `drivers_probe`, then check the `driver` link, because a probe can
//! succeed and bind nothing. A failure puts the device back on the driver it had.
//!
//! Release: `driver_override` ← "\n" (clears it), unbind from vfio-pci, `drivers_probe`; if the
//! recorded previous driver did not come back, bind it explicitly through `drivers/NAME/bind`.
//! A release that cannot reach a host driver leaves the device on vfio-pci, never driverless.
//!
//! Paths come from a typed [`PciAddress`] or constants; a driver name (the recorded previous
//! driver) is only used to pick an entry out of the `drivers/` listing, never joined as text.
//!
//! Writes are never abandoned: an unbind blocks for as long as a VM holds the device, and a
//! write given up on would still land later, behind everyone's back. Instead every write is
//! visible while it runs: [`InFlight`] tells readers which devices to leave alone (the kernel
//! holds their device lock), and [`Progress`] tells whoever waits for the operation since when
//! it has been stuck.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use passthroughd_proto::{Change, PciAddress};

use crate::error::Error;
use crate::kernel::Kernel;
use crate::kernel::sysfs::{SysfsRoot, read_link_name};

pub const VFIO_PCI: &str = "vfio-pci";
/// The module that provides [`VFIO_PCI`], as `sys/module` names it.
const VFIO_PCI_MODULE_DIR: &str = "vfio_pci";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update below is a single insert or remove: a panic elsewhere leaves them coherent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Devices with a sysfs write in flight. The kernel holds such a device's lock for the whole
/// write (an unbind waits there for a VM to let go), and reading its `driver_override` or
/// `sriov_numvfs` would wait too: readers skip those attributes and serve the last known value.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Device → (writes in flight, whether one of them can add or remove its VFs).
    devices: Mutex<HashMap<PciAddress, (u32, bool)>>,
}

impl InFlight {
    /// Whether `address` has a write in flight.
    pub fn contains(&self, address: PciAddress) -> bool {
        lock(&self.devices).contains_key(&address)
    }

    /// Whether some PF is changing its number of VFs (its VFs come and go under the lock too).
    pub fn any_pf(&self) -> bool {
        lock(&self.devices).values().any(|(_, pf)| *pf)
    }

    /// Whether `pf` is changing its number of VFs.
    pub fn is_pf(&self, pf: PciAddress) -> bool {
        lock(&self.devices).get(&pf).is_some_and(|(_, pf)| *pf)
    }

    fn enter(&self, address: PciAddress, vfs: bool) -> InFlightGuard<'_> {
        let mut devices = lock(&self.devices);
        let entry = devices.entry(address).or_insert((0, false));
        entry.0 += 1;
        entry.1 |= vfs;
        InFlightGuard { set: self, address }
    }
}

struct InFlightGuard<'a> {
    set: &'a InFlight,
    address: PciAddress,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut devices = lock(&self.set.devices);
        if let Some(entry) = devices.get_mut(&self.address) {
            entry.0 -= 1;
            if entry.0 == 0 {
                devices.remove(&self.address);
            }
        }
    }
}

/// The writes one operation has running now, each with when it started: what a waiting caller
/// and `status` look at to tell a slow kernel from a stuck one.
#[derive(Debug, Default)]
pub struct Progress {
    next: AtomicU64,
    writes: Mutex<Vec<(u64, Instant, String)>>,
}

impl Progress {
    /// The oldest running write, if it has been running for at least `limit`: what it writes
    /// and for how long.
    pub fn stalled(&self, limit: Duration) -> Option<(String, Duration)> {
        lock(&self.writes)
            .iter()
            .map(|(_, since, what)| (what.clone(), since.elapsed()))
            .filter(|(_, age)| *age >= limit)
            .max_by_key(|(_, age)| *age)
    }

    fn enter(&self, what: String) -> ProgressGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.writes).push((id, Instant::now(), what));
        ProgressGuard { progress: self, id }
    }
}

struct ProgressGuard<'a> {
    progress: &'a Progress,
    id: u64,
}

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        lock(&self.progress.writes).retain(|(id, _, _)| *id != self.id);
    }
}

/// The driver sequences for one operation: the kernel seam, the root its paths hang off, the
/// daemon-wide [`InFlight`] set and this operation's [`Progress`].
#[derive(Debug, Clone)]
pub struct Drivers {
    root: SysfsRoot,
    kernel: Arc<dyn Kernel>,
    in_flight: Arc<InFlight>,
    progress: Arc<Progress>,
}

impl Drivers {
    pub fn new(root: SysfsRoot, kernel: Arc<dyn Kernel>, in_flight: Arc<InFlight>) -> Self {
        Self {
            root,
            kernel,
            in_flight,
            progress: Arc::default(),
        }
    }

    /// The same sequences, reporting their writes to `progress`.
    pub fn with_progress(&self, progress: Arc<Progress>) -> Self {
        Self {
            progress,
            ..self.clone()
        }
    }

    pub fn root(&self) -> &SysfsRoot {
        &self.root
    }

    /// The driver bound to `address` now (the `driver` link), `None` when unbound.
    pub fn current_driver(&self, address: PciAddress) -> Result<Option<String>, Error> {
        Ok(read_link_name(
            &self.root.pci_device_attr(address, "driver"),
        )?)
    }

    pub fn exists(&self, address: PciAddress) -> bool {
        self.root.pci_device_attr(address, "uevent").exists()
    }

    /// One sysfs write about `device`, in one write(2), registered as in flight while it runs.
    /// `vfs`: the write can add or remove the device's VFs.
    pub(crate) fn write(
        &self,
        device: PciAddress,
        path: PathBuf,
        value: &str,
        vfs: bool,
    ) -> Result<(), Error> {
        let shown = match value.trim_end() {
            "" => "an empty line",
            v => v,
        };
        let what = format!("writing {shown} to {}", self.display(&path));
        let _in_flight = self.in_flight.enter(device, vfs);
        let _progress = self.progress.enter(what.clone());
        self.kernel
            .write(&path, value.as_bytes())
            .map_err(|source| Error::Write { what, source })
    }

    /// A path as the kernel would show it: relative to the root, with a leading slash.
    fn display(&self, path: &Path) -> String {
        match path.strip_prefix(self.root.root()) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => path.display().to_string(),
        }
    }

    fn set_override(&self, address: PciAddress, value: &str) -> Result<(), Error> {
        let path = self.root.pci_device_attr(address, "driver_override");
        self.write(address, path, value, false)
    }

    fn unbind(&self, address: PciAddress) -> Result<(), Error> {
        let path = self.root.pci_device_unbind(address);
        self.write(address, path, &address.to_string(), false)
    }

    fn probe(&self, address: PciAddress) -> Result<(), Error> {
        let path = self.root.pci_drivers_probe();
        self.write(address, path, &address.to_string(), false)
    }

    /// Binds through `drivers/NAME/bind`, NAME picked out of the directory listing.
    fn bind_explicitly(&self, address: PciAddress, driver: &str) -> Result<(), Error> {
        let dir = self.root.pci_drivers_dir();
        let entry = std::fs::read_dir(&dir)
            .map_err(|source| crate::kernel::sysfs::ReadError {
                path: dir.clone(),
                source,
            })?
            .flatten()
            .find(|e| e.file_name().to_str() == Some(driver))
            .ok_or_else(|| {
                Error::Failed(format!(
                    "driver {driver} is not loaded, so {address} cannot be bound to it; \
                     load it (modprobe) and release again"
                ))
            })?;
        self.write(
            address,
            entry.path().join("bind"),
            &address.to_string(),
            false,
        )
    }

    /// Whether vfio-pci is loaded: `drivers/vfio-pci` or `module/vfio_pci` exists.
    pub fn vfio_loaded(&self) -> bool {
        self.root.pci_drivers_dir().join(VFIO_PCI).is_dir()
            || self.root.module_dir().join(VFIO_PCI_MODULE_DIR).is_dir()
    }

    /// Loads vfio-pci unless it already is.
    pub fn ensure_vfio_loaded(&self) -> Result<(), Error> {
        if self.vfio_loaded() {
            return Ok(());
        }
        self.kernel
            .load_module(VFIO_PCI)
            .map_err(|source| Error::Write {
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

    /// Moves `address` to vfio-pci. On failure it is back on `previous` (or the error says it
    /// could not be put back, and why). `previous` is the driver it had before the operation,
    /// which after a crash between unbind and probe is not the one it has now: rolling back to
    /// "unbound" would leave it driverless.
    pub fn bind_vfio(&self, address: PciAddress, previous: Option<&str>) -> Result<Change, Error> {
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
                got => Err(Error::WrongDriver {
                    address,
                    wanted: VFIO_PCI.into(),
                    got,
                }),
            }
        };
        match steps() {
            Ok(()) => Ok(Change {
                address,
                old_driver: old,
                new_driver: Some(VFIO_PCI.into()),
            }),
            Err(e) if !self.exists(address) => Err(self.vanished_or(address, e)),
            Err(e) => Err(self.put_back(address, old.as_deref(), e)),
        }
    }

    /// Puts `address` back on `previous` after a failed step, and says how that went. A
    /// function that had no driver is left without one, as it was (a new VF must not meet its
    /// host VF driver on the way out).
    fn put_back(&self, address: PciAddress, previous: Option<&str>, cause: Error) -> Error {
        let back = match previous {
            Some(_) => self.restore(address, previous).map(drop),
            None => self.detach(address).map(drop),
        };
        match back {
            Ok(()) => Error::RolledBack {
                cause: Box::new(cause),
                undone: match previous {
                    Some(d) => format!("; it is back on {d}"),
                    None => "; it is unbound again, as before".into(),
                },
            },
            Err(undo) => Error::RollbackFailed {
                cause: Box::new(cause),
                undo: Box::new(undo),
            },
        }
    }

    /// When a step failed because the device is gone, say so instead of the errno.
    fn vanished_or(&self, address: PciAddress, e: Error) -> Error {
        if self.exists(address) {
            e
        } else {
            Error::Vanished {
                address,
                cause: Box::new(e),
            }
        }
    }

    /// Brings `address` to `previous` (`None`: whatever the kernel picks, or nothing) from any
    /// intermediate state: override set or not, bound to vfio-pci, to the old driver, or to
    /// nothing. Returns the driver it ends up on. Writes nothing when it is already there.
    pub fn restore(
        &self,
        address: PciAddress,
        previous: Option<&str>,
    ) -> Result<Option<String>, Error> {
        if !self.exists(address) {
            return Err(Error::NoSuchDevice(address));
        }
        let current = self.current_driver(address)?;
        let settled = match (current.as_deref(), previous) {
            (Some(VFIO_PCI), Some(VFIO_PCI)) => true,
            (Some(VFIO_PCI), _) => false,
            (Some(cur), Some(prev)) => cur == prev,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if settled && self.override_of(address)?.is_none() {
            return Ok(current);
        }
        self.set_override(address, "\n")?;
        if !settled && current.is_some() {
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

    /// The `driver_override` set on `address`, if any. Only called for a device this operation
    /// holds the lock of, so the read never waits behind someone else's write.
    fn override_of(&self, address: PciAddress) -> Result<Option<String>, Error> {
        let value = crate::kernel::sysfs::read_attr(
            &self.root.pci_device_attr(address, "driver_override"),
        )?;
        Ok(value.filter(|o| !o.is_empty() && o != "(null)"))
    }

    /// Returns `address` from vfio-pci to `previous`. If that fails and the device would be
    /// left driverless, it goes back on vfio-pci: never driverless by accident.
    pub fn release(&self, address: PciAddress, previous: Option<&str>) -> Result<Change, Error> {
        let old = self.current_driver(address)?;
        let had_override = self.override_of(address)?;
        match self.restore(address, previous) {
            Ok(now) => Ok(Change {
                address,
                old_driver: old,
                new_driver: now,
            }),
            Err(e) => {
                let e = self.vanished_or(address, e);
                if !self.exists(address) {
                    return Err(e);
                }
                match self.current_driver(address)? {
                    // Never unbound: put the override back, so it is exactly as it was (a later
                    // probe or rescan keeps it on vfio-pci).
                    Some(d) if d == VFIO_PCI => {
                        if let Some(o) = had_override {
                            let _ = self.set_override(address, &o);
                        }
                        return Err(e);
                    }
                    Some(_) => return Err(e),
                    None => {}
                }
                let rebound = self
                    .set_override(address, VFIO_PCI)
                    .and_then(|()| self.probe(address))
                    .and_then(|()| self.current_driver(address));
                Err(Error::RolledBack {
                    cause: Box::new(e),
                    undone: match rebound {
                        Ok(Some(d)) => format!("; it stays on {d}"),
                        _ => "; it is left without a driver".into(),
                    },
                })
            }
        }
    }

    /// Takes `address` off its driver without probing another: clears the override, unbinds.
    /// Used before a VF disappears. Returns the driver it had.
    pub fn detach(&self, address: PciAddress) -> Result<Option<String>, Error> {
        let old = self.current_driver(address)?;
        let had_override = self.override_of(address)?;
        if old.is_none() && had_override.is_none() {
            return Ok(None);
        }
        self.set_override(address, "\n")?;
        if old.is_some()
            && let Err(e) = self.unbind(address)
        {
            // Still bound: exactly as it was, override included.
            if let Some(o) = had_override {
                let _ = self.set_override(address, &o);
            }
            return Err(e);
        }
        Ok(old)
    }
}
