//! Assign and release end to end over the simulated kernel: the bind sequence, rollback on
//! every kind of failure, group policy, input errors and concurrency.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::*;
use nix::errno::Errno;
use passthroughd::ErrorKind;
use passthroughd::engine::EngineOptions;
use passthroughd_proto::{AssignOptions, ReleaseOptions};
use passthroughd_testkit::sim::SimOp;

const RUNTIME: AssignOptions = AssignOptions {
    runtime: true,
    group: false,
    force: false,
};

#[test]
fn assign_and_release_round_trip_restores_the_original_driver() {
    let host = Host::new();
    let (m, _) = host.open();
    let changes = m
        .assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].old_driver.as_deref(), Some("igb"));
    assert_eq!(changes[0].new_driver.as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(host.sim.modules(), vec!["vfio-pci".to_owned()]);
    // The documented sequence, in order.
    let writes: Vec<String> = host.sim.writes().iter().map(|w| w.path.clone()).collect();
    assert_eq!(
        writes,
        [
            format!("sys/bus/pci/devices/{NIC}/driver_override"),
            format!("sys/bus/pci/devices/{NIC}/driver/unbind"),
            "sys/bus/pci/drivers_probe".to_owned(),
        ]
    );
    let inventory = m.inventory().unwrap();
    assert_eq!(
        inventory.function(a(NIC)).unwrap().driver.as_deref(),
        Some("vfio-pci"),
        "the inventory reads uevent, which must agree with the driver link"
    );
    assert_eq!(m.assignments().len(), 1);

    let released = m
        .release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(released[0].new_driver.as_deref(), Some("igb"));
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.sim.override_of(a(NIC)), None, "override cleared");
    assert!(m.assignments().is_empty());
    assert_eq!(
        host.state_files(),
        ["state.toml"],
        "journal removed, no temp files"
    );
}

#[test]
fn a_release_that_cannot_restore_the_old_driver_leaves_the_device_on_vfio_not_driverless() {
    let host = Host::new();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap();
    // As if igb had been bound by hand: its id table does not match, so a probe picks nothing.
    host.sim.set_native(a(NIC), "none-matches");
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap_err();
    // bind through drivers/igb/bind is refused (ENODEV) by a non-matching driver, so the
    // device must not be left driverless: it stays on vfio-pci.
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    host.sim.set_native(a(NIC), "igb");
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}

#[test]
fn a_probe_that_binds_nothing_is_an_error_and_the_old_driver_comes_back() {
    let host = Host::new();
    let (m, _) = host.open();
    host.sim.probe_binds_nothing(a(NIC));
    let err = m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed);
    let msg = err.to_string();
    assert!(msg.contains("bound nothing"), "{msg}");
    assert!(msg.contains("back on igb"), "{msg}");
    assert!(!msg.contains('\n'));
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.sim.override_of(a(NIC)), None);
    assert!(m.assignments().is_empty());
    assert_eq!(m.status().last_errors.len(), 1);
}

#[test]
fn ebusy_from_the_probe_rolls_back() {
    let host = Host::new();
    let (m, _) = host.open();
    host.sim.fail_next(SimOp::Probe, a(NIC), Errno::EBUSY);
    let err = m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap_err();
    assert!(err.to_string().contains("busy"), "{err}");
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.sim.override_of(a(NIC)), None);
}

#[test]
fn a_failure_on_the_second_function_puts_the_first_back() {
    let host = Host::new();
    let (m, _) = host.open();
    host.sim.fail_next(SimOp::Unbind, a(PAIR1), Errno::EIO);
    let err = m
        .assign(&caller(), &[a(PAIR0), a(PAIR1)], AssignOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("put back"), "{err}");
    assert_eq!(host.driver(PAIR0).as_deref(), Some("e1000e"));
    assert_eq!(host.driver(PAIR1).as_deref(), Some("e1000e"));
    assert!(!host.state_text().contains(PAIR0), "nothing persisted");
}

