//! The engine: every operation the daemon offers, as plain blocking calls. The D-Bus service
//! (`service.rs`) is a thin layer over this; tests drive it directly over a simulated kernel.
//!
//! Concurrency contract: methods take `&self`; operations on different IOMMU groups may run in
//! parallel, operations touching the same group are serialized, and `inventory`/`status`/
//! `host_report` never wait for a slow bind. Callers run these on a blocking thread, never on the async
//! dispatch path.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use passthroughd_proto::device::driver_is_vfio_safe;
use passthroughd_proto::{
    AssignOptions, Assignment, Change, DeviceIdentity, HostReport, PciAddress, PciFunction,
    ReleaseOptions, Status,
};
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::kernel::Kernel;
use crate::kernel::driver::{Binder, DEFAULT_WRITE_TIMEOUT, VFIO_PCI};
use crate::kernel::sysfs::read_link_name;
use crate::observe::guard::{
    AddressProvider, HostSnapshot, Severity, StaticAddresses, SystemAddresses,
};
use crate::store::journal::{self, Intent, IntentFunction, JournalEntry, Operation};
use crate::store::state::{State, StoredAssignment, StoredIdentity};
use crate::{Inventory, PciIds, SysfsRoot};

#[path = "sriov_old.rs"]
mod sriov;
pub use sriov::DEFAULT_VF_WAIT;

/// Wall time of each phase of one request, logged in one debug line at the end: where a slow
/// assign spends its time (scan, guard, journal, each kernel write...) without a profiler.
struct Phases {
    what: &'static str,
    last: Instant,
    parts: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start(what: &'static str) -> Self {
        Self {
            what,
            last: Instant::now(),
            parts: Vec::new(),
        }
    }

    /// Ends the phase running now under `name`.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.parts.push((name, now - self.last));
        self.last = now;
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        let total: Duration = self.parts.iter().map(|(_, d)| *d).sum();
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(n, d)| format!("{n}={:.1}", d.as_secs_f64() * 1e3))
            .collect();
        debug!(request = self.what, total_ms = total.as_secs_f64() * 1e3, phases_ms = %parts.join(" "), "timing");
    }
}

/// Who asked, for the log line every mutation writes (authorization happens before this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Unique bus name (`:1.42`), or a fixed label for the daemon's own start-up work.
    pub bus_name: String,
}

/// Everything the engine needs from its environment.
pub struct ManagerConfig {
    pub root: SysfsRoot,
    /// Holds state.toml and the journal.
    pub state_dir: PathBuf,
    /// The one seam for kernel-facing writes.
    pub kernel: Arc<dyn Kernel>,
    pub ids: Arc<PciIds>,
}

impl std::fmt::Debug for ManagerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerConfig")
            .field("root", &self.root)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// What start-up did: journal recovery and persisted assignments re-applied or refused.
#[derive(Debug, Clone, Default)]
pub struct StartupReport {
    pub recovered: Vec<String>,
    pub applied: Vec<PciAddress>,
    pub refused: Vec<(PciAddress, String)>,
    /// PFs whose persisted VFs were recreated.
    pub vfs: Vec<PciAddress>,
}

/// Tunables and seams beyond [`ManagerConfig`], with defaults from [`EngineOptions::for_root`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Where interface addresses come from (IPv4 is not in /proc in a simple form).
    pub addresses: Arc<dyn AddressProvider>,
    /// How long one sysfs write may take before the request gets Busy.
    pub write_timeout: Duration,
    /// How long a request waits for another request on the same IOMMU group before Busy.
    pub group_wait: Duration,
    /// How long `vf create` waits for new VFs to appear.
    pub vf_wait: Duration,
}

impl EngineOptions {
    /// The host's own interfaces when the root is `/`; none for a fake root, whose interface
    /// names would otherwise be confused with the host's.
    pub fn for_root(root: &SysfsRoot) -> Self {
        let addresses: Arc<dyn AddressProvider> = if root.root() == std::path::Path::new("/") {
            Arc::new(SystemAddresses)
        } else {
            Arc::new(StaticAddresses::default())
        };
        Self {
            addresses,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            group_wait: DEFAULT_GROUP_WAIT,
            vf_wait: DEFAULT_VF_WAIT,
        }
    }
}

/// How long a request waits for a busy IOMMU group before answering Busy.
pub const DEFAULT_GROUP_WAIT: Duration = Duration::from_secs(5);
/// At most this many IOMMU groups are bound at once by one request.
const MAX_BIND_THREADS: usize = 8;
/// How many recent failures `status` keeps.
const ERROR_RING: usize = 20;

