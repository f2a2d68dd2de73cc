//! IOMMU checks. The ACPI table is read as it is (DMAR for Intel VT-d, IVRS for AMD-Vi), never
//! guessed from the CPU vendor: an emulated Intel IOMMU under an AMD CPU (QEMU's q35 with
//! `-device intel-iommu` on any host) has DMAR and no IVRS.
//!
//! Interrupt remapping, evidence used: the irq chips of /proc/interrupts. With remapping on,
//! the kernel stacks every IO-APIC and MSI domain on the remapping unit and names them `IR-IO-APIC`,
//! `IR-PCI-MSI-…`, `IR-PCI-MSIX-…` (Intel and AMD alike); without it they are `IO-APIC`,
//! `PCI-MSI-…`. The capability comes from each VT-d unit's extended capability register
//! (`/sys/class/iommu/dmarN/intel-iommu/ecap`, bit 3 IR). Both verified in the 6.12 VM test
//! bed (ecap f00f4a, `IR-IO-APIC`/`IR-PCI-MSIX` chips). The DMAR table's flags and the kernel
//! log are not used: the first is not exported, the second can be rotated or restricted.

use passthroughd_proto::host::{Check, IommuFacts, Verdict};

use super::{Probe, check, dir_names, param_on, read_text};

/// Bit 3 of the VT-d extended capability register: interrupt remapping supported.
const ECAP_IR: u64 = 1 << 3;

/// What the ACPI tables say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Dmar,
    Ivrs,
}

pub fn tables(probe: &Probe) -> Vec<Table> {
    let dir = probe.root.sys_path("firmware/acpi/tables");
    let mut found = Vec::new();
    if dir.join("DMAR").exists() {
        found.push(Table::Dmar);
    }
    if dir.join("IVRS").exists() {
        found.push(Table::Ivrs);
    }
    found
}

/// Numbered group directories.
pub fn group_ids(probe: &Probe) -> Vec<u32> {
    let mut ids: Vec<u32> = dir_names(&probe.root.iommu_groups_dir())
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// The kernel command line's IOMMU-related options, in a fixed order.
const CMDLINE_KEYS: &[&str] = &[
    "intel_iommu",
    "amd_iommu",
    "iommu",
    "iommu.passthrough",
    "iommu.strict",
    "intremap",
    "nointremap",
    "pcie_acs_override",
    "vfio_iommu_type1.allow_unsafe_interrupts",
];

fn cmdline_words(probe: &Probe) -> Vec<String> {
    CMDLINE_KEYS
        .iter()
        .filter_map(|k| {
            probe.cmdline_opt(k).map(|v| {
                if v.is_empty() {
                    (*k).to_owned()
                } else {
                    format!("{k}={v}")
                }
            })
        })
        .collect()
}

fn intremap_off(probe: &Probe) -> bool {
    probe.cmdline_opt("nointremap").is_some()
        || probe
            .cmdline_opt("intremap")
            .is_some_and(|v| v.split(',').any(|w| w == "off"))
}

/// Irq chips with remapping in /proc/interrupts: (count of IRQs on `IR-*`, the chip names).
fn remapped_irqs(text: &str) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut chips: Vec<String> = Vec::new();
    for line in text.lines() {
        // "  25:  0  0  IR-PCI-MSIX-0000:00:10.0   0-edge  PCIe PME"
        if let Some(chip) = line.split_whitespace().find(|w| w.starts_with("IR-")) {
            count += 1;
            // Drop the device address of per-device MSI domains.
            let family = chip
                .split_once("-0000:")
                .map_or(chip, |(f, _)| f)
                .to_owned();
            if !chips.contains(&family) {
                chips.push(family);
            }
        }
    }
    (count, chips)
}

