//! A plan: what one operation will do, decided before anything is written.
//!
//! Planners (`planner/`) turn what the host has now and what is wanted into a [`Plan`]: the
//! locks it needs and an ordered list of typed [`Step`]s. The executor journals the plan, runs
//! the steps, and on failure undoes the steps done, in reverse. Every step carries what its undo
//! needs (the driver a function had, the VF count a PF had), so a journaled plan can be finished
//! or undone by a later start of the daemon without asking anyone.
//!
//! Steps are idempotent: each looks at the kernel first and writes only what is missing, so
//! finishing a plan that was interrupted half-way runs it again from the top.

use std::collections::BTreeSet;
use std::fmt;

use passthroughd_proto::{DeviceIdentity, LeaseOwner, PciAddress};
use serde::{Deserialize, Serialize};

/// Which kind of request a plan serves (for journals, logs and messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    Assign,
    Release,
    VfCreate,
    VfDestroy,
    /// The desired state (config, stored requests) applied at start or by `apply`.
    Apply,
    LeaseStart,
    LeaseEnd,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Assign => "assign",
            Self::Release => "release",
            Self::VfCreate => "vf create",
            Self::VfDestroy => "vf destroy",
            Self::Apply => "apply",
            Self::LeaseStart => "lease",
            Self::LeaseEnd => "lease end",
        })
    }
}

/// What a later start does with a plan it finds journaled (the daemon died running it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCrash {
    /// Finish it, after checking the hard safety rules again: what it does outlives the daemon
    /// (a persistent assignment, a release) and every check had passed.
    Finish,
    /// Undo it: nobody got an answer, and a runtime change ends with the daemon anyway.
    Undo,
}

/// What a request locks: an IOMMU group (a function without one, by address). A PF's VFs are
/// locked through their groups, the PF through its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKey {
    Group(u32),
    Function(PciAddress),
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Group(g) => write!(f, "IOMMU group {g}"),
            Self::Function(a) => write!(f, "{a}"),
        }
    }
}

/// A function a step acts on. VFs are named by (PF, index), because the VFs a plan creates do
/// not exist when it is made, and because that is how they are persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Function(PciAddress),
    Vf { pf: PciAddress, index: u32 },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Function(a) => write!(f, "{a}"),
            Self::Vf { pf, index } => write!(f, "VF {index} of {pf}"),
        }
    }
}

/// Why a function is assigned: who asked, and so how long it lasts and who may end it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Claim {
    /// `assign --runtime`: until released or the daemon stops.
    Runtime,
    /// `assign` (or `vf create`) without `--runtime`: kept in state.toml until released.
    Request,
    /// An entry of the declarative config: until the entry is removed and the config applied.
    Config,
    /// A lease of a named owner (a libvirt domain, a Kubernetes claim, another VMM): until the
    /// owner ends it; kept across daemon restarts, dropped at a host reboot.
    Lease(LeaseOwner),
}

impl Claim {
    /// Whether the claim is kept in state.toml.
    pub fn is_persistent(&self) -> bool {
        !matches!(self, Self::Runtime)
    }

    /// What `status` shows for it: `request`, or `lease libvirt:vm1`.
    pub fn label(&self) -> String {
        match self {
            Self::Lease(owner) => format!("lease {owner}"),
            other => other.name().to_owned(),
        }
    }

    /// The word for its kind.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Runtime => "runtime",
            Self::Request => "request",
            Self::Config => "config",
            Self::Lease(_) => "lease",
        }
    }
}

/// A claim on one function, with what releasing it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub target: Target,
    /// The function's ids; for a VF, its PF's (a VF is recognized through its PF).
    pub identity: DeviceIdentity,
    /// The host driver it had before (`None`: the kernel's choice).
    pub previous_driver: Option<String>,
    pub claim: Claim,
}

