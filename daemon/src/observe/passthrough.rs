//! Whether a VM could be given a function now, read from sysfs, `/dev` and the module aliases:
//! the "passthrough" part of `show`, and the facts `verify` reports besides what VFIO says.

use std::os::unix::fs::MetadataExt;

use passthroughd_proto::device::{VFIO_SAFE_DRIVERS, driver_is_vfio};
use passthroughd_proto::vfio::{NodeAccess, Readiness};
use passthroughd_proto::{IommuGroup, PciFunction};

use crate::kernel::sysfs::{SysfsRoot, read_attr};

/// The variant drivers `driver = "auto"` may pick: vfio-pci variants shipped with the kernel.
/// (A module alias alone is not enough: any module may claim a `vfio_pci:` alias.)
pub fn variant_allowed(module: &str) -> bool {
    module != "vfio_pci"
        && VFIO_SAFE_DRIVERS
            .iter()
            .any(|d| d.replace('-', "_") == module && d.ends_with("vfio_pci"))
}

/// The kernel's reset methods for a function (`reset_method`: `flr pm bus`), in its order.
pub fn reset_methods(root: &SysfsRoot, f: &PciFunction) -> Vec<String> {
    read_attr(&root.pci_device_attr(f.address, "reset_method"))
        .ok()
        .flatten()
        .map(|m| m.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Owner and mode of `/dev/vfio/GROUP`, while it exists.
pub fn group_node(root: &SysfsRoot, group: u32) -> Option<NodeAccess> {
    let path = root.vfio_group_node(group);
    let meta = std::fs::metadata(&path).ok()?;
    Some(NodeAccess {
        path: format!("/dev/vfio/{group}"),
        uid: meta.uid(),
        gid: meta.gid(),
        mode: format!("{:04o}", meta.mode() & 0o7777),
    })
}

/// The iommufd device node of a function (`/dev/vfio/devices/vfioN`), when the kernel has one.
pub fn iommufd_node(root: &SysfsRoot, f: &PciFunction) -> Option<String> {
    std::fs::read_dir(root.pci_device_attr(f.address, "vfio-dev"))
        .ok()?
        .flatten()
        .map(|e| format!("/dev/vfio/devices/{}", e.file_name().to_string_lossy()))
        .next()
}

/// The vfio-pci variant driver the running kernel ships for `f`: a `vfio_pci:` alias in
/// `lib/modules/RELEASE/modules.alias` that matches the function's modalias, of an allowed
/// module ([`variant_allowed`]).
pub fn variant_driver(root: &SysfsRoot, f: &PciFunction) -> Option<String> {
    let modalias = read_attr(&root.pci_device_attr(f.address, "modalias"))
        .ok()
        .flatten()?;
    let wanted = format!("vfio_{modalias}");
    let release = read_attr(&root.proc_file("sys/kernel/osrelease"))
        .ok()
        .flatten()?;
    let aliases = std::fs::read_to_string(
        root.root()
            .join("lib/modules")
            .join(release)
            .join("modules.alias"),
    )
    .ok()?;
    variant_in(&aliases, &wanted)
}

/// The first allowed module whose `vfio_pci:` alias pattern matches `modalias`.
fn variant_in(aliases: &str, modalias: &str) -> Option<String> {
    aliases.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let (Some("alias"), Some(pattern), Some(module)) =
            (words.next(), words.next(), words.next())
        else {
            return None;
        };
        (pattern.starts_with("vfio_pci:") && variant_allowed(module) && glob(pattern, modalias))
            .then(|| module.to_owned())
    })
}

/// `*` matches any run of characters (modalias patterns use nothing else we rely on).
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// What `show` says about passthrough: ready, or the first thing in the way.
pub fn readiness(root: &SysfsRoot, f: &PciFunction, group: Option<&IommuGroup>) -> Readiness {
    let blocker = if f.is_bridge() {
        Some("it is a PCI bridge: pass through the devices behind it".to_owned())
    } else if f.iommu_group.is_none() {
        Some(
            "it is in no IOMMU group: the IOMMU is off or does not translate it (see \
             passthroughctl host)"
                .to_owned(),
        )
    } else if !driver_is_vfio(f.driver.as_deref()) {
        Some(format!(
            "it is bound to {}, not vfio-pci: passthroughctl assign {}",
            f.driver.as_deref().unwrap_or("no driver"),
            f.address
        ))
    } else if let Some(why) = group.and_then(IommuGroup::why_not_viable) {
        Some(format!(
            "IOMMU group {} is not viable: {why}",
            f.iommu_group.unwrap_or_default()
        ))
    } else {
        f.in_use_by
            .as_ref()
            .map(|who| format!("it is in use by {who}"))
    };
    Readiness {
        ready: blocker.is_none(),
        blocker,
        reset_methods: reset_methods(root, f),
        variant_driver: variant_driver(root, f),
        group_node: f.iommu_group.and_then(|g| group_node(root, g)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIASES: &str = "\
alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v000015B3d00001021sv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v00008086d000010CAsv*sd*bc*sc*i* evil_module
alias pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_core
";

    #[test]
    fn a_variant_is_found_only_through_an_allowed_module() {
        let cx7_vf = "vfio_pci:v000015B3d0000101Esv000015B3sd00000001bc02sc00i00";
        assert_eq!(
            variant_in(ALIASES, cx7_vf).as_deref(),
            Some("mlx5_vfio_pci")
        );
        // The generic vfio_pci alias matches everything but is not a variant; a module that
        // is not on the allowlist is never offered.
        let igb_vf = "vfio_pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00";
        assert_eq!(variant_in(ALIASES, igb_vf), None);
        assert!(variant_allowed("hisi_acc_vfio_pci"));
        assert!(!variant_allowed("vfio_pci"));
        assert!(!variant_allowed("pci_stub"));
    }

    #[test]
    fn globs_match_as_modalias_patterns_do() {
        assert!(glob("a*c", "abbbc"));
        assert!(glob("v*d*", "v1d2"));
        assert!(!glob("v1*d2", "v1d3"));
        assert!(glob("abc", "abc"));
        assert!(!glob("abc", "abcd"));
        assert!(glob("*", ""));
    }
}
