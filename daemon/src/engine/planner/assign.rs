//! `assign` and `release` as plans.
//!
//! Assign: the requested functions (with `group`, every other non-bridge member of their IOMMU
//! groups not on pcieport), refused before anything is written when a bridge, a function
//! without an IOMMU group, a PF with VFs, a half-assigned group, a protected function or a guard
//! rule says no. Then: guard, load vfio-pci, bind each function not on vfio-pci yet, claim.
//!
//! Release: each function back to the driver it had (or the kernel's choice); refused while a
//! process holds it, or while the config claims it (only editing the config releases those).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use passthroughd_proto::config::ResetPolicy;
use passthroughd_proto::device::driver_is_vfio_safe;
use passthroughd_proto::{AssignOptions, PciAddress, PciFunction, ReleaseOptions};

use crate::engine::plan::{
    Claim, ClaimRecord, LockKey, OnCrash, Operation, Plan, Step, Target, VfSetRecord,
};
use crate::engine::planner::{View, claiming_entry, identity_of, target_of};
use crate::error::Error;
use crate::kernel::driver::VFIO_PCI;
use crate::observe::guard;

/// The lock of a function as the inventory read it.
pub fn lock_key(f: &PciFunction) -> LockKey {
    f.iommu_group
        .map_or(LockKey::Function(f.address), LockKey::Group)
}

/// Looks the requested addresses up; a missing one is NotFound.
pub fn functions<'i>(
    view: &View<'i>,
    addresses: &[PciAddress],
) -> Result<Vec<&'i PciFunction>, Error> {
    addresses
        .iter()
        .map(|a| view.inventory.function(*a).ok_or(Error::NoSuchDevice(*a)))
        .collect()
}

/// Refuses what can never go to vfio-pci: a bridge, a function without an IOMMU group, a PF with
/// VFs enabled, a protected function.
pub fn check_assignable(view: &View<'_>, f: &PciFunction) -> Result<u32, Error> {
    let address = f.address;
    if f.is_bridge() {
        return Err(Error::Refused {
            address,
            reason: "it is a PCI bridge (class 0x06); bridges cannot be assigned, assign the \
                     devices behind it instead"
                .into(),
        });
    }
    if view.config.protect.contains(&address) {
        return Err(Error::Refused {
            address,
            reason: "it is listed in [protect] of the config; nothing ever unbinds it".into(),
        });
    }
    let Some(id) = f.iommu_group else {
        return Err(Error::Refused {
            address,
            reason: "it has no IOMMU group, so the IOMMU is off or not translating it; add \
                     intel_iommu=on (or amd_iommu=on) to the kernel command line"
                .into(),
        });
    };
    if let Some(sriov) = f.sriov.filter(|s| s.num_vfs > 0) {
        return Err(Error::Refused {
            address,
            reason: format!(
                "it is an SR-IOV PF with {} VFs enabled, which vfio-pci refuses; destroy the \
                 VFs first (passthroughctl vf destroy {address})",
                sriov.num_vfs
            ),
        });
    }
    Ok(id)
}

/// The functions an assign of `requested` moves: with `group`, the other members of their
/// groups as well (not bridges, not pcieport); without, a group that would be left half on host
/// drivers is refused, naming the others.
pub fn select(
    view: &View<'_>,
    requested: &[&PciFunction],
    group: bool,
) -> Result<Vec<PciFunction>, Error> {
    let wanted: HashSet<PciAddress> = requested.iter().map(|f| f.address).collect();
    let mut chosen: BTreeMap<PciAddress, PciFunction> = BTreeMap::new();
    for f in requested {
        let id = check_assignable(view, f)?;
        chosen.insert(f.address, (*f).clone());
        let members = view
            .inventory
            .group(id)
            .map(|g| g.members.clone())
            .unwrap_or_default();
        let others: Vec<&PciFunction> = members
            .iter()
            .filter(|m| !wanted.contains(m))
            .filter_map(|m| view.inventory.function(*m))
            .collect();
        if group {
            for m in others {
                if !m.is_bridge() && m.driver.as_deref() != Some("pcieport") {
                    check_assignable(view, m)?;
                    chosen.insert(m.address, m.clone());
                }
            }
        } else {
            let blockers: Vec<String> = others
                .iter()
                .filter(|m| !driver_is_vfio_safe(m.driver.as_deref()))
                .map(|m| {
                    format!(
                        "{} (bound to {})",
                        m.address,
                        m.driver.as_deref().unwrap_or("nothing")
                    )
                })
                .collect();
            if !blockers.is_empty() {
                return Err(Error::Refused {
                    address: f.address,
                    reason: format!(
                        "its IOMMU group {id} also holds {}, which would leave the group \
                         unusable; assign them too, or the whole group with --group",
                        blockers.join(", ")
                    ),
                });
            }
        }
    }
    Ok(chosen.into_values().collect())
}

/// The PF's ids for a VF (what a claim on a VF records), the function's own otherwise.
pub fn claim_identity(
    view: &View<'_>,
    f: &PciFunction,
) -> Result<passthroughd_proto::DeviceIdentity, Error> {
    match f.vf_of {
        None => Ok(identity_of(f)),
        Some(vf) => view
            .inventory
            .function(vf.pf)
            .map(identity_of)
            .ok_or(Error::NoSuchDevice(vf.pf)),
    }
}

