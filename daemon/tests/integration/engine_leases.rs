//! Leases over the simulated kernel: all or nothing, refused to a second owner naming the
//! holder, group companions only together, a function already assigned stays assigned, the end
//! gives back only what the lease took, `release` of a leased function refused, kept across a
//! restart but not a reboot, stale when its VM is gone, and an end that waits for its start.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::*;
use passthroughd::engine::EngineOptions;
use passthroughd::{Caller, Error, ErrorKind};
use passthroughd_proto::{AssignOptions, LeaseOwner, ReleaseOptions, VfCreateOptions};
use passthroughd_testkit::sim::{SimDevice, SimOp, SimSriov};

fn owner(text: &str) -> LeaseOwner {
    text.parse().unwrap()
}

fn set_boot_id(host: &Host, id: &str) {
    host.sim
        .write_file("proc/sys/kernel/random/boot_id", &format!("{id}\n"))
        .unwrap();
}

/// A QEMU of libvirt's domain `name`, as `ps` would show it.
fn run_qemu(host: &Host, pid: u32, name: &str) {
    host.sim.add_process(pid, "qemu-system-x86", &[]).unwrap();
    host.sim
        .write_file(
            &format!("proc/{pid}/cmdline"),
            &format!("/usr/bin/qemu-system-x86_64\0-name\0guest={name},debug-threads=on\0"),
        )
        .unwrap();
}

#[test]
fn a_lease_binds_all_or_nothing_and_its_end_gives_back_exactly_what_it_took() {
    let host = Host::new();
    set_boot_id(&host, "b1");
    let (m, _) = host.open();
    let vm1 = owner("libvirt:vm1");
    let changes = m.lease_start(&caller(), &vm1, &[a(NIC), a(NIC2)]).unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));
    let state = host.state_text();
    assert!(state.contains("source = \"lease\""), "{state}");
    assert!(state.contains("owner = \"libvirt:vm1\""), "{state}");
    assert!(state.contains("boot_id = \"b1\""), "{state}");
    let leases = m.leases();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].owner, vm1);
    assert_eq!(leases[0].functions, [NIC, NIC2]);
    assert_eq!(leases[0].stale, None, "young leases are never stale");
    // Taken again (libvirt retrying): nothing changes.
    assert!(
        m.lease_start(&caller(), &vm1, &[a(NIC), a(NIC2)])
            .unwrap()
            .is_empty()
    );
    assert_eq!(m.status().leases.len(), 1);
    let back = m.lease_end(&caller(), &vm1).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.driver(NIC2).as_deref(), Some("igb"));
    assert!(m.leases().is_empty());
    assert!(
        !host.state_text().contains("lease"),
        "{}",
        host.state_text()
    );
    let err = m.lease_end(&caller(), &vm1).unwrap_err();
    assert!(matches!(err, Error::NoLease(_)), "{err}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[test]
fn a_second_owner_is_refused_by_name_and_nothing_changes() {
    let host = Host::new();
    let (m, _) = host.open();
    m.lease_start(&caller(), &owner("libvirt:vm1"), &[a(NIC)])
        .unwrap();
    let before = host.sim.writes().len();
    let err = m
        .lease_start(&caller(), &owner("libvirt:vm2"), &[a(NIC2), a(NIC)])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("libvirt:vm1"), "{err}");
    assert_eq!(host.sim.writes().len(), before, "nothing was written");
    assert_eq!(host.driver(NIC2).as_deref(), Some("igb"));
    assert_eq!(m.leases().len(), 1);
    // Another kind of owner is refused the same way.
    let err = m
        .lease_start(&caller(), &owner("k8s:0f3c-claim"), &[a(NIC)])
        .unwrap_err();
    assert!(err.to_string().contains("leased to libvirt:vm1"), "{err}");
}

