//! Requests and results of the mutating operations, shared by daemon and CLI.

use serde::{Deserialize, Serialize};

use crate::{PciAddress, VfOf};

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

/// Options of `vf create`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfCreateOptions {
    /// Bind every new VF to vfio-pci; no host VF driver ever probes them.
    pub assign: bool,
    /// Do not persist: the VFs are gone at reboot or daemon restart.
    pub runtime: bool,
    /// Let a resize take assigned VFs off vfio-pci (never ones a process holds).
    pub force: bool,
}

/// Options of `release`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseOptions {
    /// Release only for now: keep the persisted assignment, which comes back at next start.
    pub runtime: bool,
    /// Reset each function through VFIO before it goes back to its host driver (the config's
    /// `[release] reset = "always"` does it for every release).
    pub reset: bool,
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
    /// The function now; for a VF that does not exist now, its PF's address (see `vf`).
    pub address: PciAddress,
    /// Set for a VF: it is assigned as (PF, index), which is how it is recognized after a
    /// renumbering.
    #[serde(default)]
    pub vf: Option<VfOf>,
    /// Its ids when it was claimed (for a VF, its PF's).
    pub identity: DeviceIdentity,
    /// The host driver it had before; release returns it there (`None`: let the kernel choose).
    pub previous_driver: Option<String>,
    /// Kept across restarts (a request or the config claims it, not only `--runtime`).
    pub persistent: bool,
    /// Who claims it: `runtime`, `request`, `config`; it stays assigned until all let go.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Why it could not be put on vfio-pci at start or by `apply`, if it could not.
    pub refused: Option<String>,
    /// What is wrong with it now, if anything: released for now (`release --runtime`), absent,
    /// or moved behind the daemon's back (drift, undone by `apply`).
    #[serde(default)]
    pub state: Option<String>,
}

/// Daemon status, as `passthroughctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_secs: u64,
    pub assignments: Vec<Assignment>,
    /// VF sets the daemon made: (PF, count, assigned VF indexes, source, refused).
    #[serde(default)]
    pub vf_sets: Vec<VfSetStatus>,
    /// The declarative config in force, and the error of its last (re)load.
    #[serde(default)]
    pub config: Option<ConfigState>,
    /// What the last apply (at start, on hotplug or by `apply`) did not do, and why: config
    /// entries refused (an identity mismatch says what was expected and what is there).
    #[serde(default)]
    pub refused: Vec<Refusal>,
    /// Leases and the functions they hold (a stale one says why).
    #[serde(default)]
    pub leases: Vec<crate::LeaseInfo>,
    /// What device events (hotplug) led to lately: claimed, not claimed and why, removed.
    #[serde(default)]
    pub hotplug: Vec<String>,
    /// Operations in flight; one waiting for the kernel says for what.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Operations that could not be fully undone; undone before their devices are used again.
    #[serde(default)]
    pub unfinished: Vec<String>,
    /// The most recent failures, newest last, one line each.
    pub last_errors: Vec<String>,
}

/// The VFs the daemon made on one PF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfSetStatus {
    pub pf: PciAddress,
    pub count: u32,
    /// VF indexes on vfio-pci.
    pub assigned: Vec<u32>,
    pub source: String,
    pub refused: Option<String>,
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

/// What `apply` changes (or, with `--dry-run`, would change) for one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedChange {
    /// The config entry or stored request it comes from.
    pub entry: String,
    /// `0000:01:00.0`, or `VF 2 of 0000:05:00.0` for a VF that may not exist yet.
    pub function: String,
    /// The driver it has now (`None`: no driver, or not there yet).
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A VF count `apply` changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedVfs {
    pub entry: String,
    pub pf: PciAddress,
    pub from: u32,
    pub to: u32,
}

/// Something `apply` does not do, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub entry: String,
    pub function: Option<String>,
    pub reason: String,
}

/// The config file as the daemon holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    pub path: String,
    /// Whether the file exists (a missing file is an empty desired state).
    pub present: bool,
    /// Why the last (re)load failed, as FILE:LINE:COLUMN: message; the last good config is
    /// still in force.
    pub error: Option<String>,
    /// `[[device]]` and `[[sriov]]` entries in force.
    pub entries: u32,
}

/// What `apply` did, or with `dry_run` would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub dry_run: bool,
    pub config: ConfigState,
    pub changes: Vec<PlannedChange>,
    pub vfs: Vec<PlannedVfs>,
    /// Not done: a guard rule, an identity mismatch, a partial IOMMU group, [protect]...
    pub refused: Vec<Refusal>,
    /// Tried and failed (everything it did undone).
    pub failed: Vec<Refusal>,
    /// Keys read and checked but not in effect yet.
    pub notes: Vec<String>,
}

impl ApplyReport {
    /// Nothing to do and nothing refused: the host is in the desired state.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.vfs.is_empty()
            && self.refused.is_empty()
            && self.failed.is_empty()
    }
}
