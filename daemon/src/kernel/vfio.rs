//! VFIO access: opening a device the way a VMM does, to report what a VM would get (regions,
//! interrupts, reset support) and to reset it.
//!
//! The sequence is the container/group one that QEMU and cloud-hypervisor use: open
//! `/dev/vfio/vfio` (the container) and `/dev/vfio/N` (the group), check that the group is viable,
//! put it in the container, pick the IOMMU backend (type1v2, else type1), then ask the group for
//! the device by its address. The kernel checks interrupt remapping when the backend takes the
//! group (`VFIO_SET_IOMMU`, or the device open under iommufd's compatibility container) and
//! answers EPERM without it; [`classify`] turns each step's errno into a [`VfioError`].
//!
//! Every fd is closed when [`SystemVfio::probe`] or [`SystemVfio::reset`] returns, on errors
//! too: they live in one [`Opened`], whose fields drop device first (a group cannot leave its
//! container while one of its devices is open), then the group (closing it takes it out of the
//! container), then the container.
//!
//! Why not rust-vmm's vfio-ioctls, whose structs we use through vfio-bindings: version 0.10 opens
//! `/dev/vfio/...` by absolute path (no root for tests to point elsewhere), requires type1v2 with
//! no type1 fallback, returns nothing from `VfioDevice::reset` (a failed reset is invisible), drops
//! the errno of `VFIO_GROUP_GET_STATUS` and `VFIO_GROUP_SET_CONTAINER`, and skips a region whose
//! info fails without saying which. The ioctls themselves are a dozen lines of nix macros below.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use passthroughd_proto::PciAddress;
use vfio_bindings::bindings::vfio as uapi;

use crate::error::ErrorKind;
use crate::kernel::sysfs::SysfsRoot;

pub use passthroughd_proto::vfio::{
    DeviceFlags, DeviceInfo, IommuBackend, IrqFlags, IrqInfo, RegionFlags, RegionInfo, irq_name,
    region_name,
};

/// `vfio_device_info.flags`, decoded.
pub fn device_flags(bits: u32) -> DeviceFlags {
    DeviceFlags {
        pci: bits & uapi::VFIO_DEVICE_FLAGS_PCI != 0,
        reset: bits & uapi::VFIO_DEVICE_FLAGS_RESET != 0,
    }
}

/// `vfio_region_info.flags`, decoded.
pub fn region_flags(bits: u32) -> RegionFlags {
    RegionFlags {
        read: bits & uapi::VFIO_REGION_INFO_FLAG_READ != 0,
        write: bits & uapi::VFIO_REGION_INFO_FLAG_WRITE != 0,
        mmap: bits & uapi::VFIO_REGION_INFO_FLAG_MMAP != 0,
    }
}

/// `vfio_irq_info.flags`, decoded.
pub fn irq_flags(bits: u32) -> IrqFlags {
    IrqFlags {
        eventfd: bits & uapi::VFIO_IRQ_INFO_EVENTFD != 0,
        maskable: bits & uapi::VFIO_IRQ_INFO_MASKABLE != 0,
        automasked: bits & uapi::VFIO_IRQ_INFO_AUTOMASKED != 0,
        noresize: bits & uapi::VFIO_IRQ_INFO_NORESIZE != 0,
    }
}

/// One region from the kernel's answer for its index.
pub fn region_info(pci: bool, raw: &uapi::vfio_region_info) -> RegionInfo {
    RegionInfo {
        index: raw.index,
        name: region_name(pci, raw.index),
        size: raw.size,
        flags: region_flags(raw.flags),
    }
}

/// One interrupt type from the kernel's answer for its index.
pub fn irq_info(pci: bool, raw: &uapi::vfio_irq_info) -> IrqInfo {
    IrqInfo {
        index: raw.index,
        name: irq_name(pci, raw.index),
        count: raw.count,
        flags: irq_flags(raw.flags),
    }
}

/// The extension number of `linux/vfio.h` for a backend.
fn extension(backend: IommuBackend) -> u32 {
    match backend {
        IommuBackend::Type1v2 => uapi::VFIO_TYPE1v2_IOMMU,
        IommuBackend::Type1 => uapi::VFIO_TYPE1_IOMMU,
    }
}

