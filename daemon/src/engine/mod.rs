//! The engine: every operation the daemon offers, as plain blocking calls. The D-Bus service is
//! a thin layer over it; tests drive it directly over a simulated kernel.
//!
//! Every mutation is the same story, told once: lock the IOMMU groups it touches, read them
//! fresh, let a planner (`planner/`) decide the [`plan::Plan`], and hand it to the one
//! [`executor::Executor`], which journals it, runs it, undoes it on failure, records what it
//! changed and answers. Crash recovery finishes or undoes journaled plans; the desired state
//! (config and stored requests) is planned and executed the same way at start and on `apply`.
//!
//! Concurrency: methods take `&self`; operations on different IOMMU groups run in parallel,
//! operations on the same group are serialized, and readers (`inventory`, `status`,
//! `host_report`) never wait for a write.

pub mod early;
pub mod executor;
pub mod locks;
pub mod plan;
pub mod planner;
pub mod registry;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use passthroughd_proto::config::Config;
use passthroughd_proto::device::driver_is_vfio;
use passthroughd_proto::{
    ApplyReport, AssignOptions, Assignment, Change, ConfigState, HostReport, PciAddress,
    PciFunction, Refusal, ReleaseOptions, Status, VfCreateOptions, VfInfo, VfOf, VfSetStatus,
};
use tracing::{info, warn};

use crate::engine::executor::{Executor, ExecutorSetup, Listener, inventory_of};
use crate::engine::locks::{LockGuard, Locks};
use crate::engine::plan::{Claim, LockKey, Plan, Step, Target};
use crate::engine::planner::desired::{self, Phase};
use crate::engine::planner::vfs::VfCreate;
use crate::engine::planner::{View, list};
use crate::engine::registry::Registry;
use crate::error::Error;
use crate::kernel::Kernel;
use crate::kernel::driver::{Drivers, InFlight, VFIO_PCI};
use crate::kernel::sysfs::SysfsRoot;
use crate::kernel::sysfs::read_link_name;
use crate::observe::guard::{AddressProvider, HostSnapshot, StaticAddresses, SystemAddresses};
use crate::observe::inventory::Avoid;
use crate::observe::inventory::Inventory;
use crate::observe::pciids::PciIds;
use crate::store::config::ConfigSlot;
use crate::store::journal;
use crate::store::state::State;

/// Who asked, for the log line every mutation writes (authorization happens before this), and
/// until when they wait: a request still queued past its deadline is dropped unstarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Unique bus name (`:1.42`), or a fixed label for the daemon's own start-up work.
    pub bus_name: String,
    pub deadline: Option<Instant>,
}

impl Caller {
    pub fn new(uid: u32, bus_name: impl Into<String>) -> Self {
        Self {
            uid,
            bus_name: bus_name.into(),
            deadline: None,
        }
    }

    /// The request is dropped, unstarted, once its caller stopped waiting.
    fn check_deadline(&self, what: &'static str) -> Result<(), Error> {
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(Error::Cancelled(what)),
            _ => Ok(()),
        }
    }
}

/// Everything the engine needs from its environment.
pub struct EngineConfig {
    pub root: SysfsRoot,
    /// Holds state.toml, the journal and the last good copy of the config.
    pub state_dir: PathBuf,
    /// The one seam for kernel-facing writes.
    pub kernel: Arc<dyn Kernel>,
    pub ids: Arc<PciIds>,
    /// The declarative config (`None`: none, an empty desired state).
    pub config: Option<PathBuf>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("root", &self.root)
            .field("state_dir", &self.state_dir)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What start-up did: journal recovery, then the desired state applied.
#[derive(Debug, Clone, Default)]
pub struct StartupReport {
    pub recovered: Vec<String>,
    /// Stored requests on vfio-pci (put there, or already there).
    pub applied: Vec<PciAddress>,
    /// Stored requests (and VF sets) not applied, and why.
    pub refused: Vec<(PciAddress, String)>,
    /// PFs whose stored VFs are there (recreated, or already there).
    pub vfs: Vec<PciAddress>,
    /// The config and the rest of the desired state, as `apply` reports it.
    pub apply: ApplyReport,
}

/// Tunables and seams beyond [`EngineConfig`], with defaults from [`EngineOptions::for_root`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Where interface addresses come from (IPv4 is not in /proc in a simple form).
    pub addresses: Arc<dyn AddressProvider>,
    /// How long a caller waits for a sysfs write before it is answered (the write goes on).
    pub write_timeout: Duration,
    /// How long a request waits for another request on the same IOMMU group before Busy.
    pub group_wait: Duration,
    /// How long `vf create` waits for new VFs to appear.
    pub vf_wait: Duration,
    /// Test failpoint: the first plan executed "dies" before its step N (after N steps),
    /// leaving the kernel, state.toml and the journal exactly as a killed daemon would. The
    /// engine then takes no more plans; opening the state again is the restart. `None` (the
    /// default, and what the daemon uses) never dies.
    pub die_before_step: Option<usize>,
}

