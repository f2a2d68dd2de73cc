//! The D-Bus face of the engine: `org.passthroughd.Passthrough1.Manager` at
//! `/org/passthroughd/Passthrough1`.
//!
//! Each method parses its arguments, authorizes mutations ([`crate::service::authz`]), then runs the
//! engine on a blocking thread with a time limit, so a stuck sysfs write never stalls the
//! dispatch of other calls. Engine errors become D-Bus error names here, and only here.

pub mod authz;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use passthroughd_proto::dbus::{self as proto_dbus, PATH, SERVICE};
use passthroughd_proto::wire::{
    ChangeWire, FunctionRow, FunctionWire, GroupWire, HostReportWire, StatusWire, VfWire,
};
use passthroughd_proto::{
    AssignOptions, Change, HostReport, PciAddress, ReleaseOptions, Status, VfInfo,
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface, message::Header};

use crate::Inventory;
use crate::engine::{Caller, Manager};
use crate::error::Error;
use authz::Authorizer;

/// What the service needs from the engine. [`Manager`] is the real one; tests of the D-Bus layer
/// can put a scripted one behind the same interface.
pub trait Engine: Send + Sync + 'static {
    /// What readers see; may be shared between requests (see `Manager::snapshot`).
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
        assign: bool,
        runtime: bool,
    ) -> Result<Vec<VfInfo>, Error>;
    fn vf_destroy(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error>;
    fn vf_list(&self, pf: PciAddress) -> Result<Vec<VfInfo>, Error>;
}

impl Engine for Manager {
    fn inventory(&self) -> Result<Arc<Inventory>, Error> {
        Manager::snapshot(self)
    }
    fn assign(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        Manager::assign(self, caller, addresses, options)
    }
    fn release(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        Manager::release(self, caller, addresses, options)
    }
    fn status(&self) -> Result<Status, Error> {
        Ok(Manager::status(self))
    }
    fn host_report(&self) -> Result<HostReport, Error> {
        Ok(Manager::host_report(self))
    }
    fn vf_create(
        &self,
        caller: &Caller,
        pf: PciAddress,
        count: u32,
        assign: bool,
        runtime: bool,
    ) -> Result<Vec<VfInfo>, Error> {
        Manager::vf_create(self, caller, pf, count, assign, runtime)
    }
    fn vf_destroy(
        &self,
        caller: &Caller,
        pf: PciAddress,
        force: bool,
    ) -> Result<Vec<Change>, Error> {
        Manager::vf_destroy(self, caller, pf, force)
    }
    fn vf_list(&self, pf: PciAddress) -> Result<Vec<VfInfo>, Error> {
        Manager::vf_list(self, pf)
    }
}

/// Tunables of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Longest a caller waits for the engine; the engine goes on in the background after that.
    pub time_limit: Duration,
    pub authorizer: Authorizer,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            time_limit: Duration::from_secs(30),
            authorizer: Authorizer::default(),
        }
    }
}

/// Connects to `bus`, serves the manager object, and only then takes the well-known name, so
/// nobody can call before the object exists. The connection serves until dropped.
pub async fn serve(
    bus: &proto_dbus::Bus,
    engine: Arc<dyn Engine>,
    config: ServiceConfig,
) -> zbus::Result<Connection> {
    let (announce, announcements) = mpsc::unbounded_channel();
    tokio::spawn(announce_in_order(announcements));
    let object = ManagerObject {
        engine,
        config,
        announce,
    };
    bus.builder()?
        .serve_at(PATH, object)?
        .name(SERVICE)?
        .build()
        .await
}

/// The served object.
pub struct ManagerObject {
    engine: Arc<dyn Engine>,
    config: ServiceConfig,
    /// To the one task that emits signals (see [`announce_in_order`]).
    announce: mpsc::UnboundedSender<(Connection, Announcement)>,
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

/// "what failed: why: root cause" on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Some messages already include their cause; do not say it twice.
        let cause_text = cause.to_string();
        if !line.ends_with(&cause_text) {
            line.push_str(": ");
            line.push_str(&cause_text);
        }
        source = cause.source();
    }
    line
}

