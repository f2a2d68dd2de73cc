//! The desired state as plans: the declarative config, stored requests, and what the config
//! claimed before but no longer does.
//!
//! Planned in two phases, because the functions the second one names may not exist before the
//! first one ran: [`Phase::Vfs`] creates the VFs of `[[sriov]]` entries and of stored `vf create`
//! requests; [`Phase::Functions`] puts `[[device]]` entries and stored requests on vfio-pci and
//! releases what the config let go. Each part is a [`Unit`] of its own, all or nothing, so one
//! refused or failing entry never holds back the others; what cannot be done is a [`Refusal`].
//!
//! Who wins: a function claimed by the config is released only when no entry claims it any more
//! (and nothing else does). Changes made behind the daemon's back (drift) are planned back like
//! anything else missing, so `apply` and every start undo them.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use passthroughd_proto::config::{Config, DriverChoice, ResetPolicy, Selector};
use passthroughd_proto::device::driver_is_vfio;
use passthroughd_proto::{PciAddress, PciFunction, PlannedChange, PlannedVfs, Refusal};

use crate::engine::plan::{Claim, ClaimRecord, LockKey, OnCrash, Operation, Plan, Step, Target};
use crate::engine::planner::assign::{
    bind_steps, check_assignable, claim_identity, lock_key, select,
};
use crate::engine::planner::vfs::{self, VfCreate};
use crate::engine::planner::{View, identity_of, kept_by_others, show_identity, target_of};
use crate::error::Error;
use crate::kernel::driver::VFIO_PCI;
use crate::observe::guard::{self, Severity};

/// Which half of the desired state to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// VF counts and the VFs they assign.
    Vfs,
    /// Functions to vfio-pci, and the config's releases.
    Functions,
}

/// One independent part of the desired state: a label for people and the plan that does it.
#[derive(Debug, Clone)]
pub struct Unit {
    pub label: String,
    pub plan: Plan,
}

impl Unit {
    /// What the plan changes, one line per function.
    pub fn changes(&self) -> Vec<PlannedChange> {
        self.plan
            .steps
            .iter()
            .filter_map(|s| {
                let (target, from, to) = match s {
                    Step::Bind { target, from } => (target, from.clone(), Some(VFIO_PCI.into())),
                    Step::Unbind { target, to } => (
                        target,
                        Some(VFIO_PCI.into()),
                        Some(to.clone().unwrap_or_else(|| "its host driver".into())),
                    ),
                    Step::Probe { target } => (target, None, Some("its host VF driver".into())),
                    _ => return None,
                };
                Some(PlannedChange {
                    entry: self.label.clone(),
                    function: target.to_string(),
                    from,
                    to,
                })
            })
            .collect()
    }

    /// What the plan changes of VF counts.
    pub fn vfs(&self) -> Vec<PlannedVfs> {
        self.plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::SetNumVfs { pf, count, was, .. } => Some(PlannedVfs {
                    entry: self.label.clone(),
                    pf: *pf,
                    from: *was,
                    to: *count,
                }),
                _ => None,
            })
            .collect()
    }
}

/// What one phase comes to.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub units: Vec<Unit>,
    pub refused: Vec<Refusal>,
    /// Stored requests that cannot be carried out now, and why (for `status`); `None` for the
    /// ones that are carried out or already are.
    pub requests: Vec<(Target, Option<String>)>,
    /// Stored VF sets, likewise.
    pub vf_sets: Vec<(PciAddress, Option<String>)>,
}

impl Outcome {
    fn refuse(&mut self, entry: &str, function: Option<String>, reason: impl Into<String>) {
        self.refused.push(Refusal {
            entry: entry.to_owned(),
            function,
            reason: reason.into(),
        });
    }

    fn unit(&mut self, label: String, plan: Plan) {
        if !plan.is_empty() {
            self.units.push(Unit { label, plan });
        }
    }
}

/// What to plan besides the config entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope<'a> {
    /// The config is known: apply its entries and release what it let go. False while no good
    /// version of it was ever read: then nothing it claimed may be released by mistake.
    pub config: bool,
    /// Skip stored requests let go by `release --runtime` (they come back at the next start).
    pub skip_suspended: bool,
    /// Only these functions (a hotplug event names them): nothing else is touched, nothing is
    /// released, and a PF's VF count is set only when the PF itself appeared.
    pub only: Option<&'a HashSet<PciAddress>>,
}

impl Scope<'_> {
    fn names(&self, address: PciAddress) -> bool {
        self.only.is_none_or(|only| only.contains(&address))
    }
}

