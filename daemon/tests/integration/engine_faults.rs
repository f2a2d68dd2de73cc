//! The executor under faults, operation by operation (assign of a group, release, a VF resize
//! with assign, a forced VF destroy, a lease's start and end, the claim of a configured device
//! that appears, a config apply):
//! - a failure of each write in turn: everything the operation did is undone, exactly;
//! - the daemon killed before each step in turn (a test failpoint): the next start finishes or
//!   undoes the journaled plan, and the host converges: no device driverless by accident, no
//!   journal left, state.toml matching the kernel.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use nix::errno::Errno;
use passthroughd::engine::{Engine, EngineOptions};
use passthroughd::{Error, ErrorKind};
use passthroughd_proto::{AssignOptions, LeaseOwner, ReleaseOptions, VfCreateOptions};
use passthroughd_testkit::sim::SimDevice;

/// Everything an operation may change: each function's driver and override, the PF's VF count
/// and autoprobe, state.toml.
fn observe(host: &Host) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(host.root().pci_devices_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let address = a(&name);
        seen.insert(
            name,
            format!(
                "{:?} {:?}",
                host.sim.driver_of(address),
                host.sim.override_of(address)
            ),
        );
    }
    for attr in ["sriov_numvfs", "sriov_drivers_autoprobe"] {
        let value = std::fs::read_to_string(host.root().pci_device_attr(a(PF), attr)).unwrap();
        seen.insert(attr.into(), value.trim().to_owned());
    }
    seen.insert("state".into(), host.state_text());
    seen
}

fn journals(host: &Host) -> usize {
    host.state_files()
        .iter()
        .filter(|n| n.starts_with("journal"))
        .count()
}

type Setup = fn(&Host, &Engine);
/// What the kernel does on its own just before the operation (a device appears): not the
/// daemon's doing, so it is part of the state the operation starts from.
type Arrive = Option<fn(&Host)>;
type Op = fn(&Host, &Engine) -> Result<(), Error>;

fn opts(assign: bool, force: bool) -> VfCreateOptions {
    VfCreateOptions {
        assign,
        runtime: false,
        force,
    }
}

/// The operations under test: a name, what the host has first, the operation.
fn operations() -> Vec<(&'static str, Setup, Arrive, Op)> {
    vec![
        (
            "assign --group",
            |_, _| {},
            None,
            |_, m| {
                let group = AssignOptions {
                    group: true,
                    ..AssignOptions::default()
                };
                m.assign(&caller(), &[a(PAIR0)], group).map(drop)
            },
        ),
        (
            "release",
            |_, m| {
                m.assign(&caller(), &[a(NIC), a(NIC2)], AssignOptions::default())
                    .unwrap();
            },
            None,
            |_, m| {
                m.release(&caller(), &[a(NIC), a(NIC2)], ReleaseOptions::default())
                    .map(drop)
            },
        ),
        (
            "vf create (resize, assign)",
            |_, m| {
                m.vf_create(&caller(), a(PF), 2, opts(true, false)).unwrap();
            },
            None,
            |_, m| {
                m.vf_create(&caller(), a(PF), 4, opts(true, false))
                    .map(drop)
            },
        ),
        (
            "vf destroy --force",
            |_, m| {
                m.vf_create(&caller(), a(PF), 3, opts(true, false)).unwrap();
            },
            None,
            |_, m| m.vf_destroy(&caller(), a(PF), true).map(drop),
        ),
        (
            "lease start",
            |_, _| {},
            None,
            |_, m| {
                m.lease_start(&caller(), &vmm(), &[a(NIC), a(NIC2)])
                    .map(drop)
            },
        ),
        (
            "lease end",
            |_, m| {
                m.lease_start(&caller(), &vmm(), &[a(NIC), a(NIC2)])
                    .unwrap();
            },
            None,
            |_, m| m.lease_end(&caller(), &vmm()).map(drop),
        ),
        (
            "hotplug claim (a configured device appears)",
            |h, m| {
                h.write_config(&format!("version = 1\n[[device]]\naddress = \"{NIC2}\"\n"));
                m.reload();
                h.sim.remove_device(a(NIC2)).unwrap();
                m.device_events(&caller(), &BTreeSet::new(), &[a(NIC2)].into())
                    .unwrap();
            },
            Some(|h| h.sim.add_device(&nic2_device()).unwrap()),
            |_, m| {
                let report = m.device_events(&caller(), &[a(NIC2)].into(), &BTreeSet::new())?;
                match report.apply.failed.first() {
                    None => Ok(()),
                    Some(f) => Err(Error::Failed(f.reason.clone())),
                }
            },
        ),
        // One entry each: apply carries out entries independently (each all or nothing).
        (
            "apply [[device]]",
            |_, _| {},
            None,
            |h, m| {
                apply(
                    h,
                    m,
                    &format!("[[device]]\naddress = \"{PAIR0}\"\ngroup = true\n"),
                )
            },
        ),
        (
            "apply [[sriov]]",
            |_, _| {},
            None,
            |h, m| {
                apply(
                    h,
                    m,
                    &format!("[[sriov]]\npf = \"{PF}\"\ncount = 3\nassign = [0, 2]\n"),
                )
            },
        ),
    ]
}

