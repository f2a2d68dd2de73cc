//! SR-IOV VFs over the simulated kernel: create (with and without assign), resize through 0,
//! the wait for VFs and its timeout, partial failure and rollback, destroy and its refusals,
//! persistence across restarts, identity checks, crash recovery and bad inputs.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use nix::errno::Errno;
use passthroughd::engine::EngineOptions;
use passthroughd::engine::plan::{
    Claim, LockKey, OnCrash, Operation, Plan, Step, Target, VfSetRecord,
};
use passthroughd::store::journal::JournalEntry;
use passthroughd::{Engine, ErrorKind};
use passthroughd_proto::{AssignOptions, DeviceIdentity, PciAddress, VfCreateOptions};
use passthroughd_testkit::sim::{SimDevice, SimOp, SimSriov};

/// Group of VF 0; VF n is in group 20 + n.
const VF_GROUP: u32 = 20;

fn vf(host: &Host, index: u32) -> PciAddress {
    host.sim.vf_address(a(PF), index).unwrap()
}

fn numvfs(host: &Host) -> String {
    std::fs::read_to_string(host.root().pci_device_attr(a(PF), "sriov_numvfs"))
        .unwrap()
        .trim()
        .to_owned()
}

fn autoprobe(host: &Host) -> String {
    std::fs::read_to_string(
        host.root()
            .pci_device_attr(a(PF), "sriov_drivers_autoprobe"),
    )
    .unwrap()
    .trim()
    .to_owned()
}

/// The values written to the PF's `attr`, in order.
fn pf_writes(host: &Host, attr: &str) -> Vec<String> {
    let path = format!("sys/bus/pci/devices/{PF}/{attr}");
    host.sim
        .writes()
        .into_iter()
        .filter(|w| w.path == path)
        .map(|w| w.value)
        .collect()
}

fn opts(assign: bool, runtime: bool) -> VfCreateOptions {
    VfCreateOptions {
        assign,
        runtime,
        force: false,
    }
}

fn fast() -> EngineOptions {
    let mut o = EngineOptions::for_root(&passthroughd::SysfsRoot::new("/nonexistent"));
    o.vf_wait = Duration::from_millis(200);
    o.group_wait = Duration::from_millis(50);
    o
}

