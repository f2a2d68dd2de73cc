//! What the daemon holds, and why: every claimed function with its claims (runtime, request,
//! config), and every VF set it made. The persistent part is exactly what state.toml holds; the
//! executor changes both together, through the record steps of a plan.

use std::collections::{BTreeMap, BTreeSet};

use passthroughd_proto::{DeviceIdentity, PciAddress};

use crate::engine::plan::{Claim, ClaimRecord, Step, Target, VfSetRecord};
use crate::store::state::{Source, State, StoredAssignment, StoredIdentity, StoredVfs};
use passthroughd_proto::LeaseOwner;

/// One claimed function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Its ids (for a VF, its PF's) when it was claimed.
    pub identity: DeviceIdentity,
    /// The host driver it goes back to (`None`: the kernel's choice).
    pub previous_driver: Option<String>,
    pub claims: BTreeSet<Claim>,
    /// Why it could not be put on vfio-pci at start or by `apply`, if it could not.
    pub refused: Option<String>,
    /// Let go by `release --runtime`: back on vfio-pci at the next start.
    pub suspended: bool,
}

impl Held {
    /// Whether any claim outlives the daemon.
    pub fn is_persistent(&self) -> bool {
        self.claims.iter().any(Claim::is_persistent)
    }
}

/// VFs the daemon made on one PF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldVfs {
    pub record: VfSetRecord,
    /// Why they could not be recreated at start, if they could not.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    functions: BTreeMap<Target, Held>,
    vf_sets: BTreeMap<PciAddress, HeldVfs>,
    /// The boot leases are taken in (from the kernel's boot_id); `None` where the kernel does
    /// not say (then leases are kept as they are).
    boot_id: Option<String>,
}

/// The claim a stored entry holds; `None` for a lease of another boot (its VM is gone).
fn claim_of(
    source: Source,
    owner: Option<&LeaseOwner>,
    boot_id: Option<&str>,
    now: Option<&str>,
) -> Option<Claim> {
    match source {
        Source::Request => Some(Claim::Request),
        Source::Config => Some(Claim::Config),
        Source::Lease => {
            let owner = owner?.clone();
            match (boot_id, now) {
                (Some(then), Some(now)) if then != now => None,
                _ => Some(Claim::Lease(owner)),
            }
        }
    }
}

fn source_of(claim: &Claim) -> Option<(Source, Option<LeaseOwner>)> {
    match claim {
        Claim::Runtime => None,
        Claim::Request => Some((Source::Request, None)),
        Claim::Config => Some((Source::Config, None)),
        Claim::Lease(owner) => Some((Source::Lease, Some(owner.clone()))),
    }
}

impl Registry {
    /// The claims stored in state.toml, in the boot `boot_id`: leases of another boot are
    /// dropped (a reboot ended their VMs).
    pub fn from_state(state: &State, boot_id: Option<&str>) -> Self {
        let mut registry = Self {
            boot_id: boot_id.map(str::to_owned),
            ..Self::default()
        };
        for a in &state.assignments {
            let Some(claim) = claim_of(a.source, a.owner.as_ref(), a.boot_id.as_deref(), boot_id)
            else {
                continue;
            };
            registry.apply(&Step::Claim(ClaimRecord {
                target: Target::Function(a.address),
                identity: a.identity.0,
                previous_driver: a.previous_driver.clone(),
                claim,
            }));
        }
        for v in &state.vfs {
            let Some(claim) = claim_of(v.source, v.owner.as_ref(), v.boot_id.as_deref(), boot_id)
            else {
                continue;
            };
            match v.count {
                Some(count) => {
                    registry.vf_sets.insert(
                        v.pf,
                        HeldVfs {
                            record: VfSetRecord {
                                identity: v.identity.0,
                                count,
                                assigned: v.assigned.iter().copied().collect(),
                                claim,
                            },
                            refused: None,
                        },
                    );
                }
                None => {
                    for &index in &v.assigned {
                        registry.apply(&Step::Claim(ClaimRecord {
                            target: Target::Vf { pf: v.pf, index },
                            identity: v.identity.0,
                            previous_driver: None,
                            claim: claim.clone(),
                        }));
                    }
                }
            }
        }
        registry
    }

