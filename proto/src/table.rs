//! Human-readable tables: functions, groups, changes, VFs, status, apply reports.

use std::fmt::Write;

use crate::vfio::{FunctionDetail, NodeAccess, VerifyReport};
use crate::{
    ApplyReport, Change, ConfigState, IommuGroup, LeaseInfo, PciFunction, Refusal, Status,
};

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
        let mut description = if description.is_empty() {
            format!("class {:06x}", f.class)
        } else {
            description
        };
        if let Some(who) = &f.in_use_by {
            description.push_str(&format!(" [in use by {who}]"));
        }
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

/// One function in full, one `key: value` line per field.
pub fn function_detail(f: &PciFunction) -> String {
    let mut out = String::new();
    let none = || "-".to_owned();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<16} {value}");
    };
    line("address", f.address.to_string());
    line(
        "ids",
        format!(
            "{:04x}:{:04x} (subsystem {:04x}:{:04x})",
            f.vendor_id, f.device_id, f.subsystem_vendor_id, f.subsystem_device_id
        ),
    );
    line("class", format!("{:06x}", f.class));
    line("vendor", f.vendor_name.clone().unwrap_or_else(none));
    line("device", f.device_name.clone().unwrap_or_else(none));
    line("class name", f.class_name.clone().unwrap_or_else(none));
    line("driver", f.driver.clone().unwrap_or_else(none));
    line(
        "driver override",
        f.driver_override.clone().unwrap_or_else(none),
    );
    line(
        "iommu group",
        f.iommu_group.map_or_else(none, |g| g.to_string()),
    );
    line(
        "numa node",
        f.numa_node.map_or_else(none, |n| n.to_string()),
    );
    line("boot vga", if f.boot_vga { "yes" } else { "no" }.to_owned());
    line("role", f.role().to_owned());
    if let Some(s) = f.sriov {
        line(
            "sr-iov",
            format!(
                "{} of {} VFs enabled, drivers autoprobe {}",
                s.num_vfs,
                s.total_vfs,
                if s.drivers_autoprobe { "on" } else { "off" }
            ),
        );
    }
    if let Some(vf) = f.vf_of {
        line("vf of", format!("{} (index {})", vf.pf, vf.index));
    }
    if let Some(who) = &f.in_use_by {
        line("in use by", who.clone());
    }
    out
}

/// `show`: the function, then whether a VM could be given it now.
pub fn function_show(d: &FunctionDetail) -> String {
    let mut out = function_detail(&d.function);
    let p = &d.passthrough;
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<16} {value}");
    };
    line(
        "passthrough",
        match &p.blocker {
            None => "ready (passthroughctl verify opens it through VFIO to prove it)".into(),
            Some(why) => format!("not ready: {why}"),
        },
    );
    line(
        "reset methods",
        if p.reset_methods.is_empty() {
            "none: state may leak from one VM to the next".into()
        } else {
            p.reset_methods.join(" ")
        },
    );
    if let Some(variant) = &p.variant_driver {
        line(
            "variant driver",
            format!("{variant} (driver = \"auto\" binds it)"),
        );
    }
    if let Some(node) = &p.group_node {
        line("group node", node_line(node));
    }
    out
}

fn node_line(n: &NodeAccess) -> String {
    format!("{} owner {}:{} mode {}", n.path, n.uid, n.gid, n.mode)
}