pub fn checks(probe: &Probe, out: &mut Vec<Check>) -> IommuFacts {
    let tables = tables(probe);
    let guest = probe.is_guest();
    let tables_dir = probe.show(&probe.root.sys_path("firmware/acpi/tables"));
    let vendor = probe.cpuinfo.get("vendor_id").cloned().unwrap_or_default();

    // iommu.acpi_table
    let names: Vec<&str> = tables
        .iter()
        .map(|t| match t {
            Table::Dmar => "DMAR (Intel VT-d)",
            Table::Ivrs => "IVRS (AMD-Vi)",
        })
        .collect();
    out.push(if tables.is_empty() {
        check(
            "iommu.acpi_table",
            Verdict::Fail,
            "no IOMMU: neither a DMAR nor an IVRS ACPI table",
            format!("{tables_dir}: no DMAR, no IVRS"),
            Some(if guest {
                format!(
                    "this is a virtual machine ({}): give it a virtual IOMMU (QEMU: -device \
                     intel-iommu,intremap=on; libvirt: <iommu model='intel'>)",
                    probe.hypervisor_name()
                )
            } else {
                match vendor.as_str() {
                    "GenuineIntel" => "enable VT-d (Intel Virtualization Technology for \
                                       Directed I/O) in the firmware setup"
                        .to_owned(),
                    "AuthenticAMD" | "HygonGenuine" => "enable the IOMMU (AMD-Vi; the \
                                                        firmware setup usually calls it IOMMU)"
                        .to_owned(),
                    _ => "enable the IOMMU (VT-d / AMD-Vi) in the firmware setup".to_owned(),
                }
            }),
        )
    } else {
        let mismatch = match (tables.as_slice(), vendor.as_str()) {
            ([Table::Dmar], "AuthenticAMD") => {
                " (an Intel IOMMU under an AMD CPU: an emulated platform)"
            }
            ([Table::Ivrs], "GenuineIntel") => {
                " (an AMD IOMMU under an Intel CPU: an emulated platform)"
            }
            _ => "",
        };
        check(
            "iommu.acpi_table",
            Verdict::Pass,
            format!("{} present{mismatch}", names.join(" and ")),
            format!(
                "{tables_dir}: {}",
                tables
                    .iter()
                    .map(|t| format!("{t:?}").to_uppercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None,
        )
    });

    let groups = group_ids(probe);
    let groups_shown = probe.show(&probe.root.iommu_groups_dir());
    let cmd = cmdline_words(probe);
    let cmd_text = if cmd.is_empty() {
        "none of intel_iommu=, amd_iommu=, iommu=, intremap=".to_owned()
    } else {
        cmd.join(" ")
    };
    let cmdline_shown = probe.show(&probe.root.proc_file("cmdline"));
    let off_word = |key: &str| {
        probe
            .cmdline_opt(key)
            .is_some_and(|v| v.split(',').any(|w| w == "off"))
    };
    let enable_fix = || -> Option<String> {
        let mut removals: Vec<&str> = Vec::new();
        if off_word("iommu") {
            removals.push("iommu=off");
        }
        if tables.contains(&Table::Dmar) {
            if off_word("intel_iommu") {
                return Some(
                    "replace intel_iommu=off with intel_iommu=on on the kernel command line".into(),
                );
            }
            if removals.is_empty() {
                return Some("add intel_iommu=on to the kernel command line".into());
            }
        } else if tables.contains(&Table::Ivrs) && off_word("amd_iommu") {
            removals.push("amd_iommu=off");
        }
        if removals.is_empty() {
            (!tables.is_empty()).then(|| {
                "the IOMMU did not start although the table is there: check the kernel log for \
                 DMAR/AMD-Vi errors and that the firmware enables it"
                    .to_owned()
            })
        } else {
            Some(format!(
                "remove {} from the kernel command line",
                removals.join(" and ")
            ))
        }
    };

    // iommu.units
    let class = probe.root.sys_path("class/iommu");
    let units = dir_names(&class);
    out.push(if !units.is_empty() {
        check(
            "iommu.units",
            Verdict::Pass,
            format!("{} IOMMU unit(s): {}", units.len(), units.join(", ")),
            format!("{}: {}", probe.show(&class), units.join(" ")),
            None,
        )
    } else if tables.is_empty() {
        check(
            "iommu.units",
            Verdict::NotApplicable,
            "no IOMMU hardware (see iommu.acpi_table)",
            format!("{} empty", probe.show(&class)),
            None,
        )
    } else {
        check(
            "iommu.units",
            Verdict::Fail,
            "the ACPI table is there but the kernel registered no IOMMU unit: the IOMMU is off",
            format!("{} empty; {cmdline_shown}: {cmd_text}", probe.show(&class)),
            enable_fix(),
        )
    });

    // iommu.groups
    out.push(if !groups.is_empty() {
        check(
            "iommu.groups",
            Verdict::Pass,
            format!("{} IOMMU groups", groups.len()),
            format!("{groups_shown}: {} entries", groups.len()),
            None,
        )
    } else if tables.is_empty() {
        check(
            "iommu.groups",
            Verdict::Fail,
            "no IOMMU groups: there is no IOMMU (see iommu.acpi_table)",
            format!("{groups_shown} empty or absent"),
            None,
        )
    } else {
        check(
            "iommu.groups",
            Verdict::Fail,
            "no IOMMU groups: the IOMMU is present but off",
            format!("{groups_shown} empty; {cmdline_shown}: {cmd_text}"),
            enable_fix(),
        )
    });

    // iommu.default_domain
    let mut types: Vec<(String, usize)> = Vec::new();
    for id in &groups {
        let ty = read_text(
            &probe
                .root
                .iommu_groups_dir()
                .join(id.to_string())
                .join("type"),
        )
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
        match types.iter_mut().find(|(t, _)| *t == ty) {
            Some((_, n)) => *n += 1,
            None => types.push((ty, 1)),
        }
    }
    out.push(if groups.is_empty() {
        check(
            "iommu.default_domain",
            Verdict::NotApplicable,
            "no groups",
            format!("{groups_shown} empty"),
            None,
        )
    } else {
        let describe = |t: &str| match t {
            "identity" => "passthrough (identity, iommu=pt)",
            "DMA" | "DMA-FQ" => "translated (DMA)",
            "blocked" => "blocked",
            "unmanaged" => "unmanaged (owned by a driver such as vfio)",
            _ => "unknown",
        };
        let parts: Vec<String> = types
            .iter()
            .map(|(t, n)| format!("{n} {} [{t}]", describe(t)))
            .collect();
        check(
            "iommu.default_domain",
            Verdict::Pass,
            format!("default domains: {}", parts.join(", ")),
            format!("{groups_shown}/N/type"),
            None,
        )
    });

    // iommu.cmdline
    let acs = probe.cmdline_opt("pcie_acs_override").is_some();
    let off: Vec<&str> = ["intel_iommu", "amd_iommu", "iommu"]
        .into_iter()
        .filter(|k| off_word(k))
        .collect();
    out.push(if acs {
        check(
            "iommu.cmdline",
            Verdict::Warn,
            "pcie_acs_override is set: the kernel pretends devices are isolated, so IOMMU groups \
             cannot be trusted",
            format!("{cmdline_shown}: {cmd_text}"),
            Some("remove pcie_acs_override from the kernel command line".to_owned()),
        )
    } else if !off.is_empty() {
        check(
            "iommu.cmdline",
            Verdict::Fail,
            format!(
                "the IOMMU is switched off on the command line ({})",
                off.join(", ")
            ),
            format!("{cmdline_shown}: {cmd_text}"),
            enable_fix(),
        )
    } else {
        check(
            "iommu.cmdline",
            Verdict::Pass,
            format!(
                "relevant options: {}",
                if cmd.is_empty() { "none" } else { &cmd_text }
            ),
            format!("{cmdline_shown}: {cmd_text}"),
            None,
        )
    });

    // iommu.interrupt_remapping
    let interrupts_path = probe.root.proc_file("interrupts");
    let interrupts = read_text(&interrupts_path);
    let (ir_irqs, ir_chips) = interrupts.as_deref().map(remapped_irqs).unwrap_or_default();
    let mut ecaps: Vec<(String, bool)> = Vec::new();
    for unit in &units {
        let path = class.join(unit).join("intel-iommu/ecap");
        if let Some(v) = read_text(&path).and_then(|t| u64::from_str_radix(t.trim(), 16).ok()) {
            ecaps.push((unit.clone(), v & ECAP_IR != 0));
        }
    }
    let ecap_text = if ecaps.is_empty() {
        String::new()
    } else {
        format!(
            "; {}",
            ecaps
                .iter()
                .map(|(u, ir)| format!("{u} ecap IR={}", u8::from(*ir)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let interrupts_shown = probe.show(&interrupts_path);
    let ir_evidence = match &interrupts {
        None => format!("{interrupts_shown} unreadable{ecap_text}"),
        Some(_) if ir_irqs > 0 => format!(
            "{interrupts_shown}: {ir_irqs} IRQs on remapped chips ({}){ecap_text}",
            ir_chips.join(", ")
        ),
        Some(_) => format!("{interrupts_shown}: no IR-* irq chips{ecap_text}"),
    };
    let capable = if ecaps.is_empty() {
        None
    } else {
        Some(ecaps.iter().all(|(_, ir)| *ir))
    };
    out.push(if groups.is_empty() {
        check(
            "iommu.interrupt_remapping",
            Verdict::NotApplicable,
            "the IOMMU is off",
            ir_evidence,
            None,
        )
    } else if ir_irqs > 0 {
        check(
            "iommu.interrupt_remapping",
            Verdict::Pass,
            "interrupt remapping enabled",
            ir_evidence,
            None,
        )
    } else if interrupts.is_none() {
        check(
            "iommu.interrupt_remapping",
            Verdict::Warn,
            "cannot tell whether interrupt remapping is on",
            ir_evidence,
            None,
        )
    } else if intremap_off(probe) {
        check(
            "iommu.interrupt_remapping",
            Verdict::Fail,
            "interrupt remapping is switched off on the command line: a device can forge \
             interrupts to the host",
            format!("{ir_evidence}; {cmdline_shown}: {cmd_text}"),
            Some("remove intremap=off / nointremap from the kernel command line".to_owned()),
        )
    } else if capable == Some(false) {
        check(
            "iommu.interrupt_remapping",
            Verdict::Fail,
            "the IOMMU cannot remap interrupts: a device can forge interrupts to the host, and \
             VFIO refuses such devices unless allow_unsafe_interrupts=1",
            ir_evidence,
            Some(if guest {
                "give this VM an interrupt-remapping IOMMU (QEMU: -device intel-iommu,intremap=on \
                 with kernel-irqchip=split)"
                    .to_owned()
            } else {
                "enable interrupt remapping / x2APIC in the firmware setup, or use a platform \
                 whose IOMMU supports it"
                    .to_owned()
            }),
        )
    } else {
        check(
            "iommu.interrupt_remapping",
            Verdict::Fail,
            "interrupt remapping is off: a device can forge interrupts to the host",
            ir_evidence,
            Some(
                "make sure the kernel has CONFIG_IRQ_REMAP=y and the firmware enables x2APIC / \
                 interrupt remapping"
                    .to_owned(),
            ),
        )
    });

    let facts = IommuFacts {
        acpi_tables: tables
            .iter()
            .map(|t| format!("{t:?}").to_uppercase())
            .collect(),
        units: units.clone(),
        group_count: u32::try_from(groups.len()).unwrap_or(u32::MAX),
        default_domains: types
            .iter()
            .map(|(t, n)| (t.clone(), u32::try_from(*n).unwrap_or(u32::MAX)))
            .collect(),
        interrupt_remapping: interrupts.as_ref().map(|_| ir_irqs > 0),
    };

    // iommu.unsafe_interrupts
    let param_path = probe
        .root
        .module_param("vfio_iommu_type1", "allow_unsafe_interrupts");
    let param = read_text(&param_path).map(|v| v.trim().to_owned());
    let cmd_unsafe = probe
        .cmdline_opt("vfio_iommu_type1.allow_unsafe_interrupts")
        .and_then(param_on);
    let param_shown = probe.show(&param_path);
    out.push(match (param.as_deref().and_then(param_on), cmd_unsafe) {
        (Some(true), _) | (None, Some(true)) => check(
            "iommu.unsafe_interrupts",
            Verdict::Warn,
            "vfio_iommu_type1 allow_unsafe_interrupts is on: VFIO accepts devices that can forge \
             interrupts, so IOMMU groups are not a security boundary",
            match &param {
                Some(v) => format!("{param_shown}: {v}"),
                None => format!("{cmdline_shown}: vfio_iommu_type1.allow_unsafe_interrupts=1"),
            },
            Some(
                "remove allow_unsafe_interrupts from /etc/modprobe.d and the kernel command line"
                    .to_owned(),
            ),
        ),
        (Some(false), _) => check(
            "iommu.unsafe_interrupts",
            Verdict::Pass,
            "vfio_iommu_type1 allow_unsafe_interrupts off",
            format!("{param_shown}: {}", param.as_deref().unwrap_or("?")),
            None,
        ),
        (None, _) => check(
            "iommu.unsafe_interrupts",
            Verdict::Pass,
            "vfio_iommu_type1 not loaded; allow_unsafe_interrupts defaults to off",
            format!("{param_shown} absent"),
            None,
        ),
    });
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_remapped_irq_chips() {
        let text = "           CPU0       CPU1\n  0:  136  0  IR-IO-APIC   2-edge  timer\n \
                    24:  0  0  DMAR-MSI   0-edge  dmar0\n 25:  0  0  IR-PCI-MSIX-0000:00:10.0  \
                    0-edge  PCIe PME\n 26:  0 0 IR-PCI-MSIX-0000:00:11.0 0-edge x\nNMI: 0 0 Non-maskable\n";
        assert_eq!(
            remapped_irqs(text),
            (3, vec!["IR-IO-APIC".to_owned(), "IR-PCI-MSIX".to_owned()])
        );
        assert_eq!(remapped_irqs(" 24: 1 0 IO-APIC 5-edge ACPI:Ged\n").0, 0);
    }
}
