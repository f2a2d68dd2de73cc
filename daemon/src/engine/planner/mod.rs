//! Planners: pure functions from (what the host has now, what is wanted) to a [`Plan`], or to
//! the reason it cannot be done. They read nothing themselves: the engine hands them a
//! [`View`] read under the plan's locks, so every decision is made on one consistent picture
//! and can be tested without a kernel.
//!
//! - [`assign`]: `assign` and `release`.
//! - [`vfs`]: `vf create` and `vf destroy`.
//! - [`lease`]: leases taken and ended by their owners.
//! - [`desired`]: the declarative config and stored requests, at start and on `apply`.

pub mod assign;
pub mod desired;
pub mod lease;
pub mod vfs;

use passthroughd_proto::config::{Config, Selector};
use passthroughd_proto::{DeviceIdentity, PciAddress, PciFunction};

use crate::engine::plan::Target;
use crate::engine::registry::Registry;
use crate::observe::guard::HostSnapshot;
use crate::observe::inventory::Inventory;

/// What a planner sees: the functions and groups it may touch, read fresh under their locks;
/// the guard's facts about them; what the daemon holds; the config in force.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub inventory: &'a Inventory,
    pub snapshot: &'a HostSnapshot,
    pub registry: &'a Registry,
    pub config: &'a Config,
}

/// The ids a claim on `f` records.
pub fn identity_of(f: &PciFunction) -> DeviceIdentity {
    DeviceIdentity {
        vendor_id: f.vendor_id,
        device_id: f.device_id,
        subsystem_vendor_id: f.subsystem_vendor_id,
        subsystem_device_id: f.subsystem_device_id,
    }
}

/// `8086:10c9 (subsystem 8086:a03c)`.
pub fn show_identity(id: &DeviceIdentity) -> String {
    format!(
        "{:04x}:{:04x} (subsystem {:04x}:{:04x})",
        id.vendor_id, id.device_id, id.subsystem_vendor_id, id.subsystem_device_id
    )
}

/// How a function is named in plans and state: a VF by (PF, index), anything else by address.
pub fn target_of(f: &PciFunction) -> Target {
    match f.vf_of {
        Some(vf) => Target::Vf {
            pf: vf.pf,
            index: vf.index,
        },
        None => Target::Function(f.address),
    }
}

/// "a, b, c".
pub fn list(addresses: &[PciAddress]) -> String {
    addresses
        .iter()
        .map(PciAddress::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The label of the config entry that claims `f`, if one does.
pub fn claiming_entry(config: &Config, inventory: &Inventory, f: &PciFunction) -> Option<String> {
    for d in &config.devices {
        let claims = match &d.selector {
            Selector::Address { address, .. } => {
                *address == f.address
                    || (d.group
                        && f.iommu_group.is_some()
                        && inventory.function(*address).and_then(|a| a.iommu_group)
                            == f.iommu_group)
            }
            Selector::Match(rule) => rule.matches(f),
        };
        if claims {
            return Some(d.label());
        }
    }
    let vf = f.vf_of?;
    config
        .sriov
        .iter()
        .find(|s| s.pf == vf.pf && vf.index < u32::from(s.count) && s.assign.contains(vf.index))
        .map(|s| s.label())
}

/// Whether something besides one claim keeps `target` on vfio-pci: another claim on it, or the
/// VF set it belongs to (`vf create --assign`, an `[[sriov]]` entry).
pub fn kept_by_others(view: &View<'_>, target: &Target, claims: usize) -> bool {
    let in_set = match *target {
        Target::Vf { pf, index } => view
            .registry
            .vf_set(pf)
            .is_some_and(|s| s.record.assigned.contains(&index)),
        Target::Function(_) => false,
    };
    claims > 1 || in_set
}