#[test]
fn a_device_vanishing_mid_operation_is_reported_and_nothing_is_recorded() {
    let host = Host::new();
    let (m, _) = host.open();
    host.sim.vanish_after(SimOp::Unbind, a(NIC));
    let err = m
        .assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("disappeared"), "{err}");
    assert!(m.assignments().is_empty());
    assert!(!host.state_text().contains(NIC));
    assert!(
        !host.state_files().iter().any(|n| n.starts_with("journal")),
        "{:?}",
        host.state_files()
    );
    // A later request names the device as missing.
    let err = m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[test]
fn bridges_are_refused_before_any_write() {
    let host = Host::new();
    let (m, _) = host.open();
    for bridge in [ROOT_PORT, HOST_BRIDGE] {
        let options = AssignOptions {
            force: true,
            group: true,
            ..AssignOptions::default()
        };
        let err = m.assign(&caller(), &[a(bridge)], options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused);
        assert!(err.to_string().contains("bridge"), "{err}");
    }
    assert!(host.sim.writes().is_empty(), "{:?}", host.sim.writes());
    assert!(host.sim.modules().is_empty());
    assert_eq!(host.driver(ROOT_PORT).as_deref(), Some("pcieport"));
}

#[test]
fn a_shared_group_is_refused_alone_and_accepted_with_group() {
    let host = Host::new();
    let (m, _) = host.open();
    let err = m.assign(&caller(), &[a(PAIR0)], RUNTIME).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    let msg = err.to_string();
    assert!(msg.contains(&format!("{PAIR1} (bound to e1000e)")), "{msg}");
    assert!(msg.contains("--group"), "{msg}");
    assert!(host.sim.writes().is_empty());

    let changes = m
        .assign(
            &caller(),
            &[a(PAIR0)],
            AssignOptions {
                group: true,
                ..RUNTIME
            },
        )
        .unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(host.driver(PAIR0).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver(PAIR1).as_deref(), Some("vfio-pci"));
    let group = m.inventory().unwrap().group(5).unwrap().clone();
    assert!(group.viable, "{group:?}");
}

#[test]
fn bad_requests_change_nothing() {
    let host = Host::new();
    let (m, _) = host.open();
    let dup = m.assign(&caller(), &[a(NIC), a(NIC)], RUNTIME).unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::InvalidArgument);
    let none = m.assign(&caller(), &[], RUNTIME).unwrap_err();
    assert_eq!(none.kind(), ErrorKind::InvalidArgument);
    let missing = m
        .assign(&caller(), &[a("0000:09:00.0")], RUNTIME)
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    let not_assigned = m
        .release(&caller(), &[a(NIC2)], ReleaseOptions::default())
        .unwrap_err();
    assert_eq!(not_assigned.kind(), ErrorKind::InvalidArgument);
    assert!(not_assigned.to_string().contains("not assigned"));
    assert!(host.sim.writes().is_empty());
    assert_eq!(m.status().last_errors.len(), 4);
}

#[test]
fn assigning_an_assigned_function_is_a_no_op() {
    let host = Host::new();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap();
    let writes = host.sim.writes().len();
    let again = m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap();
    assert!(again.is_empty());
    assert_eq!(host.sim.writes().len(), writes, "no write for a no-op");
    // And it remembers the driver from before the first assign.
    assert_eq!(m.assignments()[0].previous_driver.as_deref(), Some("igb"));
}

#[test]
fn pfs_with_vfs_are_refused_before_any_write() {
    let host = Host::new();
    let mut pf =
        passthroughd_testkit::sim::SimDevice::new(a("0000:05:00.0"), 0x020000, Some("igb"), 9);
    pf.sriov_numvfs = 2;
    host.sim.add_device(&pf).unwrap();
    let (m, _) = host.open();
    let err = m.assign(&caller(), &[pf.address], RUNTIME).unwrap_err();
    assert!(err.to_string().contains("VFs enabled"), "{err}");
    assert!(host.sim.writes().is_empty());
}

