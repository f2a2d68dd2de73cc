//! Requests and results of the mutating operations, shared by daemon and CLI.

use serde::{Deserialize, Serialize};

use crate::PciAddress;

/// Options of `assign`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignOptions {
    /// Do not persist: the assignment ends at reboot or daemon restart with `release`.
    pub runtime: bool,
    /// Assign every (non-bridge) member of each function's IOMMU group.
    pub group: bool,
    /// Override the soft safety rules (network in use, boot VGA); never the mounted-filesystem
    /// rule.
    pub force: bool,
}

/// Options of `release`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseOptions {
    /// Release only for now: keep the persisted assignment, which comes back at next start.
    pub runtime: bool,
}

/// What an operation did to one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub address: PciAddress,
    pub old_driver: Option<String>,
    pub new_driver: Option<String>,
}

/// The identity a persisted assignment is checked against at start: the address alone could
/// hold a different device after a hardware change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
}

/// One function the daemon has assigned (or was asked to and could not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub address: PciAddress,
    pub identity: DeviceIdentity,
    /// The host driver it had before; release returns it there (`None`: let the kernel choose).
    pub previous_driver: Option<String>,
    /// Stored in state.toml and re-applied at start.
    pub persistent: bool,
    /// Why a persisted assignment could not be applied at start, if it could not.
    pub refused: Option<String>,
}

/// Daemon status, as `passthroughctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_secs: u64,
    pub assignments: Vec<Assignment>,
    /// The most recent failures, newest last, one line each.
    pub last_errors: Vec<String>,
}

/// One virtual function of a PF, as `vf list` (and `vf create`) show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfInfo {
    /// The `virtfnN` index: what persistence records, never the VF's own address.
    pub index: u32,
    pub address: PciAddress,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// Assigned by the daemon (through `vf create --assign` or `assign`).
    pub assigned: bool,
    /// The process holding its VFIO group or device open ("qemu (pid 4242)"), if any.
    pub in_use_by: Option<String>,
}
