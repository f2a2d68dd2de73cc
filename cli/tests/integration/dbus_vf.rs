//! `passthroughctl vf ...` against the service over the real engine (`Engine`) and the
//! simulated kernel (`sim.rs`, which answers `sriov_numvfs` as docs/kernel.md's table says): the
//! whole path from the CLI through D-Bus to the sysfs writes, its signal, persistence and
//! refusals. (The VM scenario `sriov.sh` runs the same against a real kernel.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use passthroughd::{Engine, EngineConfig, PciIds};
use passthroughd_proto::PciAddress;
use passthroughd_proto::dbus::ManagerProxy;
use passthroughd_testkit::sim::{SimDevice, SimKernel, SimSriov};
use zbus::export::futures_core::Stream;

const PF: &str = "0000:05:00.0";
const NOT_SRIOV: &str = "0000:06:00.0";

struct Real {
    _connection: zbus::Connection,
    runtime: tokio::runtime::Runtime,
    sim: Arc<SimKernel>,
    dir: tempfile::TempDir,
    bus: TestBus,
}

impl Real {
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        ctl(&self.bus.address, args, false)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let o = self.ctl(&all);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn numvfs(&self) -> String {
        let path = self.sim.sysfs().pci_device_attr(pf(), "sriov_numvfs");
        std::fs::read_to_string(path).unwrap().trim().to_owned()
    }

    fn state(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/state.toml")).unwrap_or_default()
    }
}

fn pf() -> PciAddress {
    PF.parse().unwrap()
}

/// An igb-like PF (7 VFs possible, VF n in IOMMU group 20 + n) and a NIC without SR-IOV.
fn start() -> Real {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let sim = Arc::new(SimKernel::new(&root).unwrap());
    let mut device = SimDevice::new(pf(), 0x020000, Some("igb"), 10);
    device.device_id = 0x10c9;
    device.sriov_totalvfs = 7;
    sim.add_device(&device).unwrap();
    std::fs::write(sim.sysfs().pci_device_attr(pf(), "sriov_numvfs"), "0\n").unwrap();
    sim.configure_sriov(pf(), SimSriov::igb(20));
    let nic = SimDevice::new(NOT_SRIOV.parse().unwrap(), 0x020000, Some("e1000e"), 11);
    sim.add_device(&nic).unwrap();
    let (manager, _) = Engine::open(EngineConfig {
        root: sim.sysfs().clone(),
        state_dir: dir.path().join("state"),
        kernel: sim.clone(),
        ids: Arc::new(PciIds::empty()),
        config: None,
    })
    .unwrap();
    let (runtime, connection) = serve_engine(&bus, manager);
    Real {
        _connection: connection,
        runtime,
        sim,
        dir,
        bus,
    }
}

#[test]
fn create_list_and_destroy_through_the_cli() {
    let r = start();
    let _rt = r.runtime.enter();
    let conn = r
        .runtime
        .block_on(r.bus.bus().builder().unwrap().build())
        .unwrap();
    let mut changed = r.runtime.block_on(async {
        let p = ManagerProxy::new(&conn).await.unwrap();
        p.receive_vfs_changed().await.unwrap()
    });

    let created = r.json(&["vf", "create", PF, "--count", "3", "--assign"]);
    let created = created.as_array().unwrap();
    assert_eq!(created.len(), 3);
    for (i, vf) in created.iter().enumerate() {
        assert_eq!(vf["index"], i);
        assert_eq!(vf["driver"], "vfio-pci");
        assert_eq!(vf["assigned"], true);
        let address: PciAddress = vf["address"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            r.sim.bind_history(address),
            ["vfio-pci"],
            "no host VF driver"
        );
    }
    assert_eq!(r.numvfs(), "3");
    assert!(r.state().contains("[[vfs]]"), "{}", r.state());
    let signal = r.runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| Pin::new(&mut changed).poll_next(cx)),
        )
        .await
        .unwrap()
        .unwrap()
    });
    let args = signal.args().unwrap();
    assert_eq!((args.pf, args.count), (PF, 3));

    assert_eq!(
        &r.json(&["vf", "list", PF]),
        &serde_json::Value::Array(created.clone())
    );

    // A VF someone assigned persistently on its own (not just through this create) is kept
    // unless --force; the create's own assignments go with its VFs.
    let vf0 = created[0]["address"].as_str().unwrap();
    let o = r.ctl(&["assign", vf0]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = r.ctl(&["vf", "destroy", PF]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("persistently"), "{}", stderr(&o));
    assert_eq!(r.numvfs(), "3");
    let o = r.ctl(&["vf", "destroy", PF, "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(r.numvfs(), "0");
    assert!(!r.state().contains("[[vfs]]"), "{}", r.state());
    assert!(
        !r.state().contains(vf0),
        "the forced VF's assignment is gone too"
    );
    assert_eq!(r.json(&["vf", "list", PF]), serde_json::json!([]));
}

#[test]
fn bad_vf_requests_get_their_exit_codes_and_change_nothing() {
    let r = start();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["vf", "create", PF, "--count", "8"], 2, "at most 7 VFs"),
        (&["vf", "create", PF, "--count", "0"], 2, "a count of 0"),
        (
            &["vf", "create", NOT_SRIOV, "--count", "1"],
            2,
            "not SR-IOV capable",
        ),
        (
            &["vf", "create", "0000:0a:00.0", "--count", "1"],
            4,
            "0000:0a:00.0",
        ),
        (
            &["vf", "create", "05:00.9x", "--count", "1"],
            2,
            "invalid address",
        ),
        (&["vf", "destroy", NOT_SRIOV], 2, "not SR-IOV capable"),
        (&["vf", "list", "0000:0a:00.0"], 4, "0000:0a:00.0"),
    ];
    for (args, code, text) in cases {
        let o = r.ctl(args);
        assert_eq!(o.status.code(), Some(*code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(text), "{args:?}: {}", stderr(&o));
        assert_eq!(
            stderr(&o).trim().lines().count(),
            1,
            "one line: {}",
            stderr(&o)
        );
    }
    assert!(r.sim.writes().is_empty(), "{:?}", r.sim.writes());
    assert_eq!(r.numvfs(), "0");
}