/// How long a caller waits for one sysfs write before it is told the write is pending.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a request waits for a busy IOMMU group before answering Busy.
pub const DEFAULT_GROUP_WAIT: Duration = Duration::from_secs(5);
/// How long `vf create` waits for the kernel to show the new VFs.
pub const DEFAULT_VF_WAIT: Duration = Duration::from_secs(10);
/// The most functions one request may name (`InvalidArgument` beyond): a host has a few
/// thousand, and a reply must stay far below the bus's message limit.
pub const MAX_ADDRESSES: usize = 1024;
/// How many recent failures `status` keeps, and how long each line may be.
const ERROR_RING: usize = 20;
const ERROR_LINE: usize = 400;
/// How many units of the desired state run at once.
const APPLY_WORKERS: usize = 4;

impl EngineOptions {
    /// The host's own interfaces when the root is `/`; none for a fake root, whose interface
    /// names would otherwise be confused with the host's.
    pub fn for_root(root: &SysfsRoot) -> Self {
        let addresses: Arc<dyn AddressProvider> = if root.root() == Path::new("/") {
            Arc::new(SystemAddresses)
        } else {
            Arc::new(StaticAddresses::default())
        };
        Self {
            addresses,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            group_wait: DEFAULT_GROUP_WAIT,
            vf_wait: DEFAULT_VF_WAIT,
            die_before_step: None,
        }
    }
}

/// How long a cached inventory may serve readers. Some changes made outside the daemon raise
/// no uevent (writes to `driver_override` or `sriov_drivers_autoprobe`); this bounds how stale
/// a read can be after one of those.
pub const INVENTORY_CACHE_TTL: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another request panicked; every update is a single replace.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The label start-up work logs as its caller.
fn startup_caller() -> Caller {
    Caller::new(0, "startup")
}

#[derive(Debug)]
pub struct Engine {
    root: SysfsRoot,
    ids: Arc<PciIds>,
    state_dir: PathBuf,
    options: EngineOptions,
    drivers: Drivers,
    in_flight: Arc<InFlight>,
    locks: Arc<Locks>,
    executor: Arc<Executor>,
    registry: Arc<Mutex<Registry>>,
    config: Mutex<ConfigSlot>,
    started: Instant,
    errors: Mutex<VecDeque<String>>,
    /// What the last apply did not do (for `status`).
    last_refused: Mutex<Vec<Refusal>>,
    /// What device events led to lately (for `status`).
    hotplug: Mutex<VecDeque<String>>,
    /// Readers' copy of the last scan (see [`Engine::snapshot`]): the generation it was taken
    /// at, when, and the scan.
    cached: Mutex<Option<(u64, Instant, Arc<Inventory>)>>,
    /// One readers' scan at a time: the others wait for it and share it.
    scanning: Mutex<()>,
    /// Bumped whenever an operation lets go of its groups and on every kernel PCI uevent.
    generation: Arc<AtomicU64>,
    /// Set while something reports outside changes through [`Engine::invalidate_inventory`].
    cache_enabled: AtomicBool,
}

impl Engine {
    /// Loads state, finishes or undoes whatever the journal says was in flight, then applies
    /// the desired state (config and stored requests).
    pub fn open(config: EngineConfig) -> Result<(Self, StartupReport), Error> {
        let options = EngineOptions::for_root(&config.root);
        Self::open_with(config, options)
    }

