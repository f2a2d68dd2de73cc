//! `passthroughd`: flags, logging, then the library does the work.
//!
//! With no subcommand it runs the D-Bus service; `inventory` prints the inventory once and exits.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use passthroughd::kernel::SysfsKernel;
use passthroughd::kernel::uevents;
use passthroughd::observe::host;
use passthroughd::service::{self, ServiceConfig, error_chain};
use passthroughd::{Inventory, Manager, ManagerConfig, PciIds, SysfsRoot};
use passthroughd_proto::dbus::Bus;
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
    /// Declarative config (read from a later version on; noted in the log when present).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/passthroughd/config.toml"
    )]
    config: PathBuf,
    /// Where state.toml and the journal live.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/passthroughd")]
    state_dir: PathBuf,
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
    /// Check whether this host can pass devices through to VMs (CPU, KVM, IOMMU, VFIO, kernel
    /// config, topology, memory, SR-IOV) and print the report. Read MSRs needs root and `msr`.
    Host {
        /// The report as one JSON document (docs/host-report.md) instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let flags = Flags::parse();
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
    let root = SysfsRoot::new(&flags.sysfs_root);
    match flags.command {
        Some(Command::Inventory { json }) => inventory(&root, &ids, json),
        Some(Command::Host { json }) => host_report(&root, &ids, json),
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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

/// Opens the engine (journal recovery, persisted assignments), then serves D-Bus until SIGTERM.
fn run(flags: &Flags, root: SysfsRoot, ids: PciIds) -> ExitCode {
    if flags.config.exists() {
        info!(config = %flags.config.display(), "config file present; it is applied from a later version on");
    }
    // Kernel uevents describe the live /sys only: a captured or simulated tree gets none.
    let live_kernel = root.root() == std::path::Path::new("/");
    let config = ManagerConfig {
        kernel: Arc::new(SysfsKernel),
        root,
        state_dir: flags.state_dir.clone(),
        ids: Arc::new(ids),
    };
    let (manager, report) = match Manager::open(config) {
        Ok((manager, report)) => (Arc::new(manager), report),
        Err(e) => {
            error!("cannot start: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    for line in &report.recovered {
        info!(%line, "recovered from the journal");
    }
    for address in &report.applied {
        info!(%address, "persisted assignment applied");
    }
    for (address, why) in &report.refused {
        warn!(%address, %why, "persisted assignment refused");
    }
    if live_kernel {
        let listener = Arc::downgrade(&manager);
        match uevents::spawn_listener(move || {
            if let Some(manager) = listener.upgrade() {
                manager.invalidate_inventory();
            }
        }) {
            Ok(()) => manager.enable_inventory_cache(),
            Err(e) => warn!("no kernel uevents ({e}): every read rescans sysfs"),
        }
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
    runtime.block_on(async {
        let engine: Arc<dyn service::Engine> = manager;
        let _connection = match service::serve(&flags.bus, engine, ServiceConfig::default()).await {
            Ok(connection) => connection,
            Err(e) => {
                error!(bus = %flags.bus, "cannot serve on the bus: {e}");
                return ExitCode::from(69);
            }
        };
        info!(bus = %flags.bus, "serving org.passthroughd.Passthrough1");
        match wait_for_termination().await {
            Ok(signal) => info!(%signal, "stopping"),
            Err(e) => error!("cannot wait for signals: {e}"),
        }
        ExitCode::SUCCESS
    })
}

async fn wait_for_termination() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
