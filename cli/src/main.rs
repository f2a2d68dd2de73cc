//! `passthroughctl`: a thin D-Bus client of passthroughd. Commands become proxy calls; results
//! are printed as tables, or with `--json` as exactly one JSON document on stdout. Failures are
//! one line on stderr and an exit code from [`passthroughd_proto::dbus::exit`].

mod libvirt;
mod snippets;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use passthroughd_proto::dbus::{self, Bus, ManagerProxy, exit};
use passthroughd_proto::manual;
use passthroughd_proto::vfio::{FunctionDetail, VerifyReport};
use passthroughd_proto::wire::{Dict, WireError, from_dict, from_dicts};
use passthroughd_proto::{
    ApplyReport, Change, ConfigState, HostReport, IommuGroup, LeaseInfo, LeaseOwner, PciAddress,
    PciFunction, Status, VfInfo, host, table,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zbus::proxy::CacheProperties;

/// Longer than the daemon's own 30 s limit, so its "timed out" answer arrives first.
const METHOD_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(
    name = "passthroughctl",
    version,
    about = "Control passthroughd: list PCI functions and IOMMU groups, assign them to vfio-pci, \
             check the host"
)]
struct Cli {
    /// Print one JSON document on stdout instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The bus to reach the daemon on: system, session, or a D-Bus address (unix:path=...).
    #[arg(long, value_name = "BUS", default_value = "system", global = true)]
    bus: Bus,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every PCI function: address, ids, driver, IOMMU group, role, names.
    List,
    /// IOMMU groups, their members and whether each is viable for VFIO.
    Groups,
    /// One function in full, or ready-to-paste VMM arguments for it (with its IOMMU group's
    /// other endpoints, which a VM must get too).
    Show {
        /// DDDD:BB:DD.F or BB:DD.F
        #[arg(value_name = "ADDR")]
        address: String,
        /// Print QEMU's `-device vfio-pci,host=ADDR` argument(s).
        #[arg(long, group = "vmm")]
        qemu: bool,
        /// Print libvirt `<hostdev managed='no'>` XML (the hook leases it when the VM starts).
        #[arg(long, group = "vmm")]
        libvirt: bool,
        /// Print cloud-hypervisor's `--device path=/sys/bus/pci/devices/ADDR/` argument.
        #[arg(long, group = "vmm")]
        cloud_hypervisor: bool,
    },
    /// Bind functions to vfio-pci (persisted unless --runtime).
    Assign {
        #[arg(value_name = "ADDR", required = true)]
        addresses: Vec<String>,
        /// Do not persist: the assignment ends at reboot.
        #[arg(long)]
        runtime: bool,
        /// Assign every member of each function's IOMMU group (bridges excluded).
        #[arg(long)]
        group: bool,
        /// Override the soft safety rules (network in use, boot VGA).
        #[arg(long)]
        force: bool,
    },
    /// Return functions to the driver they had before.
    Release {
        #[arg(value_name = "ADDR", required = true)]
        addresses: Vec<String>,
        /// Keep the persisted assignment; it comes back at next start.
        #[arg(long)]
        runtime: bool,
        /// Reset each function through VFIO before it goes back (FLR or the kernel's other
        /// methods); a function that cannot be reset stays on vfio-pci and the release fails.
        #[arg(long)]
        reset: bool,
    },
    /// Reconcile the host with the declarative config and stored requests now. What is not
    /// refused is done; exit 5 when anything was refused or failed. A second apply finds
    /// nothing to do.
    Apply {
        /// Print the plan (current driver → wanted, VFs to create or remove, what is refused
        /// and why) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-read the config file (as SIGHUP does); a broken file keeps the last good config in
    /// force and says where it is broken (exit 2).
    Reload,
    /// SR-IOV virtual functions of a PF: create, destroy, list.
    Vf {
        #[command(subcommand)]
        command: VfCommand,
    },
    /// Leases: assignments owned by a libvirt domain, a Kubernetes claim or another VMM.
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// The libvirt hook: install as /etc/libvirt/hooks/qemu.d/passthroughd (a script that runs
    /// `passthroughctl libvirt-hook "$@"`). `prepare begin` leases the domain's
    /// <hostdev managed='no'> PCI functions (the domain XML is read from stdin); `release end`
    /// ends the lease; anything else exits 0 at once. A domain without such a device never
    /// contacts the daemon.
    LibvirtHook {
        /// The domain's name.
        domain: String,
        /// libvirt's operation (prepare, start, started, stopped, release, ...).
        operation: String,
        /// libvirt's sub-operation (begin, end, -).
        sub_operation: String,
        /// libvirt's extra argument (unused).
        extra: Option<String>,
        /// Longest wait for the daemon; a start given up on is ended again.
        #[arg(long, value_name = "SECONDS", default_value_t = 45)]
        timeout: u64,
    },
    /// Open a function through VFIO the way a VMM would (container, group, IOMMU backend,
    /// device) and report what a VM would get: group viability and what blocks it, interrupt
    /// remapping, regions, interrupts, reset. Exit 0 only when it is ready for a VM, 5
    /// otherwise. Refused without opening anything while it is leased or held open.
    Verify {
        /// DDDD:BB:DD.F or BB:DD.F
        #[arg(value_name = "ADDR")]
        address: String,
    },
    /// Daemon version, uptime, assignments and recent errors.
    Status,
    /// Host capability report: VT-x/AMD-V, KVM, IOMMU, interrupt remapping, VFIO, kernel config,
    /// SR-IOV, topology, memory; one verdict per check, and what to fix first.
    ///
    /// Text: one PASS/WARN/FAIL/N/A line per check with its fix, the facts, and the overall
    /// verdict on the last line. --json: the report as one document (docs/host-report.md), the
    /// same as `passthroughd host --json`.
    ///
    /// Exit status 0 means the report was produced, whatever it says: a host that is not ready
    /// for passthrough is a result, not a failure. Scripts read `.overall.ready` from --json.
    Host,
}

#[derive(Debug, Subcommand)]
enum VfCommand {
    /// Create N VFs on a PF (persisted unless --runtime); an existing other count goes through 0.
    Create {
        /// The physical function, DDDD:BB:DD.F or BB:DD.F
        #[arg(value_name = "PF")]
        pf: String,
        /// How many VFs (1 to the PF's sriov_totalvfs).
        #[arg(long, value_name = "N", required = true)]
        count: u32,
        /// Bind every new VF to vfio-pci; no host VF driver ever probes them.
        #[arg(long)]
        assign: bool,
        /// Do not persist: the VFs are gone at reboot.
        #[arg(long)]
        runtime: bool,
        /// Let a resize take assigned VFs off vfio-pci (never VFs a process holds open).
        #[arg(long)]
        force: bool,
    },
    /// Remove every VF of a PF (refused while a VM holds one, or while one is assigned).
    Destroy {
        #[arg(value_name = "PF")]
        pf: String,
        /// Also remove assigned VFs (never ones in use).
        #[arg(long)]
        force: bool,
    },
    /// Every VF of a PF: index, address, driver, group, assignment, in-use holder.
    List {
        #[arg(value_name = "PF")]
        pf: String,
    },
}

#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// Every lease: owner, functions, age, and whether it looks stale (its VM is gone).
    List,
    /// Take a lease for OWNER on functions, all or nothing (for VMMs other than libvirt; the
    /// libvirt hook does this itself).
    Start {
        /// libvirt:DOMAIN, k8s:CLAIM-UID or vmm:NAME
        #[arg(value_name = "OWNER")]
        owner: String,
        #[arg(value_name = "ADDR", required = true)]
        addresses: Vec<String>,
    },
    /// End OWNER's lease: what it leased goes back to the driver it had before, unless a
    /// request or the config also claims it.
    End {
        /// libvirt:DOMAIN, k8s:CLAIM-UID or vmm:NAME
        #[arg(value_name = "OWNER")]
        owner: String,
    },
}