#[test]
fn create_with_assign_never_lets_the_host_vf_driver_bind() {
    let host = sriov_host();
    let (m, _) = host.open();
    let vfs = m.vf_create(&caller(), a(PF), 4, opts(true, false)).unwrap();
    assert_eq!(vfs.len(), 4);
    for (i, v) in vfs.iter().enumerate() {
        assert_eq!(v.index as usize, i);
        assert_eq!(v.address, vf(&host, v.index));
        assert_eq!(v.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(v.iommu_group, Some(VF_GROUP + v.index));
        assert!(v.assigned);
        assert_eq!(host.sim.bind_history(v.address), ["vfio-pci"], "VF {i}");
    }
    assert_eq!(vfs[1].address.to_string(), "0000:05:10.2");
    assert_eq!(numvfs(&host), "4");
    // Autoprobe off before numvfs, restored after.
    assert_eq!(pf_writes(&host, "sriov_drivers_autoprobe"), ["0", "1"]);
    assert_eq!(pf_writes(&host, "sriov_numvfs"), ["4"]);
    let order: Vec<String> = host
        .sim
        .writes()
        .into_iter()
        .filter(|w| w.path.ends_with("sriov_drivers_autoprobe") || w.path.ends_with("numvfs"))
        .map(|w| w.value)
        .collect();
    assert_eq!(order, ["0", "4", "1"]);
    assert_eq!(autoprobe(&host), "1");
    let state = host.state_text();
    assert!(state.starts_with("version = 3"), "{state}");
    assert!(
        state.contains("[[vfs]]") && state.contains("count = 4"),
        "{state}"
    );
    assert!(state.contains("assigned = [0, 1, 2, 3]"), "{state}");
    assert!(
        !state.contains("05:10"),
        "VFs are never recorded by address: {state}"
    );
    assert_eq!(host.state_files(), ["state.toml"]);
    // Same count again: nothing written, same answer.
    let before = host.sim.writes().len();
    assert_eq!(
        m.vf_create(&caller(), a(PF), 4, opts(true, false)).unwrap(),
        vfs
    );
    assert_eq!(host.sim.writes().len(), before);
    assert_eq!(m.vf_list(a(PF)).unwrap(), vfs);
}

#[test]
fn create_without_assign_leaves_vfs_to_the_host_driver() {
    let host = sriov_host();
    let (m, _) = host.open();
    let vfs = m.vf_create(&caller(), a(PF), 2, opts(false, true)).unwrap();
    assert!(
        vfs.iter()
            .all(|v| v.driver.as_deref() == Some("igbvf") && !v.assigned)
    );
    assert!(pf_writes(&host, "sriov_drivers_autoprobe").is_empty());
    assert!(
        !host.state_text().contains("[[vfs]]"),
        "runtime is not persisted"
    );
}

#[test]
fn a_resize_goes_through_zero_because_the_kernel_answers_ebusy() {
    let host = sriov_host();
    // The kernel's own answers first.
    let path = host.root().pci_device_attr(a(PF), "sriov_numvfs");
    use passthroughd::kernel::Kernel;
    let w = |v: &str| host.sim.write(&path, v.as_bytes());
    w("2").unwrap();
    assert_eq!(
        w("3").unwrap_err().raw_os_error(),
        Some(Errno::EBUSY as i32)
    );
    w("2").unwrap();
    assert_eq!(
        w("8").unwrap_err().raw_os_error(),
        Some(Errno::ERANGE as i32)
    );
    for bad in [" 1", "1x", "abc", "-1", "65536"] {
        assert_eq!(
            w(bad).unwrap_err().raw_os_error(),
            Some(Errno::EINVAL as i32),
            "{bad:?}"
        );
    }
    w("0").unwrap();
    w("0x1").unwrap();
    assert_eq!(numvfs(&host), "1");
    w("0\n").unwrap();

    let (m, _) = host.open();
    m.vf_create(&caller(), a(PF), 2, opts(false, true)).unwrap();
    let vfs = m.vf_create(&caller(), a(PF), 5, opts(true, true)).unwrap();
    assert_eq!(vfs.len(), 5);
    assert!(vfs.iter().all(|v| v.driver.as_deref() == Some("vfio-pci")));
    let all = pf_writes(&host, "sriov_numvfs");
    assert_eq!(all[all.len() - 3..], ["2", "0", "5"]);
}

#[test]
fn vfs_that_never_appear_time_out_and_everything_is_put_back() {
    let mut config = SimSriov::igb(VF_GROUP);
    config.hold = true;
    let host = sriov_host_with(config);
    let (m, _) = host.open_with(fast());
    let err = m
        .vf_create(&caller(), a(PF), 3, opts(true, false))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failed);
    let text = err.to_string();
    assert!(
        text.contains("timed out after 200 ms waiting for the VFs of 0000:05:00.0"),
        "{text}"
    );
    assert!(text.contains("rolled back"), "{text}");
    assert_eq!(numvfs(&host), "0");
    assert_eq!(autoprobe(&host), "1");
    assert!(!host.state_text().contains("[[vfs]]"));
    assert!(!host.state_files().iter().any(|n| n.starts_with("journal")));
}

