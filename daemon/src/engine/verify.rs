//! `show`'s passthrough readiness and `verify`: a function opened through VFIO the way a VMM
//! opens it, under its group's lock, so a VM starting through us is never disturbed.
//!
//! The race that remains: a VMM that opens `/dev/vfio/N` on its own (not through a lease) at the
//! very moment `verify` holds it gets EBUSY and fails to start; `verify` holds the group for the
//! milliseconds the probe takes. Run it when no VM is being started on that device.

use passthroughd_proto::vfio::{FunctionDetail, VerifyReport};

use super::*;
use crate::kernel::vfio::VfioError;
use crate::observe::guard;
use crate::observe::passthrough;

/// What a VMM running as another user needs, and what every VMM needs for DMA mapping.
const MEMLOCK_NOTE: &str = "the VMM needs RLIMIT_MEMLOCK of at least the guest's RAM to map it \
                            for DMA (LimitMEMLOCK=infinity in its unit, or ulimit -l)";

impl Engine {
    /// One function in full, with whether a VM could be given it now.
    pub fn show(&self, address: PciAddress) -> Result<FunctionDetail, Error> {
        let inventory = self.snapshot()?;
        let function = inventory
            .function(address)
            .cloned()
            .ok_or(Error::NoSuchDevice(address))?;
        let group = function.iommu_group.and_then(|g| inventory.group(g));
        let passthrough = passthrough::readiness(&self.root, &function, group);
        Ok(FunctionDetail {
            function,
            passthrough,
        })
    }

    /// Opens `address` through VFIO as a VMM would (container, group, IOMMU backend, device)
    /// and reports what a VM would get. Refused, without opening anything, while the function
    /// is leased (its VM may be starting) or held open by a process (named).
    pub fn verify(&self, caller: &Caller, address: PciAddress) -> Result<VerifyReport, Error> {
        let (guard, read) = self.lock_and_read(caller, &[address], "a verify")?;
        let view = read.view();
        let f = view
            .inventory
            .function(address)
            .ok_or(Error::NoSuchDevice(address))?;
        if let Some(owner) = view.registry.get(&planner::target_of(f)).and_then(|h| {
            h.claims.iter().find_map(|c| match c {
                Claim::Lease(owner) => Some(owner),
                _ => None,
            })
        }) {
            return Err(Error::Refused {
                address,
                reason: format!(
                    "it is leased to {owner}, whose VM may be starting: opening it now could \
                     keep that VM from starting; verify it before the lease or after it ends"
                ),
            });
        }
        if let Some(finding) = view.snapshot.check_in_use(f) {
            guard::decide(address, &[finding], false)?;
        }
        let group = f.iommu_group.and_then(|g| view.inventory.group(g));
        let mut report = VerifyReport {
            address,
            ready: false,
            problem: None,
            driver: f.driver.clone(),
            iommu_group: f.iommu_group,
            group_viable: group.is_some_and(|g| g.viable),
            group_blockers: group.map(|g| g.blockers.clone()).unwrap_or_default(),
            interrupt_remapping: None,
            iommufd_node: passthrough::iommufd_node(&self.root, f),
            group_node: f
                .iommu_group
                .and_then(|g| passthrough::group_node(&self.root, g)),
            device: None,
            reset_methods: passthrough::reset_methods(&self.root, f),
            notes: Vec::new(),
        };
        // What sysfs already says is in the way: nothing is opened then.
        let readiness = passthrough::readiness(&self.root, f, group);
        if let Some(blocker) = readiness.blocker {
            report.problem = Some(blocker);
            return Ok(report);
        }
        let group_id = f.iommu_group.unwrap_or_default();
        match self.options.vfio.probe(group_id, address) {
            Ok(info) => {
                report.ready = true;
                report.interrupt_remapping = Some(true);
                if !info.flags.reset {
                    report.notes.push(
                        "the kernel cannot reset it (no FLR, PM or bus reset usable): state one \
                         VM leaves in it may reach the next"
                            .into(),
                    );
                }
                report.device = Some(info);
            }
            Err(VfioError::InterruptRemapping { .. }) => {
                report.interrupt_remapping = Some(false);
                report.problem = Some(
                    VfioError::InterruptRemapping {
                        group: group_id,
                        source: std::io::Error::from_raw_os_error(1),
                    }
                    .to_string(),
                );
            }
            // A process opened it after the guard looked: the race described above.
            Err(e @ VfioError::Busy { .. }) => return Err(e.into()),
            Err(e) => report.problem = Some(e.to_string()),
        }
        drop(guard);
        if let Some(node) = &report.group_node
            && node.uid == 0
            && node.mode.ends_with("00")
        {
            report.notes.push(format!(
                "{} is {}:{} mode {}: only a VMM running as root can open it (the config's \
                 owner key gives it to a user)",
                node.path, node.uid, node.gid, node.mode
            ));
        }
        report.notes.push(MEMLOCK_NOTE.into());
        Ok(report)
    }
}