/// A failure: what we were doing, why, an optional hint, and the exit code.
#[derive(Debug)]
struct Failure {
    what: String,
    why: String,
    name: String,
    code: u8,
    /// What stdout gets anyway (the report of an `apply` that refused something); `None`: the
    /// error itself (as JSON with `--json`).
    output: Option<String>,
}

impl Failure {
    fn with_output(self, output: String) -> Self {
        Self {
            output: Some(output),
            ..self
        }
    }

    fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            why: why.into(),
            name: "InvalidArgument".into(),
            code: exit::INVALID,
            output: None,
        }
    }

    fn from_dbus(what: &str, error: &dbus::Error) -> Self {
        let name = match error {
            dbus::Error::ZBus(zbus::Error::MethodError(name, _, _)) => name.to_string(),
            dbus::Error::ZBus(_) => "Transport".into(),
            other => zbus::DBusError::name(other)
                .as_str()
                .trim_start_matches(dbus::ERROR_PREFIX)
                .trim_start_matches('.')
                .to_owned(),
        };
        Self {
            what: what.to_owned(),
            why: error.to_string(),
            name,
            code: error.exit_code(),
            output: None,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self.code {
            exit::UNREACHABLE => Some("is passthroughd running? systemctl start passthroughd"),
            exit::PERMISSION => Some("run as root, or ask for org.passthroughd.manage-devices"),
            _ => None,
        }
    }

    fn report(&self, json: bool) -> ExitCode {
        let mut line = format!("passthroughctl: {}: {}", self.what, self.why);
        if let Some(hint) = self.hint() {
            line.push_str(" (");
            line.push_str(hint);
            line.push(')');
        }
        // Keep it one line whatever the daemon or the bus wrote.
        let line = line.replace(['\n', '\r'], " ");
        eprintln!("{line}");
        if let Some(output) = &self.output {
            print!("{output}");
        } else if json {
            let doc = serde_json::json!({
                "error": {
                    "name": self.name,
                    "message": line.trim_start_matches("passthroughctl: "),
                    "exit_code": self.code,
                }
            });
            println!("{doc:#}");
        }
        ExitCode::from(self.code)
    }
}

