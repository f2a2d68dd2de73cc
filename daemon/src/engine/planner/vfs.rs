//! `vf create` and `vf destroy` as plans.
//!
//! Create: with assign, `sriov_drivers_autoprobe` goes to 0 first (so no host VF driver ever
//! probes the new VFs), `sriov_numvfs` to N (through 0 when another count is enabled), the VFs
//! to vfio-pci, autoprobe back. A resize never takes an assigned VF off vfio-pci unless forced,
//! and never touches VFs a process holds.
//!
//! Destroy: the VFs on vfio-pci are taken off it, the count goes to 0, their claims end.

use std::collections::BTreeSet;

use passthroughd_proto::{PciAddress, PciFunction};

use crate::engine::plan::{
    Claim, ClaimRecord, LockKey, OnCrash, Operation, Plan, Step, Target, VfSetRecord,
};
use crate::engine::planner::assign::lock_key;
use crate::engine::planner::{View, identity_of};
use crate::error::Error;
use crate::observe::inventory::Inventory;
use passthroughd_proto::device::driver_is_vfio;

/// What `vf create` is asked for.
#[derive(Debug, Clone)]
pub struct VfCreate {
    pub pf: PciAddress,
    pub count: u32,
    /// VF indexes to put on vfio-pci (`vf create --assign`: all of them).
    pub assign: BTreeSet<u32>,
    pub claim: Claim,
    /// Take assigned VFs off vfio-pci in a resize.
    pub force: bool,
    /// Exactly `assign` on vfio-pci: VFs on vfio-pci that are not in it, and not assigned on
    /// their own, go back to the host VF driver (the config). Without it, VFs assigned before
    /// stay assigned (`vf create` run again).
    pub release_others: bool,
}

/// A VF count a create may ask for at all, before any PF is looked at: 1 to 65535 (the PCI
/// SR-IOV capability counts VFs in 16 bits). The D-Bus service checks it on arrival too.
pub fn check_requested_count(count: u32) -> Result<(), Error> {
    if count == 0 {
        return Err(Error::InvalidArgument(
            "a count of 0 creates no VFs; use vf destroy to remove them".into(),
        ));
    }
    if count > u32::from(u16::MAX) {
        return Err(Error::InvalidArgument(format!(
            "a PF has at most 65535 VFs; {count} asked for"
        )));
    }
    Ok(())
}

/// Checks that `pf` names an SR-IOV physical function.
pub fn check_pf(inventory: &Inventory, pf: PciAddress) -> Result<&PciFunction, Error> {
    let f = inventory.function(pf).ok_or(Error::NoSuchDevice(pf))?;
    if let Some(of) = f.vf_of {
        return Err(Error::InvalidArgument(format!(
            "{pf} is VF {} of {}, not a PF; name the PF ({})",
            of.index, of.pf, of.pf
        )));
    }
    if f.sriov.is_none() {
        return Err(Error::InvalidArgument(format!(
            "{pf} is not SR-IOV capable (it has no sriov_totalvfs); only a PF can have VFs"
        )));
    }
    Ok(f)
}

/// Checks a count against the PF before anything is built from it.
pub fn check_count(pf: &PciFunction, count: u32) -> Result<(), Error> {
    if count == 0 {
        return Err(Error::InvalidArgument(
            "a count of 0 creates no VFs; use vf destroy to remove them".into(),
        ));
    }
    let total = pf.sriov.map_or(0, |s| s.total_vfs);
    if count > total {
        return Err(Error::InvalidArgument(format!(
            "{} supports at most {total} VFs (sriov_totalvfs); {count} asked for",
            pf.address
        )));
    }
    Ok(())
}

/// Whether VF `index` (now `vf`) is assigned: through the daemon, or on a vfio driver anyway.
fn assigned(view: &View<'_>, pf: PciAddress, vf: &PciFunction, index: u32) -> bool {
    view.registry.vf_assigned(pf, index) || driver_is_vfio(vf.driver.as_deref())
}

