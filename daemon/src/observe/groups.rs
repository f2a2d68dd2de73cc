//! IOMMU groups and whether each can be handed to a VM right now.
//!
//! A group is viable for VFIO only when every member is bound to vfio-pci (or a variant),
//! pci-stub, a `driver_managed_dma` driver such as pcieport, or to nothing: the kernel refuses
//! to open the group otherwise, because a host driver could DMA into the guest's memory.

use std::collections::HashMap;

use passthroughd_proto::device::driver_is_vfio_safe;
use passthroughd_proto::{GroupBlocker, IommuGroup, PciAddress, PciFunction};
use tracing::warn;

use crate::kernel::sysfs::{ReadError, SysfsRoot, read_attr, read_link_name};

/// Reads every group under `sys/kernel/iommu_groups`, judging viability from the drivers in
/// `functions` (read in the same scan). Empty when the IOMMU is off.
pub fn scan(root: &SysfsRoot, functions: &[PciFunction]) -> Result<Vec<IommuGroup>, ReadError> {
    let dir = root.iommu_groups_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ReadError { path: dir, source }),
    };
    let drivers: HashMap<PciAddress, Option<&str>> = functions
        .iter()
        .map(|f| (f.address, f.driver.as_deref()))
        .collect();

    let mut groups = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ReadError {
            path: dir.clone(),
            source,
        })?;
        let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            warn!(entry = ?entry.file_name(), "skipping an IOMMU group that is not a number");
            continue;
        };
        groups.push(read_group(root, id, &drivers)?);
    }
    groups.sort_unstable_by_key(|g| g.id);
    Ok(groups)
}

/// Reads group `id`: members, domain type, viability. A member missing from `drivers` has
/// its `driver` link read.
pub fn read_group(
    root: &SysfsRoot,
    id: u32,
    drivers: &HashMap<PciAddress, Option<&str>>,
) -> Result<IommuGroup, ReadError> {
    let mut dir = root.iommu_groups_dir();
    dir.push(id.to_string());
    let domain_type = read_attr(&dir.join("type"))?;
    dir.push("devices");

    let mut members = Vec::new();
    let mut blockers = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        // The group went away with its last member (VFs destroyed mid-scan): nothing blocks it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(IommuGroup {
                id,
                members,
                domain_type,
                viable: true,
                blockers,
            });
        }
        Err(source) => return Err(ReadError { path: dir, source }),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let driver = match name.parse::<PciAddress>() {
            Ok(address) => {
                members.push(address);
                match drivers.get(&address) {
                    Some(driver) => driver.map(str::to_owned),
                    // A member outside the PCI scan (it appeared since): read it directly.
                    None => read_link_name(&entry.path().join("driver"))?,
                }
            }
            // Non-PCI members exist on some platforms; judge them by their driver link too.
            Err(_) => read_link_name(&entry.path().join("driver"))?,
        };
        if !driver_is_vfio_safe(driver.as_deref()) {
            blockers.push(GroupBlocker {
                member: name,
                driver: driver.unwrap_or_default(),
            });
        }
    }
    members.sort_unstable();
    blockers.sort_unstable_by(|a, b| a.member.cmp(&b.member));
    Ok(IommuGroup {
        id,
        members,
        domain_type,
        viable: blockers.is_empty(),
        blockers,
    })
}