/// Parses caller-supplied addresses: each must parse, none may repeat, at least one is needed.
fn parse_addresses(texts: &[String]) -> Result<Vec<PciAddress>, Error> {
    if texts.is_empty() {
        return Err(Error::InvalidArgument(
            "no PCI address given; name at least one function".into(),
        ));
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

/// Parses one caller-supplied address.
fn parse_address(text: &str) -> Result<PciAddress, Error> {
    text.parse()
        .map_err(|e| Error::InvalidArgument(format!("{e}")))
}

impl ManagerObject {
    /// The caller of a mutating method, if authorized (uid 0 or polkit).
    async fn authorize(&self, conn: &Connection, header: &Header<'_>) -> Reply<Caller> {
        self.config
            .authorizer
            .authorize(conn, header.sender())
            .await
            .map_err(|e| to_dbus(&e))
    }

    /// Runs `work` on a blocking thread; past the time limit the caller gets `on_timeout`.
    async fn blocking<T, F>(&self, what: &'static str, work: F) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Engine) -> Result<T, Error> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let task = tokio::task::spawn_blocking(move || work(&*engine));
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
        conn: &Connection,
        what: &'static str,
        busy_hint: &'static str,
        work: F,
        announcement: impl FnOnce(&T) -> Announcement + Send + 'static,
    ) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Engine) -> Result<T, Error> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let task = tokio::task::spawn_blocking(move || work(&*engine));
        let (conn, announce) = (conn.clone(), self.announce.clone());
        let finished = tokio::spawn(async move {
            let result = task.await;
            if let Ok(Ok(value)) = &result {
                // Only fails once the service is gone, and then nobody listens.
                let _ = announce.send((conn, announcement(value)));
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

/// "30 s", or "300 ms" for limits under a second.
fn seconds(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A panicked or cancelled engine task: the daemon stays up, the caller learns it failed.
fn internal(what: &str, join: &tokio::task::JoinError) -> proto_dbus::Error {
    error!(%what, %join, "engine task failed");
    to_dbus(&Error::Failed(format!(
        "{what}: internal error in the daemon"
    )))
}

/// What a finished mutation tells listeners.
#[derive(Debug)]
enum Announcement {
    /// `DriverChanged` (where the driver changed) and `AssignmentChanged` for each function.
    Changes {
        changes: Vec<Change>,
        assigned: bool,
    },
    /// `VfsChanged(pf, count)`.
    Vfs { pf: PciAddress, count: u32 },
}

/// Emits the signals of every finished mutation, one mutation after another in the order they
/// finished: the callers' replies never wait for signals (two per function, each a trip through
/// the bus), and two requests' signals never interleave. Ends with the service.
async fn announce_in_order(mut announcements: mpsc::UnboundedReceiver<(Connection, Announcement)>) {
    while let Some((conn, announcement)) = announcements.recv().await {
        let emitter = match SignalEmitter::new(&conn, PATH) {
            Ok(emitter) => emitter,
            Err(e) => {
                warn!(%e, "cannot emit signals");
                continue;
            }
        };
        match announcement {
            Announcement::Changes { changes, assigned } => {
                for change in &changes {
                    let address = change.address.to_string();
                    let old = change.old_driver.as_deref().unwrap_or("");
                    let new = change.new_driver.as_deref().unwrap_or("");
                    if old != new
                        && let Err(e) =
                            ManagerObject::driver_changed(&emitter, &address, old, new).await
                    {
                        warn!(%address, %e, "cannot emit DriverChanged");
                    }
                    if let Err(e) =
                        ManagerObject::assignment_changed(&emitter, &address, assigned).await
                    {
                        warn!(%address, %e, "cannot emit AssignmentChanged");
                    }
                }
            }
            Announcement::Vfs { pf, count } => {
                if let Err(e) = ManagerObject::vfs_changed(&emitter, &pf.to_string(), count).await {
                    warn!(%pf, %e, "cannot emit VfsChanged");
                }
            }
        }
    }
}

/// The announcement of an assign (`assigned`) or release.
fn changes(assigned: bool) -> impl FnOnce(&Vec<Change>) -> Announcement + Send + 'static {
    move |changes| Announcement::Changes {
        changes: changes.clone(),
        assigned,
    }
}

const BUSY_DEVICE: &str = "a VM may hold the device (see passthroughctl status)";
const BUSY_VF: &str = "a VM may hold a VF (see passthroughctl vf list)";

#[interface(name = "org.passthroughd.Passthrough1.Manager")]
impl ManagerObject {
    /// Every PCI function, sorted by address, one struct row each (see `FunctionRow`).
    async fn list_functions(&self) -> Result<Vec<FunctionRow>, proto_dbus::Error> {
        self.blocking("listing functions", |engine| {
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
    async fn list_groups(&self) -> Result<Vec<GroupWire>, proto_dbus::Error> {
        self.blocking("listing groups", |engine| {
            Ok(engine
                .inventory()?
                .groups
                .iter()
                .map(GroupWire::from)
                .collect())
        })
        .await
    }

    /// One function in full.
    async fn show(&self, address: String) -> Result<FunctionWire, proto_dbus::Error> {
        let address: PciAddress = address
            .parse()
            .map_err(|e| to_dbus(&Error::InvalidArgument(format!("{e}"))))?;
        self.blocking("showing a function", move |engine| {
            engine
                .inventory()?
                .function(address)
                .map(FunctionWire::from)
                .ok_or(Error::NoSuchDevice(address))
        })
        .await
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
    ) -> Result<Vec<ChangeWire>, proto_dbus::Error> {
        let addresses = parse_addresses(&addresses).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        let options = AssignOptions {
            runtime,
            group,
            force,
        };
        info!(uid = caller.uid, sender = %caller.bus_name, ?addresses, ?options, "assign");
        let changes = self
            .mutate(
                conn,
                "assign",
                BUSY_DEVICE,
                move |engine| engine.assign(&caller, &addresses, options),
                changes(true),
            )
            .await?;
        Ok(changes.iter().map(ChangeWire::from).collect())
    }

    /// Returns each function to the driver it had before assignment.
    async fn release(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        addresses: Vec<String>,
        runtime: bool,
    ) -> Result<Vec<ChangeWire>, proto_dbus::Error> {
        let addresses = parse_addresses(&addresses).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        let options = ReleaseOptions { runtime };
        info!(uid = caller.uid, sender = %caller.bus_name, ?addresses, ?options, "release");
        let changes = self
            .mutate(
                conn,
                "release",
                BUSY_DEVICE,
                move |engine| engine.release(&caller, &addresses, options),
                changes(false),
            )
            .await?;
        Ok(changes.iter().map(ChangeWire::from).collect())
    }

    /// Daemon version, uptime, assignments and recent errors.
    async fn status(&self) -> Result<StatusWire, proto_dbus::Error> {
        self.blocking("reading the status", |engine| {
            Ok(StatusWire::from(&engine.status()?))
        })
        .await
    }

    /// The host capability report: can this host pass devices through, and what to fix first.
    /// A read: no authorization. A host that is not ready is a successful report, not an error.
    async fn host(&self) -> Result<HostReportWire, proto_dbus::Error> {
        self.blocking("reading the host report", |engine| {
            Ok(HostReportWire::from(&engine.host_report()?))
        })
        .await
    }

    /// Creates `count` VFs on `pf` (through 0 when it has another count); with `assign` they go
    /// straight to vfio-pci without a host VF driver ever probing them. Returns the VFs.
    async fn vf_create(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        pf: String,
        count: u32,
        assign: bool,
        runtime: bool,
    ) -> Result<Vec<VfWire>, proto_dbus::Error> {
        let pf = parse_address(&pf).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        info!(uid = caller.uid, sender = %caller.bus_name, %pf, count, assign, runtime, "vf create");
        let vfs = self
            .mutate(
                conn,
                "vf create",
                BUSY_VF,
                move |engine| engine.vf_create(&caller, pf, count, assign, runtime),
                move |vfs: &Vec<VfInfo>| Announcement::Vfs {
                    pf,
                    count: u32::try_from(vfs.len()).unwrap_or(u32::MAX),
                },
            )
            .await?;
        Ok(vfs.iter().map(VfWire::from).collect())
    }

    /// Removes every VF of `pf` (`force`: even persistently assigned ones; never in-use ones).
    async fn vf_destroy(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        pf: String,
        force: bool,
    ) -> Result<Vec<ChangeWire>, proto_dbus::Error> {
        let pf = parse_address(&pf).map_err(|e| to_dbus(&e))?;
        let caller = self.authorize(conn, &header).await?;
        info!(uid = caller.uid, sender = %caller.bus_name, %pf, force, "vf destroy");
        let changes = self
            .mutate(
                conn,
                "vf destroy",
                BUSY_VF,
                move |engine| engine.vf_destroy(&caller, pf, force),
                move |_: &Vec<Change>| Announcement::Vfs { pf, count: 0 },
            )
            .await?;
        Ok(changes.iter().map(ChangeWire::from).collect())
    }

    /// Every VF of `pf`: index, address, driver, group, assignment, in-use holder.
    async fn vf_list(&self, pf: String) -> Result<Vec<VfWire>, proto_dbus::Error> {
        let pf = parse_address(&pf).map_err(|e| to_dbus(&e))?;
        self.blocking("listing VFs", move |engine| {
            Ok(engine.vf_list(pf)?.iter().map(VfWire::from).collect())
        })
        .await
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
