//! Test harness: a private `dbus-daemon`, passthroughd's service served on it in-process, and
//! the real `passthroughctl` binary pointed at it.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use passthroughd::engine::Caller;
use passthroughd::error::Error;
use passthroughd::observe::host;
use passthroughd::service::{self, Backend, ServiceConfig};
use passthroughd::{Engine, Inventory, PciIds, SysfsRoot};
use passthroughd_proto::vfio::{FunctionDetail, Readiness, VerifyReport};
use passthroughd_proto::{
    ApplyReport, AssignOptions, Change, ConfigState, HostReport, LeaseInfo, LeaseOwner, PciAddress,
    ReleaseOptions, Status, VfCreateOptions, VfInfo,
};
use passthroughd_testkit::synthetic::{self, HostShape};

/// A small host: 64 functions, 8 of them VFs of two PFs, in 8 groups.
pub const SHAPE: HostShape = HostShape {
    functions: 64,
    vfs: 8,
    vfs_per_pf: 4,
    groups: 8,
};

pub use passthroughd_testkit::bus::TestBus;

/// What the scripted engine was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Assign(Caller, Vec<PciAddress>, AssignOptions),
    Release(Caller, Vec<PciAddress>, ReleaseOptions),
    /// pf, count, assign, runtime, force
    VfCreate(Caller, PciAddress, u32, bool, bool, bool),
    /// dry run
    Apply(Caller, bool),
    Reload,
    /// pf, force
    VfDestroy(Caller, PciAddress, bool),
    LeaseStart(Caller, LeaseOwner, Vec<PciAddress>),
    LeaseEnd(Caller, LeaseOwner),
    Verify(Caller, PciAddress),
}

/// How the scripted engine answers mutations.
#[derive(Debug, Clone)]
pub enum Script {
    /// Pretend every function moved from its current driver to vfio-pci (or back to "igb").
    Succeed,
    NotFound,
    Refused,
    Busy,
    Failed,
    /// Succeed after sleeping this long.
    Slow(Duration),
}

/// An engine whose reads are the real inventory of a tree and whose mutations are scripted, so
/// the D-Bus layer can be tested without the binding engine.
#[derive(Debug)]
pub struct ScriptedEngine {
    pub root: SysfsRoot,
    pub calls: Mutex<Vec<Call>>,
    pub script: Mutex<Script>,
    /// Every read takes this long (a device the kernel holds locked).
    pub slow_reads: Mutex<Option<Duration>>,
}

