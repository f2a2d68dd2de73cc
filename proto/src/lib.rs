//! What `passthroughd` and `passthroughctl` share: the PCI address type with strict parsing and
//! the wire types that describe functions and IOMMU groups. No I/O, no async runtime, no sysfs.

pub mod address;
pub mod device;

pub use address::{AddressError, PciAddress};
pub use device::{GroupBlocker, IommuGroup, PciFunction, SriovPf, VfOf};
pub mod ops;
pub use ops::{AssignOptions, Assignment, Change, DeviceIdentity, ReleaseOptions, Status};
pub mod host;
pub use host::{Check, HostReport, Verdict};