/// Why a device could not be opened (or reset) through VFIO. Messages are one line and do not
/// repeat their source; each variant that came from an errno keeps it as the source.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// `/dev/vfio/vfio` cannot be opened because it is not there: VFIO is not loaded.
    #[error("/dev/vfio/vfio is missing: VFIO is not loaded (modprobe vfio-pci)")]
    Unsupported {
        #[source]
        source: io::Error,
    },
    /// `/dev/vfio/N` is not there: no function of the group is bound to a VFIO driver.
    #[error(
        "/dev/vfio/{group} is missing: no function of IOMMU group {group} is bound to vfio-pci"
    )]
    NoGroup {
        group: u32,
        #[source]
        source: io::Error,
    },
    /// `VFIO_GROUP_GET_STATUS` says the group is not viable: some member is on a host driver.
    #[error(
        "IOMMU group {group} is not viable: a function in it is bound to a host driver; bind every member to vfio-pci or unbind it"
    )]
    NotViable { group: u32 },
    /// EBUSY: another process has the group open (`device: None`) or the device (`Some`).
    #[error("{}", busy_message(*group, *device))]
    Busy {
        group: u32,
        device: Option<PciAddress>,
        #[source]
        source: io::Error,
    },
    /// ENODEV from `VFIO_GROUP_GET_DEVICE_FD`: the device is not in the group, or not on vfio-pci.
    #[error(
        "IOMMU group {group} has no VFIO device {device}: it is in another group or not bound to vfio-pci"
    )]
    NoDevice {
        group: u32,
        device: PciAddress,
        #[source]
        source: io::Error,
    },
    /// EPERM when the IOMMU backend takes the group: the kernel refuses a group whose interrupts
    /// are not remapped unless `allow_unsafe_interrupts=1`.
    #[error(
        "the kernel refused IOMMU group {group} because interrupt remapping is missing: enable it (intremap, x2APIC in firmware) or, accepting that the device can forge interrupts, set vfio_iommu_type1 allow_unsafe_interrupts=1"
    )]
    InterruptRemapping {
        group: u32,
        #[source]
        source: io::Error,
    },
    /// The device does not advertise `VFIO_DEVICE_FLAGS_RESET`.
    #[error(
        "{device} cannot be reset through VFIO: the kernel has no usable reset method for it (FLR, PM, or a slot or bus reset with the device alone on its bus)"
    )]
    ResetUnsupported { device: PciAddress },
    /// `VFIO_GET_API_VERSION` answered something other than the version of `linux/vfio.h`.
    #[error(
        "the kernel speaks VFIO API version {found}, not {}",
        uapi::VFIO_API_VERSION
    )]
    ApiVersion { found: i32 },
    /// The container offers neither [`IommuBackend`].
    #[error("the VFIO container offers neither the type1v2 nor the type1 IOMMU backend")]
    NoIommuBackend,
    /// Any other failure of a step, named by `what`.
    #[error("{what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn busy_message(group: u32, device: Option<PciAddress>) -> String {
    match device {
        None => format!(
            "IOMMU group {group} is busy: another process (a VM?) has /dev/vfio/{group} open"
        ),
        Some(device) => {
            format!("{device} is busy: another process (a VM?) has it open through VFIO")
        }
    }
}

impl VfioError {
    /// What a caller can do about it: Busy for EBUSY, Refused for a host or device that is not
    /// ready for a VM, PermissionDenied for EACCES/EPERM on a plain step, Failed otherwise.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Busy { .. } => ErrorKind::Busy,
            Self::Unsupported { .. }
            | Self::NoGroup { .. }
            | Self::NotViable { .. }
            | Self::NoDevice { .. }
            | Self::InterruptRemapping { .. }
            | Self::ResetUnsupported { .. } => ErrorKind::Refused,
            Self::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                ErrorKind::PermissionDenied
            }
            Self::ApiVersion { .. } | Self::NoIommuBackend | Self::Io { .. } => ErrorKind::Failed,
        }
    }
}

