//! A small host over the simulated kernel, shared by the engine tests.
//!
//! | address      | what                         | driver   | group |
//! |--------------|------------------------------|----------|-------|
//! | 0000:00:00.0 | host bridge                  | none     | 0     |
//! | 0000:00:1c.0 | root port                    | pcieport | 1     |
//! | 0000:00:03.0 | NIC enp0s3, default route    | e1000e   | 2     |
//! | 0000:00:04.0 | NVMe, nvme0n1p1 mounted at / | nvme     | 3     |
//! | 0000:01:00.0 | NIC (behind 00:1c.0)         | igb      | 4     |
//! | 0000:02:00.0 | NIC, shares its group        | e1000e   | 5     |
//! | 0000:02:00.1 | NIC, shares its group        | e1000e   | 5     |
//! | 0000:03:00.0 | NIC                          | igb      | 6     |

#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use passthroughd::engine::{EngineOptions, StartupReport};
use passthroughd::{Caller, Engine, EngineConfig, PciIds, SysfsRoot};
use passthroughd_proto::PciAddress;
use passthroughd_testkit::sim::{SimDevice, SimKernel, SimSriov};

pub fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

pub fn caller() -> Caller {
    Caller::new(0, ":1.7")
}

pub const NIC: &str = "0000:01:00.0";
pub const NIC2: &str = "0000:03:00.0";
pub const ROUTED: &str = "0000:00:03.0";
pub const DISK: &str = "0000:00:04.0";
pub const PAIR0: &str = "0000:02:00.0";
pub const PAIR1: &str = "0000:02:00.1";
pub const ROOT_PORT: &str = "0000:00:1c.0";
pub const HOST_BRIDGE: &str = "0000:00:00.0";

pub struct Host {
    pub dir: tempfile::TempDir,
    pub sim: Arc<SimKernel>,
}

impl Host {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let sim = Arc::new(SimKernel::new(&root).unwrap());
        let dev = |addr: &str, class: u32, driver: Option<&str>, group: u32| {
            SimDevice::new(a(addr), class, driver, group)
        };
        sim.add_device(&dev(HOST_BRIDGE, 0x060000, None, 0))
            .unwrap();
        sim.add_device(&dev(ROOT_PORT, 0x060400, Some("pcieport"), 1))
            .unwrap();
        sim.add_device(&dev(ROUTED, 0x020000, Some("e1000e"), 2))
            .unwrap();
        let mut nvme = dev(DISK, 0x010802, Some("nvme"), 3);
        nvme.vendor_id = 0x144d;
        nvme.device_id = 0xa808;
        sim.add_device(&nvme).unwrap();
        let mut nic = dev(NIC, 0x020000, Some("igb"), 4);
        nic.device_id = 0x10c9;
        nic.parent = Some(a(ROOT_PORT));
        sim.add_device(&nic).unwrap();
        sim.add_device(&dev(PAIR0, 0x020000, Some("e1000e"), 5))
            .unwrap();
        sim.add_device(&dev(PAIR1, 0x020000, Some("e1000e"), 5))
            .unwrap();
        let mut nic2 = dev(NIC2, 0x020000, Some("igb"), 6);
        nic2.device_id = 0x10c9;
        sim.add_device(&nic2).unwrap();

        sim.add_netdev(a(ROUTED), "enp0s3").unwrap();
        sim.add_netdev(a(NIC), "enp1s0").unwrap();
        sim.write_file(
            "proc/net/route",
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             enp0s3\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
        )
        .unwrap();
        sim.add_block(a(DISK), "nvme0n1", "259:0", None).unwrap();
        sim.add_block(a(DISK), "nvme0n1p1", "259:1", Some("nvme0n1"))
            .unwrap();
        sim.write_file(
            "proc/self/mounts",
            "/dev/nvme0n1p1 / ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\n",
        )
        .unwrap();
        Self { dir, sim }
    }

    pub fn root(&self) -> SysfsRoot {
        self.sim.sysfs().clone()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            root: self.root(),
            state_dir: self.state_dir(),
            kernel: self.sim.clone(),
            ids: Arc::new(PciIds::empty()),
            config: Some(self.config_path()),
        }
    }

    /// Where the declarative config of this host lives (absent until written).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn open(&self) -> (Engine, StartupReport) {
        Engine::open(self.config()).unwrap()
    }

    pub fn open_with(&self, options: EngineOptions) -> (Engine, StartupReport) {
        Engine::open_with(self.config(), options).unwrap()
    }

    pub fn driver(&self, addr: &str) -> Option<String> {
        self.sim.driver_of(a(addr))
    }

    pub fn state_text(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("state.toml")).unwrap_or_default()
    }

    /// Names in the state dir, sorted.
    pub fn state_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// The SR-IOV PF of [`sriov_host`].
pub const PF: &str = "0000:05:00.0";

/// An igb-like PF: 7 VFs at most, on igb, in group 10.
pub fn pf_device() -> SimDevice {
    let mut pf = SimDevice::new(a(PF), 0x020000, Some("igb"), 10);
    pf.device_id = 0x10c9;
    pf.sriov_totalvfs = 7;
    pf
}

/// The common host plus [`pf_device`] with no VFs enabled; VF n is in group 20 + n.
pub fn sriov_host() -> Host {
    sriov_host_with(SimSriov::igb(20))
}

/// [`sriov_host`] with the PF's SR-IOV behaviour given.
pub fn sriov_host_with(config: SimSriov) -> Host {
    let host = Host::new();
    host.sim.add_device(&pf_device()).unwrap();
    std::fs::write(host.root().pci_device_attr(a(PF), "sriov_numvfs"), "0\n").unwrap();
    host.sim.configure_sriov(a(PF), config);
    host
}

/// A plain connection to a test bus, on its own runtime, for tests that call blocking code.
pub struct BusClient {
    pub runtime: tokio::runtime::Runtime,
    pub connection: zbus::Connection,
}

impl BusClient {
    pub fn connect(bus: &passthroughd_testkit::bus::TestBus) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let connection = runtime
            .block_on(bus.bus().builder().unwrap().build())
            .unwrap();
        Self {
            runtime,
            connection,
        }
    }
}