#[test]
fn group_companions_are_leased_only_together() {
    let host = Host::new();
    let (m, _) = host.open();
    let vm = owner("vmm:ch-1");
    let err = m.lease_start(&caller(), &vm, &[a(PAIR0)]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(
        err.to_string().contains(PAIR1),
        "names the companion: {err}"
    );
    assert_eq!(host.driver(PAIR0).as_deref(), Some("e1000e"));
    m.lease_start(&caller(), &vm, &[a(PAIR0), a(PAIR1)])
        .unwrap();
    assert_eq!(host.driver(PAIR0).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver(PAIR1).as_deref(), Some("vfio-pci"));
}

#[test]
fn the_guard_rules_hold_for_leases_too() {
    let host = Host::new();
    let (m, _) = host.open();
    for (address, says) in [(ROUTED, "default route"), (DISK, "mounted")] {
        let err = m
            .lease_start(&caller(), &owner("libvirt:bad"), &[a(address)])
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    assert!(m.leases().is_empty());
    assert!(m.status().leases.is_empty());
}

#[test]
fn an_assigned_function_is_used_as_it_is_and_stays_assigned_after_the_lease() {
    let host = Host::new();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    let vm = owner("libvirt:vm1");
    let changes = m.lease_start(&caller(), &vm, &[a(NIC), a(NIC2)]).unwrap();
    assert_eq!(changes.len(), 1, "only NIC2 moved: {changes:?}");
    let err = m
        .release(&caller(), &[a(NIC2)], ReleaseOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("leased to libvirt:vm1"), "{err}");
    assert!(err.to_string().contains("lease end libvirt:vm1"), "{err}");
    m.lease_end(&caller(), &vm).unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"), "the request");
    assert_eq!(host.driver(NIC2).as_deref(), Some("igb"));
    assert!(host.state_text().contains(NIC), "{}", host.state_text());
    assert!(!host.state_text().contains("lease"));
}

#[test]
fn a_lease_survives_a_daemon_restart_but_not_a_reboot() {
    let host = Host::new();
    set_boot_id(&host, "boot-1");
    let vm = owner("libvirt:vm1");
    {
        let (m, _) = host.open();
        m.lease_start(&caller(), &vm, &[a(NIC)]).unwrap();
    }
    let (m, _) = host.open();
    assert_eq!(m.leases().len(), 1, "the same boot: kept");
    assert_eq!(
        m.leases()[0].age_secs,
        0,
        "its age is unknown after a restart"
    );
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    drop(m);
    // A reboot: the kernel has a new boot id, and the VM is gone.
    set_boot_id(&host, "boot-2");
    let (m, _) = host.open();
    assert!(m.leases().is_empty(), "{:?}", m.leases());
    m.assign(&caller(), &[a(NIC2)], AssignOptions::default())
        .unwrap();
    assert!(
        !host.state_text().contains("libvirt:vm1"),
        "the next write forgets it: {}",
        host.state_text()
    );
}

#[test]
fn a_libvirt_lease_is_stale_once_no_qemu_runs_with_its_name() {
    let host = Host::new();
    let vm = owner("libvirt:a,b");
    {
        let (m, _) = host.open();
        m.lease_start(&caller(), &vm, &[a(NIC)]).unwrap();
        m.lease_start(&caller(), &owner("vmm:other"), &[a(NIC2)])
            .unwrap();
    }
    // After a restart the lease's age is unknown, so only its QEMU decides.
    let (m, _) = host.open();
    run_qemu(&host, 4242, "a,,b");
    let fresh = m.leases();
    assert!(fresh.iter().all(|l| l.stale.is_none()), "{fresh:?}");
    std::fs::remove_dir_all(host.root().proc_dir().join("4242")).unwrap();
    let leases = m.leases();
    let stale = leases.iter().find(|l| l.owner == vm).unwrap();
    let why = stale.stale.as_deref().unwrap();
    assert!(why.contains("-name guest=a,b"), "{why}");
    assert!(why.contains("lease end libvirt:a,b"), "{why}");
    let other = leases.iter().find(|l| l.owner != vm).unwrap();
    assert_eq!(other.stale, None, "other VMMs are never judged stale");
    // Stale is a report, not an action: the function stays leased until someone ends it.
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    m.lease_end(&caller(), &vm).unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}

#[test]
fn an_end_while_a_process_holds_the_device_is_refused_and_the_lease_stays() {
    let host = Host::new();
    let (m, _) = host.open();
    let vm = owner("libvirt:vm1");
    m.lease_start(&caller(), &vm, &[a(NIC)]).unwrap();
    host.sim
        .add_vfio_device_holder(777, "qemu-system-x86", 31, Some(a(NIC)))
        .unwrap();
    let err = m.lease_end(&caller(), &vm).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("pid 777"), "{err}");
    assert_eq!(m.leases().len(), 1);
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
}

#[test]
fn an_end_asked_for_while_the_start_is_stuck_ends_the_lease_when_the_start_is_done() {
    let host = Host::new();
    let mut options = EngineOptions::for_root(&host.root());
    options.write_timeout = Duration::from_millis(300);
    options.group_wait = Duration::from_millis(100);
    let (m, _) = host.open_with(options);
    let vm = owner("libvirt:slow");
    host.sim
        .delay(SimOp::Probe, a(NIC), Duration::from_millis(1500));
    let err = m.lease_start(&caller(), &vm, &[a(NIC)]).unwrap_err();
    assert!(matches!(err, Error::Stalled { .. }), "{err}");
    host.sim.clear_delays(); // the probe under way keeps its delay; the end's own is quick
    // The hook gave up waiting and asks for the end; it waits for the start, then ends it.
    let started = Instant::now();
    let ended = m.lease_end(&Caller::new(0, ":1.9"), &vm).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500), "it waited");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert!(m.leases().is_empty());
    assert!(!host.state_text().contains("lease"));
}