/// Plans `phase` of the desired state: the config (see [`Scope`]) and the stored requests.
/// `view` must hold the whole host (match rules look at every function).
pub fn plan(view: &View<'_>, phase: Phase, scope: Scope<'_>) -> Outcome {
    let mut out = Outcome::default();
    let everything = scope.only.is_none();
    match phase {
        Phase::Vfs => {
            if scope.config {
                plan_sriov_entries(view, scope, &mut out);
                if everything {
                    plan_forgotten_vf_sets(view, &mut out);
                }
            }
            plan_stored_vf_sets(view, scope, &mut out);
        }
        Phase::Functions => {
            if scope.config {
                let wanted = plan_device_entries(view, scope, &mut out);
                if everything {
                    plan_config_releases(view, &wanted, &mut out);
                }
            }
            plan_stored_requests(view, scope, &mut out);
        }
    }
    out
}

/// Config keys that are read and checked but do nothing yet, one note each.
pub fn not_in_effect(config: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    for d in &config.devices {
        if d.driver == DriverChoice::Auto {
            notes.push(format!(
                "{}: driver = \"auto\" is not in effect yet; vfio-pci is used",
                d.label()
            ));
        }
        if let Some(owner) = &d.owner {
            notes.push(format!(
                "{}: owner = \"{owner}\" is not in effect yet; /dev/vfio/N stays root's",
                d.label()
            ));
        }
    }
    for s in &config.sriov {
        if s.driver == DriverChoice::Auto {
            notes.push(format!(
                "{}: driver = \"auto\" is not in effect yet; vfio-pci is used",
                s.label()
            ));
        }
        if let Some(owner) = &s.owner {
            notes.push(format!(
                "{}: owner = \"{owner}\" is not in effect yet; /dev/vfio/N stays root's",
                s.label()
            ));
        }
    }
    notes
}

fn plan_sriov_entries(view: &View<'_>, scope: Scope<'_>, out: &mut Outcome) {
    for entry in &view.config.sriov {
        let label = entry.label();
        let pf = entry.pf;
        if !scope.names(pf) {
            // Only some of its VFs appeared (someone else made them): those of them the entry
            // assigns go to vfio-pci, if the count is the entry's; the count is never changed
            // for VFs (that would remove the VFs just made).
            plan_sriov_vfs_appeared(view, scope, entry, out);
            continue;
        }
        let Some(f) = view.inventory.function(pf) else {
            out.refuse(&label, Some(pf.to_string()), "no such PCI function now");
            continue;
        };
        if !entry.identity.accepts(f.vendor_id, f.device_id) {
            out.refuse(
                &label,
                Some(pf.to_string()),
                format!(
                    "the address holds {}, not the {} the entry names",
                    show_identity(&identity_of(f)),
                    show_guard(entry.identity)
                ),
            );
            continue;
        }
        let count = u32::from(entry.count);
        let assign: BTreeSet<u32> = (0..count).filter(|i| entry.assign.contains(*i)).collect();
        if let Some(set) = view.registry.vf_set(pf)
            && set.record.claim != Claim::Config
            && set.record.count != count
        {
            out.refuse(
                &label,
                Some(pf.to_string()),
                format!(
                    "{pf} has {} VFs from a `vf create` request; the entry wants {count}: \
                     remove them with passthroughctl vf destroy {pf} first",
                    set.record.count
                ),
            );
            continue;
        }
        // VFs that requests assigned on their own keep their claim: a resize recreates every
        // VF, so one the entry does not assign would leave vfio-pci. Refused, naming them.
        let resize = f.sriov.is_some_and(|s| s.num_vfs != count);
        let claimed: Vec<String> = view
            .registry
            .vfs_of(pf)
            .filter(|(index, _)| resize && !assign.contains(index))
            .map(|(index, _)| format!("VF {index}"))
            .collect();
        if !claimed.is_empty() {
            out.refuse(
                &label,
                Some(pf.to_string()),
                format!(
                    "{} of {pf} assigned by a request would leave vfio-pci; release it first",
                    claimed.join(", ")
                ),
            );
            continue;
        }
        let request = VfCreate {
            pf,
            count,
            assign,
            claim: Claim::Config,
            force: true,
            release_others: true,
        };
        match vfs::create(view, &request) {
            Ok(plan) => out.unit(label, plan),
            Err(e) => out.refuse(&label, Some(pf.to_string()), reason(&e)),
        }
    }
}