/// The steps that put `chosen` on vfio-pci under `claim`: guard, load vfio-pci, binds of the
/// functions not there yet, claims. Checks every guard rule first (`force`: not the soft ones).
pub fn bind_steps(
    view: &View<'_>,
    chosen: &[PciFunction],
    force: bool,
    claim: &Claim,
) -> Result<Vec<Step>, Error> {
    let mut to_move = Vec::new();
    for f in chosen {
        if f.driver.as_deref() == Some(VFIO_PCI) {
            // Already where it should be; the in-use rule does not apply: nothing is unbound.
            continue;
        }
        guard::decide(f.address, &view.snapshot.check(f), force)?;
        to_move.push(f);
    }
    let mut steps = Vec::new();
    if !to_move.is_empty() {
        steps.push(Step::Guard {
            functions: to_move.iter().map(|f| f.address).collect(),
        });
        steps.push(Step::LoadVfio);
        for f in &to_move {
            steps.push(Step::Bind {
                target: target_of(f),
                from: f.driver.clone(),
            });
        }
    }
    for f in chosen {
        let target = target_of(f);
        let previous_driver = match view.registry.get(&target) {
            Some(held) => held.previous_driver.clone(),
            None => f.driver.clone().filter(|d| d != VFIO_PCI),
        };
        steps.push(Step::Claim(ClaimRecord {
            target,
            identity: claim_identity(view, f)?,
            previous_driver,
            claim: claim.clone(),
        }));
    }
    Ok(steps)
}

/// `assign ADDR...`: all or nothing.
pub fn assign(
    view: &View<'_>,
    addresses: &[PciAddress],
    options: AssignOptions,
) -> Result<Plan, Error> {
    let requested = functions(view, addresses)?;
    let chosen = select(view, &requested, options.group)?;
    let claim = if options.runtime {
        Claim::Runtime
    } else {
        Claim::Request
    };
    let on_crash = if options.runtime {
        OnCrash::Undo
    } else {
        OnCrash::Finish
    };
    let locks: BTreeSet<LockKey> = chosen.iter().map(lock_key).collect();
    let mut plan = Plan::new(Operation::Assign, on_crash, locks);
    plan.steps = bind_steps(view, &chosen, options.force, &claim)?;
    Ok(plan)
}

/// `release ADDR...`: each function back to its host driver, and (without `runtime`) its
/// request forgotten. A stored request that could not be applied is simply forgotten.
pub fn release(
    view: &View<'_>,
    addresses: &[PciAddress],
    options: ReleaseOptions,
) -> Result<Plan, Error> {
    let requested = functions(view, addresses)?;
    let locks: BTreeSet<LockKey> = requested.iter().map(|f| lock_key(f)).collect();
    let mut plan = Plan::new(Operation::Release, OnCrash::Finish, locks);
    let mut unbind = Vec::new();
    let mut records = Vec::new();
    for f in &requested {
        let target = target_of(f);
        let held = view.registry.get(&target);
        let in_set = match target {
            Target::Vf { pf, index } => view
                .registry
                .vf_set(pf)
                .filter(|s| s.record.assigned.contains(&index)),
            Target::Function(_) => None,
        };
        let on_vfio = f.driver.as_deref() == Some(VFIO_PCI);
        if held.is_none() && in_set.is_none() && !on_vfio {
            return Err(Error::InvalidArgument(format!(
                "{} is not assigned (it is bound to {}); nothing to release",
                f.address,
                f.driver.as_deref().unwrap_or("nothing")
            )));
        }
        if let Some(owner) = held.and_then(|h| {
            h.claims.iter().find_map(|c| match c {
                Claim::Lease(owner) => Some(owner),
                _ => None,
            })
        }) {
            return Err(Error::Refused {
                address: f.address,
                reason: format!(
                    "it is leased to {owner}; the lease ends with its owner, or with \
                     passthroughctl lease end {owner}"
                ),
            });
        }
        if let Some(entry) = held
            .filter(|h| h.claims.contains(&Claim::Config))
            .and_then(|_| claiming_entry(view.config, view.inventory, f))
        {
            return Err(Error::Refused {
                address: f.address,
                reason: format!(
                    "the config claims it ({entry}); remove or change that entry and run \
                     passthroughctl apply"
                ),
            });
        }
        if on_vfio {
            if let Some(finding) = view.snapshot.check_in_use(f) {
                guard::decide(f.address, &[finding], false)?;
            }
            unbind.push((target, held.and_then(|h| h.previous_driver.clone())));
        }
        let ending: Vec<Claim> = held
            .map(|h| {
                h.claims
                    .iter()
                    .filter(|c| match c {
                        Claim::Runtime => true,
                        Claim::Request => !options.runtime,
                        Claim::Config | Claim::Lease(_) => false,
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if let Some(h) = held {
            for claim in ending {
                records.push(Step::Unclaim(ClaimRecord {
                    target,
                    identity: h.identity,
                    previous_driver: h.previous_driver.clone(),
                    claim,
                }));
            }
        }
        if let (Some(set), Target::Vf { pf, index }) = (in_set, target)
            && !options.runtime
        {
            let mut now = set.record.clone();
            now.assigned.remove(&index);
            records.push(Step::SetVfs {
                pf,
                now: Some(now),
                was: Some(VfSetRecord::clone(&set.record)),
            });
        }
    }
    if !unbind.is_empty() {
        plan.push(Step::Guard {
            functions: requested
                .iter()
                .filter(|f| f.driver.as_deref() == Some(VFIO_PCI))
                .map(|f| f.address)
                .collect(),
        });
        // Every reset before any unbind: VFIO opens a device only while its whole group is
        // still viable.
        if options.reset || view.config.release.reset == ResetPolicy::Always {
            for (target, _) in &unbind {
                plan.push(Step::Reset { target: *target });
            }
        }
        for (target, to) in unbind {
            plan.push(Step::Unbind { target, to });
        }
    }
    plan.steps.extend(records);
    Ok(plan)
}
