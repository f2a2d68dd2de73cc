//! What readers see: the inventory (fresh, or the shared cache), assignments with their state
//! now, status, the host report. Nothing here waits for a write.

use super::*;

impl Engine {
    /// A fresh scan of functions and groups. Takes no lock: never waits for a bind, and never
    /// reads an attribute the kernel has locked for a write in flight.
    pub fn inventory(&self) -> Result<Inventory, Error> {
        self.inventory_avoiding(&HashSet::new())
    }

    /// [`Self::inventory`], also leaving alone the locked attributes of the functions in
    /// `busy_pfs`: PFs whose new VFs are still being made by someone else's `sriov_numvfs`
    /// write, which holds the PF's lock until the last VF is made.
    pub(super) fn inventory_avoiding(
        &self,
        busy_pfs: &HashSet<PciAddress>,
    ) -> Result<Inventory, Error> {
        let last = lock(&self.cached).as_ref().map(|(_, _, i)| Arc::clone(i));
        let skip = |a: PciAddress| busy_pfs.contains(&a) || self.write_in_flight(a);
        let avoid = Avoid {
            skip: &skip,
            last: last.as_deref(),
        };
        Ok(Inventory::scan_with(&self.root, &self.ids, &avoid)?)
    }

    /// The inventory with the process holding each function on a VFIO driver (one walk of
    /// `/proc`, only when some function is on one), for `list` and `show`.
    fn inventory_with_holders(&self) -> Result<Inventory, Error> {
        let mut inventory = self.inventory()?;
        let on_vfio: Vec<&PciFunction> = inventory
            .functions
            .iter()
            .filter(|f| driver_is_vfio(f.driver.as_deref()))
            .collect();
        if on_vfio.is_empty() {
            return Ok(inventory);
        }
        let mut holders = HostSnapshot::holders(&self.root, &on_vfio);
        for f in &mut inventory.functions {
            f.in_use_by = holders.remove(&f.address);
        }
        Ok(inventory)
    }

    /// Whether a write on `address` (or on its PF's VF count) is in flight.
    pub(super) fn write_in_flight(&self, address: PciAddress) -> bool {
        self.in_flight.contains(address)
            || (self.in_flight.any_pf()
                && read_link_name(&self.root.pci_device_attr(address, "physfn"))
                    .ok()
                    .flatten()
                    .and_then(|pf| pf.parse().ok())
                    .is_some_and(|pf| self.in_flight.is_pf(pf)))
    }

    /// The inventory for readers (list, groups, show). While the cache is enabled (the daemon's
    /// uevent listener runs), repeated reads share one scan until something changes: a request
    /// finished, a PCI uevent arrived, or [`INVENTORY_CACHE_TTL`] passed. Without the listener
    /// every read scans. Concurrent readers share one scan.
    pub fn snapshot(&self) -> Result<Arc<Inventory>, Error> {
        // A scan that started at or after `generation` (taken when this reader came in) saw
        // every change made before: readers queued behind one scan share it, instead of each
        // scanning again after every change made meanwhile (a convoy under steady writes).
        let fresh = |generation: u64| {
            lock(&self.cached).as_ref().and_then(|(g, at, inventory)| {
                (*g != u64::MAX && *g >= generation && at.elapsed() < INVENTORY_CACHE_TTL)
                    .then(|| Arc::clone(inventory))
            })
        };
        if !self.cache_enabled.load(Ordering::Acquire) {
            let inventory = Arc::new(self.inventory_with_holders()?);
            *lock(&self.cached) = Some((u64::MAX, Instant::now(), Arc::clone(&inventory)));
            return Ok(inventory);
        }
        // Taken on arrival: only a scan that started since then will do.
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(inventory) = fresh(generation) {
            return Ok(inventory);
        }
        let _one_scan = lock(&self.scanning);
        if let Some(inventory) = fresh(generation) {
            return Ok(inventory);
        }
        // The generation now, not at arrival: later readers that came in before this scan
        // started may share it.
        let scan_generation = self.generation.load(Ordering::Acquire);
        let started = Instant::now();
        let scanned = Arc::new(self.inventory_with_holders()?);
        *lock(&self.cached) = Some((scan_generation, started, Arc::clone(&scanned)));
        Ok(scanned)
    }