/// Refuses when a VF is open by a process (always: the kernel would wait for it).
fn check_not_in_use(
    view: &View<'_>,
    pf: PciAddress,
    vfs: &[&PciFunction],
    what: &str,
    force: bool,
) -> Result<(), Error> {
    for vf in vfs {
        if let Some(finding) = view.snapshot.check_in_use(vf) {
            return Err(Error::Busy(format!(
                "cannot {what} the VFs of {pf}: VF {} ({}) {}{}",
                vf.vf_of.map_or(0, |v| v.index),
                vf.address,
                finding.reason.trim_start_matches("it "),
                if force {
                    " (--force does not override this: the kernel would wait for it)"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

/// The claims on VFs that end when the VFs in `gone` (indexes) stop being what they were.
fn unclaims(view: &View<'_>, pf: PciAddress, gone: impl Fn(u32) -> bool) -> Vec<Step> {
    view.registry
        .vfs_of(pf)
        .filter(|(index, _)| gone(*index))
        .flat_map(|(index, held)| {
            held.claims.iter().map(move |claim| {
                Step::Unclaim(ClaimRecord {
                    target: Target::Vf { pf, index },
                    identity: held.identity,
                    previous_driver: held.previous_driver.clone(),
                    claim: claim.clone(),
                })
            })
        })
        .collect()
}

/// `vf create PF --count N [--assign]`.
pub fn create(view: &View<'_>, request: &VfCreate) -> Result<Plan, Error> {
    let pf = request.pf;
    let f = check_pf(view.inventory, pf)?;
    check_count(f, request.count)?;
    let Some(sriov) = f.sriov else {
        return Err(Error::Failed(format!("{pf} lost its SR-IOV capability")));
    };
    let count = request.count;
    let previous = sriov.num_vfs;
    let resize = previous != count;
    let existing = view.inventory.vfs_of(pf);
    let index_of = |vf: &PciFunction| vf.vf_of.map_or(0, |v| v.index);
    if resize {
        match f.driver.as_deref() {
            Some(d) if driver_is_vfio(Some(d)) => {
                return Err(Error::Refused {
                    address: pf,
                    reason: "it is bound to vfio-pci, which cannot enable VFs; release it to \
                             its host driver first (passthroughctl release)"
                        .into(),
                });
            }
            None => {
                return Err(Error::Refused {
                    address: pf,
                    reason: "it has no driver, and its host driver is what enables VFs; bind \
                             it first (or release it)"
                        .into(),
                });
            }
            Some(_) => {}
        }
        check_not_in_use(view, pf, &existing, "resize", request.force)?;
        // A resize recreates every VF: a leased one would vanish under its owner.
        check_not_leased(view, pf, &existing)?;
        // A resize recreates every VF: the assigned ones must stay on vfio-pci (every new VF
        // is, with --assign, except those beyond the new count), unless forced.
        let lost: Vec<String> = existing
            .iter()
            .filter(|vf| assigned(view, pf, vf, index_of(vf)))
            .filter(|vf| !request.assign.contains(&index_of(vf)))
            .map(|vf| format!("VF {} ({})", index_of(vf), vf.address))
            .collect();
        if !lost.is_empty() && !request.force {
            return Err(Error::Refused {
                address: pf,
                reason: format!(
                    "changing its VF count from {previous} to {count} would take {} off \
                     vfio-pci; use --assign to keep every VF on vfio-pci, or --force",
                    lost.join(", ")
                ),
            });
        }
    }
    let mut locks: BTreeSet<LockKey> = existing.iter().map(|vf| lock_key(vf)).collect();
    locks.insert(lock_key(f));
    let on_crash = if request.claim.is_persistent() {
        OnCrash::Finish
    } else {
        OnCrash::Undo
    };
    let mut plan = Plan::new(Operation::VfCreate, on_crash, locks);
    let old_set = view.registry.vf_set(pf).map(|s| s.record.clone());
    let mut assigned_now: BTreeSet<u32> = request.assign.clone();
    if resize {
        plan.push(Step::Guard {
            functions: existing.iter().map(|vf| vf.address).collect(),
        });
        if !request.assign.is_empty() {
            plan.push(Step::LoadVfio);
        }
        // Only new VFs can be probed: with nothing to assign, nothing to keep from the host
        // driver.
        let autoprobe_off = !request.assign.is_empty() && sriov.drivers_autoprobe;
        if autoprobe_off {
            plan.push(Step::SetAutoprobe {
                pf,
                on: false,
                was: true,
            });
        }
        plan.push(Step::SetNumVfs {
            pf,
            count,
            was: previous,
            was_on_vfio: existing
                .iter()
                .filter(|vf| driver_is_vfio(vf.driver.as_deref()))
                .map(|vf| index_of(vf))
                .collect(),
        });
        for &index in &request.assign {
            plan.push(Step::Bind {
                target: Target::Vf { pf, index },
                from: None,
            });
        }
        if autoprobe_off {
            plan.push(Step::SetAutoprobe {
                pf,
                on: true,
                was: false,
            });
            for index in (0..count).filter(|i| !request.assign.contains(i)) {
                plan.push(Step::Probe {
                    target: Target::Vf { pf, index },
                });
            }
        }
        // Claims on VFs that are gone or no longer on vfio-pci end.
        let kept = request.assign.clone();
        plan.steps
            .extend(unclaims(view, pf, |i| !kept.contains(&i)));
    } else {
        // Same count: only the VFs asked for that are not on vfio-pci yet move.
        let to_bind: Vec<&&PciFunction> = existing
            .iter()
            .filter(|vf| request.assign.contains(&index_of(vf)))
            .filter(|vf| !driver_is_vfio(vf.driver.as_deref()))
            .collect();
        if !to_bind.is_empty() {
            let moved: Vec<&PciFunction> = to_bind.iter().map(|vf| **vf).collect();
            for vf in &moved {
                crate::observe::guard::decide(vf.address, &view.snapshot.check(vf), false)?;
            }
            plan.push(Step::Guard {
                functions: moved.iter().map(|vf| vf.address).collect(),
            });
            plan.push(Step::LoadVfio);
            for vf in moved {
                plan.push(Step::Bind {
                    target: Target::Vf {
                        pf,
                        index: index_of(vf),
                    },
                    from: vf.driver.clone(),
                });
            }
        }
        if request.release_others {
            for vf in &existing {
                let index = index_of(vf);
                if !request.assign.contains(&index)
                    && driver_is_vfio(vf.driver.as_deref())
                    && view.registry.get(&Target::Vf { pf, index }).is_none()
                {
                    if let Some(finding) = view.snapshot.check_in_use(vf) {
                        crate::observe::guard::decide(vf.address, &[finding], false)?;
                    }
                    plan.push(Step::Unbind {
                        target: Target::Vf { pf, index },
                        to: None,
                    });
                }
            }
        } else if let Some(old) = &old_set {
            assigned_now.extend(old.assigned.iter().copied());
        }
    }
    let set = VfSetRecord {
        identity: identity_of(f),
        count,
        assigned: assigned_now,
        claim: strongest(old_set.as_ref().map(|s| &s.claim), &request.claim),
    };
    if old_set.as_ref() != Some(&set) {
        plan.push(Step::SetVfs {
            pf,
            now: Some(set),
            was: old_set,
        });
    }
    Ok(plan)
}

/// A persistent claim is not downgraded by a runtime request on the same VFs.
fn strongest(old: Option<&Claim>, new: &Claim) -> Claim {
    match old {
        Some(old) if old.is_persistent() && !new.is_persistent() => old.clone(),
        _ => new.clone(),
    }
}

/// A leased VF belongs to its owner until the lease ends: never removed, not even with
/// `--force` (its VM may be about to start).
fn check_not_leased(view: &View<'_>, pf: PciAddress, vfs: &[&PciFunction]) -> Result<(), Error> {
    for vf in vfs {
        let index = vf.vf_of.map_or(0, |v| v.index);
        let owner = view.registry.get(&Target::Vf { pf, index }).and_then(|h| {
            h.claims.iter().find_map(|c| match c {
                Claim::Lease(owner) => Some(owner),
                _ => None,
            })
        });
        if let Some(owner) = owner {
            return Err(Error::Refused {
                address: pf,
                reason: format!(
                    "VF {index} ({}) is leased to {owner}; the lease ends with its owner, or \
                     with passthroughctl lease end {owner} (--force does not override this)",
                    vf.address
                ),
            });
        }
    }
    Ok(())
}

/// `vf destroy PF [--force]`.
pub fn destroy(view: &View<'_>, pf: PciAddress, force: bool) -> Result<Plan, Error> {
    let f = check_pf(view.inventory, pf)?;
    let vfs = view.inventory.vfs_of(pf);
    check_not_in_use(view, pf, &vfs, "destroy", force)?;
    check_not_leased(view, pf, &vfs)?;
    if !force {
        // Destroying takes every VF off vfio-pci: refused for assigned ones unless forced.
        let mut persistent = false;
        let assigned: Vec<String> = vfs
            .iter()
            .filter_map(|vf| {
                let index = vf.vf_of.map_or(0, |v| v.index);
                assigned(view, pf, vf, index).then(|| {
                    persistent |= view
                        .registry
                        .get(&Target::Vf { pf, index })
                        .is_some_and(|h| h.is_persistent())
                        || view.registry.vf_set(pf).is_some_and(|s| {
                            s.record.claim.is_persistent() && s.record.assigned.contains(&index)
                        });
                    format!("VF {index} ({})", vf.address)
                })
            })
            .collect();
        if !assigned.is_empty() {
            return Err(Error::Refused {
                address: pf,
                reason: format!(
                    "{} {} assigned{}; release {} first or use --force",
                    assigned.join(", "),
                    if assigned.len() == 1 { "is" } else { "are" },
                    if persistent { " persistently" } else { "" },
                    if assigned.len() == 1 { "it" } else { "them" },
                ),
            });
        }
    }
    let mut locks: BTreeSet<LockKey> = vfs.iter().map(|vf| lock_key(vf)).collect();
    locks.insert(lock_key(f));
    let mut plan = Plan::new(Operation::VfDestroy, OnCrash::Finish, locks);
    let previous = f.sriov.map_or(0, |s| s.num_vfs);
    let on_vfio: Vec<&&PciFunction> = vfs
        .iter()
        .filter(|vf| driver_is_vfio(vf.driver.as_deref()))
        .collect();
    if previous > 0 {
        plan.push(Step::Guard {
            functions: vfs.iter().map(|vf| vf.address).collect(),
        });
        for vf in &on_vfio {
            plan.push(Step::Detach {
                target: Target::Vf {
                    pf,
                    index: vf.vf_of.map_or(0, |v| v.index),
                },
            });
        }
        plan.push(Step::SetNumVfs {
            pf,
            count: 0,
            was: previous,
            was_on_vfio: on_vfio
                .iter()
                .map(|vf| vf.vf_of.map_or(0, |v| v.index))
                .collect(),
        });
    }
    plan.steps.extend(unclaims(view, pf, |_| true));
    if let Some(set) = view.registry.vf_set(pf) {
        plan.push(Step::SetVfs {
            pf,
            now: None,
            was: Some(set.record.clone()),
        });
    }
    Ok(plan)
}