/// VFIO access to devices, as a VMM would have it.
pub trait Vfio: Send + Sync + std::fmt::Debug {
    /// Opens the container (`/dev/vfio/vfio`), group `group`, sets the group's container, picks
    /// the IOMMU backend (type1v2, else type1), opens `device` by its address, reads its info,
    /// regions and IRQs, and closes everything (on every path, errors included).
    fn probe(&self, group: u32, device: PciAddress) -> Result<DeviceInfo, VfioError>;
    /// Opens as [`Vfio::probe`] does and resets the device (`VFIO_DEVICE_RESET`), then closes
    /// everything. vfio-pci itself also resets a device on open and on close when it can.
    fn reset(&self, group: u32, device: PciAddress) -> Result<(), VfioError>;
}

/// The kernel's VFIO, through the device nodes under a root (`/` on a host).
#[derive(Debug, Clone, Default)]
pub struct SystemVfio {
    root: SysfsRoot,
}

impl SystemVfio {
    pub fn new(root: SysfsRoot) -> Self {
        Self { root }
    }
}

/// The steps of the open sequence and the device ioctls, each naming itself in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    OpenContainer,
    OpenGroup,
    ApiVersion,
    GroupStatus,
    SetContainer,
    CheckExtension,
    SetIommu,
    GetDeviceFd,
    DeviceInfo,
    RegionInfo,
    IrqInfo,
    Reset,
}

impl Step {
    fn what(self) -> &'static str {
        match self {
            Self::OpenContainer => "opening /dev/vfio/vfio",
            Self::OpenGroup => "opening the VFIO group",
            Self::ApiVersion => "VFIO_GET_API_VERSION",
            Self::GroupStatus => "VFIO_GROUP_GET_STATUS",
            Self::SetContainer => "VFIO_GROUP_SET_CONTAINER",
            Self::CheckExtension => "VFIO_CHECK_EXTENSION",
            Self::SetIommu => "VFIO_SET_IOMMU",
            Self::GetDeviceFd => "VFIO_GROUP_GET_DEVICE_FD",
            Self::DeviceInfo => "VFIO_DEVICE_GET_INFO",
            Self::RegionInfo => "VFIO_DEVICE_GET_REGION_INFO",
            Self::IrqInfo => "VFIO_DEVICE_GET_IRQ_INFO",
            Self::Reset => "VFIO_DEVICE_RESET",
        }
    }
}

/// The error for `source` failing `step` on `device` of `group`: the errnos the kernel's VFIO
/// code gives a meaning to (drivers/vfio/group.c, vfio_iommu_type1.c, iommufd/device.c), and
/// [`VfioError::Io`] for the rest.
fn classify(step: Step, group: u32, device: PciAddress, source: io::Error) -> VfioError {
    use nix::libc::{EBUSY, ENODEV, ENOENT, ENXIO, EPERM};
    match (step, source.raw_os_error()) {
        // ENODEV/ENXIO: a node left behind by a module that is gone.
        (Step::OpenContainer, Some(ENOENT | ENODEV | ENXIO)) => VfioError::Unsupported { source },
        (Step::OpenGroup, Some(ENOENT | ENODEV | ENXIO)) => VfioError::NoGroup { group, source },
        // The group is open elsewhere (or one of its devices through its cdev), or already in
        // another container.
        (Step::OpenGroup | Step::SetContainer, Some(EBUSY)) => VfioError::Busy {
            group,
            device: None,
            source,
        },
        (Step::GetDeviceFd, Some(EBUSY)) => VfioError::Busy {
            group,
            device: Some(device),
            source,
        },
        // type1 refuses the group when it attaches it (at SET_IOMMU for the first group, at
        // SET_CONTAINER for later ones); iommufd's compatibility container when it binds the
        // device (GET_DEVICE_FD).
        (Step::SetContainer | Step::SetIommu | Step::GetDeviceFd, Some(EPERM)) => {
            VfioError::InterruptRemapping { group, source }
        }
        (Step::GetDeviceFd, Some(ENODEV)) => VfioError::NoDevice {
            group,
            device,
            source,
        },
        _ => VfioError::Io {
            what: step.what(),
            source,
        },
    }
}

