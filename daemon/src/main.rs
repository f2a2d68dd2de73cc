//! `passthroughd`: flags, logging, then the library does the work.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use passthroughd::{Inventory, PciIds, SysfsRoot, host, table};

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
    #[command(subcommand)]
    command: Command,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let flags = Flags::parse();
    let root = SysfsRoot::new(&flags.sysfs_root);
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
        Command::Host { json } => {
            let report = host::report_live(&root, &ids);
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
        Command::Inventory { json } => match Inventory::scan(&root, &ids) {
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
        },
    }
}

/// "what failed: why: root cause" on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
