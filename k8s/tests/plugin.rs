//! The plugin end to end, without a cluster: the real engine over the simulated kernel on a real
//! dbus-daemon, the plugin's own unix sockets and gRPC, a kubelet stand-in that follows
//! kubelet's sequence and limits, and the API server stand-in reached through kube's client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use passthroughd::service::{self, Backend, ServiceConfig};
use passthroughd::{Engine, EngineConfig, PciIds};
use passthroughd_dra::cdi::Files;
use passthroughd_dra::claims::ClaimStore;
use passthroughd_dra::daemon::Daemon;
use passthroughd_dra::kubelet::{self as plugin_sockets, Sockets};
use passthroughd_dra::plugin::Plugin;
use passthroughd_dra::slices::{Publisher, device_name};
use passthroughd_dra_testkit::apiserver::ApiServer;
use passthroughd_dra_testkit::kubelet::{self, Version, claim};
use passthroughd_proto::PciAddress;
use passthroughd_proto::dbus::ManagerProxy;
use passthroughd_testkit::bus::TestBus;
use passthroughd_testkit::sim::{SimDevice, SimKernel};

const DRIVER: &str = "vfio.passthroughd.io";
const NODE: &str = "node-a";
const PF: &str = "0000:01:00.0";
const UID: &str = "0f9e8d7c-1111-2222-3333-444455556666";

/// One node: the daemon's engine on a private bus, the API server stand-in, and the plugin
/// serving its sockets (until `stop_plugin`).
struct TestNode {
    dir: tempfile::TempDir,
    sim: Arc<SimKernel>,
    bus: TestBus,
    api: ApiServer,
    runtime: tokio::runtime::Runtime,
    _engine: (tokio::runtime::Runtime, zbus::Connection),
    plugin: Option<RunningPlugin>,
}

struct RunningPlugin {
    plugin: Arc<Plugin>,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), plugin_sockets::SocketError>>,
}

impl TestNode {
    /// An igb PF with 3 VFs (igbvf) and an e1000e NIC.
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let sim = Arc::new(SimKernel::new(&root).unwrap());
        sim.add_igb_pf(PF.parse().unwrap(), 10, 20).unwrap();
        let nic = SimDevice::new(
            "0000:03:00.0".parse().unwrap(),
            0x020000,
            Some("e1000e"),
            11,
        );
        sim.add_device(&nic).unwrap();
        sim.add_driver("vfio-pci").unwrap();
        let bus = TestBus::start();
        let (engine, _) = Engine::open(EngineConfig {
            root: sim.sysfs().clone(),
            state_dir: dir.path().join("daemon-state"),
            kernel: sim.clone(),
            ids: Arc::new(PciIds::empty()),
            config: None,
        })
        .unwrap();
        let engine_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let backend: Arc<dyn Backend> = Arc::new(engine);
        let connection = engine_runtime
            .block_on(service::serve(
                &bus.bus(),
                backend,
                ServiceConfig::default(),
            ))
            .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let api = ApiServer::start();
        api.add_node(NODE);
        api.write_kubeconfig(&dir.path().join("kubeconfig"));
        let mut node = Self {
            dir,
            sim,
            bus,
            api,
            runtime,
            _engine: (engine_runtime, connection),
            plugin: None,
        };
        node.manager(|m| async move {
            m.vf_create(PF, 3, false, true, false).await.unwrap();
        });
        node.start_plugin();
        node
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn sockets(&self) -> Sockets {
        Sockets {
            registration: self.path("registry").join(format!("{DRIVER}-reg.sock")),
            dra: self.path("plugins").join(DRIVER).join("dra.sock"),
        }
    }

    fn files(&self) -> Files {
        Files {
            cdi_dir: self.path("cdi"),
            metadata_dir: self.path("plugins").join(DRIVER).join("metadata"),
            driver: DRIVER.into(),
        }
    }

    fn start_plugin(&mut self) {
        let bus = self.bus.bus();
        let kubeconfig = self.path("kubeconfig");
        let files = self.files();
        let state = self.path("plugin-state");
        let sysfs = self.sim.sysfs().root().join("sys");
        let sockets = self.sockets();
        let running = self.runtime.block_on(async move {
            let daemon = Daemon::connect(&bus).await.unwrap();
            let cluster = passthroughd_dra::cluster::connect(Some(&kubeconfig))
                .await
                .unwrap();
            let plugin = Arc::new(Plugin::new(
                DRIVER.into(),
                NODE.into(),
                daemon,
                cluster,
                files,
                ClaimStore::open(&state).unwrap(),
                sysfs,
            ));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(plugin_sockets::serve(
                Arc::clone(&plugin),
                sockets,
                Default::default(),
                async move {
                    let _ = stopped.await;
                },
            ));
            RunningPlugin {
                plugin,
                stop,
                served,
            }
        });
        self.plugin = Some(running);
        let registration = self.sockets().registration;
        // A killed plugin's stale socket stays until the new plugin replaces it: only a socket
        // that accepts a connection is the new one's (the DRA socket is bound before it).
        wait_for(
            || std::os::unix::net::UnixStream::connect(&registration).is_ok(),
            "the registration socket",
        );
    }