    /// [`Self::open`] with explicit [`EngineOptions`] (tests inject addresses and timeouts).
    pub fn open_with(
        config: EngineConfig,
        options: EngineOptions,
    ) -> Result<(Self, StartupReport), Error> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| {
            crate::error::StoreError::Io {
                what: "creating the state directory",
                path: config.state_dir.clone(),
                source,
            }
        })?;
        // Fails on an unknown state version before anything is touched.
        let registry = Arc::new(Mutex::new(Registry::from_state(&State::load(
            &config.state_dir,
        )?)));
        let in_flight = Arc::new(InFlight::default());
        let drivers = Drivers::new(
            config.root.clone(),
            Arc::clone(&config.kernel),
            Arc::clone(&in_flight),
        );
        let generation = Arc::new(AtomicU64::new(0));
        let executor = Executor::new(ExecutorSetup {
            drivers: drivers.clone(),
            ids: Arc::clone(&config.ids),
            state_dir: config.state_dir.clone(),
            registry: Arc::clone(&registry),
            addresses: Arc::clone(&options.addresses),
            write_timeout: options.write_timeout,
            vf_wait: options.vf_wait,
            group_wait: options.group_wait,
            die_before_step: options.die_before_step,
        });
        let slot = match &config.config {
            Some(path) => ConfigSlot::open(path, &config.state_dir),
            None => ConfigSlot::open(&config.state_dir.join("no-config.toml"), &config.state_dir),
        };
        let engine = Self {
            root: config.root,
            ids: config.ids,
            state_dir: config.state_dir,
            options,
            drivers,
            in_flight,
            locks: Locks::new(Arc::clone(&generation)),
            executor,
            registry,
            config: Mutex::new(slot),
            started: Instant::now(),
            errors: Mutex::new(VecDeque::new()),
            last_refused: Mutex::new(Vec::new()),
            hotplug: Mutex::new(VecDeque::new()),
            cached: Mutex::new(None),
            scanning: Mutex::new(()),
            generation,
            cache_enabled: AtomicBool::new(false),
        };
        if let Some(e) = lock(&engine.config).state().error {
            engine.note_error(&format!("config: {e}"));
        }
        let mut report = StartupReport {
            recovered: engine.recover()?,
            ..StartupReport::default()
        };
        engine.start_apply(&mut report)?;
        Ok((engine, report))
    }

    /// Where plans that finish after their caller was answered are announced.
    pub fn set_listener(&self, listener: Listener) {
        self.executor.set_listener(listener);
    }

    /// A fresh scan of functions and groups. Takes no lock: never waits for a bind, and never
    /// reads an attribute the kernel has locked for a write in flight.
    pub fn inventory(&self) -> Result<Inventory, Error> {
        let last = lock(&self.cached).as_ref().map(|(_, _, i)| Arc::clone(i));
        let skip = |a: PciAddress| self.write_in_flight(a);
        let avoid = Avoid {
            skip: &skip,
            last: last.as_deref(),
        };
        Ok(Inventory::scan_with(&self.root, &self.ids, &avoid)?)
    }

    /// Whether a write on `address` (or on its PF's VF count) is in flight.
    fn write_in_flight(&self, address: PciAddress) -> bool {
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
        let fresh = |generation: u64| {
            lock(&self.cached).as_ref().and_then(|(g, at, inventory)| {
                (*g == generation && at.elapsed() < INVENTORY_CACHE_TTL)
                    .then(|| Arc::clone(inventory))
            })
        };
        if !self.cache_enabled.load(Ordering::Acquire) {
            let inventory = Arc::new(self.inventory()?);
            *lock(&self.cached) = Some((u64::MAX, Instant::now(), Arc::clone(&inventory)));
            return Ok(inventory);
        }
        // Taken before the scan: a change during the scan leaves the entry already stale.
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(inventory) = fresh(generation) {
            return Ok(inventory);
        }
        let _one_scan = lock(&self.scanning);
        if let Some(inventory) = fresh(generation) {
            return Ok(inventory);
        }
        let started = Instant::now();
        let scanned = Arc::new(self.inventory()?);
        *lock(&self.cached) = Some((generation, started, Arc::clone(&scanned)));
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
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            assignments: self.assignments(),
            vf_sets,
            config: Some(lock(&self.config).state()),
            refused: lock(&self.last_refused).clone(),
            hotplug: lock(&self.hotplug).iter().cloned().collect(),
            pending: self.executor.pending(),
            unfinished: self.executor.unfinished(),
            last_errors: lock(&self.errors).iter().cloned().collect(),
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

    fn note_error(&self, line: &str) {
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
    fn short_list(addresses: &[PciAddress]) -> String {
        match addresses {
            [first, rest @ ..] if rest.len() > 3 => format!("{first} and {} more", rest.len()),
            _ => list(addresses),
        }
    }

    // --- requests ---

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

    fn assign_inner(
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

    fn release_inner(
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

    fn vf_create_inner(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        options: VfCreateOptions,
    ) -> Result<Vec<VfInfo>, Error> {
        // Before anything is read or built from it: a count no PF can have.
        if count == 0 {
            return Err(Error::InvalidArgument(
                "a count of 0 creates no VFs; use vf destroy to remove them".into(),
            ));
        }
        if count > u32::from(u16::MAX) {
            return Err(Error::InvalidArgument(format!(
                "a PF has at most 65535 VFs; {count} asked for"
            )));
        }
        let (guard, view) = self.lock_pf(caller, pf, "a vf create")?;
        // Against the PF before any set is built from the count.
        let f = planner::vfs::check_pf(&view.view(), pf)?;
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
        let config = Config::empty();
        let snapshot = HostSnapshot::default();
        let registry = Registry::default();
        planner::vfs::check_pf(
            &View {
                inventory: &inventory,
                snapshot: &snapshot,
                registry: &registry,
                config: &config,
            },
            pf,
        )?;
        let vfs = inventory.vfs_of(pf);
        let snapshot = HostSnapshot::gather(&self.root, &vfs, self.options.addresses.as_ref());
        Ok(self.vf_infos(pf, &vfs, Some(&snapshot)))
    }

    /// The first `count` VFs of `pf` as `vf list` shows them, read fresh; with `holders`, who
    /// holds them open (a /proc walk: not needed for VFs just created).
    fn describe_vfs(
        &self,
        pf: PciAddress,
        count: u32,
        holders: bool,
    ) -> Result<Vec<VfInfo>, Error> {
        let addresses = self.drivers.wait_for_vfs(pf, count, Duration::ZERO)?;
        let keys = self.executor.lock_keys(&addresses)?;
        let inventory = inventory_of(&self.root, &self.ids, &keys)?;
        let vfs: Vec<&PciFunction> = addresses
            .iter()
            .filter_map(|a| inventory.function(*a))
            .collect();
        let snapshot = holders
            .then(|| HostSnapshot::gather(&self.root, &vfs, self.options.addresses.as_ref()));
        Ok(self.vf_infos(pf, &vfs, snapshot.as_ref()))
    }

    fn vf_infos(
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
        let state = lock(&self.config).reload();
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

    fn note_hotplug(&self, line: String) {
        info!(%line, "hotplug");
        let mut recent = lock(&self.hotplug);
        if recent.len() == ERROR_RING {
            recent.pop_front();
        }
        recent.push_back(line);
    }

    // --- plumbing ---

    /// The locks of `addresses`, then the functions and groups behind them read fresh (with the
    /// PFs of VFs among them, whose ids a VF's claim records), and the guard's facts.
    fn lock_and_read(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        holder: &str,
    ) -> Result<(LockGuard, Read), Error> {
        caller.check_deadline("the request")?;
        let keys = self.executor.lock_keys(addresses)?;
        let mut guard = self.locks.acquire(keys, holder, self.options.group_wait)?;
        caller.check_deadline("the request")?;
        self.executor.settle(&mut guard)?;
        let read = self.read(guard.keys(), addresses)?;
        Ok((guard, read))
    }

    /// The locks of a PF and its VFs (from the `virtfnN` links: no scan), then the same read.
    fn lock_pf(
        &self,
        caller: &Caller,
        pf: PciAddress,
        holder: &str,
    ) -> Result<(LockGuard, Read), Error> {
        caller.check_deadline("the request")?;
        let mut functions = vec![pf];
        for index in 0.. {
            match self.drivers.vf(pf, index)? {
                Some(vf) => functions.push(vf),
                None => break,
            }
        }
        let keys = self.executor.lock_keys(&functions)?;
        let mut guard = self.locks.acquire(keys, holder, self.options.group_wait)?;
        caller.check_deadline("the request")?;
        self.executor.settle(&mut guard)?;
        let read = self.read(guard.keys(), &[pf])?;
        Ok((guard, read))
    }

    /// The inventory of `keys` (plus the PFs of VFs among `addresses`), and the guard's facts
    /// about every function in it.
    fn read(&self, keys: &BTreeSet<LockKey>, addresses: &[PciAddress]) -> Result<Read, Error> {
        let mut inventory = inventory_of(&self.root, &self.ids, keys)?;
        let pfs: Vec<PciAddress> = inventory
            .functions
            .iter()
            .filter(|f| addresses.contains(&f.address))
            .filter_map(|f| f.vf_of.map(|v| v.pf))
            .filter(|pf| inventory.function(*pf).is_none())
            .collect();
        if !pfs.is_empty() {
            inventory.merge(Inventory::scan_groups(&self.root, &self.ids, &[], &pfs)?);
        }
        let functions: Vec<&PciFunction> = inventory.functions.iter().collect();
        let snapshot =
            HostSnapshot::gather(&self.root, &functions, self.options.addresses.as_ref());
        Ok(Read {
            inventory,
            snapshot,
            registry: lock(&self.registry).clone(),
            config: self.config_in_force(),
        })
    }

    fn config_in_force(&self) -> Arc<Config> {
        lock(&self.config)
            .good()
            .unwrap_or_else(|| Arc::new(Config::empty()))
    }

    // --- start-up and the desired state ---

    /// Finishes or undoes the plans journals left behind. The rule: no device is left
    /// driverless by accident, and state.toml matches the kernel afterwards.
    fn recover(&self) -> Result<Vec<String>, Error> {
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
    fn start_apply(&self, report: &mut StartupReport) -> Result<(), Error> {
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
    fn adopt_vf_claims(&self, caller: &Caller) -> Result<(), Error> {
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
    fn apply_desired(
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
        for phase in [Phase::Vfs, Phase::Functions] {
            let inventory = self.inventory()?;
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
    fn run_units(&self, caller: &Caller, units: Vec<desired::Unit>) -> Vec<Refusal> {
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
    fn run_unit(&self, caller: &Caller, unit: &desired::Unit) -> Result<Vec<Change>, Error> {
        let mut guard =
            self.locks
                .acquire(unit.plan.locks.clone(), "apply", self.options.group_wait)?;
        self.executor.settle(&mut guard)?;
        self.check_still_valid(&unit.plan)?;
        self.executor.run(caller, unit.plan.clone(), guard)
    }

    /// Whether the drivers and VF counts a plan was made on are still what the kernel has
    /// (another request may have run between planning and locking).
    fn check_still_valid(&self, plan: &Plan) -> Result<(), Error> {
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

/// Why the desired state is applied.
#[derive(Debug, Clone, Copy)]
enum Trigger<'a> {
    Boot,
    Apply,
    /// Device events named these functions (present now).
    Hotplug(&'a HashSet<PciAddress>),
}

/// What a burst of device events did.
#[derive(Debug, Clone, Default)]
pub struct HotplugReport {
    /// Claimed functions (or PFs with VFs) that went away: still claimed, shown as absent.
    pub removed: Vec<PciAddress>,
    /// What the desired state did about the functions that appeared.
    pub apply: ApplyReport,
}

/// What a request plans with, read under its locks.
#[derive(Debug)]
struct Read {
    inventory: Inventory,
    snapshot: HostSnapshot,
    registry: Registry,
    config: Arc<Config>,
}

impl Read {
    fn view(&self) -> View<'_> {
        View {
            inventory: &self.inventory,
            snapshot: &self.snapshot,
            registry: &self.registry,
            config: &self.config,
        }
    }
}

/// Empty lists, duplicates and oversized lists are caller mistakes, caught before anything is
/// read.
fn check_request(addresses: &[PciAddress]) -> Result<(), Error> {
    if addresses.is_empty() {
        return Err(Error::InvalidArgument("no PCI address given".into()));
    }
    if addresses.len() > MAX_ADDRESSES {
        return Err(Error::InvalidArgument(format!(
            "{} addresses in one request; at most {MAX_ADDRESSES} (use --group, or several \
             requests)",
            addresses.len()
        )));
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
