//! The requests of callers: assign, release, vf create/destroy/list, reload, apply, and what
//! device events ask for. Each: lock, read fresh, plan, hand to the executor.

use super::*;

impl Engine {
    /// Binds each function (or with `group`, each function's whole group) to vfio-pci.
    /// All or nothing: on any failure, functions already moved go back to their drivers.
    ///
    /// A function already on vfio-pci is a success without a [`Change`] (assign is idempotent,
    /// so scripts can repeat it); a persistent request makes a runtime assignment persistent.
    pub fn assign(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        let result = self.assign_inner(caller, addresses, options);
        if let Err(e) = &result {
            self.note_error(&format!("assign {}: {e}", Self::short_list(addresses)));
        }
        result
    }

    pub(super) fn assign_inner(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        check_request(addresses)?;
        let (guard, view) = self.lock_and_read(caller, addresses, "an assign")?;
        let plan = planner::assign::assign(&view.view(), addresses, options)?;
        self.executor.run(caller, plan, guard)
    }

    /// Returns each function to the driver it had before assignment (or the kernel's choice).
    /// `runtime` keeps the stored request, so the assignment comes back at the next start.
    pub fn release(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        let result = self.release_inner(caller, addresses, options);
        if let Err(e) = &result {
            self.note_error(&format!("release {}: {e}", Self::short_list(addresses)));
        }
        result
    }

    pub(super) fn release_inner(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        check_request(addresses)?;
        let (guard, view) = self.lock_and_read(caller, addresses, "a release")?;
        let plan = planner::assign::release(&view.view(), addresses, options)?;
        let suspended: Vec<Target> = if options.runtime {
            view.inventory
                .functions
                .iter()
                .filter(|f| addresses.contains(&f.address))
                .map(planner::target_of)
                .collect()
        } else {
            Vec::new()
        };
        let changes = self.executor.run(caller, plan, guard)?;
        let mut registry = lock(&self.registry);
        for target in &suspended {
            registry.set_suspended(target, true);
        }
        Ok(changes)
    }

    /// Creates `count` VFs on `pf`. With `assign` each goes to vfio-pci before any host VF
    /// driver sees it; without `runtime` the VFs (and which are assigned) come back at start.
    pub fn vf_create(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        options: VfCreateOptions,
    ) -> Result<Vec<VfInfo>, Error> {
        let result = self.vf_create_inner(caller, pf, count, options);
        if let Err(e) = &result {
            self.note_error(&format!("vf create {pf}: {e}"));
        }
        result
    }

