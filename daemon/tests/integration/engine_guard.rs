//! The blast-radius guard through the manager: what is refused, with which reason, and what
//! `--force` does and does not override.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use crate::common::*;
use passthroughd::ErrorKind;
use passthroughd::engine::EngineOptions;
use passthroughd::observe::guard::StaticAddresses;
use passthroughd_proto::{AssignOptions, ReleaseOptions};
use passthroughd_testkit::sim::SimDevice;

const FORCE: AssignOptions = AssignOptions {
    runtime: true,
    group: false,
    force: true,
};
const PLAIN: AssignOptions = AssignOptions {
    runtime: true,
    group: false,
    force: false,
};

#[test]
fn a_nic_with_the_default_route_is_refused_unless_forced() {
    let host = Host::new();
    let (m, _) = host.open();
    let err = m.assign(&caller(), &[a(ROUTED)], PLAIN).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    let msg = err.to_string();
    assert!(
        msg.contains("carries the default route via enp0s3"),
        "{msg}"
    );
    assert!(msg.contains("--force"), "{msg}");
    assert!(host.sim.writes().is_empty());
    m.assign(&caller(), &[a(ROUTED)], FORCE).unwrap();
    assert_eq!(host.driver(ROUTED).as_deref(), Some("vfio-pci"));
}

#[test]
fn a_nic_with_an_address_is_refused_unless_forced() {
    let host = Host::new();
    let mut options = EngineOptions::for_root(&host.root());
    options.addresses = Arc::new(StaticAddresses(HashMap::from([(
        "enp1s0".to_owned(),
        vec!["fe80::1".parse().unwrap(), "192.168.7.2".parse().unwrap()],
    )])));
    let (m, _) = host.open_with(options);
    let err = m.assign(&caller(), &[a(NIC)], PLAIN).unwrap_err();
    assert!(
        err.to_string().contains("enp1s0 has address 192.168.7.2"),
        "{err}"
    );
    m.assign(&caller(), &[a(NIC)], FORCE).unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
}

#[test]
fn a_global_ipv6_address_counts_and_a_link_local_one_does_not() {
    let host = Host::new();
    host.sim
        .write_file(
            "proc/net/if_inet6",
            "fe80000000000000505400fffe123456 03 40 20 80 enp1s0\n",
        )
        .unwrap();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC)], PLAIN).unwrap();
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    host.sim
        .write_file(
            "proc/net/if_inet6",
            "20010db8000000000000000000000001 03 40 00 80 enp1s0\n",
        )
        .unwrap();
    let err = m.assign(&caller(), &[a(NIC)], PLAIN).unwrap_err();
    assert!(err.to_string().contains("2001:db8::1"), "{err}");
}

#[test]
fn a_mounted_filesystem_is_refused_even_with_force() {
    let host = Host::new();
    let (m, _) = host.open();
    let err = m.assign(&caller(), &[a(DISK)], FORCE).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    let msg = err.to_string();
    assert!(msg.contains("mounted at / (nvme0n1p1)"), "{msg}");
    assert!(host.sim.writes().is_empty());
    assert_eq!(host.driver(DISK).as_deref(), Some("nvme"));
}

#[test]
fn lvm_on_a_partition_and_swap_are_followed_to_the_function() {
    let host = Host::new();
    let disk2 = a("0000:06:00.0");
    host.sim
        .add_device(&SimDevice::new(disk2, 0x010802, Some("nvme"), 8))
        .unwrap();
    host.sim.add_block(disk2, "nvme1n1", "259:4", None).unwrap();
    host.sim
        .add_block(disk2, "nvme1n1p1", "259:5", Some("nvme1n1"))
        .unwrap();
    host.sim
        .add_block(disk2, "nvme1n1p2", "259:6", Some("nvme1n1"))
        .unwrap();
    host.sim
        .add_dm("dm-0", "253:0", "vg-home", &["nvme1n1p1"])
        .unwrap();
    host.sim
        .write_file(
            "proc/self/mounts",
            "/dev/nvme0n1p1 / ext4 rw 0 0\n/dev/mapper/vg-home /home ext4 rw 0 0\n",
        )
        .unwrap();
    let (m, _) = host.open();
    let err = m.assign(&caller(), &[disk2], FORCE).unwrap_err();
    assert!(err.to_string().contains("mounted at /home (dm-0)"), "{err}");

    // Unmounted, but swap on the other partition still holds it.
    host.sim
        .write_file("proc/self/mounts", "/dev/nvme0n1p1 / ext4 rw 0 0\n")
        .unwrap();
    host.sim
        .write_file(
            "proc/swaps",
            "Filename\tType\tSize\tUsed\tPriority\n/dev/nvme1n1p2 partition 1048572 0 -2\n",
        )
        .unwrap();
    let err = m.assign(&caller(), &[disk2], FORCE).unwrap_err();
    assert!(err.to_string().contains("swap on nvme1n1p2"), "{err}");

    host.sim
        .write_file("proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n")
        .unwrap();
    m.assign(&caller(), &[disk2], PLAIN).unwrap();
    assert_eq!(host.sim.driver_of(disk2).as_deref(), Some("vfio-pci"));
}

#[test]
fn a_function_held_by_a_vmm_is_busy_naming_the_process() {
    let host = Host::new();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC)], PLAIN).unwrap();
    host.sim
        .add_process(
            4242,
            "qemu-system-x86",
            &[(3, "/dev/null"), (27, "/dev/vfio/4")],
        )
        .unwrap();
    let writes = host.sim.writes().len();
    let err = m
        .release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    let msg = err.to_string();
    assert!(msg.contains("qemu-system-x86 (pid 4242)"), "{msg}");
    assert!(msg.contains("/dev/vfio/4"), "{msg}");
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
}

#[test]
fn a_vfio_cdev_held_open_is_busy_too() {
    let host = Host::new();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC2)], PLAIN).unwrap();
    std::fs::create_dir_all(host.root().pci_device_dir(a(NIC2)).join("vfio-dev/vfio0")).unwrap();
    host.sim
        .add_process(77, "cloud-hypervisor", &[(9, "/dev/vfio/devices/vfio0")])
        .unwrap();
    let err = m
        .release(&caller(), &[a(NIC2)], ReleaseOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(
        err.to_string().contains("cloud-hypervisor (pid 77)"),
        "{err}"
    );
}

#[test]
fn the_boot_display_with_a_console_is_refused_unless_forced() {
    let host = Host::new();
    let gpu = a("0000:07:00.0");
    let mut dev = SimDevice::new(gpu, 0x030000, Some("i915"), 10);
    dev.boot_vga = true;
    host.sim.add_device(&dev).unwrap();
    host.sim
        .write_file("sys/class/vtconsole/vtcon1/bind", "1\n")
        .unwrap();
    host.sim
        .write_file(
            "sys/class/vtconsole/vtcon1/name",
            "(M) frame buffer device\n",
        )
        .unwrap();
    let (m, _) = host.open();
    let err = m.assign(&caller(), &[gpu], PLAIN).unwrap_err();
    assert!(err.to_string().contains("boot display"), "{err}");
    assert!(err.to_string().contains("vtcon1"), "{err}");
    m.assign(&caller(), &[gpu], FORCE).unwrap();
    assert_eq!(host.sim.driver_of(gpu).as_deref(), Some("vfio-pci"));
}
