//! The desired state: journal recovery at start, the start-up apply, `apply`, hotplug passes,
//! each a set of independent units run side by side.

use super::*;

impl Engine {
    /// Finishes or undoes the plans journals left behind. The rule: no device is left
    /// driverless by accident, and state.toml matches the kernel afterwards.
    pub(super) fn recover(&self) -> Result<Vec<String>, Error> {
        let mut lines = Vec::new();
        for (entry, plan) in journal::pending::<Plan>(&self.state_dir)? {
            let (plan, undoing) = match plan {
                Ok(found) => found,
                Err(why) => {
                    let line = format!("journal {} is unreadable ({why}); set aside", entry.name());
                    warn!("{line}");
                    self.note_error(&line);
                    lines.push(line);
                    entry.set_aside()?;
                    continue;
                }
            };
            let mut guard =
                self.locks
                    .acquire(plan.locks.clone(), "recovery", self.options.group_wait)?;
            let name = entry.name().to_owned();
            match self.executor.recover(&plan, undoing, entry, &mut guard) {
                Ok(line) => {
                    info!(journal = %name, "{line}");
                    lines.push(line);
                }
                Err(e) => {
                    let line = e.to_string();
                    warn!(journal = %name, "{line}");
                    self.note_error(&line);
                    lines.push(line);
                }
            }
        }
        Ok(lines)
    }

    /// The desired state at start: stored requests and VF sets first noted as refused or not,
    /// then everything carried out.
    pub(super) fn start_apply(&self, report: &mut StartupReport) -> Result<(), Error> {
        let caller = startup_caller();
        self.adopt_vf_claims(&caller)?;
        report.apply = self.apply_desired(&caller, false, Trigger::Boot)?;
        let registry = lock(&self.registry).clone();
        for (target, held) in registry.functions() {
            if !held.claims.contains(&Claim::Request) {
                continue;
            }
            let address = match *target {
                Target::Function(a) => Some(a),
                Target::Vf { pf, index } => self.drivers.vf(pf, index).ok().flatten(),
            };
            match (&held.refused, address) {
                (Some(why), _) => {
                    let shown = address.unwrap_or(match *target {
                        Target::Function(a) | Target::Vf { pf: a, .. } => a,
                    });
                    let line = format!("{target}: persisted assignment not applied: {why}");
                    warn!("{line}");
                    self.note_error(&line);
                    report.refused.push((shown, why.clone()));
                }
                (None, Some(a)) => report.applied.push(a),
                (None, None) => {}
            }
        }
        for (pf, set) in registry.vf_sets() {
            match &set.refused {
                Some(why) => {
                    let line = format!("{pf}: persisted VFs not recreated: {why}");
                    warn!("{line}");
                    self.note_error(&line);
                    report.refused.push((*pf, why.clone()));
                }
                None => report.vfs.push(*pf),
            }
        }
        Ok(())
    }

    /// Claims stored by address (state.toml before version 3) whose function is a VF now become
    /// claims on (PF, index), so a renumbering or another VF count never moves them to the wrong
    /// function. Only when the address still holds the device that was claimed.
    pub(super) fn adopt_vf_claims(&self, caller: &Caller) -> Result<(), Error> {
        let registry = lock(&self.registry).clone();
        let loose: Vec<(PciAddress, &registry::Held)> = registry
            .functions()
            .filter_map(|(t, h)| match t {
                Target::Function(a) => Some((*a, h)),
                Target::Vf { .. } => None,
            })
            .collect();
        if loose.is_empty() {
            return Ok(());
        }
        let inventory = self.inventory()?;
        let mut plan = Plan::new(
            plan::Operation::Apply,
            plan::OnCrash::Finish,
            BTreeSet::new(),
        );
        for (address, held) in loose {
            let Some(f) = inventory.function(address) else {
                continue;
            };
            let (Some(vf), Some(pf)) = (f.vf_of, f.vf_of.and_then(|v| inventory.function(v.pf)))
            else {
                continue;
            };
            if planner::identity_of(f) != held.identity {
                continue;
            }
            for claim in &held.claims {
                plan.push(Step::Unclaim(plan::ClaimRecord {
                    target: Target::Function(address),
                    identity: held.identity,
                    previous_driver: held.previous_driver.clone(),
                    claim: claim.clone(),
                }));
                plan.push(Step::Claim(plan::ClaimRecord {
                    target: Target::Vf {
                        pf: vf.pf,
                        index: vf.index,
                    },
                    identity: planner::identity_of(pf),
                    previous_driver: held.previous_driver.clone(),
                    claim: claim.clone(),
                }));
            }
            info!(%address, pf = %vf.pf, index = vf.index, "stored VF assignment now kept as (PF, index)");
        }
        let guard = self
            .locks
            .acquire(BTreeSet::new(), "start", self.options.group_wait)?;
        self.executor.run(caller, plan, guard).map(drop)
    }

