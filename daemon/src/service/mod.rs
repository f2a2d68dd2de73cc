//! The D-Bus face of the engine: `org.passthroughd.Passthrough1.Manager` at
//! `/org/passthroughd/Passthrough1`.
//!
//! Each method parses its arguments (bounded in size), authorizes mutations ([`authz`]), then
//! runs the engine on a blocking thread with a time limit, so a stuck sysfs write never stalls
//! the dispatch of other calls. Reads share a small pool and are refused at once when it is
//! full; a mutation still waiting for its groups when its caller gives up is dropped unstarted.
//! Engine errors become D-Bus error names here, and only here. Results travel as the model
//! types' dictionaries ([`passthroughd_proto::wire`]).

pub mod authz;
pub mod events;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use passthroughd_proto::dbus::{self as proto_dbus, PATH, SERVICE};
use passthroughd_proto::vfio::{FunctionDetail, VerifyReport};
use passthroughd_proto::wire::{Dict, FunctionRow, to_dict, to_dicts};
use passthroughd_proto::{
    ApplyReport, AssignOptions, Change, ConfigState, HostReport, LeaseInfo, LeaseOwner, PciAddress,
    ReleaseOptions, Status, VfCreateOptions, VfInfo,
};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tracing::{error, info, warn};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface, message::Header};

use crate::engine::executor::{Announcement, Listener};
use crate::engine::{Caller, Engine, MAX_ADDRESSES};
pub use crate::error::chain as error_chain;
use crate::error::{Error, seconds};
use crate::observe::inventory::Inventory;
use authz::Authorizer;

/// What the service needs from the engine. [`Engine`] is the real one; tests of the D-Bus layer
/// can put a scripted one behind the same interface.
pub trait Backend: Send + Sync + 'static {
    /// What readers see; may be shared between requests (see `Engine::snapshot`).
    fn inventory(&self) -> Result<Arc<Inventory>, Error>;
    fn assign(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error>;
    fn release(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error>;
    fn status(&self) -> Result<Status, Error>;
    /// The host capability report of the root the engine reads.
    fn host_report(&self) -> Result<HostReport, Error>;
    fn vf_create(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        options: VfCreateOptions,
    ) -> Result<Vec<VfInfo>, Error>;
    fn vf_destroy(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error>;
    fn vf_list(&self, pf: PciAddress) -> Result<Vec<VfInfo>, Error>;
    fn apply(&self, caller: &Caller, dry_run: bool) -> Result<ApplyReport, Error>;
    fn reload(&self) -> Result<ConfigState, Error>;
    fn lease_start(
        &self,
        caller: &Caller,
        owner: &LeaseOwner,
        addresses: &[PciAddress],
    ) -> Result<Vec<Change>, Error>;
    fn lease_end(&self, caller: &Caller, owner: &LeaseOwner) -> Result<Vec<Change>, Error>;
    fn leases(&self) -> Result<Vec<LeaseInfo>, Error>;
    /// One function with its passthrough readiness.
    fn show(&self, address: PciAddress) -> Result<FunctionDetail, Error>;
    /// The function opened through VFIO as a VMM would.
    fn verify(&self, caller: &Caller, address: PciAddress) -> Result<VerifyReport, Error>;
    /// Where changes finished after their callers were answered are reported.
    fn set_listener(&self, _listener: Listener) {}
}

impl Backend for Engine {
    fn inventory(&self) -> Result<Arc<Inventory>, Error> {
        Engine::snapshot(self)
    }
    fn assign(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        Engine::assign(self, caller, addresses, options)
    }
    fn release(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        Engine::release(self, caller, addresses, options)
    }
    fn status(&self) -> Result<Status, Error> {
        Ok(Engine::status(self))
    }
    fn host_report(&self) -> Result<HostReport, Error> {
        Ok(Engine::host_report(self))
    }
    fn vf_create(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        options: VfCreateOptions,
    ) -> Result<Vec<VfInfo>, Error> {
        Engine::vf_create(self, caller, pf, count, options)
    }
    fn vf_destroy(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error> {
        Engine::vf_destroy(self, caller, pf, force)
    }
    fn vf_list(&self, pf: PciAddress) -> Result<Vec<VfInfo>, Error> {
        Engine::vf_list(self, pf)
    }
    fn apply(&self, caller: &Caller, dry_run: bool) -> Result<ApplyReport, Error> {
        Engine::apply(self, caller, dry_run)
    }
    fn reload(&self) -> Result<ConfigState, Error> {
        Ok(Engine::reload(self))
    }
    fn lease_start(
        &self,
        caller: &Caller,
        owner: &LeaseOwner,
        addresses: &[PciAddress],
    ) -> Result<Vec<Change>, Error> {
        Engine::lease_start(self, caller, owner, addresses)
    }
    fn lease_end(&self, caller: &Caller, owner: &LeaseOwner) -> Result<Vec<Change>, Error> {
        Engine::lease_end(self, caller, owner)
    }
    fn leases(&self) -> Result<Vec<LeaseInfo>, Error> {
        Ok(Engine::leases(self))
    }
    fn show(&self, address: PciAddress) -> Result<FunctionDetail, Error> {
        Engine::show(self, address)
    }
    fn verify(&self, caller: &Caller, address: PciAddress) -> Result<VerifyReport, Error> {
        Engine::verify(self, caller, address)
    }
    fn set_listener(&self, listener: Listener) {
        Engine::set_listener(self, listener);
    }
}

/// Tunables of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Longest a caller waits for the engine.
    pub time_limit: Duration,
    pub authorizer: Authorizer,
    /// Reads served at once; more wait up to `read_wait`, then get Busy.
    pub readers: usize,
    pub read_wait: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            time_limit: Duration::from_secs(30),
            authorizer: Authorizer::default(),
            readers: 4,
            read_wait: Duration::from_secs(2),
        }
    }
}

