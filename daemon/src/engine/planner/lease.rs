//! Leases as plans: a named owner (a libvirt domain, a Kubernetes claim, another VMM) takes a set
//! of functions, all or nothing, and gives back exactly what it took.
//!
//! Start: refused when a function is leased to another owner (naming it), or when a function's
//! IOMMU group has other endpoints the owner does not take too (naming them: a VM needs the whole
//! group). A function already assigned (a request, the config) is used as it is and stays
//! assigned; the others are bound as `assign` binds, with every guard rule.
//!
//! End: each function leased by the owner loses that claim; one nothing else claims goes back
//! to the driver it had before (refused while a process still holds it).

use std::collections::{BTreeSet, HashSet};

use passthroughd_proto::config::ResetPolicy;
use passthroughd_proto::{LeaseOwner, PciAddress, PciFunction};

use crate::engine::plan::{Claim, ClaimRecord, LockKey, OnCrash, Operation, Plan, Step};
use crate::engine::planner::assign::{bind_steps, check_assignable, functions, lock_key};
use crate::engine::planner::{View, kept_by_others, target_of};
use crate::error::Error;
use crate::kernel::driver::VFIO_PCI;
use crate::observe::guard;

/// The owner of another lease on `f`, if any.
fn leased_to<'v>(view: &View<'v>, f: &PciFunction, owner: &LeaseOwner) -> Option<&'v LeaseOwner> {
    view.registry.get(&target_of(f)).and_then(|held| {
        held.claims.iter().find_map(|c| match c {
            Claim::Lease(other) if other != owner => Some(other),
            _ => None,
        })
    })
}

/// `LeaseStart(owner, addresses)`.
pub fn start(view: &View<'_>, owner: &LeaseOwner, addresses: &[PciAddress]) -> Result<Plan, Error> {
    let requested = functions(view, addresses)?;
    let wanted: HashSet<PciAddress> = addresses.iter().copied().collect();
    for f in &requested {
        if let Some(other) = leased_to(view, f, owner) {
            return Err(Error::Refused {
                address: f.address,
                reason: format!("it is leased to {other}"),
            });
        }
        let group = check_assignable(view, f)?;
        let missing: Vec<String> = view
            .inventory
            .group(group)
            .map(|g| g.members.clone())
            .unwrap_or_default()
            .iter()
            .filter(|m| !wanted.contains(m))
            .filter_map(|m| view.inventory.function(*m))
            .filter(|m| !m.is_bridge() && m.driver.as_deref() != Some("pcieport"))
            .map(|m| m.address.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Refused {
                address: f.address,
                reason: format!(
                    "its IOMMU group {group} also holds {}; a lease takes the whole group: \
                     list them in the same lease",
                    missing.join(", ")
                ),
            });
        }
    }
    let chosen: Vec<PciFunction> = requested.iter().map(|f| (*f).clone()).collect();
    let locks: BTreeSet<LockKey> = chosen.iter().map(lock_key).collect();
    let mut plan = Plan::new(Operation::LeaseStart, OnCrash::Finish, locks);
    let claim = Claim::Lease(owner.clone());
    plan.steps = bind_steps(view, &chosen, false, &claim)?
        .into_iter()
        .filter(|s| match s {
            Step::Claim(r) => !view.registry.claims_of(&r.target).contains(&r.claim),
            _ => true,
        })
        .collect();
    Ok(plan)
}

/// `LeaseEnd(owner)`: what the owner leased, back where it was unless something else claims it.
/// `functions` is the inventory's view of the leased functions (read under their locks).
pub fn end(view: &View<'_>, owner: &LeaseOwner) -> Result<Plan, Error> {
    let claim = Claim::Lease(owner.clone());
    let held: Vec<_> = view
        .registry
        .functions()
        .filter(|(_, h)| h.claims.contains(&claim))
        .collect();
    if held.is_empty() {
        return Err(Error::NoLease(owner.clone()));
    }
    let mut locks = BTreeSet::new();
    let mut unbind = Vec::new();
    let mut records = Vec::new();
    for (target, h) in held {
        let f = view
            .inventory
            .functions
            .iter()
            .find(|f| target_of(f) == *target);
        if let Some(f) = f {
            locks.insert(lock_key(f));
            let others = kept_by_others(view, target, h.claims.len());
            if !others && f.driver.as_deref() == Some(VFIO_PCI) {
                if let Some(finding) = view.snapshot.check_in_use(f) {
                    guard::decide(f.address, &[finding], false)?;
                }
                unbind.push((f.address, *target, h.previous_driver.clone()));
            }
        }
        records.push(Step::Unclaim(ClaimRecord {
            target: *target,
            identity: h.identity,
            previous_driver: h.previous_driver.clone(),
            claim: claim.clone(),
        }));
    }
    let mut plan = Plan::new(Operation::LeaseEnd, OnCrash::Finish, locks);
    if !unbind.is_empty() {
        plan.push(Step::Guard {
            functions: unbind.iter().map(|(a, _, _)| *a).collect(),
        });
        if view.config.release.reset != ResetPolicy::Never {
            for (_, target, _) in &unbind {
                plan.push(Step::Reset { target: *target });
            }
        }
        for (_, target, to) in unbind {
            plan.push(Step::Unbind { target, to });
        }
    }
    plan.steps.extend(records);
    Ok(plan)
}
