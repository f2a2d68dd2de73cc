//! `passthroughd`: flags, logging, then the library does the work.
//!
//! With no subcommand it runs the D-Bus service; `inventory` prints the inventory once and exits.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use passthroughd::engine::EngineOptions;
use passthroughd::kernel::SysfsKernel;
use passthroughd::kernel::events::{self, Source};
use passthroughd::observe::host;
use passthroughd::service::{self, ServiceConfig, error_chain};
use passthroughd::{Engine, EngineConfig, Inventory, PciIds, SysfsRoot};
use passthroughd_proto::dbus::Bus;
use passthroughd_proto::manual;
use passthroughd_proto::table;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "PCI passthrough daemon: IOMMU groups, vfio-pci binding, SR-IOV"
)]
struct Flags {
    /// Filesystem root that sys/ is read from (a captured tree in tests).
    #[arg(long, value_name = "DIR", default_value = "/", global = true)]
    sysfs_root: PathBuf,
    /// pci.ids database for vendor and device names (default: the system's, if installed).
    #[arg(long, value_name = "FILE", global = true)]
    pci_ids: Option<PathBuf>,
    /// Declarative config: applied at start, re-read on SIGHUP or `passthroughctl reload`
    /// (a missing file is an empty desired state).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/passthroughd/config.toml"
    )]
    config: PathBuf,
    /// Where state.toml, the journal and the last good copy of the config live.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/passthroughd",
        global = true
    )]
    state_dir: PathBuf,
    /// How long a caller waits for one sysfs write (an unbind waits for as long as a VM holds
    /// the device) before it is told the operation is pending; the operation goes on.
    #[arg(long, value_name = "SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    write_timeout: u64,
    /// The bus to serve on: system, session, or a D-Bus address (unix:path=...).
    #[arg(long, value_name = "BUS", default_value = "system")]
    bus: Bus,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every PCI function and IOMMU group once, read directly from sysfs, and exit.
    Inventory {
        /// One JSON document {"functions": [...], "groups": [...]} instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// For the udev rule (systemd/70-passthroughd.rules), as a function appears: if what the
    /// daemon last applied claims it, set its driver_override to vfio-pci before its host
    /// driver's module loads, so the host driver never binds it. Reads the state dir only (the
    /// last good config and state.toml); prints one line when it claims the function.
    Claim {
        /// The function, DDDD:BB:DD.F (udev's $kernel).
        #[arg(value_name = "ADDR")]
        address: String,
    },
    /// Check whether this host can pass devices through to VMs (CPU, KVM, IOMMU, VFIO, kernel
    /// config, topology, memory, SR-IOV) and print the report. Reading the MSRs needs root and `msr`.
    Host {
        /// The report as one JSON document (docs/host-report.md) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The man page's hand-written sections; clap's definitions above make the rest
/// (`passthroughd --generate man|bash|zsh|fish`, used by `make install`).
const MANUAL: manual::Page = manual::Page {
    section: "8",
    source: include_str!("../man/passthroughd.8.in"),
};

fn main() -> ExitCode {
    if let Some(code) = manual::generate_if_asked(Flags::command, &MANUAL) {
        return code;
    }
    let flags = Flags::parse();
    let root = SysfsRoot::new(&flags.sysfs_root);
    // Run by udev for every new PCI function: no logging set-up, no pci.ids, nothing it does
    // not need.
    if let Some(Command::Claim { ref address }) = flags.command {
        return claim(&root, &flags.state_dir, address);
    }
    init_logging();
    let ids = match &flags.pci_ids {
        Some(path) => match PciIds::load(path) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("passthroughd: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => PciIds::load_system(),
    };
    match flags.command {
        Some(Command::Inventory { json }) => inventory(&root, &ids, json),
        Some(Command::Host { json }) => host_report(&root, &ids, json),
        Some(Command::Claim { ref address }) => claim(&root, &flags.state_dir, address),
        None => run(&flags, root, ids),
    }
}

/// journald when systemd started us with the journal as our output, stderr otherwise.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journald.with_syslog_identifier("passthroughd".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("passthroughd: journald unavailable, logging to stderr: {e}"),
        }
    }
    // Colours only on a terminal: a pipe or a file gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// `passthroughd claim ADDR`: the early claim of a function as it appears.
fn claim(root: &SysfsRoot, state_dir: &std::path::Path, address: &str) -> ExitCode {
    use passthroughd::kernel::Kernel;
    let address: passthroughd_proto::PciAddress = match address.parse() {
        Ok(address) => address,
        Err(e) => {
            eprintln!("passthroughd claim: {e}");
            return ExitCode::from(2);
        }
    };
    match passthroughd::engine::early::claimed(root, state_dir, address) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(why)) => {
            let attr = root.pci_device_attr(address, "driver_override");
            let unset = passthroughd::kernel::sysfs::read_attr(&attr)
                .ok()
                .flatten()
                .is_none_or(|o| o.is_empty() || o == "(null)");
            if !unset {
                return ExitCode::SUCCESS;
            }
            match SysfsKernel.write(&attr, b"vfio-pci") {
                Ok(()) => {
                    println!("{address}: claimed by {why}: driver_override=vfio-pci");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("passthroughd claim: {address}: writing driver_override: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("passthroughd claim: {address}: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The host capability report, read directly (as root it can read the MSRs), printed once.
fn host_report(root: &SysfsRoot, ids: &PciIds, json: bool) -> ExitCode {
    let report = host::report_live(root, ids);
    let text = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(doc) => doc + "\n",
            Err(e) => {
                eprintln!("passthroughd: encoding the host report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        passthroughd_proto::host::render_text(&report)
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passthroughd: writing the host report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inventory(root: &SysfsRoot, ids: &PciIds, json: bool) -> ExitCode {
    match Inventory::scan(root, ids) {
        Ok(inventory) => {
            let text = if json {
                let doc = serde_json::json!({
                    "functions": inventory.functions,
                    "groups": inventory.groups,
                });
                format!("{doc:#}\n")
            } else {
                format!(
                    "{}\n{}",
                    table::functions(&inventory.functions),
                    table::groups(&inventory.groups)
                )
            };
            // One write: stdout is line-buffered and the JSON has ~90,000 lines.
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("passthroughd: writing the inventory: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("passthroughd: inventory failed: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Opens the engine (journal recovery, the desired state), then serves D-Bus until SIGTERM, or
/// until the daemon loses its bus name (then it exits with failure, for systemd to restart it).
fn run(flags: &Flags, root: SysfsRoot, ids: PciIds) -> ExitCode {
    // Kernel uevents describe the live /sys only: a captured or simulated tree gets none.
    let live_kernel = root.root() == std::path::Path::new("/");
    let mut options = EngineOptions::for_root(&root);
    options.write_timeout = std::time::Duration::from_secs(flags.write_timeout);
    let config = EngineConfig {
        kernel: Arc::new(SysfsKernel),
        root,
        state_dir: flags.state_dir.clone(),
        ids: Arc::new(ids),
        config: Some(flags.config.clone()),
    };
    let (engine, report) = match Engine::open_with(config, options) {
        Ok((engine, report)) => (Arc::new(engine), report),
        Err(e) => {
            error!("cannot start: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    for line in &report.recovered {
        info!(%line, "recovered from the journal");
    }
    for address in &report.applied {
        info!(%address, "stored assignment in effect");
    }
    for (address, why) in &report.refused {
        warn!(%address, %why, "stored assignment refused");
    }
    for change in &report.apply.changes {
        info!(entry = %change.entry, function = %change.function, "applied");
    }
    for refusal in report.apply.refused.iter().chain(&report.apply.failed) {
        warn!(entry = %refusal.entry, reason = %refusal.reason, "not applied");
    }
    // Device events describe the live /sys only: a captured or simulated tree gets none, and
    // then every read rescans.
    let (event_tx, event_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut event_rx = Some(event_rx);
    if live_kernel {
        let source = if events::udevd_running(std::path::Path::new("/")) {
            Source::Udev
        } else {
            Source::Kernel
        };
        match events::spawn_monitor(source, move |event| {
            // Only fails once the daemon stops listening.
            let _ = event_tx.send(event);
        }) {
            Ok(()) => {
                info!(%source, "following device events");
                engine.enable_inventory_cache();
            }
            Err(e) => {
                warn!("no device events ({e}): no hotplug, and every read rescans sysfs");
                event_rx = None;
            }
        }
    } else {
        event_rx = None;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Signal handlers go in before the name is taken: once it is, a caller (systemd's
        // ExecReload, a test) may send SIGHUP at once, and its default action ends the process.
        let Some(signals) = Signals::install() else {
            error!("cannot install the signal handlers");
            return ExitCode::FAILURE;
        };
        let backend: Arc<dyn service::Backend> = engine.clone();
        let connection = match service::serve(&flags.bus, backend, ServiceConfig::default()).await {
            Ok(connection) => connection,
            Err(e) => {
                error!(bus = %flags.bus, "cannot serve on the bus: {e}");
                return ExitCode::from(69);
            }
        };
        info!(bus = %flags.bus, "serving org.passthroughd.Passthrough1");
        if let Some(events) = event_rx.take() {
            tokio::spawn(service::events::hotplug_loop(
                Arc::clone(&engine),
                events,
                connection.clone(),
            ));
        }
        let code = match serve_until_stopped(&connection, &engine, signals).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                error!("{why}; exiting so that the service manager restarts the daemon");
                ExitCode::FAILURE
            }
        };
        // Stop serving at once and give the name up, so a new daemon can take it; then wait
        // for operations in flight (a write blocked in the kernel keeps its plan running, and
        // the journal covers a kill meanwhile).
        let _ = connection
            .release_name(passthroughd_proto::dbus::SERVICE)
            .await;
        drop(connection);
        let stopping = Arc::clone(&engine);
        let _ = tokio::task::spawn_blocking(move || stopping.stop()).await;
        code
    });
    info!("stopped");
    code
}

/// The signals the daemon acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Option<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Self {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
        })
    }
}

/// Serves until SIGTERM/SIGINT (`Ok`) or until the bus name is lost (`Err`); SIGHUP re-reads
/// the config.
async fn serve_until_stopped(
    connection: &zbus::Connection,
    engine: &Arc<Engine>,
    signals: Signals,
) -> Result<(), String> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    let lost = service::name_lost(connection);
    tokio::pin!(lost);
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); return Ok(()) }
            _ = int.recv() => { info!("SIGINT: stopping"); return Ok(()) }
            _ = hup.recv() => {
                let engine = Arc::clone(engine);
                let state = tokio::task::spawn_blocking(move || engine.reload()).await;
                match state.ok().and_then(|s| s.error) {
                    None => info!("SIGHUP: config reloaded"),
                    Some(e) => warn!(error = %e, "SIGHUP: config not reloaded; the last good one stays"),
                }
            }
            why = &mut lost => return Err(why),
        }
    }
}