/// A lease owner that no process check ends at a restart (a libvirt one would be stale there,
/// with no QEMU running).
fn vmm() -> LeaseOwner {
    "vmm:vm1".parse().unwrap()
}

/// NIC2 as the common host has it, to bring it back after a removal.
fn nic2_device() -> SimDevice {
    let mut nic2 = SimDevice::new(a(NIC2), 0x020000, Some("igb"), 6);
    nic2.device_id = 0x10c9;
    nic2
}

/// Writes a config of `entries`, reloads it and applies it; a failed entry is an error.
fn apply(host: &Host, m: &Engine, entries: &str) -> Result<(), Error> {
    host.write_config(&format!("version = 1\n{entries}"));
    m.reload();
    let report = m.apply(&caller(), false)?;
    match report.failed.first() {
        None => Ok(()),
        Some(f) => Err(Error::Failed(f.reason.clone())),
    }
}

/// Runs `setup` on a fresh host (in an engine of its own, then closed, so that the next one
/// starts from a quiet state) and returns the host.
fn prepared(setup: Setup) -> Host {
    let host = sriov_host();
    {
        let (m, _) = host.open();
        setup(&host, &m);
    }
    host
}

#[test]
fn a_failure_of_any_write_undoes_everything_the_operation_did() {
    let mut covered = 0;
    for (name, setup, arrive, op) in operations() {
        // How many writes a successful run makes.
        let host = prepared(setup);
        let (m, _) = host.open();
        arrive.inspect(|f| f(&host));
        let before = host.sim.writes().len();
        op(&host, &m).unwrap();
        let writes = host.sim.writes().len() - before;
        assert!(writes > 0, "{name} writes nothing");
        for n in 1..=writes {
            let host = prepared(setup);
            let (m, _) = host.open();
            arrive.inspect(|f| f(&host));
            let expected = observe(&host);
            let assignments = m.assignments();
            host.sim.fail_nth_write(n, Errno::EIO);
            let err = op(&host, &m).unwrap_err();
            assert_ne!(err.kind(), ErrorKind::Busy, "{name}, write {n}: {err}");
            assert_eq!(observe(&host), expected, "{name}: write {n} failed: {err}");
            assert_eq!(m.assignments(), assignments, "{name}, write {n}");
            assert_eq!(journals(&host), 0, "{name}, write {n}");
            covered += 1;
        }
    }
    println!("failed writes covered: {covered}");
    assert!(covered >= 30, "{covered}");
}

#[test]
fn a_daemon_killed_before_any_step_converges_at_the_next_start() {
    let mut covered = 0;
    for (name, setup, arrive, op) in operations() {
        let mut step = 0;
        loop {
            let host = prepared(setup);
            let finished = {
                let mut options = EngineOptions::for_root(&host.root());
                options.die_before_step = Some(step);
                let (m, _) = Engine::open_with(host.config(), options).unwrap();
                arrive.inspect(|f| f(&host));
                op(&host, &m).is_ok()
            };
            if finished {
                // Past the last step: the plan ran to its end.
                break;
            }
            let (m, report) = host.open();
            let end = observe(&host);
            assert_eq!(
                journals(&host),
                0,
                "{name}, killed before step {step}: {report:?}"
            );
            // Nothing driverless by accident: every function that had a driver has one.
            let reference = prepared(setup);
            arrive.inspect(|f| f(&reference));
            for (function, was) in observe(&reference) {
                if function.starts_with("0000:") && !was.starts_with("None") {
                    let now = end.get(&function).cloned().unwrap_or_default();
                    assert!(
                        !now.starts_with("None")
                            || !host.root().pci_device_dir(a(&function)).exists(),
                        "{name}, killed before step {step}: {function} is driverless ({report:?})"
                    );
                }
            }
            // state.toml matches the kernel: every assignment is in effect.
            for x in m.status().assignments {
                assert!(
                    x.refused.is_none() && x.state.is_none(),
                    "{name}, killed before step {step}: {x:?}"
                );
            }
            // And nothing is left to do for what was stored.
            let again = m.apply(&caller(), true).unwrap();
            assert!(
                again.changes.is_empty() && again.vfs.is_empty(),
                "{name}, step {step}: {again:?}"
            );
            step += 1;
            covered += 1;
        }
        assert!(step > 0, "{name} has no step to die before");
    }
    println!("kill points covered: {covered}");
    assert!(covered >= 25, "{covered}");
}
