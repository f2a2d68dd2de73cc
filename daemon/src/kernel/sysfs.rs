//! Where kernel state lives, relative to a root that is a parameter.
//!
//! On a host the root is `/`; tests point it at a tree captured from a real kernel
//! (`tests/fixtures/`) or at a simulated one. Every path the daemon reads is built here from a
//! typed value ([`PciAddress`], a group number), never from a caller's string.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use passthroughd_proto::PciAddress;

/// A read of kernel state that failed for a reason other than the file being absent.
#[derive(Debug, thiserror::Error)]
#[error("reading {}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The filesystem root that `sys/` (and later `proc/`, `dev/`) hang off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsRoot {
    root: PathBuf,
}

impl Default for SysfsRoot {
    fn default() -> Self {
        Self::new("/")
    }
}

impl SysfsRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `sys/bus/pci/devices`: one symlink per PCI function, named by its address.
    pub fn pci_devices_dir(&self) -> PathBuf {
        self.root.join("sys/bus/pci/devices")
    }

    /// The directory of one function.
    pub fn pci_device_dir(&self, address: PciAddress) -> PathBuf {
        let mut dir = self.pci_devices_dir();
        dir.push(address.to_string());
        dir
    }

    /// `sys/kernel/iommu_groups`: one directory per group; empty when the IOMMU is off.
    pub fn iommu_groups_dir(&self) -> PathBuf {
        self.root.join("sys/kernel/iommu_groups")
    }

    /// An attribute of one function (`driver_override`, `driver`, `boot_vga`, ...). The name is
    /// always a constant of ours, never a caller's string.
    pub fn pci_device_attr(&self, address: PciAddress, attr: &'static str) -> PathBuf {
        let mut path = self.pci_device_dir(address);
        path.push(attr);
        path
    }

    /// `devices/ADDR/driver/unbind`: unbinds from whatever driver holds the function now,
    /// without us naming (and possibly mis-naming) that driver.
    pub fn pci_device_unbind(&self, address: PciAddress) -> PathBuf {
        let mut path = self.pci_device_dir(address);
        path.push("driver/unbind");
        path
    }

    /// `sys/bus/pci/drivers`: one directory per loaded PCI driver.
    pub fn pci_drivers_dir(&self) -> PathBuf {
        self.root.join("sys/bus/pci/drivers")
    }

    /// `sys/bus/pci/drivers_probe`: asks the kernel to find a driver for an unbound function.
    pub fn pci_drivers_probe(&self) -> PathBuf {
        self.root.join("sys/bus/pci/drivers_probe")
    }

    /// `sys/module`: one directory per loaded module.
    pub fn module_dir(&self) -> PathBuf {
        self.root.join("sys/module")
    }

    /// `sys/class/block`: every block device and partition, as links into the device tree.
    pub fn class_block_dir(&self) -> PathBuf {
        self.root.join("sys/class/block")
    }

    /// `sys/block`: whole disks only (holders of partitions live under `sys/class/block`).
    pub fn block_dir(&self) -> PathBuf {
        self.root.join("sys/block")
    }

    /// `sys/class/net`: network interfaces; `IF/device` links to the function.
    pub fn class_net_dir(&self) -> PathBuf {
        self.root.join("sys/class/net")
    }

    /// `sys/class/vtconsole`: console drivers; `vtconN/bind` is 1 while one is in use.
    pub fn vtconsole_dir(&self) -> PathBuf {
        self.root.join("sys/class/vtconsole")
    }

    /// `sys/class/drm`: DRM devices; `cardN/device` links to the function.
    pub fn class_drm_dir(&self) -> PathBuf {
        self.root.join("sys/class/drm")
    }

    /// `proc`: processes, mounts, swaps, routes.
    pub fn proc_dir(&self) -> PathBuf {
        self.root.join("proc")
    }

    /// A file under `proc/` (`cpuinfo`, `cmdline`, `sys/kernel/osrelease`).
    pub fn proc_file(&self, rel: &'static str) -> PathBuf {
        self.proc_dir().join(rel)
    }

    /// `sys/`: a path under sysfs, from a constant of ours (`kernel/mm/ksm/run`).
    pub fn sys_path(&self, rel: &'static str) -> PathBuf {
        self.root.join("sys").join(rel)
    }

    /// `dev/`: a device node (`kvm`, `vfio/vfio`, `cpu/0/msr`).
    pub fn dev_path(&self, rel: &'static str) -> PathBuf {
        self.root.join("dev").join(rel)
    }

    /// `dev/vfio/N`: the node of IOMMU group `group`, present while a member is on a VFIO driver.
    pub fn vfio_group_node(&self, group: u32) -> PathBuf {
        let mut path = self.dev_path("vfio");
        path.push(group.to_string());
        path
    }

    /// `boot/`: the kernel's config file lives here as `config-RELEASE`.
    pub fn boot_dir(&self) -> PathBuf {
        self.root.join("boot")
    }

    /// One module's parameter: `sys/module/MODULE/parameters/NAME`.
    pub fn module_param(&self, module: &'static str, name: &'static str) -> PathBuf {
        let mut path = self.module_dir();
        path.push(module);
        path.push("parameters");
        path.push(name);
        path
    }
}