/// Connects to `bus`, serves the manager object, and only then takes the well-known name, so
/// nobody can call before the object exists. The connection serves until dropped.
pub async fn serve(
    bus: &proto_dbus::Bus,
    engine: Arc<dyn Backend>,
    config: ServiceConfig,
) -> zbus::Result<Connection> {
    let (announce, announcements) = mpsc::unbounded_channel();
    let late = announce.clone();
    engine.set_listener(Box::new(move |a| {
        // Only fails once the service is gone, and then nobody listens.
        let _ = late.send(a);
    }));
    let object = ManagerObject {
        engine,
        readers: Arc::new(Semaphore::new(config.readers.max(1))),
        config,
        announce,
    };
    let connection = bus
        .builder()?
        .serve_at(PATH, object)?
        .name(SERVICE)?
        .build()
        .await?;
    tokio::spawn(announce_in_order(connection.clone(), announcements));
    Ok(connection)
}

/// Resolves when the daemon no longer owns its bus name: the bus took it away, or the
/// connection to the bus is gone. The caller then exits, so that systemd restarts it.
pub async fn name_lost(connection: &Connection) -> String {
    let proxy = match zbus::fdo::DBusProxy::new(connection).await {
        Ok(proxy) => proxy,
        Err(e) => return format!("cannot watch the bus name: {e}"),
    };
    let mut lost = match proxy.receive_name_lost().await {
        Ok(lost) => lost,
        Err(e) => return format!("cannot watch the bus name: {e}"),
    };
    loop {
        let next = std::future::poll_fn(|cx| {
            zbus::export::futures_core::Stream::poll_next(std::pin::Pin::new(&mut lost), cx)
        })
        .await;
        match next {
            Some(signal) => {
                if signal.args().is_ok_and(|a| a.name == SERVICE) {
                    return format!("the bus took the name {SERVICE} away");
                }
            }
            None => return "the connection to the bus is gone".into(),
        }
    }
}

/// The served object.
pub struct ManagerObject {
    engine: Arc<dyn Backend>,
    config: ServiceConfig,
    readers: Arc<Semaphore>,
    /// To the one task that emits signals (see [`announce_in_order`]).
    announce: mpsc::UnboundedSender<Announcement>,
}

impl std::fmt::Debug for ManagerObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerObject")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type Reply<T> = Result<T, proto_dbus::Error>;

