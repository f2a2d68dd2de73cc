//! The PCI functions and IOMMU groups of a host, read from sysfs in one scan.

use std::collections::HashMap;
use std::path::PathBuf;
use std::thread;

use passthroughd_proto::{IommuGroup, PciAddress, PciFunction, SriovPf, VfOf};
use tracing::{debug, warn};

use crate::kernel::sysfs::{
    DeviceDir, ReadError, SysfsRoot, parse_hex, read_link_name, read_virtfn,
};
use crate::observe::groups;
use crate::observe::pciids::PciIds;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("no PCI bus under {}: is sysfs mounted there?", .0.display())]
    NoPciBus(PathBuf),
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Every PCI function and IOMMU group, sorted by address and group number.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub functions: Vec<PciFunction>,
    pub groups: Vec<IommuGroup>,
}

impl Inventory {
    /// Reads the whole PCI inventory under `root`. Functions that disappear while we read them
    /// (hot-unplug, VFs being destroyed) are left out rather than failing the scan.
    pub fn scan(root: &SysfsRoot, ids: &PciIds) -> Result<Self, InventoryError> {
        Self::scan_with(root, ids, &Avoid::none())
    }

    /// [`Self::scan`], leaving alone the attributes of functions that `avoid` names (see
    /// [`Avoid`]).
    pub fn scan_with(
        root: &SysfsRoot,
        ids: &PciIds,
        avoid: &Avoid<'_>,
    ) -> Result<Self, InventoryError> {
        let addresses = list_functions(root)?;

        // Reading attributes is thousands of small syscalls; spread them over the cores.
        let workers = thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8)
            .min(addresses.len().div_ceil(64).max(1));
        let chunk = addresses.len().div_ceil(workers).max(1);
        let scanned: Vec<Result<Vec<Scanned>, ReadError>> = thread::scope(|scope| {
            let handles: Vec<_> = addresses
                .chunks(chunk)
                .map(|part| scope.spawn(move || read_functions(root, part, avoid)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });

        let mut functions = Vec::with_capacity(addresses.len());
        let mut vf_of = HashMap::new();
        for part in scanned {
            for Scanned { function, virtfns } in part? {
                for (index, vf) in virtfns {
                    vf_of.insert(
                        vf,
                        VfOf {
                            pf: function.address,
                            index,
                        },
                    );
                }
                functions.push(function);
            }
        }
        // A VF is known by its PF's `virtfnN` links, which give the index as well.
        for function in &mut functions {
            function.vf_of = vf_of.get(&function.address).copied();
            name(function, ids);
        }

        let groups = groups::scan(root, &functions)?;
        let mut inventory = Self { functions, groups };
        for g in 0..inventory.groups.len() {
            for m in 0..inventory.groups[g].members.len() {
                let (id, member) = (inventory.groups[g].id, inventory.groups[g].members[m]);
                if let Ok(i) = inventory
                    .functions
                    .binary_search_by_key(&member, |f| f.address)
                {
                    inventory.functions[i].iommu_group = Some(id);
                }
            }
        }
        Ok(inventory)
    }

    /// Reads only the IOMMU groups `groups` and the group-less functions `loose`: what a
    /// request on those groups needs, fresh, without scanning the host. Everything else is
    /// absent; VFs among them still get `vf_of` (from their PF's links).
    pub fn scan_groups(
        root: &SysfsRoot,
        ids: &PciIds,
        groups: &[u32],
        loose: &[PciAddress],
    ) -> Result<Self, InventoryError> {
        Self::scan_groups_with(root, ids, groups, loose, &Avoid::none())
    }

    /// [`Self::scan_groups`] with an [`Avoid`].
    pub fn scan_groups_with(
        root: &SysfsRoot,
        ids: &PciIds,
        groups: &[u32],
        loose: &[PciAddress],
        avoid: &Avoid<'_>,
    ) -> Result<Self, InventoryError> {
        let mut read = Vec::new();
        for &id in groups {
            let group = groups::read_group(root, id, &HashMap::new())?;
            read.push(group);
        }
        let mut addresses: Vec<PciAddress> = read
            .iter()
            .flat_map(|g| g.members.iter().copied())
            .chain(loose.iter().copied())
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        let mut functions: Vec<PciFunction> = read_functions(root, &addresses, avoid)?
            .into_iter()
            .map(|s| s.function)
            .collect();
        for function in &mut functions {
            function.vf_of = read_vf_of(root, function.address)?;
            function.iommu_group = read
                .iter()
                .find(|g| g.members.contains(&function.address))
                .map(|g| g.id);
            name(function, ids);
        }
        read.sort_unstable_by_key(|g| g.id);
        Ok(Self {
            functions,
            groups: read,
        })
    }

    /// Adds the functions of `other` this one does not have (a PF read beside its VF's group).
    pub fn merge(&mut self, other: Inventory) {
        for f in other.functions {
            if let Err(i) = self
                .functions
                .binary_search_by_key(&f.address, |x| x.address)
            {
                self.functions.insert(i, f);
            }
        }
        for g in other.groups {
            if let Err(i) = self.groups.binary_search_by_key(&g.id, |x| x.id) {
                self.groups.insert(i, g);
            }
        }
    }

    pub fn function(&self, address: PciAddress) -> Option<&PciFunction> {
        self.functions
            .binary_search_by_key(&address, |f| f.address)
            .ok()
            .map(|i| &self.functions[i])
    }

    pub fn group(&self, id: u32) -> Option<&IommuGroup> {
        self.groups
            .binary_search_by_key(&id, |g| g.id)
            .ok()
            .map(|i| &self.groups[i])
    }

    /// The virtual functions of `pf`, in index order.
    pub fn vfs_of(&self, pf: PciAddress) -> Vec<&PciFunction> {
        let mut vfs: Vec<_> = self
            .functions
            .iter()
            .filter(|f| f.vf_of.is_some_and(|v| v.pf == pf))
            .collect();
        vfs.sort_by_key(|f| f.vf_of.map(|v| v.index));
        vfs
    }
}

/// The addresses in `sys/bus/pci/devices`, sorted. Entries that are not valid addresses are
/// skipped with a warning: nothing the kernel did not name correctly becomes a path.
pub fn list_functions(root: &SysfsRoot) -> Result<Vec<PciAddress>, InventoryError> {
    let dir = root.pci_devices_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(InventoryError::NoPciBus(dir));
        }
        Err(source) => return Err(ReadError { path: dir, source }.into()),
    };
    let mut addresses = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ReadError {
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name();
        match name.to_str().map(str::parse::<PciAddress>) {
            Some(Ok(address)) => addresses.push(address),
            _ => warn!(entry = ?name, "skipping a PCI device entry that is not an address"),
        }
    }
    addresses.sort_unstable();
    Ok(addresses)
}

