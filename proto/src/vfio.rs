//! What VFIO says about a device opened the way a VMM opens it (regions, interrupts, reset,
//! IOMMU backend), and the `verify` report built on it. The daemon decodes the kernel's answers
//! into these types (`kernel::vfio`); clients print them.

use serde::{Deserialize, Serialize};

/// What VFIO says about one device, opened the way a VMM opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// From `VFIO_DEVICE_GET_INFO`.
    pub flags: DeviceFlags,
    /// Every region the kernel reports, by index; a BAR the device does not implement has size 0.
    /// Indexes the kernel answers EINVAL for (the VGA region of a non-VGA device) are left out.
    pub regions: Vec<RegionInfo>,
    /// Every interrupt type the kernel reports, by index; a count of 0 means none of that type
    /// (a VF has no INTx). Indexes the kernel answers EINVAL for (ERR on a conventional PCI
    /// device) are left out.
    pub irqs: Vec<IrqInfo>,
    /// The IOMMU backend the container was set to.
    pub iommu_backend: IommuBackend,
}

/// `vfio_device_info.flags`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFlags {
    /// A PCI device (`VFIO_DEVICE_FLAGS_PCI`): regions and IRQs have PCI meanings.
    pub pci: bool,
    /// `VFIO_DEVICE_RESET` is supported: vfio-pci's reset when it opened the device worked. This,
    /// not sysfs `reset_method`, is the answer: `reset_method` is probed when the device is
    /// enumerated, and can list `bus` while a sibling found later shares the bus (the e1000 of
    /// tests/vm/scenarios/vfio-probe.sh).
    pub reset: bool,
}

/// One region of a device (`VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub index: u32,
    /// `BAR0`..`BAR5`, `ROM`, `CONFIG`, `VGA` for a PCI device, else `region N`.
    pub name: String,
    /// Bytes; 0 for a BAR the device does not implement.
    pub size: u64,
    pub flags: RegionFlags,
}

/// `vfio_region_info.flags`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionFlags {
    pub read: bool,
    pub write: bool,
    /// The VMM may mmap the region (a BAR the guest then reaches without a VM exit).
    pub mmap: bool,
}

/// One interrupt type of a device (`VFIO_DEVICE_GET_IRQ_INFO`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqInfo {
    pub index: u32,
    /// `INTx`, `MSI`, `MSI-X`, `ERR`, `REQ` for a PCI device, else `irq N`.
    pub name: String,
    /// How many vectors of this type the device has (MSI-X: the table size).
    pub count: u32,
    pub flags: IrqFlags,
}

/// `vfio_irq_info.flags`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqFlags {
    /// Signalled through an eventfd.
    pub eventfd: bool,
    pub maskable: bool,
    /// Masked by the kernel when it fires (INTx, level-triggered).
    pub automasked: bool,
    /// The number of vectors cannot change once enabled.
    pub noresize: bool,
}

/// The name of region `index`: the fixed vfio-pci indexes of `linux/vfio.h` for a PCI device;
/// `region N` for device-specific regions and other buses.
pub fn region_name(pci: bool, index: u32) -> String {
    const PCI: [&str; 9] = [
        "BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "CONFIG", "VGA",
    ];
    match usize::try_from(index).ok().and_then(|i| PCI.get(i)) {
        Some(name) if pci => (*name).to_owned(),
        _ => format!("region {index}"),
    }
}

/// The name of interrupt type `index`, as [`region_name`] does for regions.
pub fn irq_name(pci: bool, index: u32) -> String {
    const PCI: [&str; 5] = ["INTx", "MSI", "MSI-X", "ERR", "REQ"];
    match usize::try_from(index).ok().and_then(|i| PCI.get(i)) {
        Some(name) if pci => (*name).to_owned(),
        _ => format!("irq {index}"),
    }
}

/// The IOMMU backend of a VFIO container (`VFIO_SET_IOMMU`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IommuBackend {
    /// `VFIO_TYPE1v2_IOMMU`: what every current VMM asks for.
    Type1v2,
    /// `VFIO_TYPE1_IOMMU`: the original type1, when v2 is missing.
    Type1,
}

impl IommuBackend {
    /// In order of preference.
    pub const ALL: [Self; 2] = [Self::Type1v2, Self::Type1];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Type1v2 => "type1v2",
            Self::Type1 => "type1",
        }
    }
}

impl std::fmt::Display for IommuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Owner and mode of a device node (`/dev/vfio/N`): who may open it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAccess {
    pub path: String,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits, e.g. `0600`.
    pub mode: String,
}

/// Whether a VM could be given a function now, from what sysfs and `/proc` say (`show`); the
/// proof is `verify`, which opens it through VFIO.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// The first thing in the way, with its fix.
    pub blocker: Option<String>,
    /// The kernel's reset methods for it (`reset_method`), in the order it tries them.
    pub reset_methods: Vec<String>,
    /// A vfio-pci variant driver the kernel ships for this device (the config's
    /// `driver = "auto"` binds it instead of vfio-pci).
    pub variant_driver: Option<String>,
    /// Who may open its group node, while it exists.
    pub group_node: Option<NodeAccess>,
}

/// `show ADDR`: the function and its readiness for passthrough.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionDetail {
    #[serde(flatten)]
    pub function: crate::PciFunction,
    pub passthrough: Readiness,
}

/// `verify ADDR`: the function opened through VFIO the way a VMM opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub address: crate::PciAddress,
    /// A VM could be given it now: the group is viable, the IOMMU took it, the device opened.
    pub ready: bool,
    /// Why not, with the fix (the first problem found).
    pub problem: Option<String>,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    pub group_viable: bool,
    /// Group members that keep it from being viable.
    pub group_blockers: Vec<crate::GroupBlocker>,
    /// Whether the kernel's IOMMU accepted the group (interrupt remapping present, or unsafe
    /// interrupts allowed); `None` when it was not asked.
    pub interrupt_remapping: Option<bool>,
    /// The iommufd device node of the function (`/dev/vfio/devices/vfioN`), when the kernel
    /// offers one.
    pub iommufd_node: Option<String>,
    pub group_node: Option<NodeAccess>,
    /// What the device offers a VM (regions, interrupts, reset), when it opened.
    pub device: Option<DeviceInfo>,
    /// The kernel's reset methods (`reset_method`).
    pub reset_methods: Vec<String>,
    /// What a VMM needs beyond this: the node's access for non-root VMMs, locked memory.
    pub notes: Vec<String>,
}