    pub(super) fn vf_create_inner(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        options: VfCreateOptions,
    ) -> Result<Vec<VfInfo>, Error> {
        // Before anything is read or built from it: a count no PF can have.
        planner::vfs::check_requested_count(count)?;
        let (guard, view) = self.lock_pf(caller, pf, "a vf create")?;
        // Against the PF before any set is built from the count.
        let f = planner::vfs::check_pf(&view.inventory, pf)?;
        planner::vfs::check_count(f, count)?;
        let request = VfCreate {
            pf,
            count,
            assign: if options.assign {
                (0..count).collect()
            } else {
                BTreeSet::new()
            },
            claim: if options.runtime {
                Claim::Runtime
            } else {
                Claim::Request
            },
            force: options.force,
            release_others: false,
        };
        let plan = planner::vfs::create(&view.view(), &request)?;
        let resize = plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::SetNumVfs { .. }));
        self.executor.run(caller, plan, guard)?;
        // New VFs: nobody can hold them yet, so no /proc scan.
        self.describe_vfs(pf, count, !resize)
    }

    /// Removes every VF of `pf`. Refused while a VF is open by a process (always) or assigned
    /// (unless `force`, which releases it first).
    pub fn vf_destroy(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error> {
        let result = (|| {
            let (guard, view) = self.lock_pf(caller, pf, "a vf destroy")?;
            let plan = planner::vfs::destroy(&view.view(), pf, force)?;
            self.executor.run(caller, plan, guard)
        })();
        if let Err(e) = &result {
            self.note_error(&format!("vf destroy {pf}: {e}"));
        }
        result
    }

    /// Every VF of `pf`, in index order. Takes no lock.
    pub fn vf_list(&self, pf: PciAddress) -> Result<Vec<VfInfo>, Error> {
        let inventory = self.snapshot()?;
        planner::vfs::check_pf(&inventory, pf)?;
        let vfs = inventory.vfs_of(pf);
        let snapshot = HostSnapshot::gather(&self.root, &vfs, self.options.addresses.as_ref());
        Ok(self.vf_infos(pf, &vfs, Some(&snapshot)))
    }

    /// The first `count` VFs of `pf` as `vf list` shows them, read fresh; with `holders`, who
    /// holds them open (a /proc walk: not needed for VFs just created). Those there now: the
    /// plan that made them has let go of the PF, and a `vf destroy` may already have come in
    /// (a create that was done is not answered with an error for that).
    pub(super) fn describe_vfs(
        &self,
        pf: PciAddress,
        count: u32,
        holders: bool,
    ) -> Result<Vec<VfInfo>, Error> {
        let addresses: Vec<PciAddress> = (0..count)
            .map_while(|index| self.drivers.vf(pf, index).ok().flatten())
            .collect();
        let keys = self.lock_keys_of_present(&addresses)?;
        let inventory = inventory_of(&self.root, &self.ids, &keys)?;
        let vfs: Vec<&PciFunction> = addresses
            .iter()
            .filter_map(|a| inventory.function(*a))
            .collect();
        let snapshot = holders
            .then(|| HostSnapshot::gather(&self.root, &vfs, self.options.addresses.as_ref()));
        Ok(self.vf_infos(pf, &vfs, snapshot.as_ref()))
    }

    pub(super) fn vf_infos(
        &self,
        pf: PciAddress,
        vfs: &[&PciFunction],
        snapshot: Option<&HostSnapshot>,
    ) -> Vec<VfInfo> {
        let registry = lock(&self.registry);
        vfs.iter()
            .filter_map(|f| {
                let index = f.vf_of?.index;
                let on_vfio = f.driver.as_deref() == Some(VFIO_PCI);
                let in_set = registry
                    .vf_set(pf)
                    .is_some_and(|s| s.record.assigned.contains(&index));
                let assigned =
                    registry.get(&Target::Vf { pf, index }).is_some() || (on_vfio && in_set);
                Some(VfInfo {
                    index,
                    address: f.address,
                    driver: f.driver.clone(),
                    iommu_group: f.iommu_group,
                    assigned,
                    in_use_by: snapshot.and_then(|s| s.in_use_by(f)),
                })
            })
            .collect()
    }

    /// Re-reads the config file; a broken one keeps the last good config in force.
    pub fn reload(&self) -> ConfigState {
        let _one_at_a_time = lock(&self.reloading);
        let path = lock(&self.config).path().to_owned();
        let read = crate::store::config::read_settled(&path);
        let state = lock(&self.config).take(read);
        if let Some(e) = &state.error {
            self.note_error(&format!("config: {e}"));
        }
        state
    }

    /// Reconciles the host with the desired state: the config, stored requests, and what the
    /// config let go. With `dry_run`, only says what it would do. What is not refused is done;
    /// the report lists what was refused or failed.
    pub fn apply(&self, caller: &Caller, dry_run: bool) -> Result<ApplyReport, Error> {
        caller.check_deadline("apply")?;
        self.apply_desired(caller, dry_run, Trigger::Apply)
    }

    /// What a burst of device events changes: functions that appeared and that the desired
    /// state claims (a config entry by address or match, a VF index of an `[[sriov]]` PF, a
    /// stored request whose device it is) go to vfio-pci through the same planners and executor
    /// as everything else; a configured PF that appeared gets its VFs. Nothing else is touched.
    /// Claimed functions that went away stay claimed, shown as absent, and are claimed again
    /// when they come back.
    pub fn device_events(
        &self,
        caller: &Caller,
        added: &BTreeSet<PciAddress>,
        removed: &BTreeSet<PciAddress>,
    ) -> Result<HotplugReport, Error> {
        self.invalidate_inventory();
        let mut report = HotplugReport::default();
        let registry = lock(&self.registry).clone();
        for address in removed {
            let claimed = registry.functions().any(|(target, _)| match *target {
                Target::Function(a) => a == *address,
                // A VF that went away no longer has a virtfn link: its PF says nothing now.
                Target::Vf { .. } => false,
            }) || registry.vf_set(*address).is_some();
            if claimed {
                report.removed.push(*address);
                self.note_hotplug(format!("{address} removed: still claimed, shown as absent"));
            }
        }
        let present: HashSet<PciAddress> = added
            .iter()
            .copied()
            .filter(|a| self.drivers.exists(*a))
            .collect();
        if present.is_empty() {
            return Ok(report);
        }
        let applied = self.apply_desired(caller, false, Trigger::Hotplug(&present))?;
        for change in &applied.changes {
            self.note_hotplug(format!(
                "{} appeared: claimed by {} ({} -> {})",
                change.function,
                change.entry,
                change.from.as_deref().unwrap_or("no driver"),
                change.to.as_deref().unwrap_or("no driver")
            ));
        }
        for r in applied.refused.iter().chain(&applied.failed) {
            self.note_hotplug(format!(
                "{} appeared: not claimed: {}",
                r.function.as_deref().unwrap_or(&r.entry),
                r.reason
            ));
        }
        report.apply = applied;
        Ok(report)
    }

    pub(super) fn note_hotplug(&self, line: String) {
        info!(%line, "hotplug");
        let mut recent = lock(&self.hotplug);
        if recent.len() == ERROR_RING {
            recent.pop_front();
        }
        recent.push_back(line);
    }
}