#[test]
fn a_failed_bind_of_vf_k_releases_the_bound_ones_and_restores_count_and_autoprobe() {
    let host = sriov_host();
    let (m, _) = host.open();
    m.vf_create(&caller(), a(PF), 2, opts(false, true)).unwrap();
    let before_state = host.state_text();
    host.sim.fail_next(SimOp::Probe, vf(&host, 2), Errno::EIO);
    let err = m
        .vf_create(&caller(), a(PF), 4, opts(true, false))
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("binding VF 2 of 0000:05:00.0"), "{text}");
    assert!(text.contains("rolled back: 2 VFs, 2 released"), "{text}");
    // Count back to 2 through 0, autoprobe back on, the old VFs on their host driver.
    assert_eq!(pf_writes(&host, "sriov_numvfs"), ["2", "0", "4", "0", "2"]);
    assert_eq!(numvfs(&host), "2");
    assert_eq!(autoprobe(&host), "1");
    for i in 0..2 {
        assert_eq!(host.sim.driver_of(vf(&host, i)).as_deref(), Some("igbvf"));
    }
    // VF 0 and 1 were on vfio-pci and were released before the count went back.
    let released = host
        .sim
        .writes()
        .iter()
        .filter(|w| w.path.ends_with("driver_override") && w.value == "\n")
        .count();
    assert!(released >= 2, "{:?}", host.sim.writes());
    assert_eq!(host.state_text(), before_state);
    assert!(!host.state_files().iter().any(|n| n.starts_with("journal")));
}

#[test]
fn a_failed_resize_puts_the_vfs_assigned_before_back_on_vfio() {
    let host = sriov_host();
    let (m, _) = host.open();
    m.vf_create(&caller(), a(PF), 2, opts(true, true)).unwrap();
    host.sim.fail_next(SimOp::Probe, vf(&host, 3), Errno::EIO);
    let err = m
        .vf_create(&caller(), a(PF), 4, opts(true, true))
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("binding VF 3 of 0000:05:00.0"), "{text}");
    assert!(text.contains("VFs 0, 1 are back on vfio-pci"), "{text}");
    assert_eq!(numvfs(&host), "2");
    assert_eq!(autoprobe(&host), "1");
    for i in 0..2 {
        assert_eq!(
            host.sim.driver_of(vf(&host, i)).as_deref(),
            Some("vfio-pci")
        );
        let history = host.sim.bind_history(vf(&host, i));
        assert!(
            !history.iter().any(|d| d == "igbvf"),
            "VF {i} went through the host VF driver: {history:?}"
        );
    }
    let listed = m.vf_list(a(PF)).unwrap();
    assert!(listed.iter().all(|v| v.assigned), "{listed:?}");
    assert!(!host.state_files().iter().any(|n| n.starts_with("journal")));
}

#[test]
fn a_driver_that_enables_fewer_vfs_is_noticed() {
    let mut config = SimSriov::igb(VF_GROUP);
    config.limit = Some(2);
    let host = sriov_host_with(config);
    let (m, _) = host.open();
    let err = m
        .vf_create(&caller(), a(PF), 4, opts(false, true))
        .unwrap_err();
    assert!(err.to_string().contains("enabled 2 of the 4 VFs"), "{err}");
    assert_eq!(numvfs(&host), "0");
}

#[test]
fn persistent_vfs_come_back_at_start_with_the_same_indexes_assigned() {
    let host = sriov_host();
    {
        let (m, _) = host.open();
        m.vf_create(&caller(), a(PF), 3, opts(true, false)).unwrap();
    }
    // A reboot: the VFs are gone.
    std::fs::create_dir_all(host.state_dir()).unwrap();
    use passthroughd::kernel::Kernel;
    host.sim
        .write(&host.root().pci_device_attr(a(PF), "sriov_numvfs"), b"0")
        .unwrap();
    assert!(!host.root().pci_device_dir(vf(&host, 0)).exists());
    let (m, report) = host.open();
    assert_eq!(report.vfs, vec![a(PF)]);
    let vfs = m.vf_list(a(PF)).unwrap();
    assert_eq!(vfs.len(), 3);
    assert!(
        vfs.iter()
            .all(|v| v.driver.as_deref() == Some("vfio-pci") && v.assigned)
    );

    // Only some indexes assigned: those go to vfio-pci, the others get the host VF driver.
    drop(m);
    host.sim
        .write(&host.root().pci_device_attr(a(PF), "sriov_numvfs"), b"0")
        .unwrap();
    let text = host
        .state_text()
        .replace("assigned = [0, 1, 2]", "assigned = [1]");
    std::fs::write(host.state_dir().join("state.toml"), text).unwrap();
    let (m, _) = host.open();
    let vfs = m.vf_list(a(PF)).unwrap();
    let drivers: Vec<_> = vfs
        .iter()
        .map(|v| v.driver.clone().unwrap_or_default())
        .collect();
    assert_eq!(drivers, ["igbvf", "vfio-pci", "igbvf"]);
    assert_eq!(
        host.sim
            .bind_history(vf(&host, 1))
            .last()
            .map(String::as_str),
        Some("vfio-pci")
    );
    assert_eq!(autoprobe(&host), "1");
}