/// The one place where an engine error becomes a D-Bus error name.
fn to_dbus(e: &Error) -> proto_dbus::Error {
    proto_dbus::Error::from_kind_name(e.kind().dbus_name(), error_chain(e))
}

/// Parses caller-supplied addresses: each must parse, none may repeat, at least one and at most
/// [`MAX_ADDRESSES`] are needed.
fn parse_addresses(texts: &[String]) -> Result<Vec<PciAddress>, Error> {
    if texts.is_empty() {
        return Err(Error::InvalidArgument(
            "no PCI address given; name at least one function".into(),
        ));
    }
    if texts.len() > MAX_ADDRESSES {
        return Err(Error::InvalidArgument(format!(
            "{} addresses in one request; at most {MAX_ADDRESSES}",
            texts.len()
        )));
    }
    let mut seen = HashSet::with_capacity(texts.len());
    texts
        .iter()
        .map(|text| {
            let address = parse_address(text)?;
            if !seen.insert(address) {
                return Err(Error::InvalidArgument(format!(
                    "{address} is named more than once"
                )));
            }
            Ok(address)
        })
        .collect()
}

/// Parses one caller-supplied address (the parser bounds its length).
fn parse_address(text: &str) -> Result<PciAddress, Error> {
    text.parse()
        .map_err(|e| Error::InvalidArgument(format!("{e}")))
}

/// Parses a caller-supplied lease owner (`libvirt:DOMAIN`, `k8s:UID`, `vmm:NAME`); the length
/// is checked before anything else looks at the text.
fn parse_owner(text: &str) -> Result<LeaseOwner, Error> {
    const LONGEST: usize = 8 + 4 * passthroughd_proto::lease::MAX_OWNER_NAME;
    if text.len() > LONGEST {
        return Err(Error::InvalidArgument(format!(
            "the lease owner is {} bytes long; at most {LONGEST}",
            text.len()
        )));
    }
    text.parse()
        .map_err(|e| Error::InvalidArgument(format!("{e}")))
}

/// A model value as its dictionary.
fn dict<T: Serialize>(value: &T) -> Reply<Dict> {
    to_dict(value).map_err(|e| to_dbus(&Error::Encode(e)))
}

fn dicts<T: Serialize>(values: &[T]) -> Reply<Vec<Dict>> {
    to_dicts(values).map_err(|e| to_dbus(&Error::Encode(e)))
}

impl ManagerObject {
    /// The caller of a mutating method, if authorized (uid 0 or polkit), with the deadline
    /// after which its request is dropped unstarted.
    async fn authorize(&self, conn: &Connection, header: &Header<'_>) -> Reply<Caller> {
        let mut caller = self
            .config
            .authorizer
            .authorize(conn, header.sender())
            .await
            .map_err(|e| to_dbus(&e))?;
        caller.deadline = Some(Instant::now() + self.config.time_limit);
        Ok(caller)
    }

