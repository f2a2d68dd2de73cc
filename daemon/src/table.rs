//! Human-readable tables of functions and groups.

use std::fmt::Write;

use passthroughd_proto::{IommuGroup, PciFunction};

/// One row per function: address, ids, class, driver, group, role, names.
pub fn functions(functions: &[PciFunction]) -> String {
    let mut out =
        String::from("ADDRESS        IDS        DRIVER       GROUP  ROLE      DESCRIPTION\n");
    for f in functions {
        let group = f.iommu_group.map_or("-".to_owned(), |g| g.to_string());
        let role = match f.vf_of {
            Some(vf) => format!("vf{}", vf.index),
            None => f.role().to_owned(),
        };
        let description = [
            f.class_name.as_deref(),
            f.vendor_name.as_deref(),
            f.device_name.as_deref(),
        ]
        .iter()
        .flatten()
        .copied()
        .collect::<Vec<_>>()
        .join(": ");
        let description = if description.is_empty() {
            format!("class {:06x}", f.class)
        } else {
            description
        };
        let _ = writeln!(
            out,
            "{:<14} {:04x}:{:04x}  {:<12} {:<6} {:<9} {}",
            f.address.to_string(),
            f.vendor_id,
            f.device_id,
            f.driver.as_deref().unwrap_or("-"),
            group,
            role,
            description
        );
    }
    out
}

/// One row per group: id, viability (and why not), members.
pub fn groups(groups: &[IommuGroup]) -> String {
    let mut out = String::from("GROUP  VIABLE  MEMBERS\n");
    for g in groups {
        let members: Vec<String> = g.members.iter().map(ToString::to_string).collect();
        let viable = if g.viable { "yes" } else { "no" };
        let _ = write!(out, "{:<6} {:<7} {}", g.id, viable, members.join(" "));
        if let Some(why) = g.why_not_viable() {
            let _ = write!(out, "  ({why})");
        }
        out.push('\n');
    }
    out
}