#[test]
fn a_pf_whose_identity_changed_is_refused_at_start() {
    let host = sriov_host();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    std::fs::write(
        host.state_dir().join("state.toml"),
        format!(
            "version = 2\n\n[[vfs]]\npf = \"{PF}\"\nvendor_id = \"15b3\"\ndevice_id = \"1017\"\n\
             subsystem_vendor_id = \"15b3\"\nsubsystem_device_id = \"0020\"\ncount = 2\n\
             assigned = [0]\n"
        ),
    )
    .unwrap();
    let before = host.state_text();
    let (m, report) = host.open();
    assert_eq!(report.refused.len(), 1);
    assert!(
        report.refused[0].1.contains("now holds 8086:10c9"),
        "{:?}",
        report.refused
    );
    assert_eq!(numvfs(&host), "0");
    assert!(pf_writes(&host, "sriov_numvfs").is_empty());
    assert_eq!(host.state_text(), before, "kept: the card may come back");
    let status = m.status();
    assert!(
        status
            .assignments
            .iter()
            .any(|x| x.address == a(PF) && x.refused.is_some())
    );
}

fn crash_between_create_and_assign(host: &Host, persistent: bool) {
    use passthroughd::kernel::Kernel;
    let root = host.root();
    host.sim
        .write(
            &root.pci_device_attr(a(PF), "sriov_drivers_autoprobe"),
            b"0",
        )
        .unwrap();
    host.sim
        .write(&root.pci_device_attr(a(PF), "sriov_numvfs"), b"3")
        .unwrap();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    // The plan a `vf create --count 3 --assign` journals (see planner/vfs.rs).
    let pf = a(PF);
    let vf = |index| Target::Vf { pf, index };
    let on_crash = if persistent {
        OnCrash::Finish
    } else {
        OnCrash::Undo
    };
    let mut plan = Plan::new(Operation::VfCreate, on_crash, [LockKey::Group(10)].into());
    plan.steps = vec![
        Step::Guard { functions: vec![] },
        Step::LoadVfio,
        Step::SetAutoprobe {
            pf,
            on: false,
            was: true,
        },
        Step::SetNumVfs {
            pf,
            count: 3,
            was: 0,
            was_on_vfio: vec![],
        },
        Step::Bind {
            target: vf(0),
            from: None,
        },
        Step::Bind {
            target: vf(1),
            from: None,
        },
        Step::Bind {
            target: vf(2),
            from: None,
        },
        Step::SetAutoprobe {
            pf,
            on: true,
            was: false,
        },
        Step::SetVfs {
            pf,
            now: Some(VfSetRecord {
                identity: DeviceIdentity {
                    vendor_id: 0x8086,
                    device_id: 0x10c9,
                    subsystem_vendor_id: 0x8086,
                    subsystem_device_id: 0xa01f,
                },
                count: 3,
                assigned: [0, 1, 2].into(),
                claim: if persistent {
                    Claim::Request
                } else {
                    Claim::Runtime
                },
            }),
            was: None,
        },
    ];
    JournalEntry::begin(&host.state_dir(), &plan).unwrap();
}