/// Vendor, device and class names from pci.ids.
fn name(function: &mut PciFunction, ids: &PciIds) {
    function.vendor_name = ids.vendor(function.vendor_id).map(str::to_owned);
    function.device_name = ids
        .device(function.vendor_id, function.device_id)
        .map(str::to_owned);
    function.class_name = ids.class(function.class).map(str::to_owned);
}

/// A VF's PF and index, from its `physfn` link and the PF's `virtfnN` link back to it; `None`
/// for anything else. For one function at a time; the full scan reads PFs' links instead.
fn read_vf_of(root: &SysfsRoot, address: PciAddress) -> Result<Option<VfOf>, ReadError> {
    let Some(pf) =
        read_link_name(&root.pci_device_attr(address, "physfn"))?.and_then(|n| n.parse().ok())
    else {
        return Ok(None);
    };
    // The PF's `virtfnN` links, in order, rather than its `sriov_numvfs`, whose read takes the
    // PF's lock (held for as long as another operation changes its VFs).
    for index in 0..=u32::from(u16::MAX) {
        match read_virtfn(root, pf, index)? {
            Some(vf) if vf == address => return Ok(Some(VfOf { pf, index })),
            Some(_) => {}
            None => break,
        }
    }
    Ok(None)
}

/// Functions whose lock-taking attributes a scan must not read, with the values to use instead.
///
/// The kernel takes a device's lock to show `driver_override` and `sriov_numvfs` (and
/// `sriov_drivers_autoprobe`), and a write in flight on the device (an unbind waiting for a VM to
/// let go, a `sriov_numvfs` write making VFs) holds that lock for as long as it waits. A reader
/// must never wait behind it: for such a function the scan serves the last known values (from
/// `last`), or none, and counts a PF's VFs from its `virtfnN` links.
pub struct Avoid<'a> {
    pub skip: &'a (dyn Fn(PciAddress) -> bool + Sync),
    pub last: Option<&'a Inventory>,
}