impl ScriptedEngine {
    pub fn new(root: &Path) -> Arc<Self> {
        Arc::new(Self {
            root: SysfsRoot::new(root),
            calls: Mutex::new(Vec::new()),
            script: Mutex::new(Script::Succeed),
            slow_reads: Mutex::new(None),
        })
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn answer(&self, addresses: &[PciAddress], assign: bool) -> Result<Vec<Change>, Error> {
        let first = addresses[0];
        let script = self.script.lock().unwrap().clone();
        match script {
            Script::NotFound => Err(Error::NoSuchDevice(first)),
            Script::Refused => Err(Error::Refused {
                address: first,
                reason: "it carries the default route via eth0".into(),
            }),
            Script::Busy => Err(Error::Busy(format!("{first} is open by a VM"))),
            Script::Failed => Err(Error::Write {
                what: format!("writing {first}/driver_override"),
                source: std::io::Error::from_raw_os_error(5),
            }),
            Script::Slow(d) => {
                std::thread::sleep(d);
                Ok(self.changes(addresses, assign))
            }
            Script::Succeed => Ok(self.changes(addresses, assign)),
        }
    }

    fn changes(&self, addresses: &[PciAddress], assign: bool) -> Vec<Change> {
        addresses
            .iter()
            .map(|&address| Change {
                address,
                old_driver: Some(if assign { "igb" } else { "vfio-pci" }.into()),
                new_driver: Some(if assign { "vfio-pci" } else { "igb" }.into()),
            })
            .collect()
    }
}

impl Backend for ScriptedEngine {
    fn inventory(&self) -> Result<Arc<Inventory>, Error> {
        if let Some(d) = *self.slow_reads.lock().unwrap() {
            std::thread::sleep(d);
        }
        Ok(Arc::new(Inventory::scan(&self.root, &PciIds::empty())?))
    }
    fn assign(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Assign(caller.clone(), addresses.to_vec(), options));
        self.answer(addresses, true)
    }
    fn release(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Release(caller.clone(), addresses.to_vec(), options));
        self.answer(addresses, false)
    }
    fn vf_create(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        options: VfCreateOptions,
    ) -> Result<Vec<VfInfo>, Error> {
        let assign = options.assign;
        self.calls.lock().unwrap().push(Call::VfCreate(
            caller.clone(),
            pf,
            count,
            assign,
            options.runtime,
            options.force,
        ));
        self.answer(&[pf], true)?;
        Ok((0..count)
            .map(|index| VfInfo {
                index,
                address: PciAddress::new(0, 0x10, index as u8 / 4, (index % 4 * 2) as u8).unwrap(),
                driver: assign.then(|| "vfio-pci".to_owned()),
                iommu_group: Some(100 + index),
                assigned: assign,
                in_use_by: None,
            })
            .collect())
    }
    fn vf_destroy(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::VfDestroy(caller.clone(), pf, force));
        self.answer(&[pf], false)
    }
    fn vf_list(&self, pf: PciAddress) -> Result<Vec<VfInfo>, Error> {
        let inventory = self.inventory()?;
        let f = inventory.function(pf).ok_or(Error::NoSuchDevice(pf))?;
        if f.sriov.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{pf} is not SR-IOV capable"
            )));
        }
        Ok(inventory
            .vfs_of(pf)
            .iter()
            .map(|v| VfInfo {
                index: v.vf_of.map_or(0, |o| o.index),
                address: v.address,
                driver: v.driver.clone(),
                iommu_group: v.iommu_group,
                assigned: false,
                in_use_by: None,
            })
            .collect())
    }
    fn status(&self) -> Result<Status, Error> {
        Ok(Status {
            version: "test".into(),
            uptime_secs: 7,
            assignments: Vec::new(),
            vf_sets: Vec::new(),
            config: None,
            refused: Vec::new(),
            leases: Vec::new(),
            hotplug: Vec::new(),
            pending: Vec::new(),
            unfinished: Vec::new(),
            last_errors: Vec::new(),
        })
    }
    fn apply(&self, caller: &Caller, dry_run: bool) -> Result<ApplyReport, Error> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Apply(caller.clone(), dry_run));
        Ok(ApplyReport {
            dry_run,
            ..ApplyReport::default()
        })
    }
    fn reload(&self) -> Result<ConfigState, Error> {
        self.calls.lock().unwrap().push(Call::Reload);
        Ok(ConfigState::default())
    }
    fn lease_start(
        &self,
        caller: &Caller,
        owner: &LeaseOwner,
        addresses: &[PciAddress],
    ) -> Result<Vec<Change>, Error> {
        self.calls.lock().unwrap().push(Call::LeaseStart(
            caller.clone(),
            owner.clone(),
            addresses.to_vec(),
        ));
        self.answer(addresses, true)
    }
    fn lease_end(&self, caller: &Caller, owner: &LeaseOwner) -> Result<Vec<Change>, Error> {
        let held = self.leases()?.into_iter().find(|l| l.owner == *owner);
        self.calls
            .lock()
            .unwrap()
            .push(Call::LeaseEnd(caller.clone(), owner.clone()));
        let held = held.ok_or_else(|| Error::NoLease(owner.clone()))?;
        let taken: Vec<PciAddress> = held.functions.iter().map(|f| f.parse().unwrap()).collect();
        Ok(self.changes(&taken, false))
    }
    /// The inventory's function; readiness from what it says about the driver only.
    fn show(&self, address: PciAddress) -> Result<FunctionDetail, Error> {
        let function = self
            .inventory()?
            .function(address)
            .cloned()
            .ok_or(Error::NoSuchDevice(address))?;
        let on_vfio = function.driver.as_deref() == Some("vfio-pci");
        Ok(FunctionDetail {
            passthrough: Readiness {
                ready: on_vfio,
                blocker: (!on_vfio).then(|| "it is not on vfio-pci".to_owned()),
                ..Readiness::default()
            },
            function,
        })
    }
    /// Ready when the script succeeds; the script's error otherwise.
    fn verify(&self, caller: &Caller, address: PciAddress) -> Result<VerifyReport, Error> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Verify(caller.clone(), address));
        self.answer(&[address], true)?;
        Ok(VerifyReport {
            address,
            ready: true,
            problem: None,
            driver: Some("vfio-pci".into()),
            iommu_group: Some(1),
            group_viable: true,
            group_blockers: Vec::new(),
            interrupt_remapping: Some(true),
            iommufd_node: None,
            group_node: None,
            device: None,
            reset_methods: vec!["flr".into()],
            notes: Vec::new(),
        })
    }
    /// One lease per owner that started one and did not end it.
    fn leases(&self) -> Result<Vec<LeaseInfo>, Error> {
        let mut leases: Vec<LeaseInfo> = Vec::new();
        for call in self.calls() {
            match call {
                Call::LeaseStart(_, owner, addresses) => leases.push(LeaseInfo {
                    owner,
                    functions: addresses.iter().map(ToString::to_string).collect(),
                    age_secs: 3,
                    stale: None,
                }),
                Call::LeaseEnd(_, owner) => leases.retain(|l| l.owner != owner),
                _ => {}
            }
        }
        Ok(leases)
    }
    /// The real report of the tree, as the daemon builds it.
    fn host_report(&self) -> Result<HostReport, Error> {
        Ok(host::report_live(&self.root, &PciIds::empty()))
    }
}