/// The first backend of [`IommuBackend::ALL`] that `supports` says yes to.
fn pick_backend(
    mut supports: impl FnMut(IommuBackend) -> Result<bool, Errno>,
) -> Result<IommuBackend, PickError> {
    for backend in IommuBackend::ALL {
        if supports(backend).map_err(PickError::Errno)? {
            return Ok(backend);
        }
    }
    Err(PickError::None)
}

#[derive(Debug, PartialEq, Eq)]
enum PickError {
    Errno(Errno),
    None,
}

/// The fds of one open device. Fields drop in declaration order: device, group, container.
struct Opened {
    device: OwnedFd,
    info: uapi::vfio_device_info,
    backend: IommuBackend,
    _group: File,
    _container: File,
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

impl SystemVfio {
    fn open(&self, group: u32, device: PciAddress) -> Result<Opened, VfioError> {
        let fail = |step: Step| move |e: io::Error| classify(step, group, device, e);
        let errno = |step: Step| move |e: Errno| classify(step, group, device, e.into());

        let container =
            open_rw(&self.root.dev_path("vfio/vfio")).map_err(fail(Step::OpenContainer))?;
        let group_file =
            open_rw(&self.root.vfio_group_node(group)).map_err(fail(Step::OpenGroup))?;
        let version = ioctl::api_version(container.as_fd()).map_err(errno(Step::ApiVersion))?;
        if u32::try_from(version).ok() != Some(uapi::VFIO_API_VERSION) {
            return Err(VfioError::ApiVersion { found: version });
        }
        let status = ioctl::group_status(group_file.as_fd()).map_err(errno(Step::GroupStatus))?;
        if status & uapi::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::NotViable { group });
        }
        ioctl::set_container(group_file.as_fd(), container.as_fd())
            .map_err(errno(Step::SetContainer))?;
        let backend = pick_backend(|b| ioctl::check_extension(container.as_fd(), extension(b)))
            .map_err(|e| match e {
                PickError::Errno(e) => errno(Step::CheckExtension)(e),
                PickError::None => VfioError::NoIommuBackend,
            })?;
        ioctl::set_iommu(container.as_fd(), extension(backend)).map_err(errno(Step::SetIommu))?;
        // An address prints as `DDDD:BB:DD.F`, never with a NUL.
        let name = CString::new(device.to_string())
            .map_err(|e| fail(Step::GetDeviceFd)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let device_fd =
            ioctl::device_fd(group_file.as_fd(), &name).map_err(errno(Step::GetDeviceFd))?;
        let info = ioctl::device_info(device_fd.as_fd()).map_err(errno(Step::DeviceInfo))?;
        Ok(Opened {
            device: device_fd,
            info,
            backend,
            _group: group_file,
            _container: container,
        })
    }
}

