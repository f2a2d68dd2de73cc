//! passthroughctl against the service over the real engine (`Engine`): reads, refusals,
//! assign/release with their signals and persistence.
//!
//! The kernel seam is a small tree-backed simulation: `driver_override` is stored, `unbind`
//! removes the driver link, `drivers_probe` binds the override or the function's native driver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use passthroughd::kernel::Kernel;
use passthroughd::{Engine, EngineConfig, Inventory, PciIds, SysfsRoot};
use passthroughd_proto::dbus::ManagerProxy;
use passthroughd_proto::{PciAddress, table};
use passthroughd_testkit::synthetic;

#[derive(Debug)]
struct TreeKernel {
    root: PathBuf,
    /// The driver a probe without an override binds, per function: the generator's plan.
    native: std::collections::HashMap<PciAddress, &'static str>,
}

impl TreeKernel {
    fn device(&self, address: &str) -> io::Result<PathBuf> {
        let address: PciAddress = address
            .trim()
            .parse()
            .map_err(|_| io::Error::from_raw_os_error(19))?;
        let dir = self
            .root
            .join("sys/bus/pci/devices")
            .join(address.to_string());
        if dir.exists() {
            Ok(dir)
        } else {
            Err(io::Error::from_raw_os_error(19))
        }
    }

    fn set_driver(dir: &Path, driver: Option<&str>) -> io::Result<()> {
        let link = dir.join("driver");
        let _ = std::fs::remove_file(&link);
        let uevent = std::fs::read_to_string(dir.join("uevent"))?;
        let mut text: String = uevent
            .lines()
            .filter(|l| !l.starts_with("DRIVER="))
            .map(|l| format!("{l}\n"))
            .collect();
        if let Some(d) = driver {
            let root = dir.ancestors().nth(5).unwrap();
            std::fs::create_dir_all(root.join("sys/bus/pci/drivers").join(d))?;
            std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{d}"), &link)?;
            text = format!("DRIVER={d}\n{text}");
        }
        std::fs::write(dir.join("uevent"), text)
    }
}

impl Kernel for TreeKernel {
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        let value = String::from_utf8_lossy(value).to_string();
        match path.file_name().and_then(|n| n.to_str()) {
            Some("driver_override") => std::fs::write(path, value.trim().to_owned() + "\n"),
            Some("unbind") => Self::set_driver(&self.device(&value)?, None),
            Some("drivers_probe") => {
                let dir = self.device(&value)?;
                let o = std::fs::read_to_string(dir.join("driver_override"))?;
                let o = o.trim();
                let driver = (!o.is_empty() && o != "(null)").then_some(o);
                let address: PciAddress = value
                    .trim()
                    .parse()
                    .map_err(|_| io::Error::from_raw_os_error(19))?;
                Self::set_driver(&dir, driver.or(self.native.get(&address).copied()))
            }
            _ => std::fs::write(path, value),
        }
    }
    fn load_module(&self, _module: &str) -> io::Result<()> {
        Ok(())
    }
}

struct Real {
    _connection: zbus::Connection,
    runtime: tokio::runtime::Runtime,
    tree: tempfile::TempDir,
    _state: tempfile::TempDir,
    bus: TestBus,
}

fn start() -> Real {
    let bus = TestBus::start();
    let tree = tempfile::tempdir().unwrap();
    synthetic::generate(tree.path(), SHAPE).unwrap();
    let state = tempfile::tempdir().unwrap();
    let (manager, _report) = Engine::open(EngineConfig {
        root: SysfsRoot::new(tree.path()),
        state_dir: state.path().to_owned(),
        kernel: Arc::new(TreeKernel {
            root: tree.path().to_owned(),
            native: synthetic::plan(SHAPE)
                .into_iter()
                .filter_map(|p| Some((p.address, p.driver?)))
                .collect(),
        }),
        ids: Arc::new(PciIds::empty()),
        config: None,
    })
    .unwrap();
    let (runtime, connection) = serve_engine(&bus, manager);
    Real {
        _connection: connection,
        runtime,
        tree,
        _state: state,
        bus,
    }
}

fn inventory(tree: &Path) -> Inventory {
    Inventory::scan(&SysfsRoot::new(tree), &PciIds::empty()).unwrap()
}

#[test]
fn reads_through_the_real_engine() {
    let r = start();
    let inv = inventory(r.tree.path());
    let o = ctl(&r.bus.address, &["list"], false);
    assert_eq!(stdout(&o), table::functions(&inv.functions));
    let o = ctl(&r.bus.address, &["--json", "status"], false);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn refusals_and_unknown_devices_change_nothing() {
    let r = start();
    let before = inventory(r.tree.path());
    // 0000:00:00.0 is a bridge in the synthetic plan (pcieport).
    let o = ctl(&r.bus.address, &["assign", "00:00.0"], false);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let o = ctl(
        &r.bus.address,
        &["assign", "0000:00:1f.7", "0001:00:00.0"],
        false,
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert_eq!(inventory(r.tree.path()).functions, before.functions);
}

#[test]
fn assign_and_release_emit_signals_and_persist() {
    let r = start();
    let _rt = r.runtime.enter();
    let conn = r
        .runtime
        .block_on(r.bus.bus().builder().unwrap().build())
        .unwrap();
    let (mut driver, mut assigned) = r.runtime.block_on(async {
        let p = ManagerProxy::new(&conn).await.unwrap();
        (
            p.receive_driver_changed().await.unwrap(),
            p.receive_assignment_changed().await.unwrap(),
        )
    });
    // A whole group, so the group rule is satisfied.
    let inv = inventory(r.tree.path());
    // A PF with VFs enabled is refused by vfio-pci (and so by the engine): pick a group without.
    let group = inv
        .groups
        .iter()
        .find(|g| {
            g.members.len() > 1
                && g.members.iter().all(|a| {
                    inv.function(*a)
                        .unwrap()
                        .sriov
                        .is_none_or(|s| s.num_vfs == 0)
                })
        })
        .unwrap();
    let members: Vec<String> = group
        .members
        .iter()
        .filter(|a| !inv.function(**a).unwrap().is_bridge())
        .map(ToString::to_string)
        .collect();
    let first = members[0].clone();
    let o = ctl(
        &r.bus.address,
        &["--json", "assign", "--group", "--force", &first],
        false,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    r.runtime.block_on(async {
        use std::future::poll_fn;
        use std::pin::Pin;
        use zbus::export::futures_core::Stream;
        let d = tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| Pin::new(&mut driver).poll_next(cx)),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(d.args().unwrap().new, "vfio-pci");
        let a = tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| Pin::new(&mut assigned).poll_next(cx)),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(a.args().unwrap().assigned);
    });
    let o = ctl(&r.bus.address, &["--json", "status"], false);
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        status["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["address"] == first.as_str())
    );
    let o = ctl(&r.bus.address, &["release", &first], false);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        inventory(r.tree.path())
            .function(first.parse().unwrap())
            .unwrap()
            .driver
            .as_deref(),
        inv.function(first.parse().unwrap())
            .unwrap()
            .driver
            .as_deref(),
        "release restores the previous driver"
    );
}
