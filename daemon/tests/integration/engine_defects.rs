//! Regression tests for the defects an adversarial review found (issue 9), one or more per item,
//! over the simulated kernel. Each failed on the engine before the plan/executor reshape.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use passthroughd::engine::plan::{
    Claim, ClaimRecord, LockKey, OnCrash, Operation, Plan, Step, Target,
};
use passthroughd::engine::{Caller, EngineOptions};
use passthroughd::store::journal::JournalEntry;
use passthroughd::{Error, ErrorKind};
use passthroughd_proto::{AssignOptions, DeviceIdentity, ReleaseOptions, VfCreateOptions};
use passthroughd_testkit::sim::SimOp;

const RUNTIME: AssignOptions = AssignOptions {
    runtime: true,
    group: false,
    force: false,
};

fn quick(host: &Host) -> EngineOptions {
    let mut o = EngineOptions::for_root(&host.root());
    // Long enough that an ordinary write on a loaded 2-core machine never reaches it; the
    // delayed writes below last several times longer.
    o.write_timeout = Duration::from_millis(400);
    o.group_wait = Duration::from_millis(100);
    o.vf_wait = Duration::from_millis(500);
    o
}

fn journals(host: &Host) -> Vec<String> {
    host.state_files()
        .into_iter()
        .filter(|n| n.starts_with("journal"))
        .collect()
}

/// Waits (up to 20 s: a loaded 2-core machine is slow) until `done` holds.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn vf_opts(assign: bool, runtime: bool, force: bool) -> VfCreateOptions {
    VfCreateOptions {
        assign,
        runtime,
        force,
    }
}

// --- item 1: a write that outlives its time limit ---

#[test]
fn a_release_whose_unbind_outlives_the_limit_finishes_later_and_never_strands_the_device() {
    let host = Host::new();
    let (m, _) = host.open_with(quick(&host));
    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    host.sim
        .delay(SimOp::Unbind, a(NIC), Duration::from_millis(1000));
    let started = Instant::now();
    let err = m
        .release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "the caller waited"
    );
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(matches!(err, Error::Stalled { .. }), "{err}");
    assert!(err.to_string().contains("did not finish"), "{err}");
    assert!(err.to_string().contains("pending"), "{err}");
    // While the kernel has not returned: the journal stays, the group stays locked, status
    // shows the operation as pending.
    assert_eq!(journals(&host).len(), 1);
    let status = m.status();
    assert_eq!(status.pending.len(), 1, "{:?}", status.pending);
    assert!(
        status.pending[0].contains("pending"),
        "{:?}",
        status.pending
    );
    let again = m
        .release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Busy, "{again}");
    assert!(again.to_string().contains("IOMMU group 4"), "{again}");
    // Then the write lands and the release is finished, not abandoned half-way.
    eventually("the release finished", || {
        host.driver(NIC).as_deref() == Some("igb")
            && journals(&host).is_empty()
            && m.status().pending.is_empty()
    });
    assert!(m.assignments().is_empty(), "{:?}", m.assignments());
    assert!(!host.state_text().contains(NIC));
    assert!(m.status().pending.is_empty());
}

#[test]
fn an_assign_whose_unbind_outlives_the_limit_is_finished_and_recorded() {
    let host = Host::new();
    let (m, _) = host.open_with(quick(&host));
    host.sim
        .delay(SimOp::Unbind, a(NIC), Duration::from_millis(1500));
    let err = m
        .assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    eventually("the assign finished", || {
        host.driver(NIC).as_deref() == Some("vfio-pci") && journals(&host).is_empty()
    });
    assert_eq!(m.assignments().len(), 1);
    assert!(host.state_text().contains(NIC), "{}", host.state_text());
}

// --- item 2: readers and a stuck device ---