    /// Runs a read on a blocking thread, at most `readers` at once; past the time limit the
    /// caller gets an error. When the pool stays full for `read_wait`, Busy at once.
    async fn read<T, F>(&self, what: &'static str, work: F) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, Error> + Send + 'static,
    {
        let permit = match tokio::time::timeout(
            self.config.read_wait,
            Arc::clone(&self.readers).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err(to_dbus(&Error::Busy(format!(
                    "{what}: the daemon is busy with other reads; try again in a moment"
                ))));
            }
        };
        let engine = Arc::clone(&self.engine);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&*engine)
        });
        self.finish(what, task).await
    }

    /// Runs `work` on a blocking thread without the readers' pool (it touches no device).
    async fn blocking<T, F>(&self, what: &'static str, work: F) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, Error> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let task = tokio::task::spawn_blocking(move || work(&*engine));
        self.finish(what, task).await
    }

    async fn finish<T>(
        &self,
        what: &'static str,
        task: tokio::task::JoinHandle<Result<T, Error>>,
    ) -> Reply<T> {
        match tokio::time::timeout(self.config.time_limit, task).await {
            Ok(Ok(result)) => result.map_err(|e| to_dbus(&e)),
            Ok(Err(join)) => Err(internal(what, &join)),
            Err(_) => Err(to_dbus(&Error::Failed(format!(
                "{what} timed out after {}",
                seconds(self.config.time_limit)
            )))),
        }
    }

    /// Runs a mutation on a blocking thread. What it changed is announced (signals) when it
    /// finishes, even if the caller stopped waiting at the time limit (then it gets `Busy`,
    /// with `busy_hint` saying where to look).
    async fn mutate<T, F>(
        &self,
        what: &'static str,
        busy_hint: &'static str,
        work: F,
        announcement: impl FnOnce(&T) -> Announcement + Send + 'static,
    ) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, Error> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let task = tokio::task::spawn_blocking(move || work(&*engine));
        let announce = self.announce.clone();
        let finished = tokio::spawn(async move {
            let result = task.await;
            if let Ok(Ok(value)) = &result {
                // Only fails once the service is gone, and then nobody listens.
                let _ = announce.send(announcement(value));
            }
            result
        });
        match tokio::time::timeout(self.config.time_limit, finished).await {
            Ok(Ok(Ok(Ok(value)))) => Ok(value),
            Ok(Ok(Ok(Err(e)))) => Err(to_dbus(&e)),
            Ok(Ok(Err(join)) | Err(join)) => Err(internal(what, &join)),
            Err(_) => Err(to_dbus(&Error::Busy(format!(
                "{what} did not finish within {} and goes on in the background; {busy_hint}",
                seconds(self.config.time_limit)
            )))),
        }
    }
}

/// A panicked or cancelled engine task: the daemon stays up, the caller learns it failed.
fn internal(what: &str, join: &tokio::task::JoinError) -> proto_dbus::Error {
    error!(%what, %join, "engine task failed");
    to_dbus(&Error::Failed(format!(
        "{what}: internal error in the daemon"
    )))
}

/// Emits the signals of every finished mutation, one mutation after another in the order they
/// finished: the callers' replies never wait for signals (two per function, each a trip through
/// the bus), and two requests' signals never interleave. Ends with the service.
async fn announce_in_order(
    conn: Connection,
    mut announcements: mpsc::UnboundedReceiver<Announcement>,
) {
    while let Some(announcement) = announcements.recv().await {
        match SignalEmitter::new(&conn, PATH) {
            Ok(emitter) => emit(&emitter, &announcement).await,
            Err(e) => warn!(%e, "cannot emit signals"),
        }
    }
}

/// `DriverChanged` and `AssignmentChanged` per function, `VfsChanged` per PF.
async fn emit(emitter: &SignalEmitter<'_>, announcement: &Announcement) {
    for change in &announcement.changes {
        let address = change.address.to_string();
        let old = change.old_driver.as_deref().unwrap_or("");
        let new = change.new_driver.as_deref().unwrap_or("");
        if old != new
            && let Err(e) = ManagerObject::driver_changed(emitter, &address, old, new).await
        {
            warn!(%address, %e, "cannot emit DriverChanged");
        }
        let assigned = crate::kernel::driver::VFIO_PCI == new;
        if let Err(e) = ManagerObject::assignment_changed(emitter, &address, assigned).await {
            warn!(%address, %e, "cannot emit AssignmentChanged");
        }
    }
    for (pf, count) in &announcement.vfs {
        if let Err(e) = ManagerObject::vfs_changed(emitter, &pf.to_string(), *count).await {
            warn!(%pf, %e, "cannot emit VfsChanged");
        }
    }
}

/// The signals of what an apply (or a hotplug pass) changed: drivers and VF counts.
pub async fn announce_changes(connection: &Connection, report: &ApplyReport) {
    let Ok(emitter) = SignalEmitter::new(connection, PATH) else {
        return;
    };
    emit(&emitter, &apply_announcement(report)).await;
}

/// An apply report as signals: its changes of functions that exist by address, its VF counts.
fn apply_announcement(report: &ApplyReport) -> Announcement {
    Announcement {
        changes: report
            .changes
            .iter()
            .filter_map(|c| {
                Some(Change {
                    address: c.function.parse().ok()?,
                    old_driver: c.from.clone(),
                    new_driver: c.to.clone(),
                })
            })
            .collect(),
        vfs: report.vfs.iter().map(|v| (v.pf, v.to)).collect(),
    }
}

