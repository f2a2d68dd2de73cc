//! The early claim: the decision the udev rule asks for when a PCI function appears, before
//! its host driver's module is loaded (`passthroughd claim ADDR`, from systemd/70-passthroughd.rules).
//!
//! It must be fast and must not depend on the daemon running, so it reads what the daemon last
//! applied, never the admin's file (which may be half-edited): the copy of the last good config
//! in the state dir and state.toml. A function they claim gets `driver_override=vfio-pci`, so the
//! PCI core never hands it to its host driver; the daemon then binds it (on the event, or at
//! start) with every check. The guard rules are not run here: the override only keeps the host
//! driver away, and the daemon's own planning still refuses what it must (the device then stays
//! without a driver until the config is fixed, which `status` shows).

use std::path::Path;

use passthroughd_proto::config::{Config, Selector};
use passthroughd_proto::{PciAddress, PciFunction};

use crate::engine::plan::Target;
use crate::engine::planner::identity_of;
use crate::engine::registry::Registry;
use crate::error::Error;
use crate::kernel::sysfs::{SysfsRoot, read_link_name};
use crate::observe::inventory::Inventory;
use crate::observe::pciids::PciIds;
use crate::store::atomic::read_own_file;
use crate::store::config::LAST_GOOD;
use crate::store::state::State;

/// Why the desired state claims the function at `address`, if it does.
pub fn claimed(
    root: &SysfsRoot,
    state_dir: &Path,
    address: PciAddress,
) -> Result<Option<String>, Error> {
    let read = Inventory::scan_groups(root, &PciIds::empty(), &[], &[address])?;
    let Some(f) = read.function(address) else {
        return Ok(None);
    };
    if f.is_bridge() {
        return Ok(None);
    }
    let config = match read_own_file(&state_dir.join(LAST_GOOD)) {
        Ok(Some(text)) => Config::parse(&text, LAST_GOOD).ok(),
        Ok(None) | Err(_) => None,
    };
    if let Some(config) = &config {
        if config.protect.contains(&address) {
            return Ok(None);
        }
        if let Some(label) = config_claims(root, config, f) {
            return Ok(Some(label));
        }
    }
    let registry = Registry::from_state(
        &State::load(state_dir)?,
        crate::engine::boot_id(root).as_deref(),
    );
    Ok(request_claims(root, &registry, f))
}

/// The config entry that claims `f`.
fn config_claims(root: &SysfsRoot, config: &Config, f: &PciFunction) -> Option<String> {
    let group_of = |a: PciAddress| -> Option<String> {
        read_link_name(&root.pci_device_attr(a, "iommu_group"))
            .ok()
            .flatten()
    };
    for entry in &config.devices {
        let claims = match &entry.selector {
            Selector::Address { address, identity } => {
                (*address == f.address && identity.accepts(f.vendor_id, f.device_id))
                    || (entry.group
                        && group_of(f.address).is_some()
                        && group_of(*address) == group_of(f.address))
            }
            Selector::Match(rule) => rule.matches(f),
        };
        if claims {
            return Some(entry.label());
        }
    }
    let vf = f.vf_of?;
    config
        .sriov
        .iter()
        .find(|s| s.pf == vf.pf && vf.index < u32::from(s.count) && s.assign.contains(vf.index))
        .map(|s| s.label())
}

/// A stored request (or a stored VF set) that claims `f`.
fn request_claims(root: &SysfsRoot, registry: &Registry, f: &PciFunction) -> Option<String> {
    match f.vf_of {
        None => registry
            .get(&Target::Function(f.address))
            .filter(|held| held.is_persistent() && held.identity == identity_of(f))
            .map(|_| format!("stored request {}", f.address)),
        Some(vf) => {
            let pf = Inventory::scan_groups(root, &PciIds::empty(), &[], &[vf.pf]).ok()?;
            let pf_identity = identity_of(pf.function(vf.pf)?);
            let target = Target::Vf {
                pf: vf.pf,
                index: vf.index,
            };
            let own = registry
                .get(&target)
                .filter(|held| held.is_persistent() && held.identity == pf_identity)
                .map(|_| format!("stored request {target}"));
            own.or_else(|| {
                registry
                    .vf_set(vf.pf)
                    .filter(|set| {
                        set.record.claim.is_persistent()
                            && set.record.identity == pf_identity
                            && set.record.assigned.contains(&vf.index)
                    })
                    .map(|_| format!("stored vf create {}", vf.pf))
            })
        }
    }
}
