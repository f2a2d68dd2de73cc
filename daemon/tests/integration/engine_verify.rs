//! `verify`, `show`'s readiness and reset on release over the simulated kernel, with the VFIO
//! seam scripted (`FakeVfio`): what is opened and when nothing may be, what a VM would get, the
//! errors a VMM would meet (a group that is not viable, no interrupt remapping, a process holding
//! the device, a lease), and resets before a function goes back to its host driver.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use crate::common::*;
use passthroughd::engine::EngineOptions;
use passthroughd::kernel::Kernel;
use passthroughd::{Engine, ErrorKind};
use passthroughd_proto::{AssignOptions, LeaseOwner, ReleaseOptions};
use passthroughd_testkit::vfio::{Call, FakeVfio, Script, igb_vf, without_reset};

const NIC_GROUP: u32 = 4;

fn open(host: &Host, vfio: &Arc<FakeVfio>) -> Engine {
    let mut options = EngineOptions::for_root(&host.root());
    options.vfio = vfio.clone();
    host.open_with(options).0
}

fn assigned_nic(script: Script) -> (Host, Arc<FakeVfio>, Engine) {
    let host = Host::new();
    let vfio = Arc::new(FakeVfio::new().with(NIC_GROUP, a(NIC), script));
    let m = open(&host, &vfio);
    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    (host, vfio, m)
}

#[test]
fn verify_opens_the_device_as_a_vmm_would_and_reports_what_a_vm_gets() {
    let (host, vfio, m) = assigned_nic(Script::Ready(igb_vf()));
    host.sim
        .write_file(
            &format!("sys/bus/pci/devices/{NIC}/reset_method"),
            "flr bus\n",
        )
        .unwrap();
    let report = m.verify(&caller(), a(NIC)).unwrap();
    assert!(report.ready, "{report:?}");
    assert_eq!(report.problem, None);
    assert!(report.group_viable);
    assert_eq!(report.iommu_group, Some(NIC_GROUP));
    assert_eq!(report.interrupt_remapping, Some(true));
    assert_eq!(report.reset_methods, ["flr", "bus"]);
    let device = report.device.as_ref().unwrap();
    assert!(device.flags.reset);
    let bar0 = device.regions.iter().find(|r| r.name == "BAR0").unwrap();
    assert_eq!(bar0.size, 16384);
    let msix = device.irqs.iter().find(|i| i.name == "MSI-X").unwrap();
    assert_eq!(msix.count, 3);
    assert!(
        report.notes.iter().any(|n| n.contains("RLIMIT_MEMLOCK")),
        "{:?}",
        report.notes
    );
    assert_eq!(
        vfio.calls(),
        [Call::Probe {
            group: NIC_GROUP,
            device: a(NIC)
        }]
    );
    // It changed nothing, and the group is free again afterwards.
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
}

#[test]
fn what_sysfs_already_rules_out_is_reported_without_opening_anything() {
    let host = Host::new();
    let vfio = Arc::new(FakeVfio::new());
    let m = open(&host, &vfio);
    // On its host driver.
    let report = m.verify(&caller(), a(NIC)).unwrap();
    assert!(!report.ready);
    let why = report.problem.unwrap();
    assert!(why.contains("bound to igb"), "{why}");
    assert!(
        why.contains(&format!("passthroughctl assign {NIC}")),
        "{why}"
    );
    // One of two functions of a group on vfio-pci by hand: the sibling is named.
    let root = host.root();
    host.sim.add_driver("vfio-pci").unwrap();
    host.sim
        .write(
            &root.pci_device_attr(a(PAIR0), "driver_override"),
            b"vfio-pci",
        )
        .unwrap();
    host.sim
        .write(&root.pci_device_unbind(a(PAIR0)), PAIR0.as_bytes())
        .unwrap();
    host.sim
        .write(&root.pci_drivers_probe(), PAIR0.as_bytes())
        .unwrap();
    assert_eq!(host.driver(PAIR0).as_deref(), Some("vfio-pci"));
    let report = m.verify(&caller(), a(PAIR0)).unwrap();
    assert!(!report.ready);
    assert!(!report.group_viable);
    assert_eq!(report.group_blockers[0].member, PAIR1);
    let why = report.problem.unwrap();
    assert!(
        why.contains(&format!("{PAIR1} is bound to e1000e")),
        "{why}"
    );
    assert!(vfio.calls().is_empty(), "nothing was opened");
    let detail = m.show(a(PAIR0)).unwrap();
    assert!(!detail.passthrough.ready);
    assert!(
        detail
            .passthrough
            .blocker
            .unwrap()
            .contains("is not viable")
    );
}