impl std::fmt::Debug for Avoid<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Avoid").finish_non_exhaustive()
    }
}

impl Avoid<'static> {
    /// Reads everything.
    pub fn none() -> Self {
        Self {
            skip: &|_| false,
            last: None,
        }
    }
}

/// One function as read, plus its `virtfnN` links (index, VF address) when it is a PF.
struct Scanned {
    function: PciFunction,
    virtfns: Vec<(u32, PciAddress)>,
}

fn read_functions(
    root: &SysfsRoot,
    addresses: &[PciAddress],
    avoid: &Avoid<'_>,
) -> Result<Vec<Scanned>, ReadError> {
    let mut out = Vec::with_capacity(addresses.len());
    for &address in addresses {
        let last = if (avoid.skip)(address) {
            Some(avoid.last.and_then(|i| i.function(address)))
        } else {
            None
        };
        match read_function(root, address, last)? {
            Some(scanned) => out.push(scanned),
            None => debug!(%address, "function vanished during the scan"),
        }
    }
    Ok(out)
}

/// Reads one function; `None` when it is gone (its identity attributes are missing). With
/// `last` (`Some`), the attributes that take the device's lock are not read: the last known
/// values stand in (none when the function was not known).
fn read_function(
    root: &SysfsRoot,
    address: PciAddress,
    last: Option<Option<&PciFunction>>,
) -> Result<Option<Scanned>, ReadError> {
    let Some(dir) = DeviceDir::open(root.pci_device_dir(address))? else {
        return Ok(None);
    };
    let attr = |name: &str| dir.attr(name);
    // `uevent` carries ids, class and driver in one read (six separate attributes otherwise);
    // the scan is dominated by the number of files opened.
    let Some(uevent) = attr("uevent")?.as_deref().and_then(Uevent::parse) else {
        return Ok(None);
    };
    // The kernel prints -1 when the platform has no NUMA information.
    let numa_node = attr("numa_node")?.and_then(|n| n.parse::<u32>().ok());
    // Unset overrides read "(null)" on current kernels, "" on some older ones.
    let driver_override = match last {
        Some(last) => last.and_then(|f| f.driver_override.clone()),
        None => attr("driver_override")?.filter(|o| !o.is_empty() && o != "(null)"),
    };
    // Only display controllers carry boot_vga; skip the failed open for everything else.
    let boot_vga = (uevent.class >> 16) as u8 == passthroughd_proto::device::CLASS_DISPLAY
        && attr("boot_vga")?.as_deref() == Some("1");

    let mut virtfns = Vec::new();
    let sriov = match attr("sriov_totalvfs")?.and_then(|t| t.parse::<u32>().ok()) {
        Some(total_vfs) if total_vfs > 0 => {
            let known = last.map(|f| f.and_then(|f| f.sriov));
            let num_vfs = match known {
                // The VFs made so far: the kernel adds `virtfn0`, `virtfn1`... one by one
                // (and removes them all) while it holds the lock, without taking it to read.
                Some(_) => {
                    while let Some(vf) = read_virtfn(root, address, virtfns.len() as u32)? {
                        virtfns.push((virtfns.len() as u32, vf));
                    }
                    virtfns.len() as u32
                }
                None => attr("sriov_numvfs")?
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
            };
            let drivers_autoprobe = match known {
                Some(sriov) => sriov.is_none_or(|s| s.drivers_autoprobe),
                None => attr("sriov_drivers_autoprobe")?.as_deref() != Some("0"),
            };
            if known.is_none() {
                for index in 0..num_vfs {
                    if let Some(vf) = read_virtfn(root, address, index)? {
                        virtfns.push((index, vf));
                    }
                }
            }
            Some(SriovPf {
                total_vfs,
                num_vfs,
                drivers_autoprobe,
            })
        }
        _ => None,
    };

    Ok(Some(Scanned {
        function: PciFunction {
            address,
            vendor_id: uevent.vendor_id,
            device_id: uevent.device_id,
            subsystem_vendor_id: uevent.subsystem_vendor_id,
            subsystem_device_id: uevent.subsystem_device_id,
            class: uevent.class,
            vendor_name: None,
            device_name: None,
            class_name: None,
            driver: uevent.driver,
            driver_override,
            // Filled from the group directories, which list every member: 300 directory reads
            // instead of 4,096 `iommu_group` links on a large host.
            iommu_group: None,
            numa_node,
            boot_vga,
            sriov,
            vf_of: None,
            in_use_by: None,
        },
        virtfns,
    }))
}

