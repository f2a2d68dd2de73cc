//! `passthroughctl apply`, `apply --dry-run`, `reload` and `status` through a real bus and the
//! real engine over the simulated kernel, with the text and JSON of `apply --dry-run` compared
//! to golden files in tests/golden/ (hosts in several states).
//!
//! After a deliberate change of output, regenerate the golden files with
//!     PT_BLESS=1 cargo test -p passthroughctl --test integration apply::
//! and review the diff: it shows exactly how the output changed.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use passthroughd::kernel::Kernel;
use passthroughd::{Engine, EngineConfig, PciIds};
use passthroughd_proto::PciAddress;
use passthroughd_testkit::sim::{SimDevice, SimKernel, SimSriov};

const NIC: &str = "0000:01:00.0";
const ROUTED: &str = "0000:00:03.0";
const PAIR0: &str = "0000:02:00.0";
const NIC2: &str = "0000:03:00.0";
const PF: &str = "0000:05:00.0";

struct Real {
    _connection: zbus::Connection,
    _runtime: tokio::runtime::Runtime,
    sim: Arc<SimKernel>,
    dir: tempfile::TempDir,
    bus: TestBus,
}

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

impl Real {
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        ctl(&self.bus.address, args, false)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn driver(&self, addr: &str) -> Option<String> {
        self.sim.driver_of(a(addr))
    }

    /// Output with this run's temporary paths replaced, so it can be compared across runs.
    fn normalized(&self, bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).replace(&self.dir.path().display().to_string(), "DIR")
    }

    /// Puts `addr` back on its host driver behind the daemon's back.
    fn hand_release(&self, addr: &str) {
        let root = self.sim.sysfs();
        self.sim
            .write(&root.pci_device_attr(a(addr), "driver_override"), b"\n")
            .unwrap();
        self.sim
            .write(&root.pci_device_unbind(a(addr)), addr.as_bytes())
            .unwrap();
        self.sim
            .write(&root.pci_drivers_probe(), addr.as_bytes())
            .unwrap();
    }
}

/// A host like the engine tests' (a routed NIC, a shared group, two igb NICs, an SR-IOV PF),
/// with `config` in place when the daemon starts (`None`: no file).
fn start(config: Option<&str>) -> Real {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let sim = Arc::new(SimKernel::new(&root).unwrap());
    let dev = |addr: &str, driver: &str, group: u32, device: u16| {
        let mut d = SimDevice::new(a(addr), 0x020000, Some(driver), group);
        d.device_id = device;
        d
    };
    sim.add_device(&dev(ROUTED, "e1000e", 2, 0x10d3)).unwrap();
    sim.add_device(&dev(NIC, "igb", 4, 0x10c9)).unwrap();
    sim.add_device(&dev(PAIR0, "e1000e", 5, 0x10d3)).unwrap();
    sim.add_device(&dev("0000:02:00.1", "e1000e", 5, 0x10d3))
        .unwrap();
    sim.add_device(&dev(NIC2, "igb", 6, 0x10c9)).unwrap();
    let mut pf = dev(PF, "igb", 10, 0x10c9);
    pf.sriov_totalvfs = 7;
    sim.add_device(&pf).unwrap();
    std::fs::write(sim.sysfs().pci_device_attr(a(PF), "sriov_numvfs"), "0\n").unwrap();
    sim.configure_sriov(a(PF), SimSriov::igb(20));
    sim.add_netdev(a(ROUTED), "enp0s3").unwrap();
    sim.write_file(
        "proc/net/route",
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
         enp0s3\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
    )
    .unwrap();
    sim.add_driver("vfio-pci").unwrap();
    if let Some(text) = config {
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
    }
    let (engine, _) = Engine::open(EngineConfig {
        root: sim.sysfs().clone(),
        state_dir: dir.path().join("state"),
        kernel: sim.clone(),
        ids: Arc::new(PciIds::empty()),
        config: Some(dir.path().join("config.toml")),
    })
    .unwrap();
    let (runtime, connection) = serve_engine(&bus, engine);
    Real {
        _connection: connection,
        _runtime: runtime,
        sim,
        dir,
        bus,
    }
}

const CONFIG: &str = r#"version = 1