/// The VFs of a configured PF named by a hotplug event, when the PF itself was not.
fn plan_sriov_vfs_appeared(
    view: &View<'_>,
    scope: Scope<'_>,
    entry: &passthroughd_proto::config::SriovEntry,
    out: &mut Outcome,
) {
    let appeared: BTreeSet<u32> = view
        .inventory
        .vfs_of(entry.pf)
        .into_iter()
        .filter(|vf| scope.names(vf.address))
        .filter_map(|vf| vf.vf_of.map(|v| v.index))
        .collect();
    if appeared.is_empty() {
        return;
    }
    let label = entry.label();
    let count = u32::from(entry.count);
    let now = view
        .inventory
        .function(entry.pf)
        .and_then(|f| f.sriov)
        .map_or(0, |s| s.num_vfs);
    if now != count {
        out.refuse(
            &label,
            Some(entry.pf.to_string()),
            format!(
                "{} has {now} VFs, made outside the daemon; the entry wants {count}: \
                 passthroughctl apply sets the count",
                entry.pf
            ),
        );
        return;
    }
    let assign: BTreeSet<u32> = appeared
        .into_iter()
        .filter(|i| entry.assign.contains(*i))
        .collect();
    if assign.is_empty() {
        return;
    }
    let request = VfCreate {
        pf: entry.pf,
        count,
        assign,
        claim: Claim::Config,
        force: false,
        release_others: false,
    };
    match vfs::create(view, &request) {
        Ok(plan) => out.unit(label, plan),
        Err(e) => out.refuse(&label, Some(entry.pf.to_string()), reason(&e)),
    }
}

/// VF sets the config made whose `[[sriov]]` entry is gone: their VFs are removed.
fn plan_forgotten_vf_sets(view: &View<'_>, out: &mut Outcome) {
    let configured: HashSet<PciAddress> = view.config.sriov.iter().map(|s| s.pf).collect();
    for (pf, set) in view.registry.vf_sets() {
        if set.record.claim != Claim::Config || configured.contains(pf) {
            continue;
        }
        let label = format!("removed [[sriov]] {pf}");
        let Some(f) = view.inventory.function(*pf) else {
            // Nothing to remove; only the record goes.
            let mut plan = Plan::new(Operation::Apply, OnCrash::Finish, BTreeSet::new());
            plan.push(Step::SetVfs {
                pf: *pf,
                now: None,
                was: Some(set.record.clone()),
            });
            out.unit(label, plan);
            continue;
        };
        if identity_of(f) != set.record.identity {
            let mut plan = Plan::new(Operation::Apply, OnCrash::Finish, BTreeSet::new());
            plan.push(Step::SetVfs {
                pf: *pf,
                now: None,
                was: Some(set.record.clone()),
            });
            out.unit(label, plan);
            continue;
        }
        let others: Vec<String> = view
            .registry
            .vfs_of(*pf)
            .map(|(index, _)| format!("VF {index}"))
            .collect();
        if !others.is_empty() {
            out.refuse(
                &label,
                Some(pf.to_string()),
                format!(
                    "{} assigned by a request; release it before the VFs are removed",
                    others.join(", ")
                ),
            );
            continue;
        }
        match vfs::destroy(view, *pf, true) {
            Ok(mut plan) => {
                plan.operation = Operation::Apply;
                out.unit(label, plan);
            }
            Err(e) => out.refuse(&label, Some(pf.to_string()), reason(&e)),
        }
    }
}

/// VF sets stored from `vf create` without `--runtime`: recreated when missing.
fn plan_stored_vf_sets(view: &View<'_>, scope: Scope<'_>, out: &mut Outcome) {
    let configured: HashSet<PciAddress> = view.config.sriov.iter().map(|s| s.pf).collect();
    for (pf, set) in view.registry.vf_sets() {
        if set.record.claim != Claim::Request || configured.contains(pf) || !scope.names(*pf) {
            continue;
        }
        let label = format!("stored vf create {pf}");
        let why = match view.inventory.function(*pf) {
            None => Some("no device at the PF's address any more".to_owned()),
            Some(f) if identity_of(f) != set.record.identity => Some(format!(
                "the PF address now holds {} instead of {}",
                show_identity(&identity_of(f)),
                show_identity(&set.record.identity)
            )),
            Some(_) => None,
        };
        if let Some(why) = why {
            out.refuse(&label, Some(pf.to_string()), why.clone());
            out.vf_sets.push((*pf, Some(why)));
            continue;
        }
        let request = VfCreate {
            pf: *pf,
            count: set.record.count,
            assign: set.record.assigned.clone(),
            claim: Claim::Request,
            force: false,
            release_others: false,
        };
        match vfs::create(view, &request) {
            Ok(plan) => {
                out.vf_sets.push((*pf, None));
                out.unit(label, plan);
            }
            Err(e) => {
                out.refuse(&label, Some(pf.to_string()), reason(&e));
                out.vf_sets.push((*pf, Some(reason(&e))));
            }
        }
    }
}

