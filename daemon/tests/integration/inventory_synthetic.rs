//! The inventory scan agrees, function by function, with a synthetic tree whose contents we
//! chose: ids, class, driver, group, SR-IOV relations and group viability.

// Test helpers outside #[test] functions may unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use passthroughd::{Inventory, PciIds, SysfsRoot};
use passthroughd_testkit::synthetic::{self, HostShape};

const SHAPE: HostShape = HostShape {
    functions: 256,
    vfs: 32,
    vfs_per_pf: 4,
    groups: 20,
};

fn scanned() -> (tempfile::TempDir, Vec<synthetic::Planned>, Inventory) {
    let dir = tempfile::tempdir().unwrap();
    let planned = synthetic::generate(dir.path(), SHAPE).unwrap();
    let inventory = Inventory::scan(&SysfsRoot::new(dir.path()), &PciIds::empty()).unwrap();
    (dir, planned, inventory)
}

#[test]
fn every_function_matches_the_plan() {
    let (_dir, planned, inventory) = scanned();
    assert_eq!(inventory.functions.len(), planned.len());
    for (p, f) in planned.iter().zip(&inventory.functions) {
        assert_eq!(f.address, p.address);
        assert_eq!(f.class, p.class, "{}", p.address);
        assert_eq!(f.driver.as_deref(), p.driver, "{}", p.address);
        assert_eq!(f.iommu_group, Some(p.group), "{}", p.address);
        assert_eq!(f.vf_of.map(|v| (v.pf, v.index)), p.vf_of, "{}", p.address);
        assert_eq!(f.sriov.map_or(0, |s| s.num_vfs), p.num_vfs, "{}", p.address);
        assert_eq!(f.driver_override, None);
        assert_eq!(f.numa_node, None, "-1 means no NUMA information");
        assert!(f.vendor_name.is_none(), "no pci.ids given");
    }
}

#[test]
fn pfs_list_their_vfs_in_index_order() {
    let (_dir, _planned, inventory) = scanned();
    let pf = "0000:00:00.0".parse().unwrap();
    let vfs = inventory.vfs_of(pf);
    assert_eq!(vfs.len(), 4);
    for (i, vf) in vfs.iter().enumerate() {
        assert_eq!(vf.vf_of.unwrap().index, i as u32);
        assert_eq!(vf.role(), "vf");
    }
    assert_eq!(inventory.function(pf).unwrap().role(), "pf");
}

#[test]
fn groups_are_viable_only_when_every_member_is_vfio_safe() {
    let (_dir, _planned, inventory) = scanned();
    assert_eq!(inventory.groups.len(), SHAPE.groups as usize);
    for group in &inventory.groups {
        let unsafe_members: Vec<String> = group
            .members
            .iter()
            .map(|a| inventory.function(*a).unwrap())
            .filter(|f| {
                !matches!(
                    f.driver.as_deref(),
                    None | Some("vfio-pci" | "pci-stub" | "pcieport")
                )
            })
            .map(|f| f.address.to_string())
            .collect();
        assert_eq!(
            group.viable,
            unsafe_members.is_empty(),
            "group {}",
            group.id
        );
        let blockers: Vec<&str> = group.blockers.iter().map(|b| b.member.as_str()).collect();
        assert_eq!(blockers, unsafe_members, "group {}", group.id);
        assert_eq!(group.domain_type.as_deref(), Some("DMA-FQ"));
    }
    // The plan puts nvme and xhci functions in every block, so no group here is viable.
    assert!(inventory.groups.iter().all(|g| !g.viable));
}

#[test]
fn a_group_becomes_viable_once_its_host_drivers_are_gone() {
    let (dir, _planned, before) = scanned();
    let group = before.group(0).unwrap();
    // Rebind every blocker to vfio-pci by rewriting its driver link, as a bind would.
    for blocker in &group.blockers {
        let link = dir
            .path()
            .join("sys/bus/pci/devices")
            .join(&blocker.member)
            .join("driver");
        std::fs::remove_file(&link).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        std::os::unix::fs::symlink("../../../bus/pci/drivers/vfio-pci", &link).unwrap();
        // The uevent carries the driver too; keep it consistent with the link.
        let uevent = link.with_file_name("uevent");
        let text = std::fs::read_to_string(&uevent).unwrap();
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("DRIVER="))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&uevent, format!("DRIVER=vfio-pci\n{text}")).unwrap();
    }
    let after = Inventory::scan(&SysfsRoot::new(dir.path()), &PciIds::empty()).unwrap();
    let group = after.group(0).unwrap();
    assert!(group.viable, "{:?}", group.why_not_viable());
    assert!(!after.group(1).unwrap().viable);
}

#[test]
fn a_missing_pci_bus_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Inventory::scan(&SysfsRoot::new(dir.path()), &PciIds::empty()).unwrap_err();
    assert!(err.to_string().contains("no PCI bus under"), "{err}");
}

#[test]
fn entries_that_are_not_addresses_are_skipped() {
    let (dir, planned, _) = scanned();
    std::fs::create_dir(dir.path().join("sys/bus/pci/devices/..evil")).unwrap();
    std::fs::create_dir(dir.path().join("sys/bus/pci/devices/0000:00:20.0")).unwrap();
    let inventory = Inventory::scan(&SysfsRoot::new(dir.path()), &PciIds::empty()).unwrap();
    assert_eq!(inventory.functions.len(), planned.len());
}