#[test]
fn a_refused_group_says_interrupt_remapping_and_how_to_fix_it() {
    let (_host, _vfio, m) = assigned_nic(Script::InterruptRemapping);
    let report = m.verify(&caller(), a(NIC)).unwrap();
    assert!(!report.ready);
    assert_eq!(report.interrupt_remapping, Some(false));
    let why = report.problem.unwrap();
    assert!(why.contains("interrupt remapping"), "{why}");
    assert!(why.contains("allow_unsafe_interrupts"), "{why}");
}

#[test]
fn a_leased_or_held_function_is_refused_without_opening_it() {
    let (host, vfio, m) = assigned_nic(Script::Ready(igb_vf()));
    host.sim
        .add_vfio_device_holder(4242, "qemu-system-x86", 12, Some(a(NIC)))
        .unwrap();
    let err = m.verify(&caller(), a(NIC)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("pid 4242"), "{err}");
    let shown = m.show(a(NIC)).unwrap();
    assert_eq!(
        shown.function.in_use_by.as_deref(),
        Some("qemu-system-x86 (pid 4242)")
    );
    assert!(
        shown
            .passthrough
            .blocker
            .unwrap()
            .contains("in use by qemu-system-x86 (pid 4242)")
    );
    let listed = m.snapshot().unwrap();
    assert_eq!(
        listed.function(a(NIC)).unwrap().in_use_by.as_deref(),
        Some("qemu-system-x86 (pid 4242)"),
        "list names the holder"
    );
    std::fs::remove_dir_all(host.root().proc_dir().join("4242")).unwrap();
    let owner: LeaseOwner = "libvirt:vm1".parse().unwrap();
    m.lease_start(&caller(), &owner, &[a(NIC2)]).unwrap();
    let err = m.verify(&caller(), a(NIC2)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("leased to libvirt:vm1"), "{err}");
    assert!(
        vfio.calls().is_empty(),
        "nothing was opened: {:?}",
        vfio.calls()
    );
}

#[test]
fn release_with_reset_resets_first_and_a_device_without_reset_stays_on_vfio() {
    let (host, vfio, m) = assigned_nic(Script::Ready(igb_vf()));
    let reset = ReleaseOptions {
        runtime: false,
        reset: true,
    };
    m.release(&caller(), &[a(NIC)], reset).unwrap();
    assert_eq!(vfio.resets(a(NIC)), 1);
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));

    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    vfio.set(NIC_GROUP, a(NIC), Script::Ready(without_reset(igb_vf())));
    let err = m.release(&caller(), &[a(NIC)], reset).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("cannot be reset"), "{err}");
    assert_eq!(
        host.driver(NIC).as_deref(),
        Some("vfio-pci"),
        "not returned"
    );
    assert_eq!(m.assignments().len(), 1, "still assigned");
    // Without --reset it goes back as before.
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(vfio.resets(a(NIC)), 2);
}

#[test]
fn the_release_reset_policy_of_the_config_applies_to_lease_ends_and_releases() {
    let host = Host::new();
    let vfio = Arc::new(
        FakeVfio::new()
            .with(NIC_GROUP, a(NIC), Script::Ready(igb_vf()))
            .with(6, a(NIC2), Script::Ready(igb_vf())),
    );
    host.write_config("version = 1\n\n[release]\nreset = \"leases\"\n");
    let m = open(&host, &vfio);
    let owner: LeaseOwner = "vmm:ch-1".parse().unwrap();
    m.lease_start(&caller(), &owner, &[a(NIC)]).unwrap();
    m.lease_end(&caller(), &owner).unwrap();
    assert_eq!(vfio.resets(a(NIC)), 1, "a lease end resets");
    m.assign(&caller(), &[a(NIC2)], AssignOptions::default())
        .unwrap();
    m.release(&caller(), &[a(NIC2)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(vfio.resets(a(NIC2)), 0, "a plain release does not");
    drop(m);
    host.write_config("version = 1\n\n[release]\nreset = \"always\"\n");
    let m = open(&host, &vfio);
    m.assign(&caller(), &[a(NIC2)], AssignOptions::default())
        .unwrap();
    m.release(&caller(), &[a(NIC2)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(vfio.resets(a(NIC2)), 1, "always: every release resets");
    assert_eq!(host.driver(NIC2).as_deref(), Some("igb"));
}