/// What a request locks: its functions' IOMMU groups (a function without one, by address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum LockKey {
    Group(u32),
    Function(PciAddress),
}

impl std::fmt::Display for LockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Group(g) => write!(f, "IOMMU group {g}"),
            Self::Function(a) => write!(f, "{a}"),
        }
    }
}

fn lock_key(f: &PciFunction) -> LockKey {
    f.iommu_group
        .map_or(LockKey::Function(f.address), LockKey::Group)
}

fn identity_of(f: &PciFunction) -> DeviceIdentity {
    DeviceIdentity {
        vendor_id: f.vendor_id,
        device_id: f.device_id,
        subsystem_vendor_id: f.subsystem_vendor_id,
        subsystem_device_id: f.subsystem_device_id,
    }
}

fn show_identity(id: &DeviceIdentity) -> String {
    format!(
        "{:04x}:{:04x} (subsystem {:04x}:{:04x})",
        id.vendor_id, id.device_id, id.subsystem_vendor_id, id.subsystem_device_id
    )
}

fn list(addresses: &[PciAddress]) -> String {
    addresses
        .iter()
        .map(PciAddress::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Locks (a poisoned lock only means another request panicked; the data is still coherent
/// because every update is a single insert or remove).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The label start-up work logs as its caller.
fn startup_caller() -> Caller {
    Caller {
        uid: 0,
        bus_name: "startup".into(),
    }
}

#[derive(Debug)]
pub struct Manager {
    config: ManagerConfig,
    options: EngineOptions,
    binder: Binder,
    started: Instant,
    /// Active assignments (runtime and persistent), by address.
    records: Mutex<BTreeMap<PciAddress, Assignment>>,
    /// Persisted assignments refused at start (kept in state.toml; shown in `status`).
    refused: Mutex<Vec<Assignment>>,
    errors: Mutex<VecDeque<String>>,
    /// Groups (or group-less functions) some request is working on now.
    busy: Mutex<HashSet<LockKey>>,
    freed: Condvar,
    /// Serializes read-modify-write of state.toml between requests on different groups.
    state_lock: Mutex<()>,
    /// Readers' copy of the last scan (see [`Manager::snapshot`]): the generation it was taken
    /// at, when, and the scan.
    cached: Mutex<Option<(u64, Instant, Arc<Inventory>)>>,
    /// Bumped whenever a request lets go of its groups and on every kernel PCI uevent.
    generation: AtomicU64,
    /// Set while something reports outside changes through [`Manager::invalidate_inventory`].
    cache_enabled: AtomicBool,
    /// VFs the daemon created, by PF.
    vfs: Mutex<BTreeMap<PciAddress, sriov::VfRecord>>,
}

/// How long a cached inventory may serve readers. Some changes made outside the daemon raise
/// no uevent (writes to `driver_override` or `sriov_drivers_autoprobe`); this bounds how stale
/// a read can be after one of those.
pub const INVENTORY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Holds a request's groups; dropping it lets the next request on them in.
struct GroupGuard<'a> {
    manager: &'a Manager,
    keys: BTreeSet<LockKey>,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.manager.busy);
        for key in &self.keys {
            busy.remove(key);
        }
        // Every mutation holds its groups while it writes: once it lets go, readers must see
        // what it did, even before the kernel's uevents arrive.
        self.manager.invalidate_inventory();
        self.manager.freed.notify_all();
    }
}

impl Manager {
    /// Loads state, finishes or rolls back whatever the journal says was in flight, then
    /// re-applies persisted assignments (refusing any whose address now holds another device).
    pub fn open(config: ManagerConfig) -> Result<(Self, StartupReport), Error> {
        let options = EngineOptions::for_root(&config.root);
        Self::open_with(config, options)
    }

