//! The inventory on sysfs trees captured from a real 6.12 kernel in the VM test bed
//! (`tests/fixtures/vm-6.12`, made by `make capture`): before and after `sriov_numvfs=4`.

// Test helpers outside #[test] functions may unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use passthroughd::{Inventory, PciIds, SysfsRoot};
use passthroughd_proto::PciAddress;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/vm-6.12")
        .join(name)
}

fn scan(name: &str) -> Inventory {
    Inventory::scan(&SysfsRoot::new(fixture(name)), &PciIds::empty()).unwrap()
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

const PF: &str = "0000:01:00.0";
const VFS: [&str; 4] = [
    "0000:01:10.0",
    "0000:01:10.2",
    "0000:01:10.4",
    "0000:01:10.6",
];

#[test]
fn igb_pf_before_vfs() {
    let inv = scan("before");
    assert_eq!(inv.functions.len(), 22);
    let pf = inv.function(addr(PF)).unwrap();
    assert_eq!((pf.vendor_id, pf.device_id), (0x8086, 0x10c9));
    assert_eq!(
        (pf.subsystem_vendor_id, pf.subsystem_device_id),
        (0x1af4, 0x1100)
    );
    assert_eq!(pf.class, 0x020000);
    assert_eq!(pf.driver.as_deref(), Some("igb"));
    assert_eq!(pf.role(), "pf");
    let sriov = pf.sriov.unwrap();
    assert_eq!(
        (sriov.total_vfs, sriov.num_vfs, sriov.drivers_autoprobe),
        (7, 0, true)
    );
    assert!(inv.vfs_of(addr(PF)).is_empty());
    assert!(inv.functions.iter().all(|f| f.vf_of.is_none()));
}

#[test]
fn four_vfs_with_their_pf_and_index() {
    let inv = scan("after-vfs");
    assert_eq!(inv.functions.len(), 26);
    assert_eq!(inv.function(addr(PF)).unwrap().sriov.unwrap().num_vfs, 4);
    let vfs: Vec<String> = inv
        .vfs_of(addr(PF))
        .iter()
        .map(|f| f.address.to_string())
        .collect();
    assert_eq!(vfs, VFS);
    for (index, vf) in VFS.iter().enumerate() {
        let f = inv.function(addr(vf)).unwrap();
        let of = f.vf_of.unwrap();
        assert_eq!((of.pf, of.index), (addr(PF), index as u32), "{vf}");
        assert_eq!((f.vendor_id, f.device_id), (0x8086, 0x10ca));
        assert_eq!(f.driver.as_deref(), Some("igbvf"));
        assert_eq!(f.role(), "vf");
        // Each VF is isolated in a group of its own, not viable while igbvf holds it.
        let group = inv.group(f.iommu_group.unwrap()).unwrap();
        assert_eq!(group.members, [f.address]);
        assert!(!group.viable);
        assert_eq!(
            group.why_not_viable().unwrap(),
            format!("{vf} is bound to igbvf")
        );
    }
}

#[test]
fn bridged_functions_share_one_group_with_their_bridge() {
    for tree in ["before", "after-vfs"] {
        let inv = scan(tree);
        let e1000 = inv.function(addr("0000:04:01.0")).unwrap();
        let pcnet = inv.function(addr("0000:04:02.0")).unwrap();
        assert_eq!(e1000.iommu_group, pcnet.iommu_group);
        let group = inv.group(e1000.iommu_group.unwrap()).unwrap();
        // The PCIe-to-PCI bridge is in the group as well: the kernel aliases the requester ids
        // of everything behind it to the bridge.
        let members: Vec<String> = group.members.iter().map(ToString::to_string).collect();
        assert_eq!(members, ["0000:03:00.0", "0000:04:01.0", "0000:04:02.0"]);
        assert!(inv.function(addr("0000:03:00.0")).unwrap().is_bridge());
        assert!(!group.viable);
        assert_eq!(
            group.why_not_viable().unwrap(),
            "0000:04:01.0 is bound to e1000, 0000:04:02.0 is bound to pcnet32"
        );
    }
}

#[test]
fn viability_of_captured_groups() {
    let inv = scan("before");
    let viable: Vec<u32> = inv
        .groups
        .iter()
        .filter(|g| g.viable)
        .map(|g| g.id)
        .collect();
    // The host bridge (no driver) and the three root ports (pcieport) are the viable ones.
    assert_eq!(viable, [0, 11, 12, 13]);
    let lpc = inv.group(14).unwrap();
    assert_eq!(lpc.members.len(), 3);
    assert_eq!(lpc.blockers.len(), 3);
    assert!(
        inv.groups
            .iter()
            .all(|g| g.domain_type.as_deref() == Some("identity"))
    );
}

#[test]
fn groups_derived_from_group_directories_match_each_iommu_group_link() {
    for tree in ["before", "after-vfs"] {
        let root = fixture(tree);
        let inv = scan(tree);
        for f in &inv.functions {
            let link = root
                .join("sys/bus/pci/devices")
                .join(f.address.to_string())
                .join("iommu_group");
            let target = std::fs::read_link(&link).unwrap();
            let group: u32 = target
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(f.iommu_group, Some(group), "{} in {tree}", f.address);
        }
    }
}

#[test]
fn names_come_from_pci_ids() {
    let ids = PciIds::parse(
        "8086  Intel Corporation\n\t10ca  82576 Virtual Function\nC 02  Network controller\n\t00  Ethernet controller\n",
    );
    let inv = Inventory::scan(&SysfsRoot::new(fixture("after-vfs")), &ids).unwrap();
    let vf = inv.function(addr(VFS[0])).unwrap();
    assert_eq!(vf.vendor_name.as_deref(), Some("Intel Corporation"));
    assert_eq!(vf.device_name.as_deref(), Some("82576 Virtual Function"));
    assert_eq!(vf.class_name.as_deref(), Some("Ethernet controller"));
    // Unknown ids stay unnamed rather than guessed.
    let virtio = inv.function(addr("0000:00:0a.0")).unwrap();
    assert_eq!(
        (virtio.vendor_name.as_deref(), virtio.device_name.as_deref()),
        (None, None)
    );
}

/// A request reads only its groups; what it reads must be exactly what the full scan says of
/// them, on the real kernel's tree (VFs with PF and index, the bridged group of three, a
/// group-less function if any).
#[test]
fn reading_some_groups_agrees_with_the_full_scan() {
    for name in ["before", "after-vfs"] {
        let root = SysfsRoot::new(fixture(name));
        let full = scan(name);
        for group in &full.groups {
            let part = Inventory::scan_groups(&root, &PciIds::empty(), &[group.id], &[]).unwrap();
            assert_eq!(
                part.groups,
                vec![group.clone()],
                "{name}: group {}",
                group.id
            );
            let expected: Vec<_> = full
                .functions
                .iter()
                .filter(|f| f.iommu_group == Some(group.id))
                .cloned()
                .collect();
            assert_eq!(part.functions, expected, "{name}: group {}", group.id);
        }
        let vfs: Vec<u32> = full
            .functions
            .iter()
            .filter(|f| f.vf_of.is_some())
            .filter_map(|f| f.iommu_group)
            .collect();
        let part = Inventory::scan_groups(&root, &PciIds::empty(), &vfs, &[]).unwrap();
        assert_eq!(part.functions.len(), vfs.len());
        for f in &part.functions {
            assert_eq!(Some(f), full.function(f.address), "{name}: {}", f.address);
        }
        let loose = full.functions[0].address;
        let part = Inventory::scan_groups(&root, &PciIds::empty(), &[], &[loose]).unwrap();
        let mut expected = full.functions[0].clone();
        expected.iommu_group = None;
        assert_eq!(part.functions, vec![expected]);
    }
    let root = SysfsRoot::new(fixture("after-vfs"));
    let part = Inventory::scan_groups(&root, &PciIds::empty(), &[], &[addr(VFS[2])]).unwrap();
    let vf = part.function(addr(VFS[2])).unwrap();
    assert_eq!(vf.vf_of.map(|v| (v.pf, v.index)), Some((addr(PF), 2)));
}
