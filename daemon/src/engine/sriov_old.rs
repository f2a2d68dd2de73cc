//! SR-IOV virtual functions: `vf create`, `vf destroy`, `vf list`, their persistence and their
//! crash recovery. A child module of `manager.rs` (it extends [`Manager`]).
//!
//! Create: `sriov_drivers_autoprobe` ← 0 (with assign, so no host VF driver ever probes the new
//! VFs), `sriov_numvfs` ← 0 when another count is enabled (the kernel answers EBUSY otherwise),
//! `sriov_numvfs` ← N (decimal, formatted here: the kernel parses base 0), re-read it (a driver
//! may enable fewer), wait for the `virtfnN` links and the VFs' directories, bind the VFs to
//! vfio-pci with the binder, restore autoprobe. Any failure releases the VFs bound so far and
//! puts the count (through 0) and autoprobe back.
//!
//! Persistence records the PF (address and identity), the count and the assigned VF indexes,
//! never the VFs' own addresses.

use super::*;
use crate::kernel::sysfs::read_attr;
use crate::store::journal::VfIntent;
use crate::store::state::StoredVfs;
use passthroughd_proto::VfInfo;

/// How long `vf create` waits for the kernel to show the new VFs.
pub const DEFAULT_VF_WAIT: Duration = Duration::from_secs(10);
/// How often it looks.
const VF_POLL: Duration = Duration::from_millis(2);

const NUMVFS: &str = "sriov_numvfs";
const AUTOPROBE: &str = "sriov_drivers_autoprobe";

/// The VFs the daemon made on one PF (runtime or persistent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct VfRecord {
    pub identity: DeviceIdentity,
    pub count: u32,
    pub assigned: BTreeSet<u32>,
    pub persistent: bool,
}