    /// Something changed outside the engine's knowledge (a kernel uevent): readers rescan.
    pub fn invalidate_inventory(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Turns the readers' cache on; only for callers that report outside changes through
    /// [`Self::invalidate_inventory`].
    pub fn enable_inventory_cache(&self) {
        self.cache_enabled.store(true, Ordering::Release);
    }

    /// Every assignment the daemon holds, with where it comes from and what is wrong with it
    /// now, plus stored VF sets that could not be recreated.
    pub fn assignments(&self) -> Vec<Assignment> {
        let registry = lock(&self.registry).clone();
        let mut all = Vec::new();
        for (target, held) in registry.functions() {
            let (address, vf) = match *target {
                Target::Function(a) => (Some(a), None),
                Target::Vf { pf, index } => (
                    self.drivers.vf(pf, index).ok().flatten(),
                    Some(VfOf { pf, index }),
                ),
            };
            let present = address.is_some_and(|a| self.drivers.exists(a));
            let driver = address.and_then(|a| self.drivers.current_driver(a).ok().flatten());
            let state = if held.refused.is_some() {
                None
            } else if !present {
                Some("absent: the device is not there now".to_owned())
            } else if held.suspended {
                Some("released for now (release --runtime); back at the next start".to_owned())
            } else if !driver_is_vfio(driver.as_deref()) {
                Some(format!(
                    "drift: on {}, expected vfio-pci (passthroughctl apply puts it back)",
                    driver.as_deref().unwrap_or("no driver")
                ))
            } else {
                None
            };
            all.push(Assignment {
                address: address.or(vf.map(|v| v.pf)).unwrap_or(match *target {
                    Target::Function(a) | Target::Vf { pf: a, .. } => a,
                }),
                vf,
                identity: held.identity,
                previous_driver: held.previous_driver.clone(),
                persistent: held.is_persistent(),
                sources: held.claims.iter().map(|c| c.name().to_owned()).collect(),
                refused: held.refused.clone(),
                state,
            });
        }
        for (pf, set) in registry.vf_sets() {
            if let Some(why) = &set.refused {
                all.push(Assignment {
                    address: *pf,
                    vf: None,
                    identity: set.record.identity,
                    previous_driver: None,
                    persistent: set.record.claim.is_persistent(),
                    sources: vec![set.record.claim.name().to_owned()],
                    refused: Some(format!(
                        "persisted {} VFs not recreated: {why}",
                        set.record.count
                    )),
                    state: None,
                });
            }
        }
        all.sort_by_key(|a| (a.address, a.vf.map(|v| v.index)));
        all
    }

    pub fn status(&self) -> Status {
        let vf_sets = lock(&self.registry)
            .vf_sets()
            .map(|(pf, set)| VfSetStatus {
                pf: *pf,
                count: set.record.count,
                assigned: set.record.assigned.iter().copied().collect(),
                source: set.record.claim.name().to_owned(),
                refused: set.refused.clone(),
            })
            .collect();
        // One lock at a time, each let go before the next: a guard left as a temporary in
        // the struct below would be held while later fields take other locks, in another
        // order than requests take them (that froze the daemon once).
        let assignments = self.assignments();
        let config = lock(&self.config).state();
        let refused = lock(&self.last_refused).clone();
        let leases = self.leases();
        let hotplug = lock(&self.hotplug).iter().cloned().collect();
        let last_errors = lock(&self.errors).iter().cloned().collect();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            assignments,
            vf_sets,
            config: Some(config),
            refused,
            leases,
            hotplug,
            pending: self.executor.pending(),
            unfinished: self.executor.unfinished(),
            last_errors,
        }
    }

    /// The host capability report of the root this engine reads (the daemon's `--sysfs-root`),
    /// MSRs through that root's dev/cpu/0/msr. Takes no lock: never waits for a bind.
    pub fn host_report(&self) -> HostReport {
        crate::observe::host::report_live(&self.root, &self.ids)
    }

    /// Stops taking mutations and waits until none is running.
    pub fn stop(&self) {
        self.executor.stop();
    }

    pub(super) fn note_error(&self, line: &str) {
        let mut line = line.replace('\n', " ");
        if line.len() > ERROR_LINE {
            let mut cut = ERROR_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str("...");
        }
        let mut errors = lock(&self.errors);
        if errors.len() == ERROR_RING {
            errors.pop_front();
        }
        errors.push_back(line);
    }

    /// "0000:01:00.0, 0000:02:00.0" or "0000:01:00.0 and 99 more".
    pub(super) fn short_list(addresses: &[PciAddress]) -> String {
        match addresses {
            [first, rest @ ..] if rest.len() > 3 => format!("{first} and {} more", rest.len()),
            _ => list(addresses),
        }
    }
}