    /// The persistent claims, as state.toml stores them: VF sets with their count, VFs assigned
    /// on their own in entries without one.
    pub fn to_state(&self) -> State {
        let mut state = State::default();
        let boot = |owner: &Option<LeaseOwner>| owner.as_ref().and(self.boot_id.clone());
        for (pf, set) in &self.vf_sets {
            if let Some((source, owner)) = source_of(&set.record.claim) {
                state.vfs.push(StoredVfs {
                    pf: *pf,
                    identity: StoredIdentity(set.record.identity),
                    count: Some(set.record.count),
                    assigned: set.record.assigned.iter().copied().collect(),
                    source,
                    boot_id: boot(&owner),
                    owner,
                });
            }
        }
        let mut loose: BTreeMap<(PciAddress, Source, Option<LeaseOwner>), StoredVfs> =
            BTreeMap::new();
        for (target, held) in &self.functions {
            for (source, owner) in held.claims.iter().filter_map(source_of) {
                match *target {
                    Target::Function(address) => state.assignments.push(StoredAssignment {
                        address,
                        identity: StoredIdentity(held.identity),
                        previous_driver: held.previous_driver.clone(),
                        source,
                        boot_id: boot(&owner),
                        owner,
                    }),
                    Target::Vf { pf, index } => loose
                        .entry((pf, source, owner.clone()))
                        .or_insert_with(|| StoredVfs {
                            pf,
                            identity: StoredIdentity(held.identity),
                            count: None,
                            assigned: Vec::new(),
                            source,
                            boot_id: boot(&owner),
                            owner,
                        })
                        .assigned
                        .push(index),
                }
            }
        }
        state.vfs.extend(loose.into_values());
        state
    }