/// The announcement of changes.
fn changes() -> impl FnOnce(&Vec<Change>) -> Announcement + Send + 'static {
    |changes| Announcement {
        changes: changes.clone(),
        vfs: Vec::new(),
    }
}

const BUSY_DEVICE: &str = "a VM may hold the device (see passthroughctl status)";
const BUSY_VF: &str = "a VM may hold a VF (see passthroughctl vf list)";

#[interface(name = "org.passthroughd.Passthrough1.Manager")]
impl ManagerObject {
    /// Every PCI function, sorted by address, one struct row each (see `FunctionRow`).
    async fn list_functions(&self) -> Result<Vec<FunctionRow>, proto_dbus::Error> {
        self.read("listing functions", |engine| {
            Ok(engine
                .inventory()?
                .functions
                .iter()
                .map(FunctionRow::from)
                .collect())
        })
        .await
    }

    /// Every IOMMU group, sorted by number.
    async fn list_groups(&self) -> Result<Vec<Dict>, proto_dbus::Error> {
        let inventory = self
            .read("listing groups", |engine| engine.inventory())
            .await?;
        dicts(&inventory.groups)
    }

    /// One function in full, with `passthrough`: whether a VM could be given it now (and the
    /// first thing in the way), its reset methods, a variant driver, its group node's access.
    async fn show(&self, address: String) -> Result<Dict, proto_dbus::Error> {
        let address = parse_address(&address).map_err(|e| to_dbus(&e))?;
        let detail = self
            .read("showing a function", move |engine| engine.show(address))
            .await?;
        dict(&detail)
    }

    /// Opens the function through VFIO the way a VMM would (container, group, IOMMU backend,
    /// device) under its group's lock and reports what a VM would get; refused without opening
    /// anything while it is leased or held open by a process. Needs authorization: it opens
    /// device nodes.
    async fn verify(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        address: String,
    ) -> Result<Dict, proto_dbus::Error> {
        let address = parse_address(&address).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        info!(uid = caller.uid, sender = %caller.bus_name, %address, "verify");
        let report = self
            .blocking("verifying", move |engine| engine.verify(&caller, address))
            .await?;
        dict(&report)
    }

    /// Binds each function (with `group`, its whole IOMMU group) to vfio-pci, all or nothing.
    async fn assign(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        addresses: Vec<String>,
        runtime: bool,
        group: bool,
        force: bool,
    ) -> Result<Vec<Dict>, proto_dbus::Error> {
        let addresses = parse_addresses(&addresses).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        let options = AssignOptions {
            runtime,
            group,
            force,
        };
        info!(uid = caller.uid, sender = %caller.bus_name, addresses = %addresses.len(),
            ?options, "assign");
        let changes = self
            .mutate(
                "assign",
                BUSY_DEVICE,
                move |engine| engine.assign(&caller, &addresses, options),
                changes(),
            )
            .await?;
        dicts(&changes)
    }

    /// Returns each function to the driver it had before assignment; with `reset`, resets it
    /// through VFIO first.
    async fn release(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        addresses: Vec<String>,
        runtime: bool,
        reset: bool,
    ) -> Result<Vec<Dict>, proto_dbus::Error> {
        let addresses = parse_addresses(&addresses).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        let options = ReleaseOptions { runtime, reset };
        info!(uid = caller.uid, sender = %caller.bus_name, addresses = %addresses.len(),
            ?options, "release");
        let changes = self
            .mutate(
                "release",
                BUSY_DEVICE,
                move |engine| engine.release(&caller, &addresses, options),
                changes(),
            )
            .await?;
        dicts(&changes)
    }

    /// Daemon version, uptime, assignments, config, operations in flight, recent errors.
    async fn status(&self) -> Result<Dict, proto_dbus::Error> {
        let status = self
            .blocking("reading the status", |engine| engine.status())
            .await?;
        dict(&status)
    }

    /// The host capability report: can this host pass devices through, and what to fix first.
    /// A read: no authorization. A host that is not ready is a successful report, not an error.
    async fn host(&self) -> Result<Dict, proto_dbus::Error> {
        let report = self
            .read("reading the host report", |engine| engine.host_report())
            .await?;
        dict(&report)
    }