/// The man page's hand-written sections; clap's definitions above make the rest
/// (`passthroughctl --generate man|bash|zsh|fish`, used by `make install`).
const MANUAL: manual::Page = manual::Page {
    section: "1",
    source: include_str!("../man/passthroughctl.1.in"),
};

fn main() -> ExitCode {
    if let Some(code) = manual::generate_if_asked(Cli::command, &MANUAL) {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return Failure {
                what: "starting".into(),
                why: e.to_string(),
                name: "Failed".into(),
                code: exit::FAILED,
                output: None,
            }
            .report(cli.json);
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(text) => match std::io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::from(exit::OK),
            // A closed pipe (`| head`) is not worth a message.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(exit::OK),
            Err(e) => {
                eprintln!("passthroughctl: writing the output: {e}");
                ExitCode::from(exit::FAILED)
            }
        },
        Err(failure) => failure.report(cli.json),
    }
}

/// clap's multi-line report, reduced to one line; help and version print as usual.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                exit::INVALID
            } else {
                exit::OK
            },
        );
    }
    // The first paragraph of clap's report, on one line; usage and tips are dropped.
    let rendered = e.render().to_string();
    let paragraph: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let joined = paragraph.join(" ");
    let why = joined.trim_start_matches("error: ");
    let json = std::env::args().any(|a| a == "--json");
    Failure {
        what: "bad usage".into(),
        why: format!("{why}; see passthroughctl --help"),
        name: "InvalidArgument".into(),
        code: exit::INVALID,
        output: None,
    }
    .report(json)
}

/// Client-side check of every address, duplicates included, before any D-Bus call.
fn parse_addresses(texts: &[String]) -> Result<Vec<String>, Failure> {
    let mut seen: Vec<PciAddress> = Vec::with_capacity(texts.len());
    for text in texts {
        let address: PciAddress = text
            .parse()
            .map_err(|e| Failure::invalid("invalid address", format!("{e}")))?;
        if seen.contains(&address) {
            return Err(Failure::invalid(
                "invalid address",
                format!("{address} is named more than once"),
            ));
        }
        seen.push(address);
    }
    Ok(seen.iter().map(ToString::to_string).collect())
}

/// Client-side check of a lease owner.
fn parse_owner(text: &str) -> Result<String, Failure> {
    text.parse::<LeaseOwner>()
        .map(|o| o.to_string())
        .map_err(|e| Failure::invalid("invalid lease owner", e.to_string()))
}

