//! Persistence and recovery: state.toml across restarts, identity checks at start, crash
//! recovery from the journal, atomic and versioned state.

#![allow(clippy::unwrap_used)]

use crate::common::*;
use nix::errno::Errno;
use passthroughd::Engine;
use passthroughd::engine::plan::{
    Claim, ClaimRecord, LockKey, OnCrash, Operation, Plan, Step, Target,
};
use passthroughd::kernel::Kernel;
use passthroughd::store::journal::JournalEntry;
use passthroughd_proto::{AssignOptions, DeviceIdentity, ReleaseOptions};
use passthroughd_testkit::sim::SimOp;

const RUNTIME: AssignOptions = AssignOptions {
    runtime: true,
    group: false,
    force: false,
};

fn nic_identity() -> DeviceIdentity {
    DeviceIdentity {
        vendor_id: 0x8086,
        device_id: 0x10c9,
        subsystem_vendor_id: 0x8086,
        subsystem_device_id: 0xa01f,
    }
}

/// What a reboot does to the kernel side: the host driver is back, no override.
fn reboot(host: &Host, addr: &str) {
    let root = host.root();
    let a = a(addr);
    host.sim
        .write(&root.pci_device_attr(a, "driver_override"), b"\n")
        .unwrap();
    host.sim
        .write(&root.pci_device_unbind(a), a.to_string().as_bytes())
        .unwrap();
    host.sim
        .write(&root.pci_drivers_probe(), a.to_string().as_bytes())
        .unwrap();
}

#[test]
fn persistent_assignments_survive_restarts_with_their_identity() {
    let host = Host::new();
    {
        let (m, _) = host.open();
        m.assign(&caller(), &[a(NIC)], AssignOptions::default())
            .unwrap();
    }
    let text = host.state_text();
    assert!(text.starts_with("version = 3"), "{text}");
    for needle in [
        "address = \"0000:01:00.0\"",
        "vendor_id = \"8086\"",
        "device_id = \"10c9\"",
        "subsystem_vendor_id = \"8086\"",
        "subsystem_device_id = \"a01f\"",
        "previous_driver = \"igb\"",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let (m, report) = host.open();
    assert_eq!(report.applied, vec![a(NIC)]);
    let assignments = m.assignments();
    assert_eq!(assignments.len(), 1);
    assert!(assignments[0].persistent);
    assert_eq!(assignments[0].previous_driver.as_deref(), Some("igb"));
    drop(m);

    // After a reboot the kernel has it on igb again; the start re-applies it.
    reboot(&host, NIC);
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    let (m, report) = host.open();
    assert_eq!(report.applied, vec![a(NIC)]);
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    // And release goes back to the recorded driver and forgets it.
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert!(!host.state_text().contains(NIC));
    assert_eq!(host.state_files(), ["state.toml"]);
}

#[test]
fn a_runtime_assignment_is_not_persisted() {
    let host = Host::new();
    {
        let (m, _) = host.open();
        m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap();
        assert!(!m.assignments()[0].persistent);
    }
    assert!(!host.state_text().contains(NIC), "{}", host.state_text());
    reboot(&host, NIC);
    let (m, report) = host.open();
    assert!(report.applied.is_empty());
    assert!(m.assignments().is_empty());
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}

#[test]
fn a_runtime_release_keeps_the_persisted_assignment() {
    let host = Host::new();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    m.release(
        &caller(),
        &[a(NIC)],
        ReleaseOptions {
            runtime: true,
            reset: false,
        },
    )
    .unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert!(host.state_text().contains(NIC));
    drop(m);
    let (_m, report) = host.open();
    assert_eq!(report.applied, vec![a(NIC)]);
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
}

#[test]
fn an_address_holding_another_device_is_refused_at_start() {
    let host = Host::new();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    std::fs::write(
        host.state_dir().join("state.toml"),
        format!(
            "version = 1\n\n[[assignment]]\naddress = \"{NIC}\"\nvendor_id = \"15b3\"\n\
             device_id = \"1017\"\nsubsystem_vendor_id = \"15b3\"\nsubsystem_device_id = \"0020\"\n\
             previous_driver = \"mlx5_core\"\n"
        ),
    )
    .unwrap();
    let before = host.state_text();
    let (m, report) = host.open();
    assert_eq!(report.refused.len(), 1);
    assert!(
        report.refused[0].1.contains("8086:10c9"),
        "{:?}",
        report.refused
    );
    assert!(host.sim.writes().is_empty(), "nothing bound");
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    let status = m.status();
    assert_eq!(status.assignments.len(), 1);
    let refused = status.assignments[0].refused.as_deref().unwrap();
    assert!(refused.contains("15b3:1017"), "{refused}");
    assert!(status.last_errors[0].contains(NIC));
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        host.state_text(),
        before,
        "kept for when the device comes back"
    );
}

