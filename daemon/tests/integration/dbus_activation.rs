//! D-Bus activation (issue 14): a private bus whose `<servicedir>` holds the shipped activation
//! file (`systemd/org.passthroughd.Passthrough1.service`), with only its `Exec=` pointed at the
//! built daemon (on that bus, over a fake sysfs tree, with a temporary state dir), starts the
//! daemon on the first call to the shipped name: nothing owns the name before the call, the call
//! is answered, and the name's owner is then the built binary. A file naming another service
//! starts nothing. What this cannot show: `SystemdService=` (the bus asks systemd, PID 1, to
//! start the unit) and the system bus's setuid launch helper (`User=root`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use passthroughd_proto::dbus::{ManagerProxy, SERVICE, exit};
use passthroughd_proto::wire::from_dict;
use passthroughd_proto::{PciFunction, Status};
use passthroughd_testkit::bus::TestBus;
use passthroughd_testkit::sim::{SimDevice, SimKernel};
use zbus::proxy::CacheProperties;

use crate::common::BusClient;

const SHIPPED: &str = include_str!("../../../systemd/org.passthroughd.Passthrough1.service");
const NIC: &str = "0000:01:00.0";

/// The shipped activation file with `Exec=` replaced, and optionally `Name=`.
fn activation_file(exec: &str, name: Option<&str>) -> String {
    let mut exec_lines = 0;
    let text: Vec<String> = SHIPPED
        .lines()
        .map(|line| {
            if line.starts_with("Exec=") {
                exec_lines += 1;
                format!("Exec={exec}")
            } else if let (Some(name), true) = (name, line.starts_with("Name=")) {
                format!("Name={name}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(exec_lines, 1, "the shipped file has one Exec= line");
    text.join("\n") + "\n"
}

struct Setup {
    dir: tempfile::TempDir,
    services: PathBuf,
    bus: TestBus,
    runtime: tokio::runtime::Runtime,
    connection: zbus::Connection,
}

impl Setup {
    /// A bus with an empty service directory and a one-NIC fake tree for the daemon.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let services = dir.path().join("services");
        std::fs::create_dir(&services).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let sim = SimKernel::new(&root).unwrap();
        sim.add_device(&SimDevice::new(
            NIC.parse().unwrap(),
            0x020000,
            Some("igb"),
            4,
        ))
        .unwrap();
        sim.add_driver("vfio-pci").unwrap();
        let bus = TestBus::with_services(&services);
        let BusClient {
            runtime,
            connection,
        } = BusClient::connect(&bus);
        Self {
            dir,
            services,
            bus,
            runtime,
            connection,
        }
    }

    /// Writes the activation file (as `name`.service) and makes the bus read it.
    fn install(&self, file_name: &str, text: &str) {
        std::fs::write(self.services.join(format!("{file_name}.service")), text).unwrap();
        self.runtime.block_on(async {
            let dbus = zbus::fdo::DBusProxy::new(&self.connection).await.unwrap();
            dbus.reload_config().await.unwrap();
        });
    }

    /// `Exec=`: the built daemon on this bus, over the fake tree.
    fn exec(&self) -> String {
        let d = self.dir.path();
        format!(
            "{} --bus {} --sysfs-root {} --state-dir {} --config {}",
            env!("CARGO_BIN_EXE_passthroughd"),
            self.bus.address,
            d.join("root").display(),
            d.join("state").display(),
            d.join("config.toml").display()
        )
    }

    fn dbus(&self) -> zbus::fdo::DBusProxy<'_> {
        self.runtime
            .block_on(zbus::fdo::DBusProxy::new(&self.connection))
            .unwrap()
    }

    fn has_owner(&self) -> bool {
        let dbus = self.dbus();
        self.runtime
            .block_on(dbus.name_has_owner(SERVICE.try_into().unwrap()))
            .unwrap()
    }

    fn activatable(&self) -> Vec<String> {
        let dbus = self.dbus();
        self.runtime
            .block_on(dbus.list_activatable_names())
            .unwrap()
            .into_iter()
            .map(|n| n.to_string())
            .collect()
    }

    /// The pid of the name's owner, if any.
    fn owner_pid(&self) -> Option<u32> {
        let dbus = self.dbus();
        self.runtime
            .block_on(dbus.get_connection_unix_process_id(SERVICE.try_into().unwrap()))
            .ok()
    }

    /// A proxy that never reads properties, so only the method call itself can activate.
    fn proxy(&self) -> ManagerProxy<'_> {
        self.runtime
            .block_on(
                ManagerProxy::builder(&self.connection)
                    .cache_properties(CacheProperties::No)
                    .build(),
            )
            .unwrap()
    }
}

/// Stops an activated daemon (a child of the bus, not of the test) and waits for its name to go.
fn stop(setup: &Setup, pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.has_owner() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!setup.has_owner(), "the activated daemon did not stop");
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

#[test]
fn a_call_to_the_shipped_name_starts_the_daemon() {
    let setup = Setup::new();
    setup.install(SERVICE, &activation_file(&setup.exec(), None));
    assert!(
        setup.activatable().iter().any(|n| n == SERVICE),
        "the bus does not list {SERVICE} as activatable: {:?}",
        setup.activatable()
    );
    assert!(
        !setup.has_owner(),
        "something owns {SERVICE} before the call"
    );
    assert!(!setup.dir.path().join("state").exists());

    // The first call: the bus starts the daemon, which takes the name and answers.
    let started = Instant::now();
    let proxy = setup.proxy();
    let status: Status = from_dict("status", setup.runtime.block_on(proxy.status()).unwrap())
        .expect("a status reply");
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert!(started.elapsed() < Duration::from_secs(20));

    let pid = setup
        .owner_pid()
        .expect("the name has an owner after the call");
    assert_eq!(
        exe_of(pid).canonicalize().unwrap(),
        Path::new(env!("CARGO_BIN_EXE_passthroughd"))
            .canonicalize()
            .unwrap(),
        "the name is owned by something else than the built daemon"
    );
    // It is the daemon the file describes: over the fake tree, with the temporary state dir.
    let rows = setup
        .runtime
        .block_on(proxy.list_functions())
        .expect("listing");
    let functions: Vec<PciFunction> = rows
        .into_iter()
        .map(|r| PciFunction::try_from(r).unwrap())
        .collect();
    assert_eq!(
        functions
            .iter()
            .map(|f| f.address.to_string())
            .collect::<Vec<_>>(),
        [NIC]
    );
    assert!(setup.dir.path().join("state").is_dir());

    // A second call goes to the same daemon: activation starts one, not one per call.
    setup.runtime.block_on(proxy.status()).unwrap();
    assert_eq!(setup.owner_pid(), Some(pid));
    stop(&setup, pid);
}

#[test]
fn a_file_for_another_name_starts_nothing() {
    let setup = Setup::new();
    let other = "org.example.NotPassthrough";
    setup.install(other, &activation_file(&setup.exec(), Some(other)));
    assert!(setup.activatable().iter().any(|n| n == other));
    assert!(!setup.activatable().iter().any(|n| n == SERVICE));
    let proxy = setup.proxy();
    let error = setup
        .runtime
        .block_on(proxy.status())
        .expect_err("nothing may answer");
    assert_eq!(error.exit_code(), exit::UNREACHABLE, "{error}");
    assert!(error.to_string().contains("ServiceUnknown"), "{error}");
    assert!(!setup.has_owner());
}