/// `verify`: the verdict first, then what VFIO said.
pub fn verify(r: &VerifyReport) -> String {
    let mut out = match &r.problem {
        None => format!("{}: ready for a VM\n", r.address),
        Some(why) => format!("{}: NOT ready: {why}\n", r.address),
    };
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "  {key:<20} {value}");
    };
    line("driver", r.driver.clone().unwrap_or_else(|| "-".into()));
    let group = r.iommu_group.map_or_else(|| "-".into(), |g| g.to_string());
    let viable = if r.group_viable {
        "viable".to_owned()
    } else {
        let blockers: Vec<String> = r
            .group_blockers
            .iter()
            .map(|b| format!("{} is bound to {}", b.member, b.driver))
            .collect();
        format!("NOT viable: {}", blockers.join(", "))
    };
    line("iommu group", format!("{group} ({viable})"));
    if let Some(remapped) = r.interrupt_remapping {
        line(
            "interrupt remapping",
            if remapped {
                "the IOMMU took the group"
            } else {
                "missing: the kernel refused the group"
            }
            .into(),
        );
    }
    if let Some(node) = &r.group_node {
        line("group node", node_line(node));
    }
    line(
        "iommufd node",
        r.iommufd_node.clone().unwrap_or_else(|| "none".into()),
    );
    if let Some(d) = &r.device {
        line("iommu backend", d.iommu_backend.to_string());
        for region in d.regions.iter().filter(|g| g.size > 0) {
            let flags: Vec<&str> = [
                (region.flags.read, "read"),
                (region.flags.write, "write"),
                (region.flags.mmap, "mmap"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect();
            line(
                &format!("region {}", region.name),
                format!("{} bytes ({})", region.size, flags.join(", ")),
            );
        }
        let irqs: Vec<String> = d
            .irqs
            .iter()
            .map(|i| format!("{} {}", i.name, i.count))
            .collect();
        line("interrupts", irqs.join(", "));
        line(
            "reset",
            if d.flags.reset {
                "supported"
            } else {
                "NOT supported"
            }
            .into(),
        );
    }
    line(
        "reset methods",
        if r.reset_methods.is_empty() {
            "none".into()
        } else {
            r.reset_methods.join(" ")
        },
    );
    for note in &r.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out
}

/// What an assign or release did: one line per function, "ADDRESS old -> new".
pub fn changes(changes: &[Change]) -> String {
    let mut out = String::new();
    for c in changes {
        let _ = writeln!(
            out,
            "{} {} -> {}",
            c.address,
            c.old_driver.as_deref().unwrap_or("(none)"),
            c.new_driver.as_deref().unwrap_or("(none)")
        );
    }
    if out.is_empty() {
        out.push_str("nothing to do\n");
    }
    out
}

/// The VFs of a PF: one line each, "index address driver group assigned holder".
pub fn vfs(vfs: &[crate::VfInfo]) -> String {
    let mut out = String::new();
    if vfs.is_empty() {
        out.push_str("no VFs\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<5} {:<14} {:<10} {:<5} {:<8} IN USE BY",
        "INDEX", "ADDRESS", "DRIVER", "GROUP", "ASSIGNED"
    );
    for v in vfs {
        let _ = writeln!(
            out,
            "{:<5} {:<14} {:<10} {:<5} {:<8} {}",
            v.index,
            v.address.to_string(),
            v.driver.as_deref().unwrap_or("(none)"),
            v.iommu_group
                .map_or_else(|| "-".to_owned(), |g| g.to_string()),
            if v.assigned { "yes" } else { "no" },
            v.in_use_by.as_deref().unwrap_or("-")
        );
    }
    out
}

/// Daemon status: version, uptime, the config, assignments with where they come from, VF sets,
/// operations in flight, recent errors.
pub fn status(s: &Status) -> String {
    let mut out = format!("passthroughd {}, up {}\n", s.version, uptime(s.uptime_secs));
    if let Some(c) = &s.config {
        out.push_str(&config_state(c));
    }
    if s.assignments.is_empty() {
        out.push_str("no assignments\n");
    } else {
        out.push_str("ADDRESS        VF    IDS        PREVIOUS     FROM            STATE\n");
        for a in &s.assignments {
            let state = match (&a.refused, &a.state) {
                (Some(why), _) => format!("refused: {why}"),
                (None, Some(state)) => state.clone(),
                (None, None) => "assigned".to_owned(),
            };
            let _ = writeln!(
                out,
                "{:<14} {:<5} {:04x}:{:04x}  {:<12} {:<15} {}",
                a.address.to_string(),
                a.vf.map_or_else(|| "-".to_owned(), |v| v.index.to_string()),
                a.identity.vendor_id,
                a.identity.device_id,
                a.previous_driver.as_deref().unwrap_or("-"),
                a.sources.join(","),
                state
            );
        }
    }
    for v in &s.vf_sets {
        let assigned: Vec<String> = v.assigned.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "VFs of {}: {} ({}), assigned by the set: {}{}",
            v.pf,
            v.count,
            v.source,
            if assigned.is_empty() {
                "none".to_owned()
            } else {
                assigned.join(", ")
            },
            v.refused
                .as_deref()
                .map_or_else(String::new, |why| format!("; refused: {why}"))
        );
    }
    for r in &s.refused {
        let _ = writeln!(out, "not applied: {}: {}", refusal_subject(r), r.reason);
    }
    for l in &s.leases {
        out.push_str(&lease_line(l));
    }
    for h in &s.hotplug {
        let _ = writeln!(out, "hotplug: {h}");
    }
    for p in &s.pending {
        let _ = writeln!(out, "in flight: {p}");
    }
    for u in &s.unfinished {
        let _ = writeln!(out, "unfinished: {u}");
    }
    if !s.last_errors.is_empty() {
        out.push_str("last errors:\n");
        for e in &s.last_errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    out
}

/// One line per lease: owner, functions, age, and why it looks stale when it does.
pub fn leases(leases: &[LeaseInfo]) -> String {
    if leases.is_empty() {
        return "no leases\n".to_owned();
    }
    leases.iter().map(lease_line).collect()
}

fn lease_line(l: &LeaseInfo) -> String {
    let age = if l.age_secs == 0 {
        String::new()
    } else {
        format!(", {} old", uptime(l.age_secs))
    };
    let stale = l
        .stale
        .as_deref()
        .map_or_else(String::new, |why| format!("; STALE: {why}"));
    format!("lease {}: {}{age}{stale}\n", l.owner, l.functions.join(" "))
}

/// "ENTRY", or "ENTRY FUNCTION" when the entry's label does not name the function already.
fn refusal_subject(r: &Refusal) -> String {
    match r.function.as_deref() {
        Some(f) if !r.entry.contains(f) => format!("{} {f}", r.entry),
        _ => r.entry.clone(),
    }
}

/// The config in force: where, how many entries, and the error of the last (re)load.
pub fn config_state(c: &ConfigState) -> String {
    let mut out = if c.present {
        format!("config {}: {} entries in force\n", c.path, c.entries)
    } else {
        format!("config {}: absent (nothing to apply)\n", c.path)
    };
    if let Some(e) = &c.error {
        let _ = writeln!(
            out,
            "config error: {e} (the last good config stays in force)"
        );
    }
    out
}

/// What `apply` did, or with `--dry-run` would do.
pub fn apply(r: &ApplyReport) -> String {
    let mut out = config_state(&r.config);
    let (will, done) = if r.dry_run {
        ("would", "")
    } else {
        ("", "done: ")
    };
    if r.changes.is_empty() && r.vfs.is_empty() {
        out.push_str(if r.dry_run {
            "nothing to do: the host is in the desired state\n"
        } else {
            "nothing to do: the host was in the desired state\n"
        });
    }
    for v in &r.vfs {
        let _ = writeln!(
            out,
            "{done}{}{}VFs of {}: {} -> {}  ({})",
            will,
            if will.is_empty() { "" } else { " change " },
            v.pf,
            v.from,
            v.to,
            v.entry
        );
    }
    for c in &r.changes {
        let _ = writeln!(
            out,
            "{done}{}{}{}: {} -> {}  ({})",
            will,
            if will.is_empty() { "" } else { " move " },
            c.function,
            c.from.as_deref().unwrap_or("no driver"),
            c.to.as_deref().unwrap_or("no driver"),
            c.entry
        );
    }
    for x in &r.refused {
        let _ = writeln!(out, "refused: {}: {}", refusal_subject(x), x.reason);
    }
    for x in &r.failed {
        let _ = writeln!(out, "failed: {}: {}", x.entry, x.reason);
    }
    for n in &r.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_short() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(65), "1m 5s");
        assert_eq!(uptime(3 * 3600 + 120), "3h 2m");
        assert_eq!(uptime(2 * 86400 + 3600), "2d 1h");
    }

    #[test]
    fn changes_say_old_and_new() {
        let c = Change {
            address: "0000:01:00.0".parse().unwrap(),
            old_driver: Some("igb".into()),
            new_driver: Some("vfio-pci".into()),
        };
        assert_eq!(changes(&[c]), "0000:01:00.0 igb -> vfio-pci\n");
        assert_eq!(changes(&[]), "nothing to do\n");
    }
}
