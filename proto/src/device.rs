//! Descriptions of PCI functions and IOMMU groups, as the daemon reports them.

use serde::{Deserialize, Serialize};

use crate::PciAddress;

/// PCI base class of bridges (host, ISA, PCI-to-PCI, ...). vfio-pci refuses them, and unbinding
/// one cuts off everything behind it.
pub const CLASS_BRIDGE: u8 = 0x06;
/// PCI base class of display controllers; with `boot_vga` set, the console's framebuffer.
pub const CLASS_DISPLAY: u8 = 0x03;

/// Drivers under which a function does not stop its IOMMU group from being handed to a VM:
/// vfio-pci and its variants own the DMA themselves, pci-stub never enables DMA, and pcieport
/// declares `driver_managed_dma`.
pub const VFIO_SAFE_DRIVERS: &[&str] = &[
    "vfio-pci",
    "pci-stub",
    "pcieport",
    // vfio-pci variant drivers shipped with the kernel; they bind through the vfio-pci core.
    "mlx5_vfio_pci",
    "hisi_acc_vfio_pci",
    "pds_vfio_pci",
    "virtio_vfio_pci",
    "nvgrace_gpu_vfio_pci",
    "qat_vfio_pci",
];

/// One PCI function as found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunction {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
    /// The 24-bit class code: base class, subclass, programming interface.
    pub class: u32,
    /// Names from the system's pci.ids, when it is installed and knows the ids.
    pub vendor_name: Option<String>,
    pub device_name: Option<String>,
    pub class_name: Option<String>,
    /// The driver bound now, if any.
    pub driver: Option<String>,
    /// The driver named in `driver_override`, if one is set.
    pub driver_override: Option<String>,
    /// IOMMU group number; `None` when the IOMMU is off or the function is not translated.
    pub iommu_group: Option<u32>,
    /// NUMA node the function is attached to; `None` on single-node hosts (the kernel says -1).
    pub numa_node: Option<u32>,
    /// The firmware's boot display device (the console's framebuffer lives here).
    pub boot_vga: bool,
    /// SR-IOV physical function capability, when the function has one.
    pub sriov: Option<SriovPf>,
    /// Set when this function is an SR-IOV virtual function.
    pub vf_of: Option<VfOf>,
    /// The process holding it open through VFIO, "comm (pid N, VM name)": filled in by the
    /// daemon for `list`, `show` and `vf list`, not by a scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use_by: Option<String>,
}

impl PciFunction {
    pub fn base_class(&self) -> u8 {
        (self.class >> 16) as u8
    }

    /// Bridges (host, PCI-to-PCI, root ports) are never assigned.
    pub fn is_bridge(&self) -> bool {
        self.base_class() == CLASS_BRIDGE
    }

    /// Role in SR-IOV terms, as `list` shows it.
    pub fn role(&self) -> &'static str {
        match (&self.sriov, &self.vf_of) {
            (_, Some(_)) => "vf",
            (Some(_), None) => "pf",
            (None, None) if self.is_bridge() => "bridge",
            (None, None) => "endpoint",
        }
    }
}

/// SR-IOV state of a physical function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovPf {
    pub total_vfs: u32,
    pub num_vfs: u32,
    /// Whether the kernel probes host drivers for newly created VFs.
    pub drivers_autoprobe: bool,
}

/// Where a virtual function comes from: its physical function and index (`virtfnN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfOf {
    pub pf: PciAddress,
    pub index: u32,
}

/// An IOMMU group: the smallest set of functions the IOMMU can isolate from each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuGroup {
    pub id: u32,
    pub members: Vec<PciAddress>,
    /// The group's default DMA domain type (`DMA`, `DMA-FQ`, `identity`, ...), when readable.
    pub domain_type: Option<String>,
    /// Whether a VM can be given this group right now.
    pub viable: bool,
    /// Members whose host drivers make the group non-viable.
    pub blockers: Vec<GroupBlocker>,
}

/// A group member that keeps the group from being viable, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBlocker {
    /// The member; a non-PCI member is named by its sysfs entry name.
    pub member: String,
    /// The host driver it is bound to.
    pub driver: String,
}

impl IommuGroup {
    /// One line saying why the group is not viable, e.g. "0000:01:00.0 is bound to igb".
    pub fn why_not_viable(&self) -> Option<String> {
        (!self.viable).then(|| {
            self.blockers
                .iter()
                .map(|b| format!("{} is bound to {}", b.member, b.driver))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

/// Whether `driver` is vfio-pci or one of its variants: a function bound to it gives its group
/// a VFIO node (`/dev/vfio/N`) that a VMM can hold open.
pub fn driver_is_vfio(driver: Option<&str>) -> bool {
    driver.is_some_and(|d| d != "pci-stub" && d != "pcieport" && VFIO_SAFE_DRIVERS.contains(&d))
}

/// Whether a function bound to `driver` (or to none) leaves its group usable for VFIO.
pub fn driver_is_vfio_safe(driver: Option<&str>) -> bool {
    driver.is_none_or(|d| VFIO_SAFE_DRIVERS.contains(&d))
}