[[device]]
address = "0000:01:00.0"
vendor = "0x8086"
device = "0x10c9"

[[device]]
address = "0000:02:00.0"
group = true

[[sriov]]
pf = "0000:05:00.0"
count = 3
assign = [0, 2]
"#;

/// Compares `actual` with tests/golden/`name`, or (with PT_BLESS=1) writes it there.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name);
    if std::env::var_os("PT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with PT_BLESS=1 cargo test -p passthroughctl --test integration \
             apply::",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs; if the change is meant, regenerate with PT_BLESS=1 cargo test -p \
         passthroughctl --test integration apply:: and review the diff",
        path.display()
    );
}

/// `apply --dry-run` as text and JSON, both against the golden files `NAME.txt` / `NAME.json`;
/// returns the exit code (the same for both).
fn dry_run_golden(r: &Real, name: &str) -> i32 {
    let text = r.ctl(&["apply", "--dry-run"]);
    let json = r.ctl(&["--json", "apply", "--dry-run"]);
    assert_eq!(text.status.code(), json.status.code());
    golden(&format!("{name}.txt"), &r.normalized(&text.stdout));
    golden(&format!("{name}.json"), &r.normalized(&json.stdout));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["dry_run"], true);
    text.status.code().unwrap()
}

#[test]
fn a_fresh_host_the_plan_then_nothing_to_do() {
    let r = start(None);
    r.write_config(CONFIG);
    let o = r.ctl(&["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("3 entries in force"));
    assert_eq!(dry_run_golden(&r, "apply-fresh"), 0);
    assert_eq!(
        r.driver(NIC).as_deref(),
        Some("igb"),
        "a dry run changes nothing"
    );
    let o = r.ctl(&["apply"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(r.driver(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(r.driver(PAIR0).as_deref(), Some("vfio-pci"));
    assert_eq!(dry_run_golden(&r, "apply-done"), 0);
    let o = r.ctl(&["apply"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn drift_refusals_and_their_exit_code() {
    let r = start(Some(&format!(
        "{CONFIG}\n[[device]]\naddress = \"{ROUTED}\"\n\n\
         [[device]]\naddress = \"{NIC2}\"\nvendor = \"0x15b3\"\n"
    )));
    r.hand_release(NIC);
    assert_eq!(dry_run_golden(&r, "apply-drift-refused"), 5);
    let o = r.ctl(&["apply"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("2 refused"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1);
    assert_eq!(
        r.driver(NIC).as_deref(),
        Some("vfio-pci"),
        "what is not refused is done"
    );
    let status = r.ctl(&["--json", "status"]);
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(doc["refused"].as_array().unwrap().len(), 2, "{doc}");
    assert!(
        doc["refused"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("not the vendor 15b3")
    );
}

#[test]
fn a_broken_reload_keeps_the_last_good_config_and_names_the_line() {
    let r = start(Some(CONFIG));
    r.write_config("version = 1\n\n[[device]]\naddress = \"0000:01:00.0\"\ngroup = \"yes\"\n");
    let o = r.ctl(&["reload"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("config.toml:5:9:"), "{err}");
    assert!(err.contains("the last good config stays in force"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(dry_run_golden(&r, "apply-broken-reload"), 0);
    let status = r.ctl(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("config error:") && text.contains(":5:9:"),
        "{text}"
    );
    // Entries removed and applied: what they claimed goes back to its host drivers.
    r.write_config("version = 1\n");
    assert_eq!(r.ctl(&["reload"]).status.code(), Some(0));
    assert_eq!(dry_run_golden(&r, "apply-entries-removed"), 0);
    assert_eq!(r.ctl(&["apply"]).status.code(), Some(0));
    assert_eq!(r.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(r.driver(PAIR0).as_deref(), Some("e1000e"));
}

#[test]
fn release_of_a_config_claimed_function_is_refused_naming_the_entry() {
    let r = start(Some(CONFIG));
    let o = r.ctl(&["release", NIC]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("[[device]] 0000:01:00.0 (line 3)"),
        "{}",
        stderr(&o)
    );
    let o = r.ctl(&["--json", "status"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nic = doc["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["address"] == NIC)
        .unwrap();
    assert_eq!(nic["sources"], serde_json::json!(["config"]));
}