    /// Stops the plugin as SIGTERM does.
    fn stop_plugin(&mut self) {
        let running = self.plugin.take().unwrap();
        let _ = running.stop.send(());
        self.runtime.block_on(running.served).unwrap().unwrap();
    }

    fn plugin(&self) -> Arc<Plugin> {
        Arc::clone(&self.plugin.as_ref().unwrap().plugin)
    }

    fn manager<F, Fut>(&self, work: F)
    where
        F: FnOnce(ManagerProxy<'static>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let bus = self.bus.bus();
        self.runtime.block_on(async move {
            let connection = bus.builder().unwrap().build().await.unwrap();
            work(ManagerProxy::new(&connection).await.unwrap()).await;
        });
    }

    fn vf(&self, index: u32) -> PciAddress {
        self.sim.vf_address(PF.parse().unwrap(), index).unwrap()
    }

    fn driver(&self, address: PciAddress) -> Option<String> {
        self.sim.driver_of(address)
    }

    fn leases(&self) -> Vec<(String, Vec<String>)> {
        let daemon = self
            .runtime
            .block_on(Daemon::connect(&self.bus.bus()))
            .unwrap();
        self.runtime
            .block_on(daemon.leases())
            .unwrap()
            .into_iter()
            .map(|l| (l.owner.to_string(), l.functions))
            .collect()
    }

    /// A claim in the API server allocated to `device` of this node's pool.
    fn claim_for(&self, name: &str, uid: &str, address: PciAddress) {
        self.api.add_claim(ApiServer::allocated_claim(
            "vms",
            name,
            uid,
            DRIVER,
            NODE,
            &device_name(address),
            "nic",
        ));
    }

    fn prepare(
        &self,
        name: &str,
        uid: &str,
    ) -> passthroughd_dra::grpc::dra_v1::NodePrepareResourceResponse {
        self.prepare_as(Version::V1, name, uid)
    }

    fn prepare_as(
        &self,
        version: Version,
        name: &str,
        uid: &str,
    ) -> passthroughd_dra::grpc::dra_v1::NodePrepareResourceResponse {
        let dra = self.sockets().dra;
        let mut answer = self
            .runtime
            .block_on(kubelet::prepare(
                &dra,
                version,
                vec![claim("vms", name, uid)],
            ))
            .unwrap();
        answer.claims.remove(uid).unwrap()
    }