#[test]
fn a_vf_lease_is_kept_by_pf_and_index_and_given_back_to_its_vf_driver() {
    let host = Host::new();
    let pf = a("0000:05:00.0");
    let mut spec = SimDevice::new(pf, 0x020000, Some("igb"), 10);
    spec.sriov_totalvfs = 7;
    host.sim.add_device(&spec).unwrap();
    std::fs::write(host.root().pci_device_attr(pf, "sriov_numvfs"), "0\n").unwrap();
    host.sim.configure_sriov(pf, SimSriov::igb(20));
    let (m, _) = host.open();
    m.vf_create(&caller(), pf, 2, Default::default()).unwrap();
    let vf1 = host.sim.vf_address(pf, 1).unwrap();
    let vm = owner("k8s:7d0b7a0e-claim");
    m.lease_start(&caller(), &vm, &[vf1]).unwrap();
    assert_eq!(host.sim.driver_of(vf1).as_deref(), Some("vfio-pci"));
    let state = host.state_text();
    assert!(state.contains("assigned = [1]"), "{state}");
    assert!(
        !state.contains(&vf1.to_string()),
        "never by VF address: {state}"
    );
    assert_eq!(m.leases()[0].functions, [vf1.to_string()]);
    // The leased VF is its owner's: no destroy or resize takes it, not even forced.
    let forced = VfCreateOptions {
        assign: false,
        runtime: false,
        force: true,
    };
    for err in [
        m.vf_destroy(&caller(), pf, true).unwrap_err(),
        m.vf_create(&caller(), pf, 3, forced).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        assert!(
            err.to_string().contains("leased to k8s:7d0b7a0e-claim"),
            "{err}"
        );
    }
    assert_eq!(host.sim.driver_of(vf1).as_deref(), Some("vfio-pci"));
    m.lease_end(&caller(), &vm).unwrap();
    assert_eq!(host.sim.driver_of(vf1).as_deref(), Some("igbvf"));
    // A VF that `vf create --assign` put on vfio-pci is used as it is and stays there.
    m.vf_destroy(&caller(), pf, true).unwrap();
    let assigned = VfCreateOptions {
        assign: true,
        runtime: false,
        force: false,
    };
    m.vf_create(&caller(), pf, 2, assigned).unwrap();
    let vf1 = host.sim.vf_address(pf, 1).unwrap();
    assert!(m.lease_start(&caller(), &vm, &[vf1]).unwrap().is_empty());
    assert!(
        m.lease_end(&caller(), &vm).unwrap().is_empty(),
        "nothing moved"
    );
    assert_eq!(host.sim.driver_of(vf1).as_deref(), Some("vfio-pci"));
}

#[test]
fn bad_requests_change_nothing() {
    let host = Host::new();
    let (m, _) = host.open();
    let vm = owner("libvirt:vm1");
    let err = m.lease_start(&caller(), &vm, &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let err = m
        .lease_start(&caller(), &vm, &[a("0000:0f:00.0")])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(m.leases().is_empty());
    assert!(host.sim.writes().is_empty());
}