#[test]
fn an_unknown_state_version_is_rejected_and_left_alone() {
    let host = Host::new();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    let path = host.state_dir().join("state.toml");
    std::fs::write(&path, "version = 7\n").unwrap();
    let err = Engine::open(host.config()).unwrap_err();
    assert!(err.to_string().contains("version 7"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "version = 7\n");
    assert!(host.sim.writes().is_empty());
}

/// The daemon died between unbind and probe: the device is unbound with the override set,
/// and the journal says what was going on.
fn crash_between_unbind_and_probe(host: &Host, persistent: bool) {
    let root = host.root();
    let nic = a(NIC);
    host.sim.load_module("vfio-pci").unwrap();
    host.sim
        .write(&root.pci_device_attr(nic, "driver_override"), b"vfio-pci")
        .unwrap();
    host.sim
        .write(&root.pci_device_unbind(nic), NIC.as_bytes())
        .unwrap();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    // The plan an `assign` journals (see planner/assign.rs).
    let target = Target::Function(nic);
    let mut plan = Plan::new(
        Operation::Assign,
        if persistent {
            OnCrash::Finish
        } else {
            OnCrash::Undo
        },
        [LockKey::Group(4)].into(),
    );
    plan.steps = vec![
        Step::Guard {
            functions: vec![nic],
        },
        Step::LoadVfio,
        Step::Bind {
            target,
            from: Some("igb".into()),
        },
        Step::Claim(ClaimRecord {
            target,
            identity: nic_identity(),
            previous_driver: Some("igb".into()),
            claim: if persistent {
                Claim::Request
            } else {
                Claim::Runtime
            },
        }),
    ];
    // Dropped without finish(): the file stays, as after SIGKILL.
    JournalEntry::begin(&host.state_dir(), &plan).unwrap();
    assert_eq!(host.driver(NIC), None);
}

#[test]
fn a_persistent_assign_interrupted_after_unbind_is_finished_at_start() {
    let host = Host::new();
    crash_between_unbind_and_probe(&host, true);
    let (m, report) = host.open();
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    assert!(
        report.recovered[0].contains("finished"),
        "{:?}",
        report.recovered
    );
    assert!(host.state_text().contains("previous_driver = \"igb\""));
    assert_eq!(m.assignments()[0].previous_driver.as_deref(), Some("igb"));
    assert_eq!(host.state_files(), ["state.toml"], "journal gone");
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}

#[test]
fn a_runtime_assign_interrupted_after_unbind_is_rolled_back_at_start() {
    let host = Host::new();
    crash_between_unbind_and_probe(&host, false);
    let (m, report) = host.open();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.sim.override_of(a(NIC)), None);
    assert!(
        report.recovered[0].contains("rolled back"),
        "{:?}",
        report.recovered
    );
    assert!(m.assignments().is_empty());
    assert!(!host.state_text().contains(NIC));
    assert!(!host.state_files().iter().any(|n| n.starts_with("journal")));
}

#[test]
fn a_failed_rollback_leaves_a_journal_that_the_next_start_completes() {
    let host = Host::new();
    {
        let (m, _) = host.open();
        // The probe fails, and so does the probe of the rollback: the device is left unbound.
        host.sim.fail_next(SimOp::Probe, a(NIC), Errno::EIO);
        host.sim.set_native(a(NIC), "not-loaded");
        m.assign(&caller(), &[a(NIC)], AssignOptions::default())
            .unwrap_err();
        assert_eq!(host.driver(NIC), None);
        assert!(host.state_files().iter().any(|n| n.starts_with("journal")));
    }
    host.sim.set_native(a(NIC), "igb");
    let (m, report) = host.open();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"), "{:?}", report);
    assert!(m.assignments().is_empty());
    assert!(!host.state_text().contains(NIC));
    assert!(!host.state_files().iter().any(|n| n.starts_with("journal")));
}