    /// Applies a record step; false when it changed nothing (the claim was there already).
    pub fn apply(&mut self, step: &Step) -> bool {
        match step {
            Step::Claim(r) => {
                let held = self.functions.entry(r.target).or_insert_with(|| Held {
                    identity: r.identity,
                    previous_driver: r.previous_driver.clone(),
                    claims: BTreeSet::new(),
                    refused: None,
                    suspended: false,
                });
                held.refused = None;
                held.suspended = false;
                held.claims.insert(r.claim.clone())
            }
            Step::Unclaim(r) => {
                let Some(held) = self.functions.get_mut(&r.target) else {
                    return false;
                };
                let removed = held.claims.remove(&r.claim);
                if held.claims.is_empty() {
                    self.functions.remove(&r.target);
                }
                removed
            }
            Step::SetVfs { pf, now, .. } => {
                let before = self.vf_sets.get(pf).map(|h| &h.record);
                if before == now.as_ref() {
                    // Taken up again (a refused set applied after all) counts as a change.
                    return match self.vf_sets.get_mut(pf) {
                        Some(held) => held.refused.take().is_some(),
                        None => false,
                    };
                }
                match now {
                    Some(record) => {
                        self.vf_sets.insert(
                            *pf,
                            HeldVfs {
                                record: record.clone(),
                                refused: None,
                            },
                        );
                    }
                    None => {
                        self.vf_sets.remove(pf);
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Takes back a record step that [`Self::apply`] said changed something.
    pub fn revert(&mut self, step: &Step) {
        let inverse = match step {
            Step::Claim(r) => Step::Unclaim(r.clone()),
            Step::Unclaim(r) => Step::Claim(r.clone()),
            Step::SetVfs { pf, now, was } => Step::SetVfs {
                pf: *pf,
                now: was.clone(),
                was: now.clone(),
            },
            _ => return,
        };
        self.apply(&inverse);
    }

    pub fn get(&self, target: &Target) -> Option<&Held> {
        self.functions.get(target)
    }

    pub fn functions(&self) -> impl Iterator<Item = (&Target, &Held)> {
        self.functions.iter()
    }

    pub fn vf_set(&self, pf: PciAddress) -> Option<&HeldVfs> {
        self.vf_sets.get(&pf)
    }

    pub fn vf_sets(&self) -> impl Iterator<Item = (&PciAddress, &HeldVfs)> {
        self.vf_sets.iter()
    }

    /// The VFs of `pf` assigned on their own (not through its VF set), by index.
    pub fn vfs_of(&self, pf: PciAddress) -> impl Iterator<Item = (u32, &Held)> {
        self.functions.iter().filter_map(move |(t, h)| match *t {
            Target::Vf { pf: p, index } if p == pf => Some((index, h)),
            _ => None,
        })
    }

    /// Notes why a claim could not be carried out (`None`: it was).
    pub fn set_refused(&mut self, target: &Target, why: Option<String>) {
        if let Some(held) = self.functions.get_mut(target) {
            held.refused = why;
        }
    }

    pub fn set_vfs_refused(&mut self, pf: PciAddress, why: Option<String>) {
        if let Some(set) = self.vf_sets.get_mut(&pf) {
            set.refused = why;
        }
    }

    /// Whether VF `index` of `pf` is assigned, through its VF set or on its own.
    pub fn vf_assigned(&self, pf: PciAddress, index: u32) -> bool {
        self.vf_sets
            .get(&pf)
            .is_some_and(|s| s.record.assigned.contains(&index))
            || self.functions.contains_key(&Target::Vf { pf, index })
    }

    /// Marks a claim let go for now (`release --runtime`), or taken up again.
    pub fn set_suspended(&mut self, target: &Target, suspended: bool) {
        if let Some(held) = self.functions.get_mut(target) {
            held.suspended = suspended;
        }
    }

    /// The claims on `target` (empty when it is not claimed).
    pub fn claims_of(&self, target: &Target) -> BTreeSet<Claim> {
        self.functions
            .get(target)
            .map(|h| h.claims.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id() -> DeviceIdentity {
        DeviceIdentity {
            vendor_id: 0x8086,
            device_id: 0x10c9,
            subsystem_vendor_id: 0x8086,
            subsystem_device_id: 0xa03c,
        }
    }

    fn claim(target: Target, claim: Claim) -> Step {
        Step::Claim(ClaimRecord {
            target,
            identity: id(),
            previous_driver: Some("igb".into()),
            claim,
        })
    }

    #[test]
    fn state_round_trip_keeps_persistent_claims_only_and_vfs_by_index() {
        let nic = Target::Function("0000:01:00.0".parse().unwrap());
        let pf: PciAddress = "0000:05:00.0".parse().unwrap();
        let mut r = Registry::default();
        assert!(r.apply(&claim(nic, Claim::Request)));
        assert!(r.apply(&claim(nic, Claim::Config)));
        assert!(!r.apply(&claim(nic, Claim::Config)), "already there");
        assert!(r.apply(&claim(
            Target::Function("0000:02:00.0".parse().unwrap()),
            Claim::Runtime
        )));
        assert!(r.apply(&claim(Target::Vf { pf, index: 2 }, Claim::Request)));
        let set = VfSetRecord {
            identity: id(),
            count: 4,
            assigned: [0, 1].into(),
            claim: Claim::Request,
        };
        let record = Step::SetVfs {
            pf,
            now: Some(set.clone()),
            was: None,
        };
        assert!(r.apply(&record));
        assert!(!r.apply(&record), "the same set again changes nothing");
        let state = r.to_state();
        assert_eq!(state.assignments.len(), 2, "{state:?}");
        assert_eq!(state.vfs.len(), 2, "the set and the VF assigned on its own");
        assert_eq!(state.vfs[0].count, Some(4));
        assert_eq!(state.vfs[0].assigned, [0, 1]);
        assert_eq!(state.vfs[1].count, None);
        assert_eq!(state.vfs[1].assigned, [2]);
        let back = Registry::from_state(&state, None);
        assert_eq!(back.get(&nic).unwrap().claims.len(), 2);
        assert!(
            back.get(&Target::Function("0000:02:00.0".parse().unwrap()))
                .is_none(),
            "runtime claims are not stored"
        );
        assert_eq!(back.vf_set(pf).unwrap().record, set);
        assert!(back.vf_assigned(pf, 2) && back.vf_assigned(pf, 0) && !back.vf_assigned(pf, 3));
        let mut r2 = back.clone();
        let unclaim = Step::Unclaim(ClaimRecord {
            target: nic,
            identity: id(),
            previous_driver: Some("igb".into()),
            claim: Claim::Config,
        });
        assert!(r2.apply(&unclaim));
        r2.revert(&unclaim);
        assert_eq!(r2, back);
        let forget = Step::SetVfs {
            pf,
            now: None,
            was: Some(set),
        };
        assert!(r2.apply(&forget));
        assert!(r2.vf_set(pf).is_none());
        r2.revert(&forget);
        assert_eq!(r2, back);
    }
}
