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

mod apply;
mod leases;
mod readers;
mod requests;
mod verify;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use passthroughd_proto::config::Config;
use passthroughd_proto::device::driver_is_vfio;
use passthroughd_proto::{
    ApplyReport, AssignOptions, Assignment, Change, ConfigState, HostReport, LeaseInfo, LeaseOwner,
    OwnerKind, PciAddress, PciFunction, Refusal, ReleaseOptions, Status, VfCreateOptions, VfInfo,
    VfOf, VfSetStatus,
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
use crate::kernel::vfio::{SystemVfio, Vfio};
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
    /// VFIO access for `verify` and resets (the kernel's, or a fake in tests).
    pub vfio: Arc<dyn Vfio>,
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
/// A libvirt lease younger than this is never stale: the hook takes it before QEMU starts.
pub const LEASE_GRACE: Duration = Duration::from_secs(120);
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
            vfio: Arc::new(SystemVfio::new(root.clone())),
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
    /// One reload at a time; the file is read outside `config`'s lock, so readers of the config
    /// in force never wait for a file that is still being written.
    reloading: Mutex<()>,
    started: Instant,
    errors: Mutex<VecDeque<String>>,
    /// What the last apply did not do (for `status`).
    last_refused: Mutex<Vec<Refusal>>,
    /// What device events led to lately (for `status`).
    hotplug: Mutex<VecDeque<String>>,
    /// When each lease was taken (since this daemon started), for judging staleness.
    lease_times: Mutex<HashMap<LeaseOwner, Instant>>,
    /// The functions each owner's lease starts asked for, until the lease ends (see
    /// [`Engine::lease_end`]).
    lease_starts: Mutex<HashMap<LeaseOwner, BTreeSet<PciAddress>>>,
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
        // Fails on an unknown state version before anything is touched. Leases of an earlier
        // boot are dropped here: their VMs are gone.
        let boot_id = boot_id(&config.root);
        let registry = Arc::new(Mutex::new(Registry::from_state(
            &State::load(&config.state_dir)?,
            boot_id.as_deref(),
        )));
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
            vfio: Arc::clone(&options.vfio),
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
            reloading: Mutex::new(()),
            started: Instant::now(),
            errors: Mutex::new(VecDeque::new()),
            last_refused: Mutex::new(Vec::new()),
            hotplug: Mutex::new(VecDeque::new()),
            lease_times: Mutex::new(HashMap::new()),
            lease_starts: Mutex::new(HashMap::new()),
            cached: Mutex::new(None),
            scanning: Mutex::new(()),
            generation,
            cache_enabled: AtomicBool::new(false),
        };
        let config_error = lock(&engine.config).state().error;
        if let Some(e) = config_error {
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
        let keys = self.pf_lock_keys(pf)?;
        let mut guard = self.locks.acquire(keys, holder, self.options.group_wait)?;
        caller.check_deadline("the request")?;
        self.executor.settle(&mut guard)?;
        // Listed again under the lock: VFs made while this request waited are locked too.
        guard.extend(self.pf_lock_keys(pf)?, holder, self.options.group_wait)?;
        let read = self.read(guard.keys(), &[pf])?;
        Ok((guard, read))
    }

    /// The locks of `pf` and of its VFs now.
    fn pf_lock_keys(&self, pf: PciAddress) -> Result<BTreeSet<LockKey>, Error> {
        let mut vfs = Vec::new();
        for index in 0.. {
            match self.drivers.vf(pf, index)? {
                Some(vf) => vfs.push(vf),
                None => break,
            }
        }
        let mut keys = self.executor.lock_keys(&[pf])?;
        keys.extend(self.lock_keys_of_present(&vfs)?);
        Ok(keys)
    }

    /// The locks of those of `vfs` still there. VFs are listed before their PF is locked, so
    /// one may go (a `vf destroy` holding the PF) between its listing and its lock: a VF gone
    /// has no lock to take, not an error. Any other failure to read a lock is one.
    fn lock_keys_of_present(&self, vfs: &[PciAddress]) -> Result<BTreeSet<LockKey>, Error> {
        let mut keys = BTreeSet::new();
        for &vf in vfs {
            match self.executor.lock_keys(&[vf]) {
                Ok(vf_keys) => keys.extend(vf_keys),
                Err(Error::NoSuchDevice(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(keys)
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
        // Each lock let go before the next is taken (see `status`).
        let registry = lock(&self.registry).clone();
        let config = self.config_in_force();
        Ok(Read {
            inventory,
            snapshot,
            registry,
            config,
        })
    }

    fn config_in_force(&self) -> Arc<Config> {
        lock(&self.config)
            .good()
            .unwrap_or_else(|| Arc::new(Config::empty()))
    }
}

/// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`), if it says.
pub fn boot_id(root: &SysfsRoot) -> Option<String> {
    crate::kernel::sysfs::read_attr(&root.proc_file("sys/kernel/random/boot_id"))
        .ok()
        .flatten()
        .filter(|id| !id.is_empty())
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