#[test]
fn assigns_on_different_groups_run_in_parallel() {
    let host = Host::new();
    let (m, _) = host.open();
    // Long enough that scheduling noise on a loaded 2-core machine stays far below it.
    let delay = Duration::from_millis(700);
    host.sim.delay(SimOp::Probe, a(NIC), delay);
    host.sim.delay(SimOp::Probe, a(NIC2), delay);
    let start = Instant::now();
    std::thread::scope(|s| {
        let one = s.spawn(|| m.assign(&caller(), &[a(NIC)], RUNTIME));
        let two = s.spawn(|| m.assign(&caller(), &[a(NIC2)], RUNTIME));
        one.join().unwrap().unwrap();
        two.join().unwrap().unwrap();
    });
    let took = start.elapsed();
    assert!(
        took < delay * 2 - Duration::from_millis(50),
        "serialized: {took:?}"
    );
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));
    assert_eq!(m.assignments().len(), 2);
}

#[test]
fn one_request_binds_its_groups_side_by_side() {
    let host = Host::new();
    let (m, _) = host.open();
    // Long enough that scheduling noise on a loaded 2-core machine stays far below it.
    let delay = Duration::from_millis(700);
    host.sim.delay(SimOp::Probe, a(NIC), delay);
    host.sim.delay(SimOp::Probe, a(NIC2), delay);
    let start = Instant::now();
    let changes = m.assign(&caller(), &[a(NIC2), a(NIC)], RUNTIME).unwrap();
    let took = start.elapsed();
    assert!(
        took < delay * 2 - Duration::from_millis(50),
        "groups bound one after another: {took:?}"
    );
    let order: Vec<_> = changes.iter().map(|c| c.address).collect();
    assert_eq!(
        order,
        vec![a(NIC), a(NIC2)],
        "changes come back in address order"
    );
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));
}

#[test]
fn a_failure_in_one_group_puts_back_a_group_bound_beside_it() {
    let host = Host::new();
    let (m, _) = host.open();
    // NIC's bind is slow, so it is still running (and then finishes) when NIC2's probe fails.
    host.sim
        .delay(SimOp::Probe, a(NIC), Duration::from_millis(200));
    host.sim.fail_next(SimOp::Probe, a(NIC2), Errno::EIO);
    let err = m
        .assign(&caller(), &[a(NIC), a(NIC2)], AssignOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains(NIC2), "{err}");
    assert!(err.to_string().contains("put back"), "{err}");
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.driver(NIC2).as_deref(), Some("igb"));
    assert_eq!(host.sim.override_of(a(NIC)), None);
    assert!(m.assignments().is_empty());
    assert!(!host.state_text().contains(NIC), "nothing persisted");
}

#[test]
fn a_request_on_a_busy_group_waits_briefly_then_gets_busy_and_readers_never_wait() {
    let host = Host::new();
    let mut options = EngineOptions::for_root(&host.root());
    options.group_wait = Duration::from_millis(100);
    let (m, _) = host.open_with(options);
    host.sim
        .delay(SimOp::Probe, a(NIC), Duration::from_millis(800));
    std::thread::scope(|s| {
        let slow = s.spawn(|| m.assign(&caller(), &[a(NIC)], RUNTIME));
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        m.inventory().unwrap();
        m.status();
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "readers blocked"
        );
        let err = m
            .release(&caller(), &[a(NIC)], ReleaseOptions::default())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        assert!(err.to_string().contains("IOMMU group 4"), "{err}");
        slow.join().unwrap().unwrap();
    });
}

#[test]
fn a_write_that_hangs_is_cut_off_with_busy() {
    let host = Host::new();
    let mut options = EngineOptions::for_root(&host.root());
    options.write_timeout = Duration::from_millis(150);
    let (m, _) = host.open_with(options);
    host.sim
        .delay(SimOp::Unbind, a(NIC), Duration::from_millis(1000));
    let start = Instant::now();
    let err = m.assign(&caller(), &[a(NIC)], RUNTIME).unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(900));
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("did not finish"), "{err}");
}
