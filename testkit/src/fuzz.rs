//! The fuzz targets: every parser that takes input from outside the daemon, each as a function
//! of raw bytes that panics when a property fails (a crash, to the fuzzer).
//!
//! The coverage-guided fuzzer (`fuzz/`, cargo-afl) calls these; so does the replay test
//! (`daemon/tests/integration/fuzz_replay.rs`), which runs every seed and every input a fuzzer
//! ever crashed on (`tests/fuzz/TARGET/`) in the ordinary test suite.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use passthroughd::engine::plan::Plan;
use passthroughd::observe::guard::{HostSnapshot, StaticAddresses};
use passthroughd::observe::host::{self, msr::FixedMsrs};
use passthroughd::store::{journal, state::State};
use passthroughd::{Inventory, PciIds, SysfsRoot};
use passthroughd_proto::config::Config;
use passthroughd_proto::domain_xml;
use passthroughd_proto::{LeaseOwner, PciAddress};

use crate::sim::{SimDevice, SimKernel};

/// A target: raw input in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/` and the replay test know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("address", address),
    ("config", config),
    ("state", state),
    ("journal", journal_file),
    ("domain_xml", domain_xml),
    ("sysfs", sysfs),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Messages are shown to people as one line.
fn one_line(what: &str, message: &str) {
    assert!(
        !message.contains('\n'),
        "{what} message spans lines: {message:?}"
    );
}

/// Caller-supplied identifiers (CLI arguments, D-Bus strings, sysfs entry names): a PCI address
/// and a lease owner. What parses prints back to the same value.
pub fn address(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<PciAddress>() {
        Ok(address) => {
            let again: PciAddress = address.to_string().parse().expect("printed address parses");
            assert_eq!(again, address);
        }
        Err(e) => one_line("address error", &e.to_string()),
    }
    match text.parse::<LeaseOwner>() {
        Ok(owner) => {
            let again: LeaseOwner = owner.to_string().parse().expect("printed owner parses");
            assert_eq!(again, owner);
        }
        Err(e) => one_line("owner error", &e.to_string()),
    }
}

/// `/etc/passthroughd/config.toml`.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text, "config.toml") {
        one_line("config error", &e.to_string());
    }
}

/// `state.toml`: what parses is written back and reads as the same state.
pub fn state(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/var/lib/passthroughd/state.toml");
    match State::parse(text, path) {
        Ok(state) => {
            let written = state.to_toml().expect("a parsed state encodes");
            let again = State::parse(&written, path).expect("a written state parses");
            assert_eq!(again, state, "state.toml does not round-trip:\n{written}");
        }
        Err(e) => one_line("state error", &e.to_string()),
    }
}

/// A journal file, as crash recovery reads it.
pub fn journal_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((plan, _undoing)) = journal::parse::<Plan>(text) {
        // What recovery finds it re-journals as it undoes: it must encode again.
        serde_json::to_string(&plan).expect("a parsed plan encodes");
    }
}

/// libvirt's domain XML on the hook's stdin.
pub fn domain_xml(data: &[u8]) {
    let Ok(xml) = domain_xml::read_xml(data) else {
        return;
    };
    match domain_xml::domain_devices(&xml) {
        Ok(devices) => {
            let mut seen = std::collections::HashSet::new();
            for address in devices.functions.iter().chain(&devices.managed) {
                assert!(seen.insert(address), "{address} listed twice");
            }
        }
        Err(e) => one_line("domain XML error", &e.to_string()),
    }
}

/// The files the fuzzed contents go to, one field each (fields split at NUL bytes): the
/// attributes of one PCI function that the inventory and the guard read, and the `/proc` files
/// of the host report and the guard.
const SYSFS_FIELDS: &[&str] = &[
    "uevent",
    "numa_node",
    "driver_override",
    "boot_vga",
    "sriov_totalvfs",
    "sriov_numvfs",
    "sriov_drivers_autoprobe",
    "reset_method",
    "/proc/cpuinfo",
    "/proc/cmdline",
    "/proc/modules",
    "/proc/sys/kernel/osrelease",
    "/proc/meminfo",
    "/proc/interrupts",
    "/proc/self/mounts",
    "/proc/swaps",
    "/proc/net/route",
    "/proc/net/ipv6_route",
    "/proc/net/if_inet6",
];

struct FakeHost {
    _dir: tempfile::TempDir,
    root: SysfsRoot,
    files: Vec<PathBuf>,
}

/// One simulated host for the whole run (a fuzzer calls the target thousands of times a
/// second): a function with a network interface, on a tmpfs when there is one.
fn fake_host() -> &'static FakeHost {
    static HOST: OnceLock<FakeHost> = OnceLock::new();
    HOST.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary directory");
        let sim = SimKernel::new(dir.path()).expect("a simulated host");
        let address: PciAddress = "0000:01:00.0".parse().expect("an address");
        let mut device = SimDevice::new(address, 0x020000, Some("igb"), 1);
        device.device_id = 0x10c9;
        sim.add_device(&device).expect("a device");
        sim.add_netdev(address, "eth0").expect("an interface");
        let root = sim.sysfs().clone();
        let files = SYSFS_FIELDS
            .iter()
            .map(|name| match name.strip_prefix('/') {
                Some(rel) => dir.path().join(rel),
                None => root.pci_device_attr(address, name),
            })
            .collect::<Vec<_>>();
        for file in &files {
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).expect("a directory");
            }
        }
        FakeHost {
            _dir: dir,
            root,
            files,
        }
    })
}

/// Attribute and `/proc` contents: the full inventory scan, the host report and the guard over
/// a host whose files hold the input. Whatever the kernel shows, reading it never panics.
pub fn sysfs(data: &[u8]) {
    let host = fake_host();
    let mut fields = data.split(|b| *b == 0);
    for file in &host.files {
        std::fs::write(file, fields.next().unwrap_or_default()).expect("writing a field");
    }
    let ids = PciIds::empty();
    if let Ok(inventory) = Inventory::scan(&host.root, &ids) {
        let functions: Vec<_> = inventory.functions.iter().collect();
        let snapshot = HostSnapshot::gather(&host.root, &functions, &StaticAddresses::default());
        for function in &functions {
            let _ = snapshot.check(function);
        }
    }
    let _ = host::report(&host.root, &ids, &FixedMsrs::new("fuzz", []));
}