    /// [`Self::open`] with explicit [`EngineOptions`] (tests inject addresses and timeouts).
    pub fn open_with(
        config: ManagerConfig,
        options: EngineOptions,
    ) -> Result<(Self, StartupReport), Error> {
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            Error::Failed(format!(
                "creating state directory {}: {e}",
                config.state_dir.display()
            ))
        })?;
        // Fails on an unknown state version before anything is touched.
        State::load(&config.state_dir)?;
        let binder = Binder::new(
            config.root.clone(),
            Arc::clone(&config.kernel),
            options.write_timeout,
        );
        let manager = Self {
            config,
            options,
            binder,
            started: Instant::now(),
            records: Mutex::new(BTreeMap::new()),
            refused: Mutex::new(Vec::new()),
            errors: Mutex::new(VecDeque::new()),
            busy: Mutex::new(HashSet::new()),
            freed: Condvar::new(),
            state_lock: Mutex::new(()),
            cached: Mutex::new(None),
            generation: AtomicU64::new(0),
            cache_enabled: AtomicBool::new(false),
            vfs: Mutex::new(BTreeMap::new()),
        };
        let mut report = StartupReport::default();
        manager.recover(&mut report)?;
        // VFs first: an assignment of a VF needs the VF to exist.
        manager.reapply_vfs(&mut report)?;
        manager.reapply(&mut report)?;
        Ok((manager, report))
    }

    /// A fresh scan of functions and groups. Takes no lock: never waits for a bind. Every
    /// decision the engine makes uses this, never the readers' cache.
    pub fn inventory(&self) -> Result<Inventory, Error> {
        Ok(Inventory::scan(&self.config.root, &self.config.ids)?)
    }

    /// Just the functions and groups behind `keys`, read fresh: what a request holding those
    /// locks plans with (a whole-host scan costs ten times more on a small host, and grows
    /// with it).
    fn inventory_of(&self, keys: &BTreeSet<LockKey>) -> Result<Inventory, Error> {
        let mut groups = Vec::new();
        let mut loose = Vec::new();
        for key in keys {
            match *key {
                LockKey::Group(g) => groups.push(g),
                LockKey::Function(a) => loose.push(a),
            }
        }
        Ok(Inventory::scan_groups(
            &self.config.root,
            &self.config.ids,
            &groups,
            &loose,
        )?)
    }

    /// The inventory for readers (list, groups, show). While the cache is enabled (the daemon's
    /// uevent listener runs), repeated reads share one scan until something changes: a request
    /// finished, a PCI uevent arrived, or [`INVENTORY_CACHE_TTL`] passed. Without the listener
    /// every read scans.
    pub fn snapshot(&self) -> Result<Arc<Inventory>, Error> {
        if !self.cache_enabled.load(Ordering::Acquire) {
            return Ok(Arc::new(self.inventory()?));
        }
        // Taken before the scan: a change during the scan leaves the entry already stale.
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, at, inventory)) = &*lock(&self.cached)
            && *g == generation
            && at.elapsed() < INVENTORY_CACHE_TTL
        {
            return Ok(Arc::clone(inventory));
        }
        let started = Instant::now();
        let fresh = Arc::new(self.inventory()?);
        *lock(&self.cached) = Some((generation, started, Arc::clone(&fresh)));
        Ok(fresh)
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

    /// Every assignment the daemon knows of, persistent or runtime, plus persisted ones that
    /// were refused at start (with `refused` set).
    pub fn assignments(&self) -> Vec<Assignment> {
        let mut all: Vec<Assignment> = lock(&self.records).values().cloned().collect();
        all.extend(lock(&self.refused).iter().cloned());
        all.sort_by_key(|a| a.address);
        all
    }

    /// Binds each function (or with `group`, each function's whole group) to vfio-pci.
    /// All or nothing: on any failure, functions already moved go back to their drivers.
    ///
    /// A function already on vfio-pci is a success without a [`Change`] (assign is
    /// idempotent, so scripts and the boot-time apply can repeat it); a persistent request
    /// makes an existing runtime record persistent.
    pub fn assign(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        let result = self.assign_inner(caller, addresses, options);
        if let Err(e) = &result {
            self.note_error(&format!("assign {}: {e}", list(addresses)));
        }
        result
    }

    /// Returns each function to the driver it had before assignment (or the kernel's choice).
    /// `runtime` keeps the persisted entry, so the assignment comes back at the next start.
    pub fn release(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        let result = self.release_inner(caller, addresses, options);
        if let Err(e) = &result {
            self.note_error(&format!("release {}: {e}", list(addresses)));
        }
        result
    }

    pub fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            assignments: self.assignments(),
            last_errors: lock(&self.errors).iter().cloned().collect(),
        }
    }

    /// The host capability report of the root this engine reads (the daemon's `--sysfs-root`),
    /// MSRs through that root's dev/cpu/0/msr. Takes no lock: never waits for a bind.
    pub fn host_report(&self) -> HostReport {
        crate::observe::host::report_live(&self.config.root, &self.config.ids)
    }

    fn note_error(&self, line: &str) {
        let line = line.replace('\n', " ");
        let mut errors = lock(&self.errors);
        if errors.len() == ERROR_RING {
            errors.pop_front();
        }
        errors.push_back(line);
    }

    // --- request plumbing ---

    /// Empty lists and duplicates are caller mistakes, caught before anything is read.
    fn check_request(addresses: &[PciAddress]) -> Result<(), Error> {
        if addresses.is_empty() {
            return Err(Error::InvalidArgument("no PCI address given".into()));
        }
        let mut seen = HashSet::new();
        for a in addresses {
            if !seen.insert(*a) {
                return Err(Error::InvalidArgument(format!(
                    "{a} is listed more than once; name each function once"
                )));
            }
        }
        Ok(())
    }

    fn functions<'i>(
        inventory: &'i Inventory,
        addresses: &[PciAddress],
    ) -> Result<Vec<&'i PciFunction>, Error> {
        addresses
            .iter()
            .map(|a| inventory.function(*a).ok_or(Error::NoSuchDevice(*a)))
            .collect()
    }

    /// The locks a request on `addresses` takes, read from each function's `iommu_group` link:
    /// known without a scan, so a request's one scan runs under its locks. `--group` needs
    /// nothing more: the other members share the group's key.
    fn lock_keys(&self, addresses: &[PciAddress]) -> Result<BTreeSet<LockKey>, Error> {
        addresses
            .iter()
            .map(|&address| {
                if !self.binder.exists(address) {
                    return Err(Error::NoSuchDevice(address));
                }
                let link = self.config.root.pci_device_attr(address, "iommu_group");
                let group = read_link_name(&link)?.and_then(|name| name.parse().ok());
                Ok(group.map_or(LockKey::Function(address), LockKey::Group))
            })
            .collect()
    }

    /// Waits (up to `group_wait`) until no other request holds any of `keys`, then takes them
    /// all at once (all at once, so two requests can never deadlock on each other's groups).
    fn lock_groups(&self, keys: BTreeSet<LockKey>) -> Result<GroupGuard<'_>, Error> {
        let deadline = Instant::now() + self.options.group_wait;
        let mut busy = lock(&self.busy);
        loop {
            match keys.iter().find(|k| busy.contains(k)) {
                None => break,
                Some(key) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::Busy(format!(
                            "{key} is busy with another request; try again in a moment"
                        )));
                    }
                    busy = self
                        .freed
                        .wait_timeout(busy, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        busy.extend(keys.iter().copied());
        Ok(GroupGuard {
            manager: self,
            keys,
        })
    }

    fn save_state(&self, update: impl FnOnce(&mut State)) -> Result<(), Error> {
        let _guard = lock(&self.state_lock);
        let mut state = State::load(&self.config.state_dir)?;
        update(&mut state);
        state.save(&self.config.state_dir)
    }

    // --- assign ---

    /// The functions an assign request moves: the requested ones, plus with `group` every
    /// other non-bridge member of their groups not on pcieport. Refuses what can never work
    /// (bridges, no IOMMU group, PFs with VFs) and, without `group`, a group left half on
    /// host drivers.
    fn plan_assign(
        inventory: &Inventory,
        requested: &[&PciFunction],
        group: bool,
    ) -> Result<Vec<PciFunction>, Error> {
        let wanted: HashSet<PciAddress> = requested.iter().map(|f| f.address).collect();
        let mut plan: BTreeMap<PciAddress, PciFunction> = BTreeMap::new();
        for f in requested {
            let address = f.address;
            if f.is_bridge() {
                return Err(Error::Refused {
                    address,
                    reason: "it is a PCI bridge (class 0x06); bridges cannot be assigned, \
                             assign the devices behind it instead"
                        .into(),
                });
            }
            let Some(id) = f.iommu_group else {
                return Err(Error::Refused {
                    address,
                    reason: "it has no IOMMU group, so the IOMMU is off or not translating it; \
                             add intel_iommu=on (or amd_iommu=on) to the kernel command line"
                        .into(),
                });
            };
            if let Some(sriov) = f.sriov.filter(|s| s.num_vfs > 0) {
                return Err(Error::Refused {
                    address,
                    reason: format!(
                        "it is an SR-IOV PF with {} VFs enabled, which vfio-pci refuses; \
                         destroy the VFs first (passthroughctl vf destroy {address})",
                        sriov.num_vfs
                    ),
                });
            }
            plan.insert(address, (*f).clone());
            let members = inventory
                .group(id)
                .map(|g| g.members.clone())
                .unwrap_or_default();
            let others: Vec<&PciFunction> = members
                .iter()
                .filter(|m| !wanted.contains(m))
                .filter_map(|m| inventory.function(*m))
                .collect();
            if group {
                for m in others {
                    if !m.is_bridge() && m.driver.as_deref() != Some("pcieport") {
                        plan.insert(m.address, m.clone());
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
                        address,
                        reason: format!(
                            "its IOMMU group {id} also holds {}, which would leave the group \
                             unusable; assign them too, or the whole group with --group",
                            blockers.join(", ")
                        ),
                    });
                }
            }
        }
        Ok(plan.into_values().collect())
    }

    fn assign_inner(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        Self::check_request(addresses)?;
        let mut phases = Phases::start("assign");
        let keys = self.lock_keys(addresses)?;
        let _groups = self.lock_groups(keys.clone())?;
        phases.mark("lock");
        // Read and plan under the lock: no other request can move a member meanwhile.
        let inventory = self.inventory_of(&keys)?;
        let requested = Self::functions(&inventory, addresses)?;
        let plan = Self::plan_assign(&inventory, &requested, options.group)?;
        phases.mark("scan");

        // Every safety check before the first write.
        let refs: Vec<&PciFunction> = plan.iter().collect();
        let snapshot =
            HostSnapshot::gather(&self.config.root, &refs, self.options.addresses.as_ref());
        phases.mark("guard");
        let mut to_move = Vec::new();
        for f in &plan {
            if f.driver.as_deref() == Some(VFIO_PCI) {
                // Already where it should be; only the in-use rule matters, and it does not
                // apply: nothing will be unbound.
                continue;
            }
            crate::observe::guard::decide(f.address, &snapshot.check(f), options.force)?;
            to_move.push(f);
        }

        let persistent = !options.runtime;
        let records: Vec<Assignment> = {
            let records = lock(&self.records);
            plan.iter()
                .map(|f| {
                    let known = records.get(&f.address);
                    Assignment {
                        address: f.address,
                        identity: identity_of(f),
                        previous_driver: match known {
                            Some(r) => r.previous_driver.clone(),
                            None => f.driver.clone().filter(|d| d != VFIO_PCI),
                        },
                        persistent: persistent || known.is_some_and(|r| r.persistent),
                        refused: None,
                    }
                })
                .collect()
        };
        let changes = if to_move.is_empty() {
            if persistent {
                self.persist(&records)?;
            }
            Vec::new()
        } else {
            self.binder.ensure_vfio_loaded()?;
            phases.mark("modprobe");
            let persisted = if persistent { &records[..] } else { &[] };
            self.move_to_vfio(caller, &to_move, persisted, &mut phases)?
        };
        {
            let mut map = lock(&self.records);
            for r in records {
                map.insert(r.address, r);
            }
        }
        lock(&self.refused).retain(|r| !plan.iter().any(|f| f.address == r.address));
        Ok(changes)
    }

    /// Writes `records` into state.toml.
    fn persist(&self, records: &[Assignment]) -> Result<(), Error> {
        self.save_state(|state| {
            for r in records {
                state.upsert(StoredAssignment {
                    address: r.address,
                    identity: StoredIdentity(r.identity),
                    previous_driver: r.previous_driver.clone(),
                });
            }
        })
    }

    /// The journaled, all-or-nothing part of assign: every function in `to_move` ends on
    /// vfio-pci and `persist` (empty for a runtime assign) is in state.toml, or every function
    /// is back where it was.
    fn move_to_vfio(
        &self,
        caller: &Caller,
        to_move: &[&PciFunction],
        persist: &[Assignment],
        phases: &mut Phases,
    ) -> Result<Vec<Change>, Error> {
        let persistent = !persist.is_empty();
        let functions: Vec<IntentFunction> = to_move
            .iter()
            .map(|f| IntentFunction {
                address: f.address,
                identity: StoredIdentity(identity_of(f)),
                previous_driver: f.driver.clone(),
            })
            .collect();
        let journal = JournalEntry::begin(
            &self.config.state_dir,
            &Intent::new(Operation::Assign, persistent, functions.clone()),
        )?;
        phases.mark("journal");
        let (changes, mut failure) = self.bind_groups_in_parallel(to_move);
        phases.mark("bind");
        if failure.is_none() && persistent {
            // Persist before the journal goes: a crash in between is finished at start.
            if let Err(e) = self.persist(persist) {
                failure = Some(e);
            }
            phases.mark("persist");
        }
        if let Some(e) = failure {
            let mut undone = Vec::new();
            for done in changes.iter().rev() {
                match self
                    .binder
                    .restore(done.address, done.old_driver.as_deref())
                {
                    Ok(_) => undone.push(done.address),
                    Err(u) => warn!(device = %done.address, error = %u,
                        "could not put a function back after a failed assign"),
                }
            }
            let stranded = to_move.iter().any(|f| {
                f.driver.is_some()
                    && self.binder.exists(f.address)
                    && self
                        .binder
                        .current_driver(f.address)
                        .ok()
                        .flatten()
                        .is_none()
            });
            if stranded || undone.len() != changes.len() {
                // Something could not be put back: leave a rollback intent for the next
                // start instead of the assign (which would otherwise be finished).
                JournalEntry::begin(
                    &self.config.state_dir,
                    &Intent::new(Operation::Assign, false, functions),
                )?;
            }
            journal.finish()?;
            return Err(if undone.is_empty() {
                e
            } else {
                annotate(e, &format!("; {} put back as well", list(&undone)))
            });
        }
        journal.finish()?;
        phases.mark("unjournal");
        for c in &changes {
            info!(uid = caller.uid, caller = %caller.bus_name, device = %c.address,
                old_driver = c.old_driver.as_deref().unwrap_or("none"),
                new_driver = c.new_driver.as_deref().unwrap_or("none"),
                persistent, "assigned");
        }
        Ok(changes)
    }

    /// Binds `to_move` to vfio-pci, IOMMU groups side by side: the kernel probes functions of
    /// different groups independently (most of a bind is the old driver's remove and vfio-pci's
    /// probe), while one group's members go one after another, in address order. After the
    /// first failure no new group is started. Returns what was bound, in address order, and the
    /// first failure (by address).
    fn bind_groups_in_parallel(&self, to_move: &[&PciFunction]) -> (Vec<Change>, Option<Error>) {
        let mut by_group: BTreeMap<LockKey, Vec<&PciFunction>> = BTreeMap::new();
        for f in to_move {
            by_group.entry(lock_key(f)).or_default().push(f);
        }
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, MAX_BIND_THREADS)
            .min(by_group.len());
        let queue = Mutex::new(by_group.into_values());
        let failed = AtomicBool::new(false);
        // Every result lands here as soon as it is known, so even a worker that panics
        // afterwards cannot take a bound function out of the rollback.
        let results: Mutex<Vec<(PciAddress, Result<Change, Error>)>> = Mutex::new(Vec::new());
        let bind_queue = || {
            while !failed.load(Ordering::Acquire) {
                let Some(group) = lock(&queue).next() else {
                    return;
                };
                for f in group {
                    let result = self.binder.bind_vfio(f);
                    let stop = result.is_err();
                    lock(&results).push((f.address, result));
                    if stop {
                        failed.store(true, Ordering::Release);
                        break;
                    }
                }
            }
        };
        let panicked = std::thread::scope(|scope| {
            let handles: Vec<_> = (1..workers).map(|_| scope.spawn(bind_queue)).collect();
            bind_queue();
            // A worker only panics if the binder does; the request then fails and rolls back
            // what was bound.
            handles.into_iter().any(|h| h.join().is_err())
        });
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|(address, _)| *address);
        let mut changes = Vec::new();
        let mut failure = None;
        for (_, result) in results {
            match result {
                Ok(change) => changes.push(change),
                Err(e) if failure.is_none() => failure = Some(e),
                Err(e) => warn!(error = %e, "another bind of the same request failed too"),
            }
        }
        if failure.is_none() && panicked {
            failure = Some(Error::Failed("a bind worker stopped unexpectedly".into()));
        }
        (changes, failure)
    }

    // --- release ---

    fn release_inner(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        Self::check_request(addresses)?;
        let keys = self.lock_keys(addresses)?;
        let _groups = self.lock_groups(keys.clone())?;
        let inventory = self.inventory_of(&keys)?;
        let functions = Self::functions(&inventory, addresses)?;
        let records = lock(&self.records).clone();
        for f in &functions {
            if !records.contains_key(&f.address) && f.driver.as_deref() != Some(VFIO_PCI) {
                return Err(Error::InvalidArgument(format!(
                    "{} is not assigned (it is bound to {}); nothing to release",
                    f.address,
                    f.driver.as_deref().unwrap_or("nothing")
                )));
            }
        }
        let snapshot = HostSnapshot::gather(
            &self.config.root,
            &functions,
            self.options.addresses.as_ref(),
        );
        for f in &functions {
            if let Some(finding) = snapshot.check_in_use(f) {
                crate::observe::guard::decide(f.address, &[finding], false)?;
            }
        }
        let previous = |a: PciAddress| records.get(&a).and_then(|r| r.previous_driver.clone());
        let intent = Intent::new(
            Operation::Release,
            !options.runtime,
            functions
                .iter()
                .map(|f| IntentFunction {
                    address: f.address,
                    identity: StoredIdentity(identity_of(f)),
                    previous_driver: previous(f.address),
                })
                .collect(),
        );
        let journal = JournalEntry::begin(&self.config.state_dir, &intent)?;
        let mut changes = Vec::new();
        let mut failure = None;
        for f in &functions {
            match self
                .binder
                .release(f.address, previous(f.address).as_deref())
            {
                Ok(c) => changes.push(c),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // Whatever was released is released: records and state follow the kernel.
        let released: Vec<PciAddress> = changes.iter().map(|c| c.address).collect();
        {
            let mut records = lock(&self.records);
            for a in &released {
                records.remove(a);
            }
        }
        if !options.runtime && !released.is_empty() {
            self.save_state(|state| {
                for a in &released {
                    state.remove(*a);
                }
            })?;
        }
        journal.finish()?;
        for c in &changes {
            info!(uid = caller.uid, caller = %caller.bus_name, device = %c.address,
                old_driver = c.old_driver.as_deref().unwrap_or("none"),
                new_driver = c.new_driver.as_deref().unwrap_or("none"),
                runtime = options.runtime, "released");
        }
        match failure {
            None => Ok(changes),
            Some(e) if released.is_empty() => Err(e),
            Some(e) => Err(annotate(
                e,
                &format!("; {} released before it", list(&released)),
            )),
        }
    }

    // --- start-up ---

    /// Handles journals left by a run that died mid-operation. The rule: no device is left
    /// driverless by accident, and state.toml matches the kernel afterwards.
    /// - assign, persistent: finish it. The admin asked for an assignment that survives
    ///   restarts and every check had passed; re-binding to vfio-pci (from whatever half-way
    ///   state) and recording it is what they would get had we not died. If finishing fails,
    ///   the function goes back to its previous driver and nothing is recorded.
    /// - assign, runtime: roll it back. Nobody received an answer, and a runtime assignment
    ///   does not outlive the daemon's memory anyway; the function returns to its driver.
    /// - release: finish it (back to the previous driver); returning a device to the host
    ///   is the safe direction, and it is what was asked.
    fn recover(&self, report: &mut StartupReport) -> Result<(), Error> {
        let caller = startup_caller();
        for (entry, intent) in journal::pending(&self.config.state_dir)? {
            let intent = match intent {
                Ok(intent) => intent,
                Err(why) => {
                    let line = format!("journal {} is unreadable ({why}); set aside", entry.name());
                    warn!("{line}");
                    self.note_error(&line);
                    report.recovered.push(line);
                    entry.set_aside()?;
                    continue;
                }
            };
            if let Some(vf) = &intent.vf {
                let line = self.recover_vfs(&intent, vf);
                info!(journal = entry.name(), "{line}");
                report.recovered.push(line);
            }
            let inventory = self.inventory()?;
            for f in &intent.functions {
                let line = self.recover_function(&caller, &inventory, &intent, f);
                info!(journal = entry.name(), "{line}");
                report.recovered.push(line);
            }
            entry.finish()?;
        }
        Ok(())
    }

    fn recover_function(
        &self,
        caller: &Caller,
        inventory: &Inventory,
        intent: &Intent,
        f: &IntentFunction,
    ) -> String {
        let a = f.address;
        let Some(function) = inventory.function(a) else {
            return format!("{a}: gone since the interrupted operation; nothing to do");
        };
        if identity_of(function) != f.identity.0 {
            return format!("{a}: now holds another device; left alone");
        }
        let prev = f.previous_driver.as_deref();
        let prev_name = prev.unwrap_or("no driver");
        let outcome = match (intent.operation, intent.persistent) {
            (Operation::Assign, true) => {
                let bound = self
                    .binder
                    .ensure_vfio_loaded()
                    .and_then(|()| self.binder.bind_vfio_from(function, prev));
                match bound.and_then(|_| {
                    let record = Assignment {
                        address: a,
                        identity: f.identity.0,
                        previous_driver: f.previous_driver.clone(),
                        persistent: true,
                        refused: None,
                    };
                    self.persist(std::slice::from_ref(&record))
                }) {
                    Ok(()) => Ok(format!("{a}: interrupted assign finished (on vfio-pci)")),
                    Err(e) => Err(format!("{a}: interrupted assign undone: {e}")),
                }
            }
            (Operation::Assign, false) => match self.binder.restore(a, prev) {
                Ok(_) => Ok(format!(
                    "{a}: interrupted runtime assign rolled back to {prev_name}"
                )),
                Err(e) => Err(format!(
                    "{a}: rolling back an interrupted assign failed: {e}"
                )),
            },
            (Operation::Release, persistent) => {
                let done = self.binder.release(a, prev).and_then(|_| {
                    if persistent {
                        self.save_state(|s| {
                            s.remove(a);
                        })
                    } else {
                        Ok(())
                    }
                });
                match done {
                    Ok(()) => Ok(format!(
                        "{a}: interrupted release finished (back on {prev_name})"
                    )),
                    Err(e) => Err(format!("{a}: finishing an interrupted release failed: {e}")),
                }
            }
            (Operation::VfCreate | Operation::VfDestroy, _) => {
                Err(format!("{a}: a VF journal naming a function; ignored"))
            }
        };
        match outcome {
            Ok(line) => {
                info!(uid = caller.uid, caller = %caller.bus_name, device = %a,
                    new_driver = self.binder.current_driver(a).ok().flatten().as_deref().unwrap_or("none"),
                    "recovered");
                line
            }
            Err(line) => {
                warn!("{line}");
                self.note_error(&line);
                line
            }
        }
    }

    /// Re-applies state.toml: each entry whose address still holds the recorded device goes
    /// (back) to vfio-pci; others are refused, kept in state.toml (the device may come back)
    /// and reported in `status`.
    fn reapply(&self, report: &mut StartupReport) -> Result<(), Error> {
        let state = State::load(&self.config.state_dir)?;
        if state.assignments.is_empty() {
            return Ok(());
        }
        let caller = startup_caller();
        let inventory = self.inventory()?;
        for entry in &state.assignments {
            let a = entry.address;
            let record = Assignment {
                address: a,
                identity: entry.identity.0,
                previous_driver: entry.previous_driver.clone(),
                persistent: true,
                refused: None,
            };
            match self.reapply_one(&caller, &inventory, entry) {
                Ok(()) => {
                    lock(&self.records).insert(a, record);
                    report.applied.push(a);
                }
                Err(why) => {
                    let line = format!("{a}: persisted assignment not applied: {why}");
                    warn!("{line}");
                    self.note_error(&line);
                    lock(&self.refused).push(Assignment {
                        refused: Some(why.clone()),
                        ..record
                    });
                    report.refused.push((a, why));
                }
            }
        }
        Ok(())
    }

    fn reapply_one(
        &self,
        caller: &Caller,
        inventory: &Inventory,
        entry: &StoredAssignment,
    ) -> Result<(), String> {
        let a = entry.address;
        let f = inventory
            .function(a)
            .ok_or_else(|| "no device at this address any more".to_owned())?;
        let now = identity_of(f);
        if now != entry.identity.0 {
            return Err(format!(
                "the address now holds {} instead of {}",
                show_identity(&now),
                show_identity(&entry.identity.0)
            ));
        }
        if f.driver.as_deref() == Some(VFIO_PCI) {
            return Ok(());
        }
        // Soft rules were the admin's call when the assignment was made; hard ones and
        // "in use" still protect the host now.
        let snapshot =
            HostSnapshot::gather(&self.config.root, &[f], self.options.addresses.as_ref());
        if let Some(finding) = snapshot
            .check(f)
            .into_iter()
            .find(|x| x.severity != Severity::Soft)
        {
            return Err(finding.reason);
        }
        self.binder
            .ensure_vfio_loaded()
            .map_err(|e| e.to_string())?;
        // Journaled as a persistent assign, so a crash here is finished at the next start.
        let record = Assignment {
            address: a,
            identity: now,
            previous_driver: entry.previous_driver.clone(),
            persistent: true,
            refused: None,
        };
        self.move_to_vfio(caller, &[f], &[record], &mut Phases::start("reapply"))
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Appends context to an error's message, keeping its kind.
fn annotate(error: Error, more: &str) -> Error {
    match error {
        Error::Busy(m) => Error::Busy(format!("{m}{more}")),
        Error::Refused { address, reason } => Error::Refused {
            address,
            reason: format!("{reason}{more}"),
        },
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{m}{more}")),
        other => Error::Failed(format!("{other}{more}")),
    }
}