    /// Plans the desired state in its two phases, executes what is not refused (unless
    /// `dry_run`), and reports. At start, requests let go by `release --runtime` come back
    /// too; on hotplug only the functions the events name are touched. Refusals of stored
    /// requests are noted in the registry for `status`.
    pub(super) fn apply_desired(
        &self,
        caller: &Caller,
        dry_run: bool,
        trigger: Trigger<'_>,
    ) -> Result<ApplyReport, Error> {
        let boot = matches!(trigger, Trigger::Boot);
        let only = match trigger {
            Trigger::Hotplug(only) => Some(only),
            Trigger::Boot | Trigger::Apply => None,
        };
        let config_state = lock(&self.config).state();
        let config = lock(&self.config).good();
        let mut report = ApplyReport {
            dry_run,
            config: config_state,
            ..ApplyReport::default()
        };
        let config_in_force = config.clone().unwrap_or_else(|| Arc::new(Config::empty()));
        report.notes = desired::not_in_effect(&config_in_force);
        if config.is_none() {
            report.notes.push(
                "the config has never been read successfully: its entries are not applied \
                 and nothing it claimed is released"
                    .into(),
            );
        }
        // VFs that appear are made one by one under their PF's lock, taken by whoever writes
        // `sriov_numvfs`: reading that PF's locked attributes would wait for the last VF, and
        // the first would be claimed only after all are made.
        let busy_pfs: HashSet<PciAddress> = only
            .into_iter()
            .flatten()
            .filter_map(|&a| {
                read_link_name(&self.root.pci_device_attr(a, "physfn"))
                    .ok()
                    .flatten()
                    .and_then(|pf| pf.parse().ok())
            })
            .collect();
        for phase in [Phase::Vfs, Phase::Functions] {
            let inventory = self.inventory_avoiding(&busy_pfs)?;
            let functions: Vec<&PciFunction> = inventory.functions.iter().collect();
            let snapshot =
                HostSnapshot::gather(&self.root, &functions, self.options.addresses.as_ref());
            let registry = lock(&self.registry).clone();
            let view = View {
                inventory: &inventory,
                snapshot: &snapshot,
                registry: &registry,
                config: &config_in_force,
            };
            let scope = desired::Scope {
                config: config.is_some(),
                skip_suspended: !boot,
                only,
            };
            let outcome = desired::plan(&view, phase, scope);
            {
                let mut registry = lock(&self.registry);
                for (target, why) in &outcome.requests {
                    registry.set_refused(target, why.clone());
                }
                for (pf, why) in &outcome.vf_sets {
                    registry.set_vfs_refused(*pf, why.clone());
                }
            }
            report.refused.extend(outcome.refused.iter().cloned());
            for unit in &outcome.units {
                report.changes.extend(unit.changes());
                report.vfs.extend(unit.vfs());
            }
            if dry_run || outcome.units.is_empty() {
                continue;
            }
            report.failed.extend(self.run_units(caller, outcome.units));
        }
        if !dry_run {
            for r in report.refused.iter().chain(report.failed.iter()) {
                self.note_error(&format!("apply: {}: {}", r.entry, r.reason));
            }
            *lock(&self.last_refused) = report
                .refused
                .iter()
                .chain(report.failed.iter())
                .cloned()
                .collect();
        }
        Ok(report)
    }

    /// Runs independent units side by side (a few at a time); returns those that failed.
    pub(super) fn run_units(&self, caller: &Caller, units: Vec<desired::Unit>) -> Vec<Refusal> {
        let queue = Mutex::new(units.into_iter());
        let failed = Mutex::new(Vec::new());
        let work = || {
            while let Some(unit) = lock(&queue).next() {
                if let Err(e) = self.run_unit(caller, &unit) {
                    lock(&failed).push(Refusal {
                        entry: unit.label.clone(),
                        function: None,
                        reason: crate::error::chain(&e),
                    });
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..APPLY_WORKERS {
                scope.spawn(work);
            }
            work();
        });
        failed.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// One unit under its locks, after checking that what it was planned on still holds.
    pub(super) fn run_unit(
        &self,
        caller: &Caller,
        unit: &desired::Unit,
    ) -> Result<Vec<Change>, Error> {
        let mut guard =
            self.locks
                .acquire(unit.plan.locks.clone(), "apply", self.options.group_wait)?;
        self.executor.settle(&mut guard)?;
        self.check_still_valid(&unit.plan)?;
        self.executor.run(caller, unit.plan.clone(), guard)
    }

    /// Whether the drivers and VF counts a plan was made on are still what the kernel has
    /// (another request may have run between planning and locking).
    pub(super) fn check_still_valid(&self, plan: &Plan) -> Result<(), Error> {
        let moved = |what: String| {
            Err(Error::Busy(format!(
                "{what} changed while apply was planning; run apply again"
            )))
        };
        for step in &plan.steps {
            match step {
                Step::Bind {
                    target: Target::Function(a),
                    from,
                } if self.drivers.current_driver(*a)? != *from => {
                    return moved(a.to_string());
                }
                Step::SetNumVfs { pf, was, .. } if self.drivers.num_vfs(*pf)? != *was => {
                    return moved(format!("the VF count of {pf}"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}