#[test]
fn readers_never_wait_behind_a_device_the_kernel_holds_locked() {
    let host = Host::new();
    let (m, _) = host.open_with(quick(&host));
    m.enable_inventory_cache();
    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    let before = m.snapshot().unwrap();
    // The unbind blocks for 1.5 s, and meanwhile reading NIC's driver_override blocks too, as
    // the kernel's device lock makes it.
    host.sim.lock_device_during_writes(a(NIC));
    host.sim
        .delay(SimOp::Unbind, a(NIC), Duration::from_millis(2500));
    let m = Arc::new(m);
    let release = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || m.release(&caller(), &[a(NIC)], ReleaseOptions::default()))
    };
    eventually("the release's unbind is stuck in the kernel", || {
        m.status()
            .pending
            .iter()
            .any(|p| p.contains("has not returned from writing 0000:01:00.0 to"))
    });
    let started = Instant::now();
    let readers: Vec<_> = (0..16)
        .map(|i| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    m.invalidate_inventory();
                    m.snapshot().map(|inv| inv.function(a(NIC)).cloned())
                } else {
                    m.inventory().map(|inv| inv.function(a(NIC)).cloned())
                }
            })
        })
        .collect();
    for r in readers {
        let nic = r.join().unwrap().unwrap().unwrap();
        assert_eq!(
            nic.driver_override,
            before.function(a(NIC)).unwrap().driver_override,
            "the last known value is served"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "readers waited behind the stuck device: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    m.status();
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(release.join().unwrap().unwrap_err().kind(), ErrorKind::Busy);
    eventually("the release finished", || {
        host.driver(NIC).as_deref() == Some("igb")
    });
}

#[test]
fn a_request_whose_caller_stopped_waiting_is_dropped_before_it_starts() {
    let host = Host::new();
    let (m, _) = host.open();
    let late = Caller {
        deadline: Some(Instant::now() - Duration::from_millis(1)),
        ..caller()
    };
    let err = m.assign(&late, &[a(NIC)], RUNTIME).unwrap_err();
    assert!(matches!(err, Error::Cancelled(_)), "{err}");
    assert!(err.to_string().contains("nothing changed"), "{err}");
    assert!(host.sim.writes().is_empty());
    // One queued behind a busy group past its deadline is dropped too.
    let mut options = EngineOptions::for_root(&host.root());
    options.group_wait = Duration::from_millis(600);
    drop(m);
    let (m, _) = host.open_with(options);
    host.sim
        .delay(SimOp::Probe, a(NIC), Duration::from_millis(500));
    std::thread::scope(|s| {
        let slow = s.spawn(|| m.assign(&caller(), &[a(NIC)], RUNTIME));
        std::thread::sleep(Duration::from_millis(100));
        let queued = Caller {
            deadline: Some(Instant::now() + Duration::from_millis(200)),
            ..caller()
        };
        let err = m
            .release(&queued, &[a(NIC)], ReleaseOptions::default())
            .unwrap_err();
        assert!(matches!(err, Error::Cancelled(_)), "{err}");
        slow.join().unwrap().unwrap();
    });
    assert_eq!(
        host.driver(NIC).as_deref(),
        Some("vfio-pci"),
        "release never ran"
    );
}

#[test]
fn vf_create_and_destroy_never_read_an_unrelated_stuck_device() {
    let host = sriov_host();
    let (m, _) = host.open_with(quick(&host));
    // NIC2's driver_override blocks every reader (a FIFO nobody writes), like a device whose
    // unbind is stuck in the kernel; a full-host scan would hang on it.
    let stuck = host.root().pci_device_attr(a(NIC2), "driver_override");
    std::fs::remove_file(&stuck).unwrap();
    nix::unistd::mkfifo(&stuck, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let m = Arc::new(m);
    let work = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || {
            m.vf_create(&caller(), a(PF), 2, vf_opts(true, true, false))
                .map(|v| v.len())
                .and_then(|_| m.vf_destroy(&caller(), a(PF), true).map(|c| c.len()))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !work.is_finished() {
        assert!(Instant::now() < deadline, "vf create/destroy hung on NIC2");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(work.join().unwrap().unwrap(), 2);
    std::fs::remove_file(&stuck).unwrap();
}

// --- item 3: journals never outlive their operation ---

#[test]
fn a_stalled_destroy_is_finished_before_anything_else_touches_the_pf_and_is_never_replayed() {
    let host = sriov_host();
    let (m, _) = host.open_with(quick(&host));
    m.vf_create(&caller(), a(PF), 2, vf_opts(false, false, false))
        .unwrap();
    host.sim
        .delay(SimOp::NumVfs, a(PF), Duration::from_millis(1500));
    let err = m.vf_destroy(&caller(), a(PF), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    // A retry while the first is still in the kernel: Busy, nothing new journaled.
    let retry = m.vf_destroy(&caller(), a(PF), false).unwrap_err();
    assert_eq!(retry.kind(), ErrorKind::Busy, "{retry}");
    assert_eq!(journals(&host).len(), 1);
    eventually("the destroy finished", || {
        journals(&host).is_empty() && m.status().pending.is_empty()
    });
    host.sim.clear_delays();
    // Later work on the PF, then a restart: nothing old is replayed over it. (The worker gives
    // the PF's lock back just after its journal is gone; a loaded machine may take a moment.)
    eventually("the PF is free again", || {
        match m.vf_create(&caller(), a(PF), 3, vf_opts(false, false, false)) {
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::Busy => false,
            Err(e) => panic!("{e}"),
        }
    });
    drop(m);
    let (m, report) = host.open();
    assert!(report.recovered.is_empty(), "{:?}", report.recovered);
    assert_eq!(m.vf_list(a(PF)).unwrap().len(), 3);
    assert!(
        host.state_text().contains("count = 3"),
        "{}",
        host.state_text()
    );
}

#[test]
fn a_failed_state_save_undoes_the_assign_and_leaves_no_journal_to_replay() {
    let host = Host::new();
    let (m, _) = host.open();
    // state.toml cannot be replaced: a non-empty directory sits where it goes.
    let state = host.state_dir().join("state.toml");
    let _ = std::fs::remove_file(&state);
    std::fs::create_dir_all(state.join("blocker")).unwrap();
    let err = m
        .assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("state.toml"), "{err}");
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"), "undone");
    assert!(journals(&host).is_empty());
    assert!(m.assignments().is_empty());
    drop(m);
    std::fs::remove_dir_all(&state).unwrap();
    let (m, report) = host.open();
    assert!(report.recovered.is_empty(), "{:?}", report.recovered);
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert!(m.assignments().is_empty());
}

// --- item 4: requests that cannot knock the daemon over ---

#[test]
fn oversized_requests_are_refused_and_error_lines_stay_short() {
    let host = Host::new();
    let (m, _) = host.open();
    let many: Vec<_> = (0..1025u16)
        .map(|i| {
            passthroughd_proto::PciAddress::new(0, (i / 32) as u8 + 0x10, (i % 32) as u8, 0)
                .unwrap()
        })
        .collect();
    let err = m.assign(&caller(), &many, RUNTIME).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("at most 1024"), "{err}");
    let err = m.assign(&caller(), &many[..1024], RUNTIME).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    for line in m.status().last_errors {
        assert!(line.len() <= 420, "{} bytes: {line}", line.len());
    }
    assert!(host.sim.writes().is_empty());
}

// --- item 5: the VF count is checked before anything is built from it ---

#[test]
fn an_absurd_vf_count_is_refused_at_once() {
    let host = sriov_host();
    let (m, _) = host.open();
    for count in [100_000_000, u32::MAX, 65_536, 8] {
        let started = Instant::now();
        let err = m
            .vf_create(&caller(), a(PF), count, vf_opts(true, false, false))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{count}: {err}");
        assert!(started.elapsed() < Duration::from_millis(200), "{count}");
    }
    assert!(host.sim.writes().is_empty());
}

// --- item 6: recovery checks the hard rules again ---

#[test]
fn recovery_never_finishes_an_assign_of_the_root_disk() {
    let host = Host::new();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    let disk = a(DISK);
    let target = Target::Function(disk);
    let mut plan = Plan::new(
        Operation::Assign,
        OnCrash::Finish,
        [LockKey::Group(3)].into(),
    );
    plan.steps = vec![
        Step::Guard {
            functions: vec![disk],
        },
        Step::LoadVfio,
        Step::Bind {
            target,
            from: Some("nvme".into()),
        },
        Step::Claim(ClaimRecord {
            target,
            identity: DeviceIdentity {
                vendor_id: 0x144d,
                device_id: 0xa808,
                subsystem_vendor_id: 0x8086,
                subsystem_device_id: 0xa01f,
            },
            previous_driver: Some("nvme".into()),
            claim: Claim::Request,
        }),
    ];
    JournalEntry::begin(&host.state_dir(), &plan).unwrap();
    let (m, report) = host.open();
    assert_eq!(host.driver(DISK).as_deref(), Some("nvme"));
    assert!(
        report.recovered[0].contains("undone") && report.recovered[0].contains("mounted at /"),
        "{:?}",
        report.recovered
    );
    assert!(journals(&host).is_empty());
    assert!(!host.state_text().contains(DISK));
    assert!(m.assignments().is_empty());
    assert!(
        !host
            .sim
            .writes()
            .iter()
            .any(|w| w.path.contains(DISK) || w.value.contains(DISK)),
        "nothing written for the disk: {:?}",
        host.sim.writes()
    );
}

// --- item 7: releasing a VF that `vf create --assign` assigned sticks ---

#[test]
fn a_persistent_release_of_a_created_vf_is_kept_across_restarts() {
    let host = sriov_host();
    {
        let (m, _) = host.open();
        m.vf_create(&caller(), a(PF), 2, vf_opts(true, false, false))
            .unwrap();
        let vf0 = host.sim.vf_address(a(PF), 0).unwrap();
        m.release(&caller(), &[vf0], ReleaseOptions::default())
            .unwrap();
        assert!(
            host.state_text().contains("assigned = [1]"),
            "{}",
            host.state_text()
        );
    }
    // A reboot: no VFs.
    use passthroughd::kernel::Kernel;
    host.sim
        .write(&host.root().pci_device_attr(a(PF), "sriov_numvfs"), b"0")
        .unwrap();
    let (m, _) = host.open();
    let drivers: Vec<_> = m
        .vf_list(a(PF))
        .unwrap()
        .iter()
        .map(|v| v.driver.clone().unwrap_or_default())
        .collect();
    assert_eq!(drivers, ["igbvf", "vfio-pci"]);
}

// --- item 8: a stored assignment refused at start can be released ---

#[test]
fn releasing_a_refused_stored_assignment_removes_it() {
    let host = Host::new();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    std::fs::write(
        host.state_dir().join("state.toml"),
        format!(
            "version = 2\n\n[[assignment]]\naddress = \"{NIC}\"\nvendor_id = \"15b3\"\n\
             device_id = \"1017\"\nsubsystem_vendor_id = \"15b3\"\nsubsystem_device_id = \"0020\"\n"
        ),
    )
    .unwrap();
    let (m, report) = host.open();
    assert_eq!(report.refused.len(), 1);
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    assert!(host.sim.writes().is_empty(), "{:?}", host.sim.writes());
    assert!(!host.state_text().contains(NIC), "{}", host.state_text());
    assert!(m.status().assignments.is_empty());
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}

// --- item 9: a VF assigned on its own is stored as (PF, index) ---

#[test]
fn a_persistently_assigned_vf_is_stored_by_pf_and_index_and_follows_the_index() {
    let host = sriov_host();
    {
        let (m, _) = host.open();
        m.vf_create(&caller(), a(PF), 2, vf_opts(false, true, false))
            .unwrap();
        let vf1 = host.sim.vf_address(a(PF), 1).unwrap();
        m.assign(&caller(), &[vf1], AssignOptions::default())
            .unwrap();
        let state = host.state_text();
        assert!(!state.contains(&vf1.to_string()), "{state}");
        assert!(state.contains(&format!("pf = \"{PF}\"")), "{state}");
        assert!(state.contains("assigned = [1]"), "{state}");
        assert_eq!(m.assignments()[0].vf.unwrap().index, 1);
    }
    // After a reboot someone else makes 3 VFs: VF 1 (and only it) is claimed again.
    use passthroughd::kernel::Kernel;
    let numvfs = host.root().pci_device_attr(a(PF), "sriov_numvfs");
    host.sim.write(&numvfs, b"0").unwrap();
    host.sim.write(&numvfs, b"3").unwrap();
    let (m, report) = host.open();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    let drivers: Vec<_> = (0..3)
        .map(|i| host.sim.driver_of(host.sim.vf_address(a(PF), i).unwrap()))
        .collect();
    assert_eq!(
        drivers,
        [
            Some("igbvf".into()),
            Some("vfio-pci".into()),
            Some("igbvf".into())
        ]
    );
    assert_eq!(m.assignments().len(), 1);
}

#[test]
fn a_version_2_vf_assignment_by_address_is_adopted_as_pf_and_index() {
    let host = sriov_host();
    use passthroughd::kernel::Kernel;
    host.sim
        .write(&host.root().pci_device_attr(a(PF), "sriov_numvfs"), b"2")
        .unwrap();
    let vf1 = host.sim.vf_address(a(PF), 1).unwrap();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    std::fs::write(
        host.state_dir().join("state.toml"),
        format!(
            "version = 2\n\n[[assignment]]\naddress = \"{vf1}\"\nvendor_id = \"8086\"\n\
             device_id = \"10ca\"\nsubsystem_vendor_id = \"8086\"\nsubsystem_device_id = \"a01f\"\n\
             previous_driver = \"igbvf\"\n"
        ),
    )
    .unwrap();
    let (m, report) = host.open();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert_eq!(host.sim.driver_of(vf1).as_deref(), Some("vfio-pci"));
    let state = host.state_text();
    assert!(state.starts_with("version = 3"), "{state}");
    assert!(!state.contains(&vf1.to_string()), "{state}");
    assert!(state.contains("assigned = [1]"), "{state}");
    assert_eq!(m.assignments()[0].vf.unwrap().index, 1);
}

// --- item 10: a VFIO device fd held without its group fd ---

#[test]
fn a_vfio_device_fd_without_its_group_is_found_and_named() {
    let host = sriov_host();
    let (m, _) = host.open();
    m.vf_create(&caller(), a(PF), 2, vf_opts(true, true, false))
        .unwrap();
    let vf0 = host.sim.vf_address(a(PF), 0).unwrap();
    let vf1 = host.sim.vf_address(a(PF), 1).unwrap();
    host.sim
        .add_vfio_device_holder(4343, "python3", 5, Some(vf0))
        .unwrap();
    let writes = host.sim.writes().len();
    let err = m
        .release(&caller(), &[vf0], ReleaseOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("python3 (pid 4343)"), "{err}");
    assert!(err.to_string().contains("vfio-device"), "{err}");
    let list = m.vf_list(a(PF)).unwrap();
    assert_eq!(list[0].in_use_by.as_deref(), Some("python3 (pid 4343)"));
    assert_eq!(list[1].in_use_by, None, "the fd names VF 0 only");
    let err = m.vf_destroy(&caller(), a(PF), true).unwrap_err();
    assert!(err.to_string().contains("python3 (pid 4343)"), "{err}");
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    m.release(&caller(), &[vf1], ReleaseOptions::default())
        .unwrap();
    // An older kernel (6.12) says nothing about which device: a function on vfio-pci is held
    // unless its group node opens (the kernel answers EBUSY for a held group).
    std::fs::remove_dir_all(host.root().proc_dir().join("4343")).unwrap();
    host.sim
        .add_vfio_device_holder(4444, "qemu", 9, None)
        .unwrap();
    let err = m
        .release(&caller(), &[vf0], ReleaseOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("qemu (pid 4444)"), "{err}");
    // Its group node opens: nobody holds it, whatever that fd is.
    let group = m.vf_list(a(PF)).unwrap()[0].iommu_group.unwrap();
    let group = host.sim.sysfs().vfio_group_node(group);
    std::fs::create_dir_all(group.parent().unwrap()).unwrap();
    std::fs::write(&group, "").unwrap();
    m.release(&caller(), &[vf0], ReleaseOptions::default())
        .unwrap();
    assert_eq!(host.sim.driver_of(vf0).as_deref(), Some("igbvf"));
}

// --- item 11: a resize never silently takes assigned VFs off vfio-pci ---

#[test]
fn a_resize_keeps_assigned_vfs_on_vfio_unless_forced() {
    let host = sriov_host();
    let (m, _) = host.open();
    m.vf_create(&caller(), a(PF), 4, vf_opts(true, true, false))
        .unwrap();
    let writes = host.sim.writes().len();
    let err = m
        .vf_create(&caller(), a(PF), 7, vf_opts(false, true, false))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    for i in 0..4 {
        let vf = host.sim.vf_address(a(PF), i).unwrap();
        assert!(err.to_string().contains(&format!("VF {i} ({vf})")), "{err}");
    }
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    // With --assign every VF ends on vfio-pci: allowed.
    let vfs = m
        .vf_create(&caller(), a(PF), 7, vf_opts(true, true, false))
        .unwrap();
    assert!(vfs.iter().all(|v| v.driver.as_deref() == Some("vfio-pci")));
    // Shrinking without --assign takes them off: only with --force.
    let err = m
        .vf_create(&caller(), a(PF), 2, vf_opts(false, true, false))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    let vfs = m
        .vf_create(&caller(), a(PF), 2, vf_opts(false, true, true))
        .unwrap();
    assert!(
        vfs.iter().all(|v| v.driver.as_deref() == Some("igbvf")),
        "{vfs:?}"
    );
    assert!(vfs.iter().all(|v| !v.assigned));
    // Destroy: assigned VFs need --force too.
    m.vf_create(&caller(), a(PF), 2, vf_opts(true, true, true))
        .unwrap();
    let err = m.vf_destroy(&caller(), a(PF), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    m.vf_destroy(&caller(), a(PF), true).unwrap();
}

/// `status` took the config lock and then, still holding it, the registry (through the lease
/// list), while every request took the registry and then the config: two locks taken in
/// opposite orders. Under load (tests in cli/tests/integration/load.rs) the daemon froze for
/// good. Each side here runs in a loop; a deadlock shows as threads that never finish.
#[test]
fn status_and_requests_taking_the_same_locks_never_deadlock() {
    let host = Host::new();
    let (m, _) = host.open();
    let m = std::sync::Arc::new(m);
    let until = Instant::now() + Duration::from_millis(1500);
    let (done, finished) = std::sync::mpsc::channel();
    for worker in 0..6 {
        let (m, done) = (std::sync::Arc::clone(&m), done.clone());
        std::thread::spawn(move || {
            let nic = if worker % 2 == 0 { NIC } else { NIC2 };
            while Instant::now() < until {
                if worker < 2 {
                    let _ = m.assign(&caller(), &[a(nic)], AssignOptions::default());
                    let _ = m.release(&caller(), &[a(nic)], ReleaseOptions::default());
                } else {
                    let _ = m.status();
                }
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..6 {
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("a thread never finished: status and a request deadlocked");
    }
}