/// Reads indexes `0..count` with `read`, leaving out those the kernel answers EINVAL for (it has
/// no such region or IRQ type on this device).
fn read_all<T>(count: u32, mut read: impl FnMut(u32) -> Result<T, Errno>) -> Result<Vec<T>, Errno> {
    let mut out = Vec::new();
    for index in 0..count {
        match read(index) {
            Ok(item) => out.push(item),
            Err(Errno::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

impl Vfio for SystemVfio {
    fn probe(&self, group: u32, device: PciAddress) -> Result<DeviceInfo, VfioError> {
        let opened = self.open(group, device)?;
        let errno = |step: Step| move |e: Errno| classify(step, group, device, e.into());
        let flags = device_flags(opened.info.flags);
        let fd = opened.device.as_fd();
        let regions = read_all(opened.info.num_regions, |i| {
            ioctl::region_info(fd, i).map(|raw| region_info(flags.pci, &raw))
        })
        .map_err(errno(Step::RegionInfo))?;
        let irqs = read_all(opened.info.num_irqs, |i| {
            ioctl::irq_info(fd, i).map(|raw| irq_info(flags.pci, &raw))
        })
        .map_err(errno(Step::IrqInfo))?;
        Ok(DeviceInfo {
            flags,
            regions,
            irqs,
            iommu_backend: opened.backend,
        })
    }

    fn reset(&self, group: u32, device: PciAddress) -> Result<(), VfioError> {
        let opened = self.open(group, device)?;
        if !device_flags(opened.info.flags).reset {
            return Err(VfioError::ResetUnsupported { device });
        }
        ioctl::reset(opened.device.as_fd())
            .map_err(|e| classify(Step::Reset, group, device, e.into()))
    }
}

/// The VFIO ioctls of `linux/vfio.h`, each behind a safe function over a borrowed fd. All are
/// `_IO(VFIO_TYPE, VFIO_BASE + n)` ("bad" in nix's terms: no size in the number); those with a
/// struct take a pointer to one whose `argsz` says how much of it the kernel may use.
#[allow(unsafe_code)]
mod ioctl {
    use std::ffi::CStr;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use nix::errno::Errno;
    use nix::libc::{c_char, c_int};
    use vfio_bindings::bindings::vfio as uapi;

    mod raw {
        use nix::libc::{c_char, c_int};
        use nix::request_code_none;
        use vfio_bindings::bindings::vfio::{
            VFIO_BASE, VFIO_TYPE, vfio_device_info, vfio_group_status, vfio_irq_info,
            vfio_region_info,
        };

        nix::ioctl_none_bad!(get_api_version, request_code_none!(VFIO_TYPE, VFIO_BASE));
        nix::ioctl_write_int_bad!(
            check_extension,
            request_code_none!(VFIO_TYPE, VFIO_BASE + 1)
        );
        nix::ioctl_write_int_bad!(set_iommu, request_code_none!(VFIO_TYPE, VFIO_BASE + 2));
        nix::ioctl_readwrite_bad!(
            group_get_status,
            request_code_none!(VFIO_TYPE, VFIO_BASE + 3),
            vfio_group_status
        );
        nix::ioctl_write_ptr_bad!(
            group_set_container,
            request_code_none!(VFIO_TYPE, VFIO_BASE + 4),
            c_int
        );
        nix::ioctl_write_ptr_bad!(
            group_get_device_fd,
            request_code_none!(VFIO_TYPE, VFIO_BASE + 6),
            c_char
        );
        nix::ioctl_readwrite_bad!(
            device_get_info,
            request_code_none!(VFIO_TYPE, VFIO_BASE + 7),
            vfio_device_info
        );
        nix::ioctl_readwrite_bad!(
            device_get_region_info,
            request_code_none!(VFIO_TYPE, VFIO_BASE + 8),
            vfio_region_info
        );
        nix::ioctl_readwrite_bad!(
            device_get_irq_info,
            request_code_none!(VFIO_TYPE, VFIO_BASE + 9),
            vfio_irq_info
        );
        nix::ioctl_none_bad!(device_reset, request_code_none!(VFIO_TYPE, VFIO_BASE + 11));
    }

    /// `argsz` for a struct of ours: its full size (all are a few dozen bytes).
    fn argsz<T>() -> u32 {
        u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
    }

    pub(super) fn api_version(container: BorrowedFd<'_>) -> Result<c_int, Errno> {
        // SAFETY: no argument is passed; the fd is open for the call (borrowed).
        unsafe { raw::get_api_version(container.as_raw_fd()) }
    }

    /// Whether the container supports extension `ext` (the kernel answers 1 or 0).
    pub(super) fn check_extension(container: BorrowedFd<'_>, ext: u32) -> Result<bool, Errno> {
        let ext = c_int::try_from(ext).map_err(|_| Errno::EINVAL)?;
        // SAFETY: the argument is an integer, not a pointer; the fd is open for the call.
        unsafe { raw::check_extension(container.as_raw_fd(), ext) }.map(|r| r > 0)
    }

    pub(super) fn set_iommu(container: BorrowedFd<'_>, backend: u32) -> Result<(), Errno> {
        let backend = c_int::try_from(backend).map_err(|_| Errno::EINVAL)?;
        // SAFETY: the argument is an integer, not a pointer; the fd is open for the call.
        unsafe { raw::set_iommu(container.as_raw_fd(), backend) }.map(drop)
    }

    /// The group's `VFIO_GROUP_FLAGS_*`.
    pub(super) fn group_status(group: BorrowedFd<'_>) -> Result<u32, Errno> {
        let mut status = uapi::vfio_group_status {
            argsz: argsz::<uapi::vfio_group_status>(),
            flags: 0,
        };
        // SAFETY: `status` is a live, writable vfio_group_status whose argsz is its own size, so
        // the kernel reads and writes only inside it; the fd is open for the call.
        unsafe { raw::group_get_status(group.as_raw_fd(), &mut status) }?;
        Ok(status.flags)
    }

    pub(super) fn set_container(
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> Result<(), Errno> {
        let fd: c_int = container.as_raw_fd();
        // SAFETY: the kernel reads one int (the container fd) through the pointer, which points
        // at `fd` for the whole call; both fds are open for the call.
        unsafe { raw::group_set_container(group.as_raw_fd(), &fd) }.map(drop)
    }

    /// A new fd for the device named `name` (its PCI address) in the group.
    pub(super) fn device_fd(group: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
        let ptr: *const c_char = name.as_ptr();
        // SAFETY: the kernel reads a NUL-terminated string through the pointer, and `name` is
        // one that outlives the call; the fd is open for the call.
        let fd = unsafe { raw::group_get_device_fd(group.as_raw_fd(), ptr) }?;
        // SAFETY: on success the ioctl returns a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub(super) fn device_info(device: BorrowedFd<'_>) -> Result<uapi::vfio_device_info, Errno> {
        let mut info = uapi::vfio_device_info {
            argsz: argsz::<uapi::vfio_device_info>(),
            ..Default::default()
        };
        // SAFETY: `info` is a live, writable vfio_device_info whose argsz is its own size, so the
        // kernel reads and writes only inside it; the fd is open for the call.
        unsafe { raw::device_get_info(device.as_raw_fd(), &mut info) }?;
        Ok(info)
    }

    pub(super) fn region_info(
        device: BorrowedFd<'_>,
        index: u32,
    ) -> Result<uapi::vfio_region_info, Errno> {
        let mut info = uapi::vfio_region_info {
            argsz: argsz::<uapi::vfio_region_info>(),
            index,
            ..Default::default()
        };
        // SAFETY: as for device_info: a live vfio_region_info whose argsz is its own size (the
        // kernel only reports, in argsz, the larger size capabilities would need).
        unsafe { raw::device_get_region_info(device.as_raw_fd(), &mut info) }?;
        Ok(info)
    }

    pub(super) fn irq_info(
        device: BorrowedFd<'_>,
        index: u32,
    ) -> Result<uapi::vfio_irq_info, Errno> {
        let mut info = uapi::vfio_irq_info {
            argsz: argsz::<uapi::vfio_irq_info>(),
            index,
            ..Default::default()
        };
        // SAFETY: as for device_info: a live vfio_irq_info whose argsz is its own size.
        unsafe { raw::device_get_irq_info(device.as_raw_fd(), &mut info) }?;
        Ok(info)
    }

    pub(super) fn reset(device: BorrowedFd<'_>) -> Result<(), Errno> {
        // SAFETY: no argument is passed; the fd is open for the call.
        unsafe { raw::device_reset(device.as_raw_fd()) }.map(drop)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn names_pci_regions_and_irqs_by_index() {
        let names: Vec<String> = (0..10).map(|i| region_name(true, i)).collect();
        assert_eq!(
            names,
            [
                "BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "CONFIG", "VGA", "region 9"
            ]
        );
        let irqs: Vec<String> = (0..6).map(|i| irq_name(true, i)).collect();
        assert_eq!(irqs, ["INTx", "MSI", "MSI-X", "ERR", "REQ", "irq 5"]);
        // Other buses have no fixed meanings.
        assert_eq!(region_name(false, 0), "region 0");
        assert_eq!(irq_name(false, 2), "irq 2");
        assert_eq!(region_name(true, u32::MAX), format!("region {}", u32::MAX));
    }

    #[test]
    fn decodes_flags_bit_by_bit() {
        assert_eq!(device_flags(0), DeviceFlags::default());
        assert_eq!(
            device_flags(uapi::VFIO_DEVICE_FLAGS_PCI | uapi::VFIO_DEVICE_FLAGS_CAPS),
            DeviceFlags {
                pci: true,
                reset: false
            }
        );
        assert!(device_flags(uapi::VFIO_DEVICE_FLAGS_RESET).reset);
        assert_eq!(
            region_flags(0b1111),
            RegionFlags {
                read: true,
                write: true,
                mmap: true
            }
        );
        assert_eq!(
            region_flags(uapi::VFIO_REGION_INFO_FLAG_READ),
            RegionFlags {
                read: true,
                ..Default::default()
            }
        );
        // vfio-pci's INTx: eventfd | maskable | automasked; MSI-X without dynamic vectors adds
        // noresize.
        assert_eq!(
            irq_flags(0b0111),
            IrqFlags {
                eventfd: true,
                maskable: true,
                automasked: true,
                noresize: false
            }
        );
        assert_eq!(
            irq_flags(uapi::VFIO_IRQ_INFO_EVENTFD | uapi::VFIO_IRQ_INFO_NORESIZE),
            IrqFlags {
                eventfd: true,
                noresize: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn decodes_kernel_answers() {
        let raw = uapi::vfio_region_info {
            argsz: 32,
            flags: 0b111,
            index: 3,
            cap_offset: 0,
            size: 16384,
            offset: 3 << 40,
        };
        assert_eq!(
            region_info(true, &raw),
            RegionInfo {
                index: 3,
                name: "BAR3".into(),
                size: 16384,
                flags: region_flags(7)
            }
        );
        let raw = uapi::vfio_irq_info {
            argsz: 16,
            flags: 0b1001,
            index: 2,
            count: 3,
        };
        let irq = irq_info(true, &raw);
        assert_eq!((irq.name.as_str(), irq.count), ("MSI-X", 3));
        assert!(irq.flags.eventfd && irq.flags.noresize && !irq.flags.maskable);
    }

    #[test]
    fn serializes_backend_and_info_as_json() {
        let info = DeviceInfo {
            flags: DeviceFlags {
                pci: true,
                reset: true,
            },
            regions: vec![],
            irqs: vec![],
            iommu_backend: IommuBackend::Type1v2,
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["iommu_backend"], "type1v2");
        assert_eq!(json["flags"]["reset"], true);
        assert_eq!(IommuBackend::Type1.to_string(), "type1");
        let back: DeviceInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, info);
    }

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn maps_errnos_of_each_step() {
        use nix::libc::{EACCES, EBUSY, EINVAL, ENODEV, ENOENT, EPERM};
        let dev = addr("0000:01:10.0");
        let c = |step, e| classify(step, 18, dev, os(e));
        assert!(matches!(
            c(Step::OpenContainer, ENOENT),
            VfioError::Unsupported { .. }
        ));
        assert!(matches!(
            c(Step::OpenGroup, ENOENT),
            VfioError::NoGroup { group: 18, .. }
        ));
        assert!(matches!(
            c(Step::OpenGroup, EBUSY),
            VfioError::Busy {
                group: 18,
                device: None,
                ..
            }
        ));
        assert!(matches!(
            c(Step::GetDeviceFd, EBUSY),
            VfioError::Busy {
                device: Some(d),
                ..
            } if d == dev
        ));
        for step in [Step::SetContainer, Step::SetIommu, Step::GetDeviceFd] {
            assert!(matches!(
                c(step, EPERM),
                VfioError::InterruptRemapping { group: 18, .. }
            ));
        }
        assert!(matches!(
            c(Step::GetDeviceFd, ENODEV),
            VfioError::NoDevice { group: 18, .. }
        ));
        // The same errno elsewhere means nothing special: kept, with the step named.
        let e = c(Step::OpenGroup, EPERM);
        assert!(matches!(
            e,
            VfioError::Io {
                what: "opening the VFIO group",
                ..
            }
        ));
        assert_eq!(
            std::error::Error::source(&e)
                .unwrap()
                .downcast_ref::<io::Error>()
                .unwrap()
                .raw_os_error(),
            Some(EPERM)
        );
        assert!(matches!(
            c(Step::Reset, EINVAL),
            VfioError::Io {
                what: "VFIO_DEVICE_RESET",
                ..
            }
        ));
        assert_eq!(
            c(Step::OpenContainer, EACCES).kind(),
            ErrorKind::PermissionDenied
        );
    }

    #[test]
    fn messages_are_one_line_and_kinds_fit() {
        let dev = addr("0000:01:10.0");
        let all = [
            VfioError::Unsupported { source: os(2) },
            VfioError::NoGroup {
                group: 3,
                source: os(2),
            },
            VfioError::NotViable { group: 3 },
            VfioError::Busy {
                group: 3,
                device: None,
                source: os(16),
            },
            VfioError::Busy {
                group: 3,
                device: Some(dev),
                source: os(16),
            },
            VfioError::NoDevice {
                group: 3,
                device: dev,
                source: os(19),
            },
            VfioError::InterruptRemapping {
                group: 3,
                source: os(1),
            },
            VfioError::ResetUnsupported { device: dev },
            VfioError::ApiVersion { found: 1 },
            VfioError::NoIommuBackend,
            VfioError::Io {
                what: "VFIO_DEVICE_GET_INFO",
                source: os(5),
            },
        ];
        for e in &all {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            // The source is not repeated in the message.
            assert!(!text.contains("os error"), "{text}");
        }
        assert!(all[6].to_string().contains("allow_unsafe_interrupts=1"));
        assert!(all[3].to_string().contains("/dev/vfio/3"));
        assert!(all[4].to_string().starts_with("0000:01:10.0 is busy"));
        assert_eq!(all[3].kind(), ErrorKind::Busy);
        assert_eq!(all[2].kind(), ErrorKind::Refused);
        assert_eq!(all[10].kind(), ErrorKind::Failed);
    }

    #[test]
    fn prefers_type1v2_then_type1() {
        assert_eq!(pick_backend(|_| Ok(true)), Ok(IommuBackend::Type1v2));
        assert_eq!(
            pick_backend(|b| Ok(b == IommuBackend::Type1)),
            Ok(IommuBackend::Type1)
        );
        assert_eq!(pick_backend(|_| Ok(false)), Err(PickError::None));
        assert_eq!(
            pick_backend(|_| Err(Errno::ENOTTY)),
            Err(PickError::Errno(Errno::ENOTTY))
        );
    }

    #[test]
    fn reads_every_index_but_those_the_kernel_lacks() {
        let got = read_all(10, |i| if i == 8 { Err(Errno::EINVAL) } else { Ok(i) }).unwrap();
        assert_eq!(got, [0, 1, 2, 3, 4, 5, 6, 7, 9]);
        assert_eq!(
            read_all(3, |i| if i == 1 { Err(Errno::EFAULT) } else { Ok(i) }),
            Err(Errno::EFAULT)
        );
    }

    #[test]
    fn fails_typed_under_a_root_without_vfio() {
        let dir = tempfile::tempdir().unwrap();
        let vfio = SystemVfio::new(SysfsRoot::new(dir.path()));
        let dev = addr("0000:01:10.0");
        assert!(matches!(
            vfio.probe(18, dev),
            Err(VfioError::Unsupported { .. })
        ));
        std::fs::create_dir_all(dir.path().join("dev/vfio")).unwrap();
        std::fs::write(dir.path().join("dev/vfio/vfio"), "").unwrap();
        assert!(matches!(
            vfio.reset(18, dev),
            Err(VfioError::NoGroup { group: 18, .. })
        ));
        // Plain files answer every VFIO ioctl with ENOTTY: the first one is named.
        std::fs::write(dir.path().join("dev/vfio/18"), "").unwrap();
        match vfio.probe(18, dev) {
            Err(VfioError::Io { what, source }) => {
                assert_eq!(what, "VFIO_GET_API_VERSION");
                assert_eq!(source.raw_os_error(), Some(nix::libc::ENOTTY));
            }
            other => panic!("{other:?}"),
        }
    }
}
