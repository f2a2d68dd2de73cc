//! SR-IOV capable functions, from the same scan as `passthroughd inventory`.

use passthroughd_proto::host::{Check, SriovDevice, Verdict};

use super::{check, shown};
use crate::kernel::sysfs::SysfsRoot;
use crate::observe::inventory::Inventory;
use crate::observe::pciids::PciIds;

pub fn devices(root: &SysfsRoot, ids: &PciIds, out: &mut Vec<Check>) -> Vec<SriovDevice> {
    let devices_shown = shown(root, &root.pci_devices_dir());
    let inventory = match Inventory::scan(root, ids) {
        Ok(inventory) => inventory,
        Err(e) => {
            out.push(check(
                "sriov.devices",
                Verdict::NotApplicable,
                "no PCI bus to scan",
                format!("{devices_shown}: {e}"),
                None,
            ));
            return Vec::new();
        }
    };
    let devices: Vec<SriovDevice> = inventory
        .functions
        .iter()
        .filter_map(|f| {
            f.sriov.as_ref().map(|s| SriovDevice {
                address: f.address,
                vendor_id: f.vendor_id,
                device_id: f.device_id,
                name: f.device_name.clone(),
                driver: f.driver.clone(),
                total_vfs: s.total_vfs,
                num_vfs: s.num_vfs,
            })
        })
        .collect();
    out.push(if devices.is_empty() {
        check(
            "sriov.devices",
            Verdict::NotApplicable,
            "no SR-IOV capable functions",
            format!("{devices_shown}/*/sriov_totalvfs: none above 0"),
            None,
        )
    } else {
        let enabled = devices.iter().filter(|d| d.num_vfs > 0).count();
        check(
            "sriov.devices",
            Verdict::Pass,
            format!(
                "{} SR-IOV capable function(s), {enabled} with VFs enabled",
                devices.len()
            ),
            format!("{devices_shown}/*/sriov_totalvfs, sriov_numvfs"),
            None,
        )
    });
    devices
}
