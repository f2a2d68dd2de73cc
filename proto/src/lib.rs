//! What `passthroughd` and `passthroughctl` share: the PCI address type with strict parsing, the
//! types that describe functions, groups and operations, their D-Bus wire form, the `Manager`
//! proxy with its error names, and the human tables both print. No sysfs, no runtime of its own.

pub mod address;
pub mod config;
pub mod dbus;
pub mod device;
#[cfg(feature = "domain-xml")]
pub mod domain_xml;
pub mod ops;
pub mod table;
pub mod wire;

pub use address::{AddressError, PciAddress};
pub use device::{GroupBlocker, IommuGroup, PciFunction, SriovPf, VfOf};
pub use ops::{
    ApplyReport, AssignOptions, Assignment, Change, ConfigState, DeviceIdentity, PlannedChange,
    PlannedVfs, Refusal, ReleaseOptions, Status, VfCreateOptions, VfInfo, VfSetStatus,
};
pub mod host;
pub mod lease;
#[cfg(feature = "manual")]
pub mod manual;
pub mod vfio;
pub use host::{Check, HostReport, Verdict};
pub use lease::{LeaseInfo, LeaseOwner, OwnerKind};
