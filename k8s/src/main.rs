//! passthroughd-dra: the Kubernetes DRA node plugin. It publishes the node's PCI functions as
//! ResourceSlices and turns kubelet's prepare of a claim into a passthroughd lease owned by the
//! claim's UID, plus a CDI spec; see docs/dra.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use passthroughd_dra::cdi::Files;
use passthroughd_dra::claims::ClaimStore;
use passthroughd_dra::daemon::Daemon;
use passthroughd_dra::kubelet::{self, Sockets};
use passthroughd_dra::plugin::Plugin;
use passthroughd_dra::slices::Publisher;
use passthroughd_dra::watch::{follow_daemon, keep_slices};
use passthroughd_proto::dbus::Bus;
use tracing::{error, info};

/// The Kubernetes DRA node plugin of passthroughd: claims become leases.
#[derive(Debug, Parser)]
#[command(version)]
struct Flags {
    /// This node's name (the pool's name; the ResourceSlices' nodeName)
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The DRA driver name claims and DeviceClasses refer to
    #[arg(long, default_value = "vfio.passthroughd.io")]
    driver_name: String,
    /// kubelet's plugin registry: the registration socket is DIR/DRIVER-reg.sock
    #[arg(long, default_value = "/var/lib/kubelet/plugins_registry")]
    registry_dir: PathBuf,
    /// The plugin's directory: the DRA socket (DIR/dra.sock) and KubeVirt's metadata files
    /// [default: /var/lib/kubelet/plugins/DRIVER]
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Where CDI specs go, for the container runtime
    #[arg(long, default_value = "/var/run/cdi")]
    cdi_dir: PathBuf,
    /// What was prepared, so unprepare works after a restart
    #[arg(long, default_value = "/var/lib/passthroughd-dra")]
    state_dir: PathBuf,
    /// A kubeconfig file [default: the in-cluster configuration]
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The bus passthroughd serves on: system, session, or a D-Bus address
    #[arg(long, default_value = "system")]
    bus: Bus,
    /// The sysfs mount (read only: PCIe roots and iommufd nodes)
    #[arg(long, default_value = "/sys")]
    sysfs: PathBuf,
    /// How often the ResourceSlices are checked without any event, in seconds
    #[arg(long, default_value_t = 60)]
    resync_secs: u64,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Pod logs and files get plain text; colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    match runtime.block_on(run(flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(flags: Flags) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let plugin_dir = flags
        .plugin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/kubelet/plugins").join(&flags.driver_name));
    let sockets = Sockets {
        registration: flags
            .registry_dir
            .join(format!("{}-reg.sock", flags.driver_name)),
        dra: plugin_dir.join("dra.sock"),
    };
    // Refused before anything else happens: kubelet could never dial such a path.
    for path in [&sockets.registration, &sockets.dra] {
        if path.as_os_str().len() > kubelet::MAX_SOCKET_PATH {
            return Err(kubelet::SocketError::TooLong {
                path: path.clone(),
                len: path.as_os_str().len(),
            }
            .to_string());
        }
    }
    let daemon = Daemon::connect(&flags.bus)
        .await
        .map_err(|e| e.to_string())?;
    let cluster = passthroughd_dra::cluster::connect(flags.kubeconfig.as_deref())
        .await
        .map_err(|e| e.one_line())?;
    let owner = passthroughd_dra::cluster::node_owner(&cluster, &flags.node_name)
        .await
        .map_err(|e| e.one_line())?;
    let store = ClaimStore::open(&flags.state_dir)
        .map_err(|e| format!("{}: {e}", flags.state_dir.display()))?;
    let files = Files {
        cdi_dir: flags.cdi_dir.clone(),
        metadata_dir: plugin_dir.join("metadata"),
        driver: flags.driver_name.clone(),
    };
    let plugin = Arc::new(Plugin::new(
        flags.driver_name.clone(),
        flags.node_name.clone(),
        daemon.clone(),
        cluster.clone(),
        files,
        store,
        flags.sysfs.clone(),
    ));
    info!(
        driver = %flags.driver_name,
        node = %flags.node_name,
        prepared = plugin.prepared().len(),
        "starting"
    );
    let publisher = Publisher::new(
        cluster,
        flags.driver_name.clone(),
        flags.node_name.clone(),
        owner,
    );
    let follow = tokio::spawn(follow_daemon(daemon, Arc::clone(&plugin.changed)));
    let publish = tokio::spawn(keep_slices(
        Arc::clone(&plugin),
        publisher,
        Duration::from_secs(flags.resync_secs.max(1)),
    ));
    let shutdown = async {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
    };
    let served = kubelet::serve(plugin, sockets, Default::default(), shutdown).await;
    follow.abort();
    publish.abort();
    served.map_err(|e| e.to_string())
}