#[test]
fn a_crash_between_create_and_assign_is_finished_when_persistent() {
    let host = sriov_host();
    crash_between_create_and_assign(&host, true);
    let (m, report) = host.open();
    assert!(
        report
            .recovered
            .iter()
            .any(|l| l.contains("interrupted vf create finished")),
        "{:?}",
        report.recovered
    );
    let vfs = m.vf_list(a(PF)).unwrap();
    assert_eq!(vfs.len(), 3);
    for v in &vfs {
        assert_eq!(v.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(host.sim.bind_history(v.address), ["vfio-pci"]);
    }
    assert_eq!(autoprobe(&host), "1");
    assert!(host.state_text().contains("count = 3"));
    assert_eq!(host.state_files(), ["state.toml"]);
}

#[test]
fn a_crash_between_create_and_assign_is_rolled_back_when_runtime() {
    let host = sriov_host();
    crash_between_create_and_assign(&host, false);
    let (_m, report) = host.open();
    assert!(
        report
            .recovered
            .iter()
            .any(|l| l.contains("rolled back to 0 VFs")),
        "{:?}",
        report.recovered
    );
    assert_eq!(numvfs(&host), "0");
    assert_eq!(autoprobe(&host), "1");
    assert!(!host.state_files().iter().any(|n| n.starts_with("journal")));
}

#[test]
fn destroy_and_resize_are_refused_while_a_process_holds_a_vf_even_with_force() {
    let host = sriov_host();
    let (m, _) = host.open();
    m.vf_create(&caller(), a(PF), 2, opts(true, false)).unwrap();
    host.sim
        .add_process(4242, "qemu-system-x86", &[(7, "/dev/vfio/21")])
        .unwrap();
    let list = m.vf_list(a(PF)).unwrap();
    assert_eq!(
        list[1].in_use_by.as_deref(),
        Some("qemu-system-x86 (pid 4242)")
    );
    assert_eq!(list[0].in_use_by, None);
    let writes = host.sim.writes().len();
    for force in [false, true] {
        let err = m.vf_destroy(&caller(), a(PF), force).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy);
        assert!(
            err.to_string().contains("qemu-system-x86 (pid 4242)"),
            "{err}"
        );
        assert!(err.to_string().contains("VF 1 (0000:05:10.2)"), "{err}");
    }
    let err = m
        .vf_create(&caller(), a(PF), 4, opts(true, false))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("cannot resize"), "{err}");
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    std::fs::remove_dir_all(host.root().proc_dir().join("4242")).unwrap();

    // Assigned VFs (vf create --assign) are taken off vfio-pci only with --force.
    let err = m.vf_destroy(&caller(), a(PF), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(
        err.to_string()
            .contains("VF 0 (0000:05:10.0), VF 1 (0000:05:10.2) are assigned"),
        "{err}"
    );
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    let changes = m.vf_destroy(&caller(), a(PF), true).unwrap();
    assert_eq!(changes.len(), 2);
    assert!(
        changes
            .iter()
            .all(|c| c.old_driver.as_deref() == Some("vfio-pci"))
    );
    assert_eq!(numvfs(&host), "0");
    assert!(!host.state_text().contains("[[vfs]]"));
    assert!(m.vf_list(a(PF)).unwrap().is_empty());
    // Idempotent.
    assert!(m.vf_destroy(&caller(), a(PF), false).unwrap().is_empty());
}

