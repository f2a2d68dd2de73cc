//! A generator of synthetic sysfs trees shaped like a large host, for benchmarks and tests.
//!
//! The layout matches what a real kernel shows (and what `tests/vm/capture-sysfs.sh` captures):
//! `sys/bus/pci/devices/ADDR` symlinks into `sys/devices/pci0000:00/ADDR`, `driver` and
//! `iommu_group` links with the kernel's relative targets, `virtfnN` links on PFs, and
//! `sys/kernel/iommu_groups/N/devices/ADDR`. It also writes a 64-byte `config` header per
//! function so `lspci -A linux-sysfs` can read the same tree for comparison.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

use passthroughd_proto::PciAddress;

/// The shape of the host to generate.
#[derive(Debug, Clone, Copy)]
pub struct HostShape {
    pub functions: u32,
    pub vfs: u32,
    pub vfs_per_pf: u32,
    pub groups: u32,
}

impl HostShape {
    /// The large host of the inventory benchmark: 4,096 functions, 512 of them VFs
    /// (64 PFs with 8 each), in 300 IOMMU groups.
    pub const LARGE: Self = Self {
        functions: 4096,
        vfs: 512,
        vfs_per_pf: 8,
        groups: 300,
    };
}

/// What the generator decided for function `i`, so tests can check the scan against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub address: PciAddress,
    pub class: u32,
    pub driver: Option<&'static str>,
    pub group: u32,
    /// (PF address, VF index) for VFs.
    pub vf_of: Option<(PciAddress, u32)>,
    /// Number of VFs for PFs.
    pub num_vfs: u32,
}

/// Address of the `i`-th function: eight functions per device, 32 devices per bus.
fn address(i: u32) -> PciAddress {
    let bus = (i / 256) as u8;
    let device = ((i / 8) % 32) as u8;
    let function = (i % 8) as u8;
    PciAddress::new(0, bus, device, function).unwrap_or_else(|| unreachable!("ranges are masked"))
}

/// The plan for every function of `shape`, in address order.
pub fn plan(shape: HostShape) -> Vec<Planned> {
    let plain = shape.functions - shape.vfs;
    let pfs = shape.vfs / shape.vfs_per_pf.max(1);
    (0..shape.functions)
        .map(|i| {
            // Functions are grouped in contiguous blocks, like multi-function devices
            // behind a switch without ACS.
            let group =
                (u64::from(i) * u64::from(shape.groups) / u64::from(shape.functions)) as u32;
            if i >= plain {
                let j = i - plain;
                let pf = address((j / shape.vfs_per_pf) * 8);
                return Planned {
                    address: address(i),
                    class: 0x020000,
                    driver: [Some("vfio-pci"), None, Some("igbvf")][(j % 3) as usize],
                    group,
                    vf_of: Some((pf, j % shape.vfs_per_pf)),
                    num_vfs: 0,
                };
            }
            let is_pf = i % 8 == 0 && i / 8 < pfs;
            let (class, driver) = match i % 8 {
                _ if is_pf => (0x020000, Some("igb")),
                0 => (0x060400, Some("pcieport")),
                1 => (0x010802, Some("nvme")),
                2 => (0x030000, None),
                3 => (0x020000, Some("vfio-pci")),
                _ => (0x0c0330, Some("xhci_hcd")),
            };
            Planned {
                address: address(i),
                class,
                driver,
                group,
                vf_of: None,
                num_vfs: if is_pf { shape.vfs_per_pf } else { 0 },
            }
        })
        .collect()
}