/// The PCI address components of a resolved device path, outermost first:
/// `.../pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1` → [00:1c.0, 01:00.0].
/// The last one is the function the path belongs to.
pub fn pci_path_components(path: &Path) -> Vec<PciAddress> {
    path.components()
        .filter_map(|c| c.as_os_str().to_str())
        // Only the long form: a component such as `00:1c.0` is not how sysfs names functions.
        .filter(|name| name.len() >= 12)
        .filter_map(|name| name.parse().ok())
        .collect()
}

/// Reads a small sysfs attribute, trimmed of its trailing newline. `Ok(None)` when it does not
/// exist, which for sysfs means "this device has no such property".
///
/// Sysfs attributes are at most a page; we read them with one `read` into a stack buffer rather
/// than `fs::read_to_string`, which also stats the file: the inventory reads tens of thousands.
pub fn read_attr(path: &Path) -> Result<Option<String>, ReadError> {
    match File::open(path) {
        Ok(file) => read_open_attr(file, &|| path.to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReadError {
            path: path.to_owned(),
            source,
        }),
    }
}

/// One device's sysfs directory, opened once (`O_PATH`): its attributes are then opened
/// relative to it, so that each open walks one path component instead of the whole path and the
/// `bus/pci/devices` link. The full inventory scan opens tens of thousands of them.
#[derive(Debug)]
pub struct DeviceDir {
    fd: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl DeviceDir {
    /// `Ok(None)` when the device is gone.
    pub fn open(path: PathBuf) -> Result<Option<Self>, ReadError> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        match nix::fcntl::open(&path, flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => Ok(Some(Self { fd, path })),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(ReadError {
                path,
                source: e.into(),
            }),
        }
    }

    /// [`read_attr`] of the attribute `name` (a fixed name, never a caller's string).
    pub fn attr(&self, name: &str) -> Result<Option<String>, ReadError> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(&self.fd, name, flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => read_open_attr(File::from(fd), &|| self.path.join(name)),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(ReadError {
                path: self.path.join(name),
                source: e.into(),
            }),
        }
    }
}

/// The rest of [`read_attr`], once the file is open; `path` names it in errors.
fn read_open_attr(mut file: File, path: &dyn Fn() -> PathBuf) -> Result<Option<String>, ReadError> {
    let fail = |source| ReadError {
        path: path(),
        source,
    };
    // A sysfs attribute is produced by one `show()` call and handed out whole by the first
    // read, so a read shorter than the buffer is the complete value; that saves the second
    // read(2) that would only confirm end-of-file. Longer values fall back to reading on.
    let mut buf = [0u8; 512];
    loop {
        match file.read(&mut buf) {
            Ok(n) if n < buf.len() => return Ok(Some(trim(&buf[..n]))),
            Ok(_) => {
                let mut all = Vec::from(&buf[..]);
                file.read_to_end(&mut all).map_err(fail)?;
                return Ok(Some(trim(&all)));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A device removed while we read it: treat like an absent attribute.
            Err(e) if e.raw_os_error() == Some(19) => return Ok(None), // ENODEV
            Err(e) => return Err(fail(e)),
        }
    }
}

fn trim(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_owned()
}

/// The last component of a symlink's target (`driver` → `igb`, `iommu_group` → `12`).
/// `Ok(None)` when the link does not exist.
pub fn read_link_name(path: &Path) -> Result<Option<String>, ReadError> {
    match std::fs::read_link(path) {
        Ok(target) => Ok(target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReadError {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// VF `index` of `pf`: where its `virtfnN` link points, `None` when there is no such link (or
/// it names no PCI address).
pub fn read_virtfn(
    root: &SysfsRoot,
    pf: PciAddress,
    index: u32,
) -> Result<Option<PciAddress>, ReadError> {
    let link = root.pci_device_dir(pf).join(format!("virtfn{index}"));
    Ok(read_link_name(&link)?.and_then(|n| n.parse().ok()))
}

/// Parses a sysfs hex attribute such as `0x8086`.
pub fn parse_hex(text: &str) -> Option<u32> {
    u32::from_str_radix(text.strip_prefix("0x").unwrap_or(text), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_trimmed_attributes_and_absent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vendor");
        std::fs::write(&path, "0x8086\n").unwrap();
        assert_eq!(read_attr(&path).unwrap().as_deref(), Some("0x8086"));
        assert_eq!(read_attr(&dir.path().join("absent")).unwrap(), None);
        let long = "x".repeat(1000);
        std::fs::write(&path, &long).unwrap();
        assert_eq!(read_attr(&path).unwrap(), Some(long));
    }

    #[test]
    fn reads_link_names() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../../bus/pci/drivers/igb", dir.path().join("driver")).unwrap();
        assert_eq!(
            read_link_name(&dir.path().join("driver"))
                .unwrap()
                .as_deref(),
            Some("igb")
        );
        assert_eq!(
            read_link_name(&dir.path().join("iommu_group")).unwrap(),
            None
        );
    }

    #[test]
    fn parses_hex_attributes() {
        assert_eq!(parse_hex("0x8086"), Some(0x8086));
        assert_eq!(parse_hex("0x020000"), Some(0x020000));
        assert_eq!(parse_hex("zz"), None);
    }
}
