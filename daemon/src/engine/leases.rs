//! Leases: assignments owned by a named consumer (a libvirt domain, a Kubernetes claim, another
//! VMM) for as long as it runs. Taking one is all or nothing; ending one gives back exactly what
//! it took. They are stored with the boot id, so they survive a daemon restart but not a reboot.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// How long an end waits for the functions' operations in progress (a start the kernel blocks)
/// before it gives up; the lease then stays, and `lease list` shows it stale once its VM is gone.
const END_WAIT: Duration = Duration::from_secs(600);

impl Engine {
    /// Takes a lease of `owner` on `addresses`: all or nothing, refused when another owner holds
    /// one of them (naming it) or when a function's IOMMU group has endpoints left out.
    /// Taking the same lease again changes nothing.
    pub fn lease_start(
        &self,
        caller: &Caller,
        owner: &LeaseOwner,
        addresses: &[PciAddress],
    ) -> Result<Vec<Change>, Error> {
        // Remembered before anything is locked: an end that comes while this start is still
        // running (its caller gave up) must wait for these functions, not find nothing to end.
        lock(&self.lease_starts)
            .entry(owner.clone())
            .or_default()
            .extend(addresses.iter().copied());
        lock(&self.lease_times)
            .entry(owner.clone())
            .or_insert_with(Instant::now);
        let result = (|| {
            check_request(addresses)?;
            let (guard, view) = self.lock_and_read(caller, addresses, "a lease")?;
            let plan = planner::lease::start(&view.view(), owner, addresses)?;
            self.executor.run(caller, plan, guard)
        })();
        if let Err(e) = &result {
            self.note_error(&format!("lease {owner}: {e}"));
            // A start that goes on in the background (Stalled) still counts as in progress.
            if !matches!(e, Error::Stalled { .. }) && self.lease_targets(owner).is_empty() {
                lock(&self.lease_starts).remove(owner);
                lock(&self.lease_times).remove(owner);
            }
        }
        result
    }

    /// Ends the lease of `owner`: what it leased goes back to its driver, unless something
    /// else claims it. Waits (up to [`END_WAIT`], unless the caller has a deadline) for a start
    /// of the same owner that is still in progress, so a start given up on is ended too.
    pub fn lease_end(&self, caller: &Caller, owner: &LeaseOwner) -> Result<Vec<Change>, Error> {
        let result = self.lease_end_inner(caller, owner);
        match &result {
            Ok(_) | Err(Error::NoLease(_)) => {
                lock(&self.lease_starts).remove(owner);
                lock(&self.lease_times).remove(owner);
            }
            Err(e) => self.note_error(&format!("lease end {owner}: {e}")),
        }
        result
    }

    fn lease_end_inner(&self, caller: &Caller, owner: &LeaseOwner) -> Result<Vec<Change>, Error> {
        let mut addresses: BTreeSet<PciAddress> = lock(&self.lease_starts)
            .get(owner)
            .cloned()
            .unwrap_or_default();
        for target in self.lease_targets(owner) {
            let address = match target {
                Target::Function(a) => Some(a).filter(|a| self.drivers.exists(*a)),
                Target::Vf { pf, index } => self.drivers.vf(pf, index).ok().flatten(),
            };
            addresses.extend(address);
        }
        if addresses.is_empty() && self.lease_targets(owner).is_empty() {
            return Err(Error::NoLease(owner.clone()));
        }
        let addresses: Vec<PciAddress> = addresses.into_iter().collect();
        let started = Instant::now();
        let (guard, view) = loop {
            match self.lock_and_read(caller, &addresses, "a lease end") {
                Err(Error::Busy(_))
                    if caller.deadline.is_none() && started.elapsed() < END_WAIT => {}
                other => break other?,
            }
        };
        // Read under the locks: a start that was in progress has now finished or been undone.
        let plan = planner::lease::end(&view.view(), owner)?;
        self.executor.run(caller, plan, guard)
    }

    /// What `owner` holds now, by target.
    fn lease_targets(&self, owner: &LeaseOwner) -> Vec<Target> {
        let claim = Claim::Lease(owner.clone());
        lock(&self.registry)
            .functions()
            .filter(|(_, h)| h.claims.contains(&claim))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Every lease, with the functions it holds, and whether it looks stale: a libvirt lease
    /// whose VM no longer runs (no process with `-name guest=DOMAIN`) once it is older than
    /// [`LEASE_GRACE`] (the hook takes the lease before QEMU starts).
    pub fn leases(&self) -> Vec<LeaseInfo> {
        let registry = lock(&self.registry).clone();
        let times = lock(&self.lease_times).clone();
        let mut by_owner: BTreeMap<LeaseOwner, Vec<String>> = BTreeMap::new();
        for (target, held) in registry.functions() {
            for claim in &held.claims {
                if let Claim::Lease(owner) = claim {
                    let shown = match *target {
                        Target::Function(a) => a.to_string(),
                        Target::Vf { pf, index } => match self.drivers.vf(pf, index) {
                            Ok(Some(a)) => a.to_string(),
                            _ => target.to_string(),
                        },
                    };
                    by_owner.entry(owner.clone()).or_default().push(shown);
                }
            }
        }
        let running = if by_owner.keys().any(|o| o.kind == OwnerKind::Libvirt) {
            crate::observe::guard::running_vms(&self.root.proc_dir())
        } else {
            HashSet::new()
        };
        by_owner
            .into_iter()
            .map(|(owner, functions)| {
                let age = times.get(&owner).map(Instant::elapsed);
                let stale = (owner.kind == OwnerKind::Libvirt
                    && age.is_none_or(|a| a >= LEASE_GRACE)
                    && !running.contains(&owner.name))
                .then(|| {
                    format!(
                        "no QEMU runs with -name guest={}; passthroughctl lease end {owner} \
                             gives its functions back",
                        owner.name
                    )
                });
                LeaseInfo {
                    age_secs: age.map_or(0, |a| a.as_secs()),
                    owner,
                    functions,
                    stale,
                }
            })
            .collect()
    }
}