    /// Creates `count` VFs on `pf` (through 0 when it has another count); with `assign` they go
    /// straight to vfio-pci without a host VF driver ever probing them. Returns the VFs.
    #[allow(clippy::too_many_arguments)] // the D-Bus signature: header, connection, five args
    async fn vf_create(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        pf: String,
        count: u32,
        assign: bool,
        runtime: bool,
        force: bool,
    ) -> Result<Vec<Dict>, proto_dbus::Error> {
        let pf = parse_address(&pf).map_err(|e| to_dbus(&e))?;
        crate::engine::planner::vfs::check_requested_count(count).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        let options = VfCreateOptions {
            assign,
            runtime,
            force,
        };
        info!(uid = caller.uid, sender = %caller.bus_name, %pf, count, ?options, "vf create");
        let vfs = self
            .mutate(
                "vf create",
                BUSY_VF,
                move |engine| engine.vf_create(&caller, pf, count, options),
                move |vfs: &Vec<VfInfo>| Announcement {
                    changes: Vec::new(),
                    vfs: vec![(pf, u32::try_from(vfs.len()).unwrap_or(u32::MAX))],
                },
            )
            .await?;
        dicts(&vfs)
    }

    /// Removes every VF of `pf` (`force`: even assigned ones; never in-use ones).
    async fn vf_destroy(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        pf: String,
        force: bool,
    ) -> Result<Vec<Dict>, proto_dbus::Error> {
        let pf = parse_address(&pf).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        info!(uid = caller.uid, sender = %caller.bus_name, %pf, force, "vf destroy");
        let changes = self
            .mutate(
                "vf destroy",
                BUSY_VF,
                move |engine| engine.vf_destroy(&caller, pf, force),
                move |_: &Vec<Change>| Announcement {
                    changes: Vec::new(),
                    vfs: vec![(pf, 0)],
                },
            )
            .await?;
        dicts(&changes)
    }

    /// Every VF of `pf`: index, address, driver, group, assignment, in-use holder.
    async fn vf_list(&self, pf: String) -> Result<Vec<Dict>, proto_dbus::Error> {
        let pf = parse_address(&pf).map_err(|e| to_dbus(&e))?;
        let vfs = self
            .read("listing VFs", move |engine| engine.vf_list(pf))
            .await?;
        dicts(&vfs)
    }

    /// Reconciles the host with the declarative config and stored requests; `dry_run` only
    /// says what it would do (a read: no authorization needed for it).
    async fn apply(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        dry_run: bool,
    ) -> Result<Dict, proto_dbus::Error> {
        let report = if dry_run {
            let caller = Caller::new(u32::MAX, header.sender().map_or("", |s| s.as_str()));
            self.read("planning apply", move |engine| engine.apply(&caller, true))
                .await?
        } else {
            let caller = self.authorize(conn, &header).await?;
            info!(uid = caller.uid, sender = %caller.bus_name, "apply");
            self.mutate(
                "apply",
                BUSY_DEVICE,
                move |engine| engine.apply(&caller, false),
                apply_announcement,
            )
            .await?
        };
        dict(&report)
    }