    fn unprepare(&self, name: &str, uid: &str) -> String {
        let dra = self.sockets().dra;
        let mut answer = self
            .runtime
            .block_on(kubelet::unprepare(
                &dra,
                Version::V1,
                vec![claim("vms", name, uid)],
            ))
            .unwrap();
        answer.claims.remove(uid).unwrap().error
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(running) = self.plugin.take() {
            let _ = running.stop.send(());
        }
    }
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spec(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn kubelet_registers_the_plugin_within_its_limits() {
    let node = TestNode::start();
    let sockets = kubelet::registration_sockets(&node.path("registry"));
    assert_eq!(sockets, [node.sockets().registration]);
    let started = Instant::now();
    let registered = node
        .runtime
        .block_on(kubelet::register(&sockets[0]))
        .unwrap();
    assert!(started.elapsed() < kubelet::GET_INFO_TIMEOUT);
    assert_eq!(registered.info.r#type, "DRAPlugin");
    assert_eq!(registered.info.name, DRIVER);
    assert_eq!(
        Path::new(&registered.info.endpoint),
        node.sockets().dra.as_path()
    );
    assert_eq!(
        registered.info.supported_versions,
        ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    );
}

#[test]
fn a_claim_becomes_a_lease_and_a_cdi_spec_and_unprepare_gives_it_back() {
    let node = TestNode::start();
    let vf = node.vf(1);
    assert_eq!(node.driver(vf).as_deref(), Some("igbvf"));
    node.claim_for("vm1-nic", UID, vf);
    let answer = node.prepare("vm1-nic", UID);
    assert_eq!(answer.error, "");
    assert_eq!(answer.devices.len(), 1);
    let device = &answer.devices[0];
    assert_eq!(device.request_names, ["nic"]);
    assert_eq!(device.pool_name, NODE);
    assert_eq!(device.device_name, device_name(vf));
    assert_eq!(
        device.cdi_device_ids,
        [
            format!("passthroughd.io/vfio={UID}-{}", device_name(vf)),
            format!("passthroughd.io/vfio={UID}-metadata-nic"),
        ]
    );
    assert_eq!(node.driver(vf).as_deref(), Some("vfio-pci"));
    assert_eq!(
        node.leases(),
        [(format!("k8s:{UID}"), vec![vf.to_string()])]
    );
    let files = node.files();
    let spec = spec(&files.spec_path(UID));
    let group = std::fs::read_link(node.sim.sysfs().pci_device_attr(vf, "iommu_group"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        spec["devices"][0]["containerEdits"]["deviceNodes"][1]["path"],
        format!("/dev/vfio/{group}")
    );
    // The runtime reads the spec and KubeVirt's launcher (not root) the metadata.
    let metadata = files.metadata_path(UID, "nic");
    for file in [files.spec_path(UID), metadata] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o644, "{}", file.display());
    }

    // Again (kubelet retries; a restarted kubelet asks again): the same answer, nothing
    // written to sysfs, nothing asked of the API server.
    let writes = node.sim.writes().len();
    let requests = node.api.requests().len();
    let again = node.prepare("vm1-nic", UID);
    assert_eq!(again, answer);
    assert_eq!(node.prepare_as(Version::V1beta1, "vm1-nic", UID), answer);
    assert_eq!(
        node.sim.writes().len(),
        writes,
        "a repeated prepare wrote to sysfs"
    );
    assert_eq!(node.api.requests().len(), requests);

    assert_eq!(node.unprepare("vm1-nic", UID), "");
    assert_eq!(node.driver(vf).as_deref(), Some("igbvf"));
    assert!(node.leases().is_empty());
    assert!(!files.spec_path(UID).exists());
    assert!(!files.metadata_dir.join(UID).exists());
    // Unknown (or already unprepared) claims are a success.
    assert_eq!(node.unprepare("vm1-nic", UID), "");
    assert_eq!(node.unprepare("gone", "1234"), "");
}

#[test]
fn bad_claims_get_their_own_error_and_change_nothing() {
    let node = TestNode::start();
    let vf = node.vf(0);
    // Deleted and made again: the API server's claim has another UID.
    node.claim_for("recreated", "aaaa-new", vf);
    // Not allocated.
    let mut pending =
        ApiServer::allocated_claim("vms", "pending", "bbbb", DRIVER, NODE, "x", "nic");
    pending.status = None;
    node.api.add_claim(pending);
    // Allocated in another node's pool.
    node.api.add_claim(ApiServer::allocated_claim(
        "vms",
        "elsewhere",
        "cccc",
        DRIVER,
        "node-b",
        &device_name(vf),
        "nic",
    ));
    // A request name that is not a DNS label (it would become a directory of the metadata
    // path); the API server refuses it, the plugin does not rely on that.
    node.api.add_claim(ApiServer::allocated_claim(
        "vms",
        "climber",
        "ffff",
        DRIVER,
        NODE,
        &device_name(vf),
        "../../etc",
    ));
    let writes = node.sim.writes().len();
    for (name, uid, why) in [
        ("climber", "ffff", "DNS label"),
        ("recreated", "aaaa-old", "UID"),
        ("pending", "bbbb", "not allocated"),
        ("elsewhere", "cccc", "pool"),
        ("missing", "dddd", "missing"),
        ("../etc", "eeee", "name"),
        ("vm", "../../x", "UID"),
    ] {
        let answer = node.prepare(name, uid);
        assert!(answer.devices.is_empty(), "{name}");
        assert!(answer.error.contains(why), "{name}: {}", answer.error);
    }
    assert_eq!(node.sim.writes().len(), writes);
    assert!(node.leases().is_empty());
    assert_eq!(
        std::fs::read_dir(node.path("cdi"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn a_vf_leased_to_a_vm_is_refused_to_a_claim_and_left_as_it_was() {
    let node = TestNode::start();
    let vf = node.vf(2);
    let address = vf.to_string();
    node.manager(|m| async move {
        m.lease_start("libvirt:vm1", &[address.as_str()])
            .await
            .unwrap();
    });
    node.claim_for("vm2-nic", UID, vf);
    let writes = node.sim.writes().len();
    let answer = node.prepare("vm2-nic", UID);
    assert!(answer.devices.is_empty());
    assert!(answer.error.contains("libvirt:vm1"), "{}", answer.error);
    assert_eq!(node.sim.writes().len(), writes);
    assert_eq!(
        node.leases(),
        [("libvirt:vm1".into(), vec![vf.to_string()])]
    );
    assert!(!node.files().spec_path(UID).exists());
}

#[test]
fn after_a_restart_with_a_stale_socket_prepare_answers_the_same_and_unprepare_works_without_the_claim()
 {
    let mut node = TestNode::start();
    let vf = node.vf(0);
    node.claim_for("vm1-nic", UID, vf);
    let answer = node.prepare("vm1-nic", UID);
    assert_eq!(answer.error, "");
    node.stop_plugin();
    // A killed plugin leaves its sockets behind: a stale socket nobody listens on.
    for path in [node.sockets().registration, node.sockets().dra] {
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
    }
    node.start_plugin();
    let registered = node
        .runtime
        .block_on(kubelet::register(&node.sockets().registration))
        .unwrap();
    assert_eq!(registered.info.name, DRIVER);
    assert_eq!(node.prepare("vm1-nic", UID), answer);
    // The pod is gone and its claim deleted before kubelet unprepares.
    node.api.remove_claim("vms", "vm1-nic");
    assert_eq!(node.unprepare("vm1-nic", UID), "");
    assert_eq!(node.driver(vf).as_deref(), Some("igbvf"));
    assert!(node.leases().is_empty());
}

#[test]
fn a_lease_ended_behind_the_plugins_back_is_taken_again_and_the_nodes_read_again() {
    let node = TestNode::start();
    let vf = node.vf(0);
    node.claim_for("vm1-nic", UID, vf);
    let answer = node.prepare("vm1-nic", UID);
    assert_eq!(answer.error, "");
    let record_path = node.path("plugin-state/claims").join(format!("{UID}.json"));
    let record = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap()
    };
    let group = record()["devices"][0]["iommu_group"].clone();
    // As after a reboot, or an administrator ending the lease by hand: the device is back on
    // its host driver, and the recorded group is no longer what the kernel says (stood in
    // for here by a record that names another group).
    node.manager(|m| async move {
        m.lease_end(&format!("k8s:{UID}")).await.unwrap();
    });
    assert_eq!(node.driver(vf).as_deref(), Some("igbvf"));
    let mut stale = record();
    stale["devices"][0]["iommu_group"] = 999.into();
    std::fs::write(&record_path, serde_json::to_vec(&stale).unwrap()).unwrap();

    assert_eq!(node.prepare("vm1-nic", UID), answer);
    assert_eq!(node.driver(vf).as_deref(), Some("vfio-pci"));
    assert_eq!(
        node.leases(),
        [(format!("k8s:{UID}"), vec![vf.to_string()])]
    );
    assert_eq!(record()["devices"][0]["iommu_group"], group);
    let spec = spec(&node.files().spec_path(UID));
    assert_eq!(
        spec["devices"][0]["containerEdits"]["deviceNodes"][1]["path"],
        format!("/dev/vfio/{group}")
    );
}

#[test]
fn a_socket_path_of_108_bytes_is_refused() {
    let long = PathBuf::from(format!("/tmp/{}", "s".repeat(103)));
    assert_eq!(long.as_os_str().len(), 108);
    let err = plugin_sockets::bind(&long).unwrap_err();
    assert!(err.to_string().contains("108"), "{err}");
    assert!(!long.exists());
}

#[test]
fn the_slices_offer_the_vfs_and_follow_leases() {
    let node = TestNode::start();
    let plugin = node.plugin();
    let vf = node.vf(1);
    let kubeconfig = node.path("kubeconfig");
    let publish = node.runtime.spawn(async move {
        let cluster = passthroughd_dra::cluster::connect(Some(&kubeconfig))
            .await
            .unwrap();
        let owner = passthroughd_dra::cluster::node_owner(&cluster, NODE)
            .await
            .unwrap();
        let publisher = Publisher::new(cluster, DRIVER.into(), NODE.into(), owner);
        passthroughd_dra::watch::keep_slices(plugin, publisher, Duration::from_secs(60)).await;
    });
    let free = |node: &TestNode| -> Option<bool> {
        node.api
            .slices()
            .iter()
            .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
            .find(|d| d.name == device_name(vf))
            .and_then(|d| d.attributes?.get("free")?.bool)
    };
    wait_for(|| free(&node) == Some(true), "the VF offered as free");
    let names: Vec<String> = node
        .api
        .slices()
        .iter()
        .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
        .map(|d| d.name)
        .collect();
    assert!(
        !names.contains(&device_name(PF.parse().unwrap())),
        "a PF with VFs is not offered"
    );
    node.claim_for("vm1-nic", UID, vf);
    assert_eq!(node.prepare("vm1-nic", UID).error, "");
    wait_for(|| free(&node) == Some(false), "the VF shown leased");
    assert_eq!(node.unprepare("vm1-nic", UID), "");
    wait_for(|| free(&node) == Some(true), "the VF free again");
    publish.abort();
}