/// `[[device]]` entries: each selected function (or group) to vfio-pci under a config claim.
/// Returns every target an entry selects, whether or not it could be carried out now.
fn plan_device_entries(view: &View<'_>, scope: Scope<'_>, out: &mut Outcome) -> HashSet<Target> {
    let mut wanted = HashSet::new();
    // A function two entries select is bound by the first.
    let mut taken: HashSet<PciAddress> = HashSet::new();
    for entry in &view.config.devices {
        let label = entry.label();
        let selected: Vec<&PciFunction> = match &entry.selector {
            // An event names another function of the host: this entry is not its business,
            // unless the entry takes a whole group the named function belongs to.
            Selector::Address { address, .. }
                if !(scope.names(*address)
                    || entry.group && group_named(view, scope, *address)) =>
            {
                continue;
            }
            Selector::Address { address, identity } => {
                let Some(f) = view.inventory.function(*address) else {
                    out.refuse(
                        &label,
                        Some(address.to_string()),
                        "no such PCI function now",
                    );
                    continue;
                };
                wanted.insert(target_of(f));
                if !identity.accepts(f.vendor_id, f.device_id) {
                    out.refuse(
                        &label,
                        Some(address.to_string()),
                        format!(
                            "the address holds {}, not the {} the entry names",
                            show_identity(&identity_of(f)),
                            show_guard(*identity)
                        ),
                    );
                    continue;
                }
                vec![f]
            }
            Selector::Match(rule) => view
                .inventory
                .functions
                .iter()
                .filter(|f| rule.matches(f) && !f.is_bridge() && scope.names(f.address))
                .collect(),
        };
        // One unit per IOMMU group: a refused group never holds back another.
        let mut by_group: BTreeMap<LockKey, Vec<&PciFunction>> = BTreeMap::new();
        for f in selected {
            wanted.insert(target_of(f));
            if view.config.protect.contains(&f.address) {
                out.refuse(
                    &label,
                    Some(f.address.to_string()),
                    "it is listed in [protect]; [protect] wins",
                );
                continue;
            }
            if taken.insert(f.address) {
                by_group.entry(lock_key(f)).or_default().push(f);
            }
        }
        for (key, functions) in by_group {
            let result = select(view, &functions, entry.group).and_then(|chosen| {
                for f in &chosen {
                    wanted.insert(target_of(f));
                    taken.insert(f.address);
                }
                let steps = bind_steps(view, &chosen, entry.force, &Claim::Config)?;
                let mut plan = Plan::new(Operation::Apply, OnCrash::Finish, [key].into());
                plan.locks.extend(chosen.iter().map(lock_key));
                plan.steps = without_held_claims(view, steps);
                Ok(plan)
            });
            match result {
                Ok(plan) => out.unit(label.clone(), plan),
                Err(e) => out.refuse(
                    &label,
                    Some(
                        functions
                            .iter()
                            .map(|f| f.address.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                    reason(&e),
                ),
            }
        }
    }
    wanted
}

/// Functions the config claimed before and no entry selects now: the claim ends, and the
/// function goes back to its host driver unless something else still claims it.
fn plan_config_releases(view: &View<'_>, wanted: &HashSet<Target>, out: &mut Outcome) {
    for (target, held) in view.registry.functions() {
        if !held.claims.contains(&Claim::Config) || wanted.contains(target) {
            continue;
        }
        let label = format!("released from the config: {target}");
        let unclaim = Step::Unclaim(ClaimRecord {
            target: *target,
            identity: held.identity,
            previous_driver: held.previous_driver.clone(),
            claim: Claim::Config,
        });
        let f = find(view, target);
        let others = kept_by_others(view, target, held.claims.len());
        let on_vfio = f.is_some_and(|f| driver_is_vfio(f.driver.as_deref()));
        let locks: BTreeSet<LockKey> = f.map(lock_key).into_iter().collect();
        let mut plan = Plan::new(Operation::Apply, OnCrash::Finish, locks);
        if let Some(f) = f.filter(|_| on_vfio && !others) {
            if let Some(finding) = view.snapshot.check_in_use(f) {
                out.refuse(&label, Some(f.address.to_string()), finding.reason);
                continue;
            }
            plan.push(Step::Guard {
                functions: vec![f.address],
            });
            if view.config.release.reset == ResetPolicy::Always {
                plan.push(Step::Reset { target: *target });
            }
            plan.push(Step::Unbind {
                target: *target,
                to: held.previous_driver.clone(),
            });
        }
        plan.push(unclaim);
        out.unit(label, plan);
    }
}

/// Stored requests (`assign` without `--runtime`): each claimed function not on vfio-pci goes
/// back there, if it is still the device that was claimed and the hard rules allow it (the soft
/// ones were the admin's call when the request was made).
fn plan_stored_requests(view: &View<'_>, scope: Scope<'_>, out: &mut Outcome) {
    for (target, held) in view.registry.functions() {
        if !held.claims.contains(&Claim::Request) || (scope.skip_suspended && held.suspended) {
            continue;
        }
        if scope.only.is_some() && !find(view, target).is_some_and(|f| scope.names(f.address)) {
            continue;
        }
        let label = format!("stored request {target}");
        let result = (|| -> Result<Option<Plan>, String> {
            let f = find(view, target).ok_or_else(|| match target {
                Target::Function(_) => "no device at this address any more".to_owned(),
                Target::Vf { pf, index } => format!("{pf} has no VF {index} now"),
            })?;
            let now = claim_identity(view, f).map_err(|e| reason(&e))?;
            if now != held.identity {
                return Err(format!(
                    "the address now holds {} instead of {}",
                    show_identity(&now),
                    show_identity(&held.identity)
                ));
            }
            if f.driver.as_deref() == Some(VFIO_PCI) {
                return Ok(None);
            }
            check_assignable(view, f).map_err(|e| reason(&e))?;
            let findings: Vec<_> = view
                .snapshot
                .check(f)
                .into_iter()
                .filter(|x| x.severity != Severity::Soft)
                .collect();
            guard::decide(f.address, &findings, true).map_err(|e| reason(&e))?;
            let mut plan = Plan::new(Operation::Apply, OnCrash::Finish, [lock_key(f)].into());
            plan.push(Step::Guard {
                functions: vec![f.address],
            });
            plan.push(Step::LoadVfio);
            plan.push(Step::Bind {
                target: *target,
                from: f.driver.clone(),
            });
            Ok(Some(plan))
        })();
        match result {
            Ok(plan) => {
                out.requests.push((*target, None));
                if let Some(plan) = plan {
                    out.unit(label, plan);
                }
            }
            Err(why) => {
                out.refuse(&label, Some(target.to_string()), why.clone());
                out.requests.push((*target, Some(why)));
            }
        }
    }
}

/// Whether a function of `address`'s IOMMU group is named by the scope.
fn group_named(view: &View<'_>, scope: Scope<'_>, address: PciAddress) -> bool {
    let Some(group) = view.inventory.function(address).and_then(|f| f.iommu_group) else {
        return false;
    };
    view.inventory
        .group(group)
        .is_some_and(|g| g.members.iter().any(|m| scope.names(*m)))
}

/// The function a target names now, if the view has it.
fn find<'i>(view: &View<'i>, target: &Target) -> Option<&'i PciFunction> {
    match *target {
        Target::Function(a) => view.inventory.function(a),
        Target::Vf { pf, index } => view
            .inventory
            .vfs_of(pf)
            .into_iter()
            .find(|f| f.vf_of.is_some_and(|v| v.index == index)),
    }
}

/// Drops claims that are held already, so an entry already carried out plans nothing.
fn without_held_claims(view: &View<'_>, steps: Vec<Step>) -> Vec<Step> {
    steps
        .into_iter()
        .filter(|s| match s {
            Step::Claim(r) => !view.registry.claims_of(&r.target).contains(&r.claim),
            _ => true,
        })
        .collect()
}

/// A refusal's reason: the error's message without the address it starts with.
fn reason(e: &Error) -> String {
    match e {
        Error::Refused { reason, .. } => reason.clone(),
        other => crate::error::chain(other),
    }
}

fn show_guard(guard: passthroughd_proto::config::IdGuard) -> String {
    match (guard.vendor, guard.device) {
        (Some(v), Some(d)) => format!("{v:04x}:{d:04x}"),
        (Some(v), None) => format!("vendor {v:04x}"),
        (None, Some(d)) => format!("device {d:04x}"),
        (None, None) => "device".into(),
    }
}