async fn run(cli: &Cli) -> Result<String, Failure> {
    if let Command::LibvirtHook {
        domain,
        operation,
        sub_operation,
        timeout,
        ..
    } = &cli.command
    {
        return libvirt::hook(
            async || connect(&cli.bus).await,
            domain,
            libvirt::HookAction::of(operation, sub_operation),
            std::io::stdin().lock(),
            Duration::from_secs(*timeout),
        )
        .await;
    }
    // Validate everything we can before touching the bus.
    let addresses = match &cli.command {
        Command::Show { address, .. } | Command::Verify { address } => {
            parse_addresses(std::slice::from_ref(address))?
        }
        Command::Assign { addresses, .. }
        | Command::Release { addresses, .. }
        | Command::Lease {
            command: LeaseCommand::Start { addresses, .. },
        } => parse_addresses(addresses)?,
        Command::Vf {
            command:
                VfCommand::Create { pf, .. } | VfCommand::Destroy { pf, .. } | VfCommand::List { pf },
        } => parse_addresses(std::slice::from_ref(pf))?,
        _ => Vec::new(),
    };
    let owner = match &cli.command {
        Command::Lease {
            command: LeaseCommand::Start { owner, .. } | LeaseCommand::End { owner },
        } => parse_owner(owner)?,
        _ => String::new(),
    };
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let proxy = connect(&cli.bus).await?;
    let json = cli.json;
    let first = refs.first().copied().unwrap_or_default();
    match &cli.command {
        Command::List => {
            let what = "listing functions";
            let rows = proxy
                .list_functions()
                .await
                .map_err(|e| Failure::from_dbus(what, &e))?;
            let functions = rows
                .into_iter()
                .map(PciFunction::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| malformed(what, &e))?;
            render(json, functions.as_slice(), table::functions)
        }
        Command::Groups => {
            let groups: Vec<IommuGroup> = list("listing IOMMU groups", proxy.list_groups().await)?;
            render(json, groups.as_slice(), table::groups)
        }
        Command::Show {
            qemu,
            libvirt,
            cloud_hypervisor,
            ..
        } => {
            let what = format!("show {first}");
            let detail: FunctionDetail = one(&what, proxy.show(first).await)?;
            let vmm = match (qemu, libvirt, cloud_hypervisor) {
                (true, _, _) => snippets::Vmm::Qemu,
                (_, true, _) => snippets::Vmm::Libvirt,
                (_, _, true) => snippets::Vmm::CloudHypervisor,
                _ => return render(json, &detail, table::function_show),
            };
            let function = detail.function;
            let rows = proxy
                .list_functions()
                .await
                .map_err(|e| Failure::from_dbus(&what, &e))?;
            let all = rows
                .into_iter()
                .map(PciFunction::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| malformed(&what, &e))?;
            let together = snippets::passed_together(&function, &all);
            render(json, together.as_slice(), |a| snippets::render(vmm, a))
        }
        Command::Assign {
            runtime,
            group,
            force,
            ..
        } => {
            let what = format!("assign {}", refs.join(" "));
            let changes: Vec<Change> =
                list(&what, proxy.assign(&refs, *runtime, *group, *force).await)?;
            render(json, changes.as_slice(), table::changes)
        }
        Command::Release { runtime, reset, .. } => {
            let what = format!("release {}", refs.join(" "));
            let changes: Vec<Change> = list(&what, proxy.release(&refs, *runtime, *reset).await)?;
            render(json, changes.as_slice(), table::changes)
        }
        Command::Vf { command } => match command {
            VfCommand::Create {
                count,
                assign,
                runtime,
                force,
                ..
            } => {
                let vfs: Vec<VfInfo> = list(
                    &format!("vf create {first}"),
                    proxy
                        .vf_create(first, *count, *assign, *runtime, *force)
                        .await,
                )?;
                render(json, vfs.as_slice(), table::vfs)
            }
            VfCommand::Destroy { force, .. } => {
                let changes: Vec<Change> = list(
                    &format!("vf destroy {first}"),
                    proxy.vf_destroy(first, *force).await,
                )?;
                render(json, changes.as_slice(), table::changes)
            }
            VfCommand::List { .. } => {
                let vfs: Vec<VfInfo> =
                    list(&format!("vf list {first}"), proxy.vf_list(first).await)?;
                render(json, vfs.as_slice(), table::vfs)
            }
        },
        Command::Apply { dry_run } => {
            let what = if *dry_run { "apply --dry-run" } else { "apply" };
            let report: ApplyReport = one(what, proxy.apply(*dry_run).await)?;
            let text = render(json, &report, table::apply)?;
            if report.refused.is_empty() && report.failed.is_empty() {
                return Ok(text);
            }
            // The report is the output; the exit status says something was not done.
            Err(Failure {
                what: what.into(),
                why: format!(
                    "{} refused, {} failed (listed above)",
                    report.refused.len(),
                    report.failed.len()
                ),
                name: "Refused".into(),
                code: exit::REFUSED,
                output: None,
            }
            .with_output(text))
        }
        Command::Reload => {
            let state: ConfigState = one("reload", proxy.reload().await)?;
            let text = render(json, &state, table::config_state)?;
            match &state.error {
                None => Ok(text),
                Some(e) => Err(Failure {
                    what: "reload".into(),
                    why: format!("{e}; the last good config stays in force"),
                    name: "InvalidArgument".into(),
                    code: exit::INVALID,
                    output: None,
                }
                .with_output(text)),
            }
        }
        Command::Lease { command } => match command {
            LeaseCommand::List => {
                let leases: Vec<LeaseInfo> = list("listing leases", proxy.list_leases().await)?;
                render(json, leases.as_slice(), table::leases)
            }
            LeaseCommand::Start { .. } => {
                let what = format!("lease start {owner} {}", refs.join(" "));
                let changes: Vec<Change> = list(&what, proxy.lease_start(&owner, &refs).await)?;
                render(json, changes.as_slice(), table::changes)
            }
            LeaseCommand::End { .. } => {
                let what = format!("lease end {owner}");
                let changes: Vec<Change> = list(&what, proxy.lease_end(&owner).await)?;
                render(json, changes.as_slice(), table::changes)
            }
        },
        Command::Verify { .. } => {
            let what = format!("verify {first}");
            let report: VerifyReport = one(&what, proxy.verify(first).await)?;
            let text = render(json, &report, table::verify)?;
            match &report.problem {
                None => Ok(text),
                // The report is the output; the exit status says the device is not ready.
                Some(why) => Err(Failure {
                    what,
                    why: format!("not ready for a VM: {why}"),
                    name: "Refused".into(),
                    code: exit::REFUSED,
                    output: None,
                }
                .with_output(text)),
            }
        }
        Command::LibvirtHook { .. } => Ok(String::new()), // handled above
        Command::Status => {
            let status: Status = one("reading the status", proxy.status().await)?;
            render(json, &status, table::status)
        }
        Command::Host => {
            let report: HostReport = one("reading the host report", proxy.host().await)?;
            render(json, &report, host::render_text)
        }
    }
}