#[test]
fn destroy_refuses_a_persistently_assigned_vf_unless_forced() {
    let host = sriov_host();
    let (m, _) = host.open();
    m.vf_create(&caller(), a(PF), 2, opts(false, true)).unwrap();
    m.assign(&caller(), &[vf(&host, 0)], AssignOptions::default())
        .unwrap();
    let err = m.vf_destroy(&caller(), a(PF), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(err.to_string().contains("assigned persistently"), "{err}");
    assert_eq!(numvfs(&host), "2");
    m.vf_destroy(&caller(), a(PF), true).unwrap();
    assert_eq!(numvfs(&host), "0");
    assert!(
        !host.state_text().contains("05:10.0"),
        "{}",
        host.state_text()
    );
    assert!(m.assignments().is_empty());
}

#[test]
fn bad_inputs_get_their_documented_error_and_change_nothing() {
    let host = sriov_host();
    // A PF on vfio-pci (a second PF) and one without a driver.
    let mut on_vfio = SimDevice::new(a("0000:06:00.0"), 0x020000, Some("vfio-pci"), 11);
    on_vfio.sriov_totalvfs = 7;
    host.sim.add_device(&on_vfio).unwrap();
    let mut sriov = SimSriov::igb(40);
    sriov.pf_driver = "igb".into();
    host.sim.configure_sriov(a("0000:06:00.0"), sriov);
    let (m, _) = host.open_with(fast());
    m.vf_create(&caller(), a(PF), 1, opts(false, true)).unwrap();
    let a_vf = vf(&host, 0).to_string();
    let writes = host.sim.writes().len();
    let state = host.state_text();
    let cases: &[(&str, u32, ErrorKind, &str)] = &[
        (PF, 8, ErrorKind::InvalidArgument, "supports at most 7 VFs"),
        (PF, 0, ErrorKind::InvalidArgument, "use vf destroy"),
        (
            &a_vf,
            1,
            ErrorKind::InvalidArgument,
            "is VF 0 of 0000:05:00.0, not a PF",
        ),
        (NIC2, 1, ErrorKind::InvalidArgument, "not SR-IOV capable"),
        ("0000:0a:00.0", 1, ErrorKind::NotFound, "no PCI function"),
        ("0000:06:00.0", 2, ErrorKind::Refused, "bound to vfio-pci"),
    ];
    for (pf, count, kind, text) in cases {
        let err = m
            .vf_create(&caller(), a(pf), *count, opts(true, false))
            .unwrap_err();
        assert_eq!(err.kind(), *kind, "{pf} {count}: {err}");
        assert!(err.to_string().contains(text), "{pf} {count}: {err}");
        assert!(!err.to_string().contains('\n'));
    }
    let err = m.vf_destroy(&caller(), a(NIC2), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = m.vf_list(a(&a_vf)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    assert_eq!(host.state_text(), state);
    assert_eq!(numvfs(&host), "1");
}

#[test]
fn a_pf_in_the_middle_of_another_operation_is_busy() {
    let host = sriov_host();
    host.sim
        .delay(SimOp::NumVfs, a(PF), Duration::from_millis(400));
    let (m, _) = host.open_with(fast());
    let m: Arc<Engine> = Arc::new(m);
    let first = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || m.vf_create(&caller(), a(PF), 2, opts(false, true)))
    };
    std::thread::sleep(Duration::from_millis(100));
    let writes = host.sim.writes().len();
    let err = m
        .vf_create(&caller(), a(PF), 3, opts(false, true))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(
        err.to_string().contains("busy with another request"),
        "{err}"
    );
    let err = m.vf_destroy(&caller(), a(PF), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    assert_eq!(first.join().unwrap().unwrap().len(), 2);
}

#[test]
fn a_new_vf_is_busy_for_other_requests_until_its_create_finishes() {
    let host = sriov_host();
    let (vf0, vf1) = (vf(&host, 0), vf(&host, 1));
    // VF 0's bind is slow, so the create is still setting up its VFs when VF 1 is asked for.
    host.sim
        .delay(SimOp::Probe, vf0, Duration::from_millis(500));
    let (m, _) = host.open_with(fast());
    let m: Arc<Engine> = Arc::new(m);
    let create = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || m.vf_create(&caller(), a(PF), 2, opts(true, true)))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while host.sim.driver_of(vf0).is_none() && host.sim.override_of(vf0).is_none() {
        assert!(std::time::Instant::now() < deadline, "VF 0 never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let runtime = AssignOptions {
        runtime: true,
        ..AssignOptions::default()
    };
    let err = m.assign(&caller(), &[vf1], runtime).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    let vfs = create.join().unwrap().unwrap();
    assert!(vfs.iter().all(|v| v.driver.as_deref() == Some("vfio-pci")));
    assert!(
        m.assignments().is_empty(),
        "the refused assign recorded nothing"
    );
}
