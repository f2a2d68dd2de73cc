//! The SR-IOV attributes of a PF: `sriov_numvfs`, `sriov_drivers_autoprobe`, and the `virtfnN`
//! links that say where VF N is.
//!
//! `sriov_numvfs` accepts only 0 or the count already enabled while VFs exist (the kernel
//! answers EBUSY otherwise), so a new count goes through 0. The kernel parses the value in base
//! 0 ("010" would be 8): it is formatted here, in decimal. A driver may enable fewer VFs than
//! asked: the count is read back.

use std::time::{Duration, Instant};

use passthroughd_proto::PciAddress;

use crate::error::Error;
use crate::kernel::driver::Drivers;
use crate::kernel::sysfs::{read_attr, read_virtfn};

const NUMVFS: &str = "sriov_numvfs";
const AUTOPROBE: &str = "sriov_drivers_autoprobe";
/// How often [`Drivers::wait_for_vfs`] looks.
const VF_POLL: Duration = Duration::from_millis(2);

impl Drivers {
    /// The VFs `pf` has enabled now (0 when it has none or is not a PF).
    pub fn num_vfs(&self, pf: PciAddress) -> Result<u32, Error> {
        Ok(read_attr(&self.root().pci_device_attr(pf, NUMVFS))?
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// Whether the kernel probes host drivers for new VFs of `pf`.
    pub fn autoprobe(&self, pf: PciAddress) -> Result<bool, Error> {
        Ok(read_attr(&self.root().pci_device_attr(pf, AUTOPROBE))?.as_deref() != Some("0"))
    }

    pub fn set_autoprobe(&self, pf: PciAddress, on: bool) -> Result<(), Error> {
        let path = self.root().pci_device_attr(pf, AUTOPROBE);
        self.write(pf, path, if on { "1" } else { "0" }, false)
    }

    /// Sets the VF count of `pf` to `count` (through 0 when another count is enabled), checks
    /// the driver enabled them all, and waits (up to `wait`) for the VFs to appear. Nothing is
    /// written when `pf` has `count` VFs already.
    pub fn set_num_vfs(&self, pf: PciAddress, count: u32, wait: Duration) -> Result<(), Error> {
        let now = self.num_vfs(pf)?;
        if now != count {
            let path = self.root().pci_device_attr(pf, NUMVFS);
            if now != 0 && count != 0 {
                self.write(pf, path.clone(), "0", true)?;
            }
            self.write(pf, path, &count.to_string(), true)?;
            let enabled = self.num_vfs(pf)?;
            if enabled != count {
                return Err(Error::Failed(format!(
                    "the driver of {pf} enabled {enabled} of the {count} VFs asked for"
                )));
            }
        }
        self.wait_for_vfs(pf, count, wait).map(drop)
    }

    /// VF `index` of `pf` now, if it exists.
    pub fn vf(&self, pf: PciAddress, index: u32) -> Result<Option<PciAddress>, Error> {
        Ok(read_virtfn(self.root(), pf, index)?.filter(|a| self.exists(*a)))
    }

    /// Waits (bounded) until `virtfn0..count` resolve to VFs whose directories exist; returns
    /// their addresses in index order.
    pub fn wait_for_vfs(
        &self,
        pf: PciAddress,
        count: u32,
        wait: Duration,
    ) -> Result<Vec<PciAddress>, Error> {
        let deadline = Instant::now() + wait;
        loop {
            let mut found = Vec::with_capacity(count as usize);
            for index in 0..count {
                match self.vf(pf, index).ok().flatten() {
                    Some(a) => found.push(a),
                    None => break,
                }
            }
            if found.len() == count as usize {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(Error::Failed(format!(
                    "timed out after {} ms waiting for the VFs of {pf} to appear ({} of {count} \
                     there); the PF driver may be slow or out of resources",
                    wait.as_millis(),
                    found.len()
                )));
            }
            std::thread::sleep(VF_POLL);
        }
    }
}