/// The service on a test bus, over a synthetic tree, with a scripted engine.
pub struct Harness {
    // Fields drop in order: the connection needs the runtime, the service needs the bus.
    pub connection: zbus::Connection,
    pub runtime: tokio::runtime::Runtime,
    pub engine: Arc<ScriptedEngine>,
    pub tree: tempfile::TempDir,
    pub bus: TestBus,
}

impl Harness {
    pub fn start() -> Self {
        Self::start_with(TestBus::start(), SHAPE, ServiceConfig::default())
    }

    pub fn start_with(bus: TestBus, shape: HostShape, config: ServiceConfig) -> Self {
        let tree = tempfile::tempdir().unwrap();
        synthetic::generate(tree.path(), shape).unwrap();
        Self::serve(bus, tree, None, config)
    }

    /// The service over an existing root (a fixture, read only), not a synthetic tree; `tree`
    /// is then an empty directory and [`Harness::inventory`] is not meaningful.
    pub fn start_on_root(root: &Path) -> Self {
        let tree = tempfile::tempdir().unwrap();
        Self::serve(TestBus::start(), tree, Some(root), ServiceConfig::default())
    }

    fn serve(
        bus: TestBus,
        tree: tempfile::TempDir,
        root: Option<&Path>,
        config: ServiceConfig,
    ) -> Self {
        let engine = ScriptedEngine::new(root.unwrap_or(tree.path()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dyn_engine: Arc<dyn Backend> = engine.clone();
        let connection = runtime
            .block_on(service::serve(&bus.bus(), dyn_engine, config))
            .unwrap();
        Self {
            bus,
            tree,
            engine,
            runtime,
            connection,
        }
    }

    pub fn inventory(&self) -> Inventory {
        Inventory::scan(&SysfsRoot::new(self.tree.path()), &PciIds::empty()).unwrap()
    }

    /// Runs passthroughctl against this bus.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.bus.address, args, false)
    }

    /// Runs passthroughctl as uid/gid 65534 (nobody).
    pub fn ctl_as_nobody(&self, args: &[&str]) -> Output {
        ctl(&self.bus.address, args, true)
    }

    /// A client connection to the test bus, for raw D-Bus calls.
    pub fn client(&self) -> zbus::Connection {
        self.runtime
            .block_on(self.bus.bus().builder().unwrap().build())
            .unwrap()
    }
}

pub fn ctl_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_passthroughctl"))
}

pub fn ctl(address: &str, args: &[&str], as_nobody: bool) -> Output {
    let mut command = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(ctl_path());
        c
    } else {
        Command::new(ctl_path())
    };
    command
        .arg("--bus")
        .arg(address)
        .args(args)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// The real engine served on `bus` from a runtime of its own, as the daemon's main serves it;
/// the connection lives as long as the caller keeps it.
pub fn serve_engine(bus: &TestBus, engine: Engine) -> (tokio::runtime::Runtime, zbus::Connection) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine: Arc<dyn Backend> = Arc::new(engine);
    let connection = runtime
        .block_on(service::serve(&bus.bus(), engine, ServiceConfig::default()))
        .unwrap();
    (runtime, connection)
}
