//! passthroughd-dra: the Kubernetes DRA node plugin. It publishes the node's PCI functions as
//! ResourceSlices and turns kubelet's prepare of a claim into a passthroughd lease owned by the
//! claim's UID, plus a CDI spec; see docs/dra.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use passthroughd_dra::cdi::Files;
use passthroughd_dra::claims::{ClaimStore, is_dns_subdomain};
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

impl Flags {
    /// Where the sockets and files go, all absolute: GetInfo hands kubelet the DRA socket's
    /// path and the CDI spec hands the runtime the metadata's, and neither runs in this
    /// process's working directory. Socket paths kubelet could not dial are refused.
    fn layout(&self) -> Result<(Sockets, Files), String> {
        if !is_dns_subdomain(&self.driver_name) {
            return Err(format!(
                "--driver-name {:?} is not a DNS subdomain, as Kubernetes requires of driver names",
                self.driver_name
            ));
        }
        let absolute =
            |path: &Path| std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()));
        let plugin_dir =
            absolute(&self.plugin_dir.clone().unwrap_or_else(|| {
                PathBuf::from("/var/lib/kubelet/plugins").join(&self.driver_name)
            }))?;
        let sockets = Sockets {
            registration: absolute(&self.registry_dir)?
                .join(format!("{}-reg.sock", self.driver_name)),
            dra: plugin_dir.join("dra.sock"),
        };
        for path in [&sockets.registration, &sockets.dra] {
            kubelet::check_socket_path(path).map_err(|e| e.to_string())?;
        }
        let files = Files {
            cdi_dir: absolute(&self.cdi_dir)?,
            metadata_dir: plugin_dir.join("metadata"),
            driver: self.driver_name.clone(),
        };
        Ok((sockets, files))
    }
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
    let (sockets, files) = flags.layout()?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(["passthroughd-dra", "--node-name", "n1"].iter().chain(args)).unwrap()
    }

    #[test]
    fn relative_directories_become_absolute_paths_for_kubelet_and_the_runtime() {
        let (sockets, files) = flags(&[
            "--plugin-dir",
            "plug",
            "--registry-dir",
            "reg",
            "--cdi-dir",
            "cdi",
        ])
        .layout()
        .unwrap();
        let here = std::env::current_dir().unwrap();
        assert_eq!(sockets.dra, here.join("plug/dra.sock"));
        assert_eq!(
            sockets.registration,
            here.join("reg/vfio.passthroughd.io-reg.sock")
        );
        assert_eq!(files.metadata_dir, here.join("plug/metadata"));
        assert_eq!(files.cdi_dir, here.join("cdi"));
        let (sockets, _) = flags(&[]).layout().unwrap();
        assert_eq!(
            sockets.dra,
            Path::new("/var/lib/kubelet/plugins/vfio.passthroughd.io/dra.sock")
        );
    }

    #[test]
    fn a_driver_name_that_is_no_dns_subdomain_or_a_socket_path_too_long_is_refused() {
        for bad in ["../x", "a/b", "Vfio.io", "-a.io", "a..io", ""] {
            let refused = flags(&[&format!("--driver-name={bad}")])
                .layout()
                .unwrap_err();
            assert!(refused.contains("DNS subdomain"), "{bad}: {refused}");
        }
        let deep = format!("/{}", "d".repeat(100));
        let refused = flags(&["--plugin-dir", &deep]).layout().unwrap_err();
        assert!(refused.contains("108"), "{refused}");
    }
}