/// Checks that `pf` names an SR-IOV physical function.
fn check_pf(inventory: &Inventory, pf: PciAddress) -> Result<&PciFunction, Error> {
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

/// "; VFs 0, 1 are back on vfio-pci" when `indexes` is not empty.
fn back_on_vfio(indexes: &BTreeSet<u32>) -> String {
    if indexes.is_empty() {
        return String::new();
    }
    let list: Vec<String> = indexes.iter().map(u32::to_string).collect();
    format!("; VFs {} are back on vfio-pci", list.join(", "))
}

/// The PF's group and its VFs' groups: what a VF operation locks.
fn vf_keys(inventory: &Inventory, pf: &PciFunction) -> BTreeSet<LockKey> {
    let mut keys: BTreeSet<LockKey> = inventory
        .vfs_of(pf.address)
        .into_iter()
        .map(lock_key)
        .collect();
    keys.insert(lock_key(pf));
    keys
}

impl Manager {
    /// Creates `count` VFs on `pf`. With `assign` each goes to vfio-pci before any host VF
    /// driver sees it; without `runtime` the VFs (and which are assigned) come back at start.
    pub fn vf_create(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        assign: bool,
        runtime: bool,
    ) -> Result<Vec<VfInfo>, Error> {
        let indexes: BTreeSet<u32> = if assign {
            (0..count).collect()
        } else {
            BTreeSet::new()
        };
        let result = self.vf_create_inner(caller, pf, count, &indexes, !runtime);
        if let Err(e) = &result {
            self.note_error(&format!("vf create {pf}: {e}"));
        }
        result
    }

    /// Removes every VF of `pf`. Refused while a VF is open by a process (always) or
    /// persistently assigned (unless `force`, which releases it first).
    pub fn vf_destroy(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error> {
        let result = self.vf_destroy_inner(caller, pf, force);
        if let Err(e) = &result {
            self.note_error(&format!("vf destroy {pf}: {e}"));
        }
        result
    }

    /// Every VF of `pf`, in index order. Takes no lock.
    pub fn vf_list(&self, pf: PciAddress) -> Result<Vec<VfInfo>, Error> {
        let inventory = self.inventory()?;
        check_pf(&inventory, pf)?;
        let vfs = inventory.vfs_of(pf);
        let snapshot =
            HostSnapshot::gather(&self.config.root, &vfs, self.options.addresses.as_ref());
        Ok(self.describe_vfs(pf, &vfs, Some(&snapshot)))
    }

    /// The VFs as `vf list` shows them; without a snapshot nobody holds them (just created).
    fn describe_vfs(
        &self,
        pf: PciAddress,
        vfs: &[&PciFunction],
        snapshot: Option<&HostSnapshot>,
    ) -> Vec<VfInfo> {
        let records = lock(&self.records);
        let ours = lock(&self.vfs).get(&pf).cloned();
        vfs.iter()
            .filter_map(|f| {
                let index = f.vf_of?.index;
                let on_vfio = f.driver.as_deref() == Some(VFIO_PCI);
                let assigned = records.contains_key(&f.address)
                    || (on_vfio && ours.as_ref().is_some_and(|r| r.assigned.contains(&index)));
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

    fn pf_attr(&self, pf: PciAddress, attr: &'static str) -> Result<Option<String>, Error> {
        read_attr(&self.config.root.pci_device_attr(pf, attr)).map_err(Error::from)
    }

    fn num_vfs_now(&self, pf: PciAddress) -> Result<u32, Error> {
        Ok(self
            .pf_attr(pf, NUMVFS)?
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    fn set_num_vfs(&self, pf: PciAddress, n: u32) -> Result<(), Error> {
        // Decimal, formatted here: the kernel parses base 0 ("010" would be 8).
        self.binder.write_attr(pf, NUMVFS, format!("{n}"))
    }

    fn set_autoprobe(&self, pf: PciAddress, on: bool) -> Result<(), Error> {
        self.binder
            .write_attr(pf, AUTOPROBE, if on { "1" } else { "0" }.to_owned())
    }

    fn autoprobe_now(&self, pf: PciAddress) -> Result<bool, Error> {
        Ok(self.pf_attr(pf, AUTOPROBE)?.as_deref() != Some("0"))
    }

    /// Refuses when a VF is open by a process (Busy, naming it) or, unless `force`, assigned
    /// through `assign` (persistently only, when `persistent_only`).
    fn check_vfs_free(
        &self,
        pf: PciAddress,
        vfs: &[&PciFunction],
        what: &str,
        force: bool,
        persistent_only: bool,
    ) -> Result<(), Error> {
        let snapshot =
            HostSnapshot::gather(&self.config.root, vfs, self.options.addresses.as_ref());
        for vf in vfs {
            if let Some(finding) = snapshot.check_in_use(vf) {
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
        if force {
            return Ok(());
        }
        let records = lock(&self.records);
        for vf in vfs {
            if let Some(r) = records.get(&vf.address)
                && (r.persistent || !persistent_only)
            {
                return Err(Error::Refused {
                    address: vf.address,
                    reason: format!(
                        "this VF of {pf} is assigned{}; release it first{}",
                        if r.persistent { " persistently" } else { "" },
                        if persistent_only {
                            " or use --force"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        Ok(())
    }

    fn vf_create_inner(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        assign: &BTreeSet<u32>,
        persistent: bool,
    ) -> Result<Vec<VfInfo>, Error> {
        if count == 0 {
            return Err(Error::InvalidArgument(
                "a count of 0 creates no VFs; use vf destroy to remove them".into(),
            ));
        }
        let keys = {
            let inventory = self.inventory()?;
            vf_keys(&inventory, check_pf(&inventory, pf)?)
        };
        let _groups = self.lock_groups(keys.clone())?;
        let inventory = self.inventory()?;
        let f = check_pf(&inventory, pf)?;
        let Some(sriov) = f.sriov else {
            return Err(Error::Failed(format!("{pf} lost its SR-IOV capability")));
        };
        if count > sriov.total_vfs {
            return Err(Error::InvalidArgument(format!(
                "{pf} supports at most {} VFs (sriov_totalvfs); {count} asked for",
                sriov.total_vfs
            )));
        }
        let previous_count = self.num_vfs_now(pf)?;
        let resize = previous_count != count;
        if resize {
            match f.driver.as_deref() {
                Some(VFIO_PCI) => {
                    return Err(Error::Refused {
                        address: pf,
                        reason: "it is bound to vfio-pci, which cannot enable VFs; release it \
                                 to its host driver first (passthroughctl release)"
                            .into(),
                    });
                }
                None => {
                    return Err(Error::Refused {
                        address: pf,
                        reason: "it has no driver, and its host driver is what enables VFs; \
                                 bind it first (or release it)"
                            .into(),
                    });
                }
                Some(_) => {}
            }
        }
        let existing = inventory.vfs_of(pf);
        if resize && previous_count > 0 {
            self.check_vfs_free(pf, &existing, "resize", false, false)?;
        }
        let mut assigned = assign.clone();
        if !resize && let Some(r) = lock(&self.vfs).get(&pf) {
            assigned.extend(r.assigned.iter().copied());
        }
        let intent = VfIntent {
            pf,
            identity: StoredIdentity(identity_of(f)),
            count,
            assign: assign.iter().copied().collect(),
            previous_count,
            previous_autoprobe: self.autoprobe_now(pf)?,
        };
        let journal = JournalEntry::begin(
            &self.config.state_dir,
            &Intent::for_vfs(Operation::VfCreate, persistent, intent.clone()),
        )?;
        // VFs an earlier `vf create --assign` put on vfio-pci: a failed resize brings the old
        // count back, and these go back to vfio-pci with it.
        let assigned_before: BTreeSet<u32> = lock(&self.vfs)
            .get(&pf)
            .map(|r| r.assigned.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|&i| i < previous_count)
            .collect();
        let vfs = match self.make_vfs(&intent, resize, &keys, &assigned_before) {
            Ok(vfs) => vfs,
            Err(e) => {
                let put_back = (!resize || self.num_vfs_now(pf).ok() == Some(previous_count))
                    && self.autoprobe_now(pf).ok() == Some(intent.previous_autoprobe);
                if !put_back {
                    // The rollback did not finish: the next start rolls back (a runtime
                    // create's recovery) instead of finishing the create.
                    JournalEntry::begin(
                        &self.config.state_dir,
                        &Intent::for_vfs(Operation::VfCreate, false, intent.clone()),
                    )?;
                }
                journal.finish()?;
                return Err(e);
            }
        };
        let record = VfRecord {
            identity: identity_of(f),
            count,
            assigned: assigned.clone(),
            persistent,
        };
        if persistent
            && let Err(e) = self.save_state(|s| {
                s.upsert_vfs(StoredVfs {
                    pf,
                    identity: StoredIdentity(record.identity),
                    count,
                    assigned: assigned.iter().copied().collect(),
                });
            })
        {
            // Leave the journal: the next start finishes the persistent create.
            return Err(e);
        }
        lock(&self.vfs).insert(pf, record);
        journal.finish()?;
        info!(uid = caller.uid, caller = %caller.bus_name, pf = %pf, count,
            assigned = assigned.len(), persistent, "VFs created");
        let refs: Vec<&PciFunction> = vfs.iter().collect();
        if resize {
            // New VFs: nobody can hold them yet, so no /proc scan.
            Ok(self.describe_vfs(pf, &refs, None))
        } else {
            let snapshot =
                HostSnapshot::gather(&self.config.root, &refs, self.options.addresses.as_ref());
            Ok(self.describe_vfs(pf, &refs, Some(&snapshot)))
        }
    }

    /// The sysfs part of create, all or nothing: on failure the VFs bound so far are released,
    /// the count is back to `previous_count` (with the VFs in `assigned_before` on vfio-pci
    /// again) and autoprobe to what it was.
    fn make_vfs(
        &self,
        intent: &VfIntent,
        resize: bool,
        held: &BTreeSet<LockKey>,
        assigned_before: &BTreeSet<u32>,
    ) -> Result<Vec<PciFunction>, Error> {
        let pf = intent.pf;
        let assign = !intent.assign.is_empty();
        if assign {
            self.binder.ensure_vfio_loaded()?;
        }
        // Only new VFs can be probed: no VFs created, nothing to keep from the host driver.
        let autoprobe_off = assign && resize && intent.previous_autoprobe;
        if autoprobe_off {
            self.set_autoprobe(pf, false)?;
        }
        let mut bound = Vec::new();
        let result = self.make_vfs_steps(intent, resize, held, &mut bound);
        let result = match result {
            Ok(vfs) => Ok(vfs),
            Err(e) => {
                let count_back = if resize {
                    Some(intent.previous_count)
                } else {
                    None
                };
                let reassign = if resize {
                    assigned_before
                } else {
                    &BTreeSet::new()
                };
                match self.undo_vfs(pf, &bound, count_back, intent.previous_autoprobe, reassign) {
                    Ok(()) => Err(annotate(
                        e,
                        &format!(
                            "; rolled back: {} VFs, {} released{}",
                            intent.previous_count,
                            bound.len(),
                            back_on_vfio(reassign)
                        ),
                    )),
                    Err(u) => Err(annotate(e, &format!("; rolling back also failed: {u}"))),
                }
            }
        };
        if autoprobe_off && !self.autoprobe_now(pf).unwrap_or(true) {
            let restored = self.set_autoprobe(pf, true);
            if result.is_ok() {
                restored?;
            }
        }
        let mut vfs = result?;
        if autoprobe_off {
            // VFs left out of the assignment get what autoprobe would have given them.
            for (index, f) in vfs.iter_mut().enumerate() {
                let wanted = u32::try_from(index).is_ok_and(|i| intent.assign.contains(&i));
                if !wanted && f.driver.is_none() {
                    match self.binder.restore(f.address, None) {
                        Ok(now) => f.driver = now,
                        Err(e) => warn!(device = %f.address, error = %e,
                            "could not probe a host driver for a VF"),
                    }
                }
            }
        }
        Ok(vfs)
    }

    fn make_vfs_steps(
        &self,
        intent: &VfIntent,
        resize: bool,
        held: &BTreeSet<LockKey>,
        bound: &mut Vec<PciAddress>,
    ) -> Result<Vec<PciFunction>, Error> {
        let pf = intent.pf;
        let count = intent.count;
        if resize {
            if intent.previous_count > 0 {
                self.set_num_vfs(pf, 0)?;
            }
            self.set_num_vfs(pf, count)?;
            let now = self.num_vfs_now(pf)?;
            if now != count {
                return Err(Error::Failed(format!(
                    "the driver of {pf} enabled {now} of the {count} VFs asked for"
                )));
            }
        }
        let addresses = self.wait_for_vfs(pf, count)?;
        // New VFs bring new IOMMU groups (or reuse the numbers of the old ones, which we hold):
        // lock them too, so no other request takes a VF while it is being set up.
        let new_keys = self
            .lock_keys(&addresses)?
            .difference(held)
            .copied()
            .collect();
        let _new_groups = self.lock_groups(new_keys)?;
        let inventory = self.inventory()?;
        let mut vfs = addresses
            .iter()
            .map(|a| {
                inventory
                    .function(*a)
                    .cloned()
                    .ok_or(Error::NoSuchDevice(*a))
            })
            .collect::<Result<Vec<PciFunction>, Error>>()?;
        for &index in &intent.assign {
            let Some(f) = vfs.get_mut(index as usize) else {
                continue;
            };
            if f.driver.as_deref() == Some(VFIO_PCI) {
                continue;
            }
            let change = self
                .binder
                .bind_vfio(f)
                .map_err(|e| annotate(e, &format!(" (binding VF {index} of {pf})")))?;
            bound.push(f.address);
            f.driver = change.new_driver;
        }
        Ok(vfs)
    }

    /// Waits (bounded) until `virtfn0..count` resolve to VFs whose directories exist.
    fn wait_for_vfs(&self, pf: PciAddress, count: u32) -> Result<Vec<PciAddress>, Error> {
        let deadline = Instant::now() + self.options.vf_wait;
        loop {
            let mut found = Vec::with_capacity(count as usize);
            for index in 0..count {
                let vf = crate::kernel::sysfs::read_virtfn(&self.config.root, pf, index)
                    .ok()
                    .flatten()
                    .filter(|a| self.binder.exists(*a));
                match vf {
                    Some(a) => found.push(a),
                    None => break,
                }
            }
            if found.len() == count as usize {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(Error::Failed(format!(
                    "timed out after {} ms waiting for the VFs of {pf} to appear ({} of {count} \
                     there); the PF driver may be slow or out of resources",
                    self.options.vf_wait.as_millis(),
                    found.len()
                )));
            }
            std::thread::sleep(VF_POLL);
        }
    }

    /// Puts a PF back: `bound` VFs released, the count back to `count` (through 0) with the VFs
    /// in `reassign` on vfio-pci as before (autoprobe stays off meanwhile, so the host VF driver
    /// never takes them), autoprobe to `autoprobe`. Tries every step; reports the first failure.
    fn undo_vfs(
        &self,
        pf: PciAddress,
        bound: &[PciAddress],
        count: Option<u32>,
        autoprobe: bool,
        reassign: &BTreeSet<u32>,
    ) -> Result<(), Error> {
        let mut first: Option<Error> = None;
        let mut keep = |r: Result<(), Error>| {
            if let Err(e) = r
                && first.is_none()
            {
                first = Some(e);
            }
        };
        let now = self.num_vfs_now(pf)?;
        let recount = count.is_some_and(|c| c != now);
        for a in bound.iter().rev() {
            // VFs about to go away only need to leave vfio-pci: probing a host driver onto them
            // first would be wasted work (and is what --assign exists to avoid).
            keep(if recount {
                self.binder.detach(*a).map(drop)
            } else {
                self.binder.restore(*a, None).map(drop)
            });
        }
        if let Some(count) = count
            && recount
        {
            if now != 0 {
                keep(self.set_num_vfs(pf, 0));
            }
            let probe = autoprobe && reassign.is_empty();
            if self.autoprobe_now(pf)? != probe {
                keep(self.set_autoprobe(pf, probe));
            }
            if count > 0 {
                keep(self.set_num_vfs(pf, count));
                if !reassign.is_empty() {
                    keep(self.bind_old_vfs(pf, count, reassign, autoprobe));
                }
            }
        }
        if self.autoprobe_now(pf)? != autoprobe {
            keep(self.set_autoprobe(pf, autoprobe));
        }
        first.map_or(Ok(()), Err)
    }

    /// After the count is back to `count` with autoprobe off: the VFs in `indexes` go to
    /// vfio-pci, the others (with `autoprobe`) to what autoprobe would have given them.
    fn bind_old_vfs(
        &self,
        pf: PciAddress,
        count: u32,
        indexes: &BTreeSet<u32>,
        autoprobe: bool,
    ) -> Result<(), Error> {
        let addresses = self.wait_for_vfs(pf, count)?;
        let inventory = self.inventory_of(&self.lock_keys(&addresses)?)?;
        for (index, address) in (0..).zip(&addresses) {
            if indexes.contains(&index) {
                let f = inventory
                    .function(*address)
                    .ok_or(Error::NoSuchDevice(*address))?;
                self.binder
                    .bind_vfio(f)
                    .map_err(|e| annotate(e, &format!(" (VF {index})")))?;
            } else if autoprobe {
                self.binder.restore(*address, None)?;
            }
        }
        Ok(())
    }

    fn vf_destroy_inner(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error> {
        let keys = {
            let inventory = self.inventory()?;
            vf_keys(&inventory, check_pf(&inventory, pf)?)
        };
        let _groups = self.lock_groups(keys)?;
        let inventory = self.inventory()?;
        let f = check_pf(&inventory, pf)?;
        let vfs = inventory.vfs_of(pf);
        self.check_vfs_free(pf, &vfs, "destroy", force, true)?;
        let previous_count = self.num_vfs_now(pf)?;
        let intent = VfIntent {
            pf,
            identity: StoredIdentity(identity_of(f)),
            count: 0,
            assign: Vec::new(),
            previous_count,
            previous_autoprobe: self.autoprobe_now(pf)?,
        };
        let journal = JournalEntry::begin(
            &self.config.state_dir,
            &Intent::for_vfs(Operation::VfDestroy, true, intent),
        )?;
        let changes = match self.remove_vfs(pf, &vfs) {
            Ok(changes) => changes,
            Err(e) => {
                if e.kind() != crate::ErrorKind::Busy {
                    journal.finish()?;
                }
                return Err(e);
            }
        };
        journal.finish()?;
        info!(uid = caller.uid, caller = %caller.bus_name, pf = %pf, previous_count, force,
            "VFs destroyed");
        Ok(changes)
    }

    /// Releases the VFs on vfio-pci, sets the count to 0, forgets the VFs (records, state).
    fn remove_vfs(&self, pf: PciAddress, vfs: &[&PciFunction]) -> Result<Vec<Change>, Error> {
        let mut changes = Vec::new();
        let assigned: Vec<PciAddress> = {
            let records = lock(&self.records);
            vfs.iter()
                .map(|f| f.address)
                .filter(|a| records.contains_key(a))
                .collect()
        };
        for vf in vfs {
            if vf.driver.as_deref() == Some(VFIO_PCI) {
                self.binder.detach(vf.address)?;
            }
            changes.push(Change {
                address: vf.address,
                old_driver: vf.driver.clone(),
                new_driver: None,
            });
        }
        if self.num_vfs_now(pf)? != 0 {
            self.set_num_vfs(pf, 0)?;
        }
        {
            let mut records = lock(&self.records);
            for a in &assigned {
                records.remove(a);
            }
        }
        lock(&self.vfs).remove(&pf);
        self.save_state(|s| {
            s.remove_vfs(pf);
            for a in &assigned {
                s.remove(*a);
            }
        })?;
        Ok(changes)
    }

    // --- start-up ---

    /// Finishes (persistent create, destroy) or rolls back (runtime create) an interrupted VF
    /// operation.
    pub(super) fn recover_vfs(&self, intent: &Intent, vf: &VfIntent) -> String {
        let pf = vf.pf;
        let inventory = match self.inventory() {
            Ok(i) => i,
            Err(e) => return format!("{pf}: cannot read the PCI tree to recover VFs: {e}"),
        };
        let Some(f) = inventory.function(pf) else {
            return format!("{pf}: gone since the interrupted VF operation; nothing to do");
        };
        if identity_of(f) != vf.identity.0 {
            return format!("{pf}: now holds another device; left alone");
        }
        let caller = startup_caller();
        let outcome = match (intent.operation, intent.persistent) {
            (Operation::VfCreate, true) => {
                let assign: BTreeSet<u32> = vf.assign.iter().copied().collect();
                let done = self.vf_create_inner(&caller, pf, vf.count, &assign, true);
                // A crash after autoprobe went to 0 left it there: put the admin's value back.
                let probe = self.autoprobe_now(pf).and_then(|now| {
                    if now == vf.previous_autoprobe {
                        Ok(())
                    } else {
                        self.set_autoprobe(pf, vf.previous_autoprobe)
                    }
                });
                match done.and_then(|list| probe.map(|()| list)) {
                    Ok(list) => Ok(format!(
                        "{pf}: interrupted vf create finished ({} VFs, {} on vfio-pci)",
                        list.len(),
                        assign.len()
                    )),
                    Err(e) => {
                        let _ = self.undo_vfs(
                            pf,
                            &[],
                            Some(vf.previous_count),
                            vf.previous_autoprobe,
                            &BTreeSet::new(),
                        );
                        Err(format!("{pf}: interrupted vf create undone: {e}"))
                    }
                }
            }
            (Operation::VfCreate, false) => {
                match self.undo_vfs(
                    pf,
                    &[],
                    Some(vf.previous_count),
                    vf.previous_autoprobe,
                    &BTreeSet::new(),
                ) {
                    Ok(()) => Ok(format!(
                        "{pf}: interrupted runtime vf create rolled back to {} VFs",
                        vf.previous_count
                    )),
                    Err(e) => Err(format!(
                        "{pf}: rolling back an interrupted vf create failed: {e}"
                    )),
                }
            }
            (Operation::VfDestroy, _) => {
                let vfs = inventory.vfs_of(pf);
                match self.remove_vfs(pf, &vfs) {
                    Ok(_) => Ok(format!("{pf}: interrupted vf destroy finished")),
                    Err(e) => Err(format!(
                        "{pf}: finishing an interrupted vf destroy failed: {e}"
                    )),
                }
            }
            (op, _) => Err(format!("{pf}: a {op:?} journal with VF details; ignored")),
        };
        match outcome {
            Ok(line) => line,
            Err(line) => {
                warn!("{line}");
                self.note_error(&line);
                line
            }
        }
    }

    /// Recreates the persistent VFs of state.toml (PF identity checked), assigning the recorded
    /// indexes again; others are refused and shown in `status`.
    pub(super) fn reapply_vfs(&self, report: &mut StartupReport) -> Result<(), Error> {
        let state = State::load(&self.config.state_dir)?;
        let caller = startup_caller();
        for entry in &state.vfs {
            let pf = entry.pf;
            let why = match self.inventory()?.function(pf) {
                None => Some("no device at the PF's address any more".to_owned()),
                Some(f) if identity_of(f) != entry.identity.0 => Some(format!(
                    "the PF address now holds {} instead of {}",
                    show_identity(&identity_of(f)),
                    show_identity(&entry.identity.0)
                )),
                Some(_) => None,
            };
            let result = match why {
                Some(why) => Err(why),
                None => {
                    let assign: BTreeSet<u32> = entry.assigned.iter().copied().collect();
                    self.vf_create_inner(&caller, pf, entry.count, &assign, true)
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            };
            match result {
                Ok(()) => report.vfs.push(pf),
                Err(why) => {
                    let line = format!("{pf}: persisted VFs not recreated: {why}");
                    warn!("{line}");
                    self.note_error(&line);
                    lock(&self.refused).push(Assignment {
                        address: pf,
                        identity: entry.identity.0,
                        previous_driver: None,
                        persistent: true,
                        refused: Some(format!(
                            "persisted {} VFs not recreated: {why}",
                            entry.count
                        )),
                    });
                    report.refused.push((pf, why));
                }
            }
        }
        Ok(())
    }
}