/// One dictionary from the daemon, as the model type.
fn one<T: DeserializeOwned>(what: &str, reply: Result<Dict, dbus::Error>) -> Result<T, Failure> {
    let dict = reply.map_err(|e| Failure::from_dbus(what, &e))?;
    from_dict("reply", dict).map_err(|e| malformed(what, &e))
}

/// A list of dictionaries from the daemon, as model types.
fn list<T: DeserializeOwned>(
    what: &str,
    reply: Result<Vec<Dict>, dbus::Error>,
) -> Result<Vec<T>, Failure> {
    let dicts = reply.map_err(|e| Failure::from_dbus(what, &e))?;
    from_dicts("reply", dicts).map_err(|e| malformed(what, &e))
}

async fn connect(bus: &Bus) -> Result<ManagerProxy<'static>, Failure> {
    let unreachable = |e: zbus::Error| Failure {
        what: format!("cannot reach the {bus} bus"),
        why: e.to_string(),
        name: "Unreachable".into(),
        code: exit::UNREACHABLE,
        output: None,
    };
    let conn = bus
        .builder()
        .map_err(unreachable)?
        .method_timeout(METHOD_TIMEOUT)
        .build()
        .await
        .map_err(unreachable)?;
    ManagerProxy::builder(&conn)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(unreachable)
}

fn malformed(what: &str, e: &WireError) -> Failure {
    let mut why = e.to_string();
    if let Some(source) = std::error::Error::source(e) {
        why.push_str(": ");
        why.push_str(&source.to_string());
    }
    Failure {
        what: what.to_owned(),
        why,
        name: "Failed".into(),
        code: exit::FAILED,
        output: None,
    }
}

fn render<T: Serialize + ?Sized>(
    json: bool,
    value: &T,
    table: impl Fn(&T) -> String,
) -> Result<String, Failure> {
    if json {
        serde_json::to_string_pretty(value)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| Failure {
                what: "printing JSON".into(),
                why: e.to_string(),
                name: "Failed".into(),
                code: exit::FAILED,
                output: None,
            })
    } else {
        Ok(table(value))
    }
}