/// Writes a tree for `shape` under `root` (which must exist and be empty).
pub fn generate(root: &Path, shape: HostShape) -> io::Result<Vec<Planned>> {
    let planned = plan(shape);
    let devices = root.join("sys/devices/pci0000:00");
    let bus_devices = root.join("sys/bus/pci/devices");
    let drivers = root.join("sys/bus/pci/drivers");
    let groups = root.join("sys/kernel/iommu_groups");
    fs::create_dir_all(&devices)?;
    fs::create_dir_all(&bus_devices)?;

    for p in &planned {
        let name = p.address.to_string();
        let dir = devices.join(&name);
        fs::create_dir(&dir)?;
        let (vendor, device) = match (p.vf_of, p.num_vfs) {
            (Some(_), _) => (0x8086u16, 0x10cau16),
            (None, n) if n > 0 => (0x8086, 0x10c9),
            _ => (0x1af4, 0x1000 + (p.class >> 16) as u16),
        };
        let write = |attr: &str, value: String| fs::write(dir.join(attr), value + "\n");
        let driver_line = p
            .driver
            .map(|d| format!("DRIVER={d}\n"))
            .unwrap_or_default();
        write(
            "uevent",
            format!(
                "{driver_line}PCI_CLASS={:X}\nPCI_ID={vendor:04X}:{device:04X}\n\
                 PCI_SUBSYS_ID={vendor:04X}:0001\nPCI_SLOT_NAME={name}\n\
                 MODALIAS=pci:v0000{vendor:04X}d0000{device:04X}sv0000{vendor:04X}sd00000001bc{:02X}sc{:02X}i{:02X}",
                p.class,
                p.class >> 16,
                (p.class >> 8) & 0xff,
                p.class & 0xff
            ),
        )?;
        write("vendor", format!("{vendor:#06x}"))?;
        write("device", format!("{device:#06x}"))?;
        write("subsystem_vendor", format!("{vendor:#06x}"))?;
        write("subsystem_device", "0x0001".into())?;
        write("class", format!("{:#08x}", p.class))?;
        write("numa_node", "-1".into())?;
        write("driver_override", "(null)".into())?;
        write("enable", "1".into())?;
        if p.class >> 16 == 0x03 {
            write("boot_vga", "0".into())?;
        }
        fs::write(dir.join("config"), config_header(vendor, device, p.class))?;
        if p.num_vfs > 0 {
            write("sriov_totalvfs", p.num_vfs.to_string())?;
            write("sriov_numvfs", p.num_vfs.to_string())?;
            write("sriov_drivers_autoprobe", "1".into())?;
        }
        if let Some((pf, index)) = p.vf_of {
            symlink(format!("../{pf}"), dir.join("physfn"))?;
            symlink(
                format!("../{name}"),
                devices.join(pf.to_string()).join(format!("virtfn{index}")),
            )?;
        }
        symlink(
            format!("../../../devices/pci0000:00/{name}"),
            bus_devices.join(&name),
        )?;
        if let Some(driver) = p.driver {
            let driver_dir = drivers.join(driver);
            fs::create_dir_all(&driver_dir)?;
            symlink(
                format!("../../../../devices/pci0000:00/{name}"),
                driver_dir.join(&name),
            )?;
            symlink(
                format!("../../../bus/pci/drivers/{driver}"),
                dir.join("driver"),
            )?;
        }
        let group_dir = groups.join(p.group.to_string());
        if !group_dir.exists() {
            fs::create_dir_all(group_dir.join("devices"))?;
            fs::write(group_dir.join("type"), "DMA-FQ\n")?;
        }
        symlink(
            format!("../../../../devices/pci0000:00/{name}"),
            group_dir.join("devices").join(&name),
        )?;
        symlink(
            format!("../../../kernel/iommu_groups/{}", p.group),
            dir.join("iommu_group"),
        )?;
    }
    Ok(planned)
}

/// The first 64 bytes of configuration space: ids, class and a type-0 header.
fn config_header(vendor: u16, device: u16, class: u32) -> Vec<u8> {
    let mut config = vec![0u8; 64];
    config[0..2].copy_from_slice(&vendor.to_le_bytes());
    config[2..4].copy_from_slice(&device.to_le_bytes());
    config[9..12].copy_from_slice(&class.to_le_bytes()[0..3]);
    config[0x2c..0x2e].copy_from_slice(&vendor.to_le_bytes());
    config[0x2e..0x30].copy_from_slice(&1u16.to_le_bytes());
    config
}