    /// Re-reads the config file (as SIGHUP does); a broken file keeps the last good config.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Dict, proto_dbus::Error> {
        let caller = self.authorize(conn, &header).await?;
        info!(uid = caller.uid, sender = %caller.bus_name, "reload");
        let state = self
            .blocking("reloading the config", |engine| engine.reload())
            .await?;
        dict(&state)
    }

    /// Takes a lease for `owner` (`libvirt:DOMAIN`, `k8s:CLAIM-UID`, `vmm:NAME`) on every
    /// function of `addresses`, all or nothing: bound to vfio-pci with every guard rule; refused
    /// when another owner holds one (naming it) or when a group has endpoints left out. A
    /// function already assigned stays as it is. Taking the same lease again changes nothing.
    async fn lease_start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        owner: String,
        addresses: Vec<String>,
    ) -> Result<Vec<Dict>, proto_dbus::Error> {
        let owner = parse_owner(&owner).map_err(|e| to_dbus(&e))?;
        let addresses = parse_addresses(&addresses).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        info!(uid = caller.uid, sender = %caller.bus_name, %owner, addresses = %addresses.len(),
            "lease start");
        let changes = self
            .mutate(
                "lease start",
                BUSY_DEVICE,
                move |engine| engine.lease_start(&caller, &owner, &addresses),
                changes(),
            )
            .await?;
        dicts(&changes)
    }

    /// Ends the lease of `owner`: each function it leased goes back to the driver it had
    /// before, unless a request or the config also claims it. An end is never dropped for
    /// waiting: it runs once the functions' operations in progress are done, even after its
    /// caller stopped waiting (the libvirt hook that gave up on a start relies on that).
    async fn lease_end(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        owner: String,
    ) -> Result<Vec<Dict>, proto_dbus::Error> {
        let owner = parse_owner(&owner).map_err(|e| to_dbus(&e))?;
        let mut caller = self.authorize(conn, &header).await?;
        caller.deadline = None;
        info!(uid = caller.uid, sender = %caller.bus_name, %owner, "lease end");
        let changes = self
            .mutate(
                "lease end",
                BUSY_DEVICE,
                move |engine| engine.lease_end(&caller, &owner),
                changes(),
            )
            .await?;
        dicts(&changes)
    }

    /// Every lease: owner, functions, age, and why it looks stale when it does.
    async fn list_leases(&self) -> Result<Vec<Dict>, proto_dbus::Error> {
        let leases = self
            .blocking("listing leases", |engine| engine.leases())
            .await?;
        dicts(&leases)
    }

    /// The VFs of `pf` changed; `count` is how many it has now.
    #[zbus(signal)]
    async fn vfs_changed(emitter: &SignalEmitter<'_>, pf: &str, count: u32) -> zbus::Result<()>;

    /// A function's driver changed; an empty string means "no driver".
    #[zbus(signal)]
    async fn driver_changed(
        emitter: &SignalEmitter<'_>,
        address: &str,
        old: &str,
        new: &str,
    ) -> zbus::Result<()>;

    /// A device event led somewhere: `action` is `claimed` (`detail`: the entry or request),
    /// `refused` (`detail`: why), or `removed` (a claimed function went away; it stays claimed).
    #[zbus(signal)]
    async fn hotplug(
        emitter: &SignalEmitter<'_>,
        address: &str,
        action: &str,
        detail: &str,
    ) -> zbus::Result<()>;

    /// A function was assigned (`true`) or released (`false`).
    #[zbus(signal)]
    async fn assignment_changed(
        emitter: &SignalEmitter<'_>,
        address: &str,
        assigned: bool,
    ) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn addresses_are_parsed_and_checked() {
        assert_eq!(
            parse_addresses(&strings(&["01:00.0", "0000:01:00.1"])).unwrap(),
            vec![
                "0000:01:00.0".parse::<PciAddress>().unwrap(),
                "0000:01:00.1".parse().unwrap()
            ]
        );
        let err = parse_addresses(&[]).unwrap_err();
        assert!(err.to_string().contains("no PCI address given"));
        let err = parse_addresses(&strings(&["01:00.0", "0000:01:00.0"])).unwrap_err();
        assert_eq!(err.to_string(), "0000:01:00.0 is named more than once");
        let err = parse_addresses(&strings(&["../x"])).unwrap_err();
        assert!(err.to_string().contains("contains '/'"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        let many = vec!["01:00.0".to_owned(); MAX_ADDRESSES + 1];
        let err = parse_addresses(&many).unwrap_err();
        assert!(err.to_string().contains("at most 1024"), "{err}");
    }

    #[test]
    fn every_error_kind_has_its_own_name() {
        use crate::ErrorKind::*;
        for kind in [
            InvalidArgument,
            PermissionDenied,
            NotFound,
            Refused,
            Busy,
            Failed,
        ] {
            let e = proto_dbus::Error::from_kind_name(kind.dbus_name(), String::new());
            assert_eq!(
                zbus::DBusError::name(&e).as_str(),
                format!("{}.{}", proto_dbus::ERROR_PREFIX, kind.dbus_name())
            );
        }
    }
}