/// The fields of a PCI device's `uevent` we use:
/// `DRIVER=igb`, `PCI_CLASS=20000`, `PCI_ID=8086:10C9`, `PCI_SUBSYS_ID=8086:A03C`.
#[derive(Debug, PartialEq, Eq)]
struct Uevent {
    driver: Option<String>,
    class: u32,
    vendor_id: u16,
    device_id: u16,
    subsystem_vendor_id: u16,
    subsystem_device_id: u16,
}

impl Uevent {
    /// `None` when the ids or class are missing: not a PCI device we can describe.
    fn parse(text: &str) -> Option<Self> {
        let mut driver = None;
        let (mut class, mut id, mut subsys) = (None, None, None);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("DRIVER", name)) => driver = Some(name.to_owned()),
                Some(("PCI_CLASS", value)) => class = parse_hex(value),
                Some(("PCI_ID", value)) => id = parse_id_pair(value),
                Some(("PCI_SUBSYS_ID", value)) => subsys = parse_id_pair(value),
                _ => {}
            }
        }
        let (vendor_id, device_id) = id?;
        let (subsystem_vendor_id, subsystem_device_id) = subsys.unwrap_or((0, 0));
        Some(Self {
            driver,
            class: class?,
            vendor_id,
            device_id,
            subsystem_vendor_id,
            subsystem_device_id,
        })
    }
}

/// `8086:10C9` → (0x8086, 0x10c9).
fn parse_id_pair(text: &str) -> Option<(u16, u16)> {
    let (a, b) = text.split_once(':')?;
    Some((
        u16::from_str_radix(a, 16).ok()?,
        u16::from_str_radix(b, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_kernel_uevent() {
        let text = "DRIVER=igb\nPCI_CLASS=20000\nPCI_ID=8086:10C9\nPCI_SUBSYS_ID=8086:A03C\n\
                    PCI_SLOT_NAME=0000:01:00.0\nMODALIAS=pci:v00008086d000010C9sv00008086sd0000A03Cbc02sc00i00";
        assert_eq!(
            Uevent::parse(text),
            Some(Uevent {
                driver: Some("igb".into()),
                class: 0x020000,
                vendor_id: 0x8086,
                device_id: 0x10c9,
                subsystem_vendor_id: 0x8086,
                subsystem_device_id: 0xa03c,
            })
        );
        // Unbound: no DRIVER line.
        let unbound =
            Uevent::parse("PCI_CLASS=60400\nPCI_ID=1B36:000E\nPCI_SUBSYS_ID=0000:0000").unwrap();
        assert_eq!((unbound.driver, unbound.class), (None, 0x060400));
        assert_eq!(Uevent::parse("DRIVER=igb\nPCI_CLASS=20000"), None);
        assert_eq!(Uevent::parse("PCI_CLASS=zz\nPCI_ID=8086:10C9"), None);
    }
}