/// The VFs a `vf create` or an `[[sriov]]` entry made on one PF, and which of them it put on
/// vfio-pci.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfSetRecord {
    /// The PF's ids.
    pub identity: DeviceIdentity,
    pub count: u32,
    /// VF indexes on vfio-pci.
    pub assigned: BTreeSet<u32>,
    pub claim: Claim,
}

/// One thing a plan does. Each variant says what its undo is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "step")]
pub enum Step {
    /// The hard safety rules (a mounted disk, a bridge, a process holding the device) for
    /// `functions`; the soft ones were the caller's call. Planners check all while planning; the
    /// executor checks them again only when it finishes a journaled plan after a crash, because
    /// the host may have changed since. Undo: nothing.
    Guard { functions: Vec<PciAddress> },
    /// `modprobe vfio-pci` unless loaded. Undo: nothing (other devices may use it by then).
    LoadVfio,
    /// Host driver (or none) → vfio-pci. Undo: back to `from`.
    Bind {
        target: Target,
        from: Option<String>,
    },
    /// A device reset through VFIO (`VFIO_DEVICE_RESET`) while it is still on vfio-pci, so
    /// nothing a VM left in it reaches the host driver. Undo: nothing (a reset cannot be undone,
    /// and the device stays on vfio-pci when a later step fails).
    Reset { target: Target },
    /// vfio-pci → `to` (`None`: the kernel's choice). Undo: back on vfio-pci.
    Unbind { target: Target, to: Option<String> },
    /// Off vfio-pci without probing a host driver: the VF is about to go away. Undo: back on
    /// vfio-pci.
    Detach { target: Target },
    /// An unbound VF → what its host VF driver (autoprobe) would have given it. Undo: detach.
    Probe { target: Target },
    /// `sriov_drivers_autoprobe` ← `on`. Undo: back to `was`; VFs left unbound then get the
    /// host driver that autoprobe would have given them.
    SetAutoprobe { pf: PciAddress, on: bool, was: bool },
    /// `sriov_numvfs` ← `count` (through 0), then wait for the VFs. Undo: back to `was`, with
    /// the VFs in `was_on_vfio` on vfio-pci again.
    SetNumVfs {
        pf: PciAddress,
        count: u32,
        was: u32,
        #[serde(default)]
        was_on_vfio: Vec<u32>,
    },
    /// A claim appears (registry and state.toml). Undo: it disappears.
    Claim(ClaimRecord),
    /// A claim disappears. Undo: it comes back.
    Unclaim(ClaimRecord),
    /// The VF set of `pf` becomes `now` (`None`: forgotten). Undo: back to `was`.
    SetVfs {
        pf: PciAddress,
        now: Option<VfSetRecord>,
        was: Option<VfSetRecord>,
    },
}

impl Step {
    /// Whether the step writes to the kernel (a plan without such steps needs no journal).
    pub fn touches_kernel(&self) -> bool {
        !matches!(
            self,
            Self::Guard { .. } | Self::Claim(_) | Self::Unclaim(_) | Self::SetVfs { .. }
        )
    }

    /// Whether the step changes the registry (and state.toml).
    pub fn is_record(&self) -> bool {
        matches!(
            self,
            Self::Claim(_) | Self::Unclaim(_) | Self::SetVfs { .. }
        )
    }
}

/// Everything one operation will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub operation: Operation,
    pub on_crash: OnCrash,
    pub locks: BTreeSet<LockKey>,
    #[serde(rename = "do")]
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn new(operation: Operation, on_crash: OnCrash, locks: BTreeSet<LockKey>) -> Self {
        Self {
            operation,
            on_crash,
            locks,
            steps: Vec::new(),
        }
    }

    pub fn push(&mut self, step: Step) {
        self.steps.push(step);
    }

    /// Whether running it would change anything at all.
    pub fn is_empty(&self) -> bool {
        !self
            .steps
            .iter()
            .any(|s| s.touches_kernel() || s.is_record())
    }

    /// Whether it writes to the kernel.
    pub fn touches_kernel(&self) -> bool {
        self.steps.iter().any(Step::touches_kernel)
    }
}
