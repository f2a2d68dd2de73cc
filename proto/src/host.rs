//! The host capability report: can this machine pass PCI devices through to VMs, and if not,
//! what to fix first. Built by the daemon from sysfs/procfs; the CLI prints it.
//!
//! The JSON form is stable (documented field by field in `docs/host-report.md`): fields are
//! snake_case, verdicts are lowercase strings, check ids are dotted and never renamed. New
//! fields may be added; [`HostReport::schema_version`] changes only when one is removed or
//! changes meaning.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::PciAddress;

/// The schema version written by this build.
pub const HOST_REPORT_SCHEMA: u32 = 1;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// Works, but not as well or as safely as it could.
    Warn,
    /// Blocks VFIO passthrough (or makes it unsafe).
    Fail,
    /// Does not apply to this host (an AMD parameter on an Intel host, a module not loaded).
    NotApplicable,
}

impl Verdict {
    /// The lowercase name it has in JSON and on D-Bus (`pass`, `not_applicable`).
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
            Verdict::NotApplicable => "not_applicable",
        }
    }

    /// The verdict [`Verdict::name`] gives `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Verdict::Pass,
            Verdict::Warn,
            Verdict::Fail,
            Verdict::NotApplicable,
        ]
        .into_iter()
        .find(|v| v.name() == name)
    }

    /// The fixed-width word the text report starts each line with.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::NotApplicable => "N/A ",
        }
    }
}

/// One check: what was decided, from what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Stable dotted id, e.g. `cpu.virt_extension`, `iommu.acpi_table`.
    pub id: String,
    pub verdict: Verdict,
    /// One line for people.
    pub summary: String,
    /// What was read to decide, e.g. `/proc/cpuinfo flags: vmx`.
    pub evidence: String,
    /// One line telling what to do, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The verdict over all checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overall {
    /// True when no check failed: devices can be handed to VMs through VFIO safely.
    pub ready: bool,
    /// `fail` when any check failed, else `warn` when any warned, else `pass`.
    pub verdict: Verdict,
    pub summary: String,
    /// The first failing check (warning, when nothing failed), in report order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_check: Option<String>,
    /// Its fix: the first thing to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_fix: Option<String>,
}

/// What the CPU is and whether we run under a hypervisor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFacts {
    /// `vendor_id` of /proc/cpuinfo: `GenuineIntel`, `AuthenticAMD`, ...
    pub vendor: Option<String>,
    pub model_name: Option<String>,
    pub microcode: Option<String>,
    /// `vmx` or `svm` when /proc/cpuinfo lists one.
    pub virt_extension: Option<String>,
    /// The `hypervisor` cpuinfo flag is set, or DMI names a virtual platform.
    pub hypervisor: bool,
    /// Who the hypervisor is, from DMI (`QEMU`, `VMware, Inc.`), when it says.
    pub hypervisor_vendor: Option<String>,
}

/// Sockets, cores and threads of the online CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub sockets: u32,
    pub cores_per_socket: u32,
    pub threads_per_core: u32,
    pub logical_cpus: u32,
    /// CPU list of `isolcpus=` (sys/devices/system/cpu/isolated); empty when none.
    pub isolated_cpus: String,
    /// CPU list of `nohz_full=`; empty when none or not supported.
    pub nohz_full_cpus: String,
}

/// One hugepage pool: a page size, system-wide or on one NUMA node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugepagePool {
    pub size_kb: u64,
    pub total: u64,
    pub free: u64,
}

/// One NUMA node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    pub id: u32,
    /// CPU list as the kernel prints it (`0-7,16-23`).
    pub cpus: String,
    pub memory_total_kb: Option<u64>,
    pub memory_free_kb: Option<u64>,
    /// Distances to every node, in node order (`10` to itself).
    pub distances: Vec<u32>,
    pub hugepages: Vec<HugepagePool>,
}

/// A hugetlbfs mount from /proc/mounts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugetlbfsMount {
    pub mount_point: String,
    /// The `pagesize=` option, when given.
    pub page_size: Option<String>,
}

/// Kernel same-page merging.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ksm {
    /// `sys/kernel/mm/ksm/run`: 0 stopped, 1 running, 2 unmerging; `None` without KSM.
    pub run: Option<u32>,
    pub pages_sharing: Option<u64>,
}

/// Memory facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFacts {
    pub total_kb: Option<u64>,
    /// `Hugepagesize` of /proc/meminfo.
    pub default_hugepage_kb: Option<u64>,
    /// System-wide pools, one per supported size (sys/kernel/mm/hugepages).
    pub hugepages: Vec<HugepagePool>,
    pub hugetlbfs_mounts: Vec<HugetlbfsMount>,
    pub ksm: Ksm,
}

/// What the IOMMU checks found, as numbers a script can compare.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuFacts {
    /// ACPI tables present: `DMAR` (Intel VT-d), `IVRS` (AMD-Vi).
    pub acpi_tables: Vec<String>,
    /// Units in /sys/class/iommu (`dmar0`, `ivhd0`).
    pub units: Vec<String>,
    /// Entries of /sys/kernel/iommu_groups; 0 when the IOMMU is off.
    pub group_count: u32,
    /// Default domain type → number of groups (`identity`, `DMA`, `DMA-FQ`).
    pub default_domains: BTreeMap<String, u32>,
    /// `Some(true)` when IR-* irq chips are in use, `None` when it cannot be told.
    pub interrupt_remapping: Option<bool>,
}

/// An SR-IOV physical function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovDevice {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub name: Option<String>,
    pub driver: Option<String>,
    pub total_vfs: u32,
    pub num_vfs: u32,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub schema_version: u32,
    /// `proc/sys/kernel/osrelease`.
    pub kernel_release: Option<String>,
    pub overall: Overall,
    pub checks: Vec<Check>,
    pub cpu: CpuFacts,
    pub iommu: IommuFacts,
    pub topology: Topology,
    pub numa_nodes: Vec<NumaNode>,
    pub memory: MemoryFacts,
    pub sriov_devices: Vec<SriovDevice>,
}

impl HostReport {
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }
}

/// Computes the overall verdict of `checks`, in their order.
pub fn overall(checks: &[Check]) -> Overall {
    let first = |v: Verdict| checks.iter().find(|c| c.verdict == v);
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    let warned = checks.iter().filter(|c| c.verdict == Verdict::Warn).count();
    let (verdict, pick) = match (first(Verdict::Fail), first(Verdict::Warn)) {
        (Some(f), _) => (Verdict::Fail, Some(f)),
        (None, Some(w)) => (Verdict::Warn, Some(w)),
        (None, None) => (Verdict::Pass, None),
    };
    let summary = match verdict {
        Verdict::Fail => {
            format!("NOT ready for VFIO passthrough: {failed} check(s) failed, {warned} warning(s)")
        }
        Verdict::Warn => format!("ready for VFIO passthrough, with {warned} warning(s)"),
        _ => "ready for VFIO passthrough".to_owned(),
    };
    Overall {
        ready: verdict != Verdict::Fail,
        verdict,
        summary,
        first_check: pick.map(|c| c.id.clone()),
        first_fix: pick.and_then(|c| c.fix.clone()),
    }
}

fn kb(kb: u64) -> String {
    if kb >= 1 << 20 && kb.is_multiple_of(1 << 20) {
        format!("{}G", kb >> 20)
    } else if kb >= 1 << 10 && kb.is_multiple_of(1 << 10) {
        format!("{}M", kb >> 10)
    } else {
        format!("{kb}K")
    }
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or_else(|| "?".to_owned(), |k| format!("{} MiB", k / 1024))
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "none" } else { text }
}

/// The human form: one line per check (`PASS cpu.virt_extension  VT-x (vmx) present`) with its
/// fix indented below, then the facts, then the overall verdict.
pub fn render_text(report: &HostReport) -> String {
    let mut out = String::new();
    let width = report.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
    for check in &report.checks {
        let _ = writeln!(
            out,
            "{} {:width$}  {}",
            check.verdict.label(),
            check.id,
            check.summary
        );
        if let Some(fix) = &check.fix {
            let _ = writeln!(out, "     {:width$}  fix: {fix}", "");
        }
    }
    let cpu = &report.cpu;
    let _ = writeln!(out, "\nFacts");
    let _ = writeln!(
        out,
        "  kernel     {}",
        report.kernel_release.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "  cpu        {} / {} / microcode {}{}",
        cpu.vendor.as_deref().unwrap_or("?"),
        cpu.model_name.as_deref().unwrap_or("?"),
        cpu.microcode.as_deref().unwrap_or("?"),
        if cpu.hypervisor {
            format!(
                " (guest of {})",
                cpu.hypervisor_vendor.as_deref().unwrap_or("a hypervisor")
            )
        } else {
            String::new()
        }
    );
    let i = &report.iommu;
    let _ = writeln!(
        out,
        "  iommu      tables {}; units {}; {} groups {:?}; interrupt remapping {}",
        if i.acpi_tables.is_empty() {
            "none".to_owned()
        } else {
            i.acpi_tables.join(", ")
        },
        if i.units.is_empty() {
            "none".to_owned()
        } else {
            i.units.join(", ")
        },
        i.group_count,
        i.default_domains,
        match i.interrupt_remapping {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        }
    );
    let t = &report.topology;
    let _ = writeln!(
        out,
        "  topology   {} socket(s) x {} core(s) x {} thread(s) = {} logical CPUs; isolated: {}; nohz_full: {}",
        t.sockets,
        t.cores_per_socket,
        t.threads_per_core,
        t.logical_cpus,
        or_none(&t.isolated_cpus),
        or_none(&t.nohz_full_cpus)
    );
    for node in &report.numa_nodes {
        let pools: Vec<String> = node
            .hugepages
            .iter()
            .map(|p| format!("{} {}/{} free", kb(p.size_kb), p.free, p.total))
            .collect();
        let _ = writeln!(
            out,
            "  numa node{} cpus {}; memory {} ({} free); distances {:?}; hugepages {}",
            node.id,
            or_none(&node.cpus),
            mib(node.memory_total_kb),
            mib(node.memory_free_kb),
            node.distances,
            if pools.is_empty() {
                "none".to_owned()
            } else {
                pools.join(", ")
            }
        );
    }
    let m = &report.memory;
    let pools: Vec<String> = m
        .hugepages
        .iter()
        .map(|p| format!("{} {}/{} free", kb(p.size_kb), p.free, p.total))
        .collect();
    let _ = writeln!(
        out,
        "  memory     {}; hugepages {}; default size {}",
        mib(m.total_kb),
        if pools.is_empty() {
            "none".to_owned()
        } else {
            pools.join(", ")
        },
        m.default_hugepage_kb.map_or_else(|| "?".to_owned(), kb)
    );
    let mounts: Vec<&str> = m
        .hugetlbfs_mounts
        .iter()
        .map(|h| h.mount_point.as_str())
        .collect();
    let _ = writeln!(
        out,
        "  hugetlbfs  {}; ksm {}",
        if mounts.is_empty() {
            "not mounted".to_owned()
        } else {
            mounts.join(", ")
        },
        match m.ksm.run {
            None => "absent".to_owned(),
            Some(0) => "stopped".to_owned(),
            Some(1) => format!(
                "running ({} pages sharing)",
                m.ksm.pages_sharing.unwrap_or(0)
            ),
            Some(n) => format!("run={n}"),
        }
    );
    if report.sriov_devices.is_empty() {
        let _ = writeln!(out, "  sr-iov     no capable devices");
    }
    for d in &report.sriov_devices {
        let _ = writeln!(
            out,
            "  sr-iov     {} {:04x}:{:04x} {} driver {}: {} of {} VFs enabled",
            d.address,
            d.vendor_id,
            d.device_id,
            d.name.as_deref().unwrap_or(""),
            d.driver.as_deref().unwrap_or("none"),
            d.num_vfs,
            d.total_vfs
        );
    }
    let o = &report.overall;
    let _ = writeln!(out, "\n{} {}", o.verdict.label(), o.summary);
    if let (Some(id), Some(fix)) = (&o.first_check, &o.first_fix) {
        let _ = writeln!(out, "     first fix ({id}): {fix}");
    } else if let Some(id) = &o.first_check {
        let _ = writeln!(out, "     first to look at: {id}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, verdict: Verdict, fix: Option<&str>) -> Check {
        Check {
            id: id.to_owned(),
            verdict,
            summary: format!("{id} summary"),
            evidence: "read".to_owned(),
            fix: fix.map(str::to_owned),
        }
    }

    #[test]
    fn overall_picks_the_first_failure_then_the_first_warning() {
        let checks = vec![
            check("a", Verdict::Pass, None),
            check("b", Verdict::Warn, Some("warn fix")),
            check("c", Verdict::Fail, Some("fail fix")),
            check("d", Verdict::Fail, Some("later")),
        ];
        let o = overall(&checks);
        assert!(!o.ready);
        assert_eq!(o.first_check.as_deref(), Some("c"));
        assert_eq!(o.first_fix.as_deref(), Some("fail fix"));
        let o = overall(&checks[..2]);
        assert!(o.ready);
        assert_eq!(o.verdict, Verdict::Warn);
        assert_eq!(o.first_fix.as_deref(), Some("warn fix"));
        let o = overall(&checks[..1]);
        assert_eq!(
            (o.ready, o.verdict, o.first_check),
            (true, Verdict::Pass, None)
        );
    }

    #[test]
    fn verdicts_are_lowercase_on_the_wire() {
        let json = serde_json::to_string(&check("x.y", Verdict::NotApplicable, None)).unwrap();
        assert_eq!(
            json,
            r#"{"id":"x.y","verdict":"not_applicable","summary":"x.y summary","evidence":"read"}"#
        );
    }

    #[test]
    fn verdict_names_are_the_json_names() {
        for v in [
            Verdict::Pass,
            Verdict::Warn,
            Verdict::Fail,
            Verdict::NotApplicable,
        ] {
            assert_eq!(
                serde_json::to_value(v).unwrap(),
                serde_json::Value::from(v.name())
            );
            assert_eq!(Verdict::from_name(v.name()), Some(v));
        }
        assert_eq!(Verdict::from_name("PASS"), None);
    }

    #[test]
    fn text_has_one_line_per_check_and_indented_fixes() {
        let checks = vec![
            check("cpu.virt_extension", Verdict::Pass, None),
            check("iommu.groups", Verdict::Fail, Some("add intel_iommu=on")),
        ];
        let report = HostReport {
            schema_version: HOST_REPORT_SCHEMA,
            kernel_release: Some("6.12".into()),
            overall: overall(&checks),
            checks,
            cpu: CpuFacts::default(),
            iommu: IommuFacts::default(),
            topology: Topology::default(),
            numa_nodes: vec![],
            memory: MemoryFacts::default(),
            sriov_devices: vec![],
        };
        let text = render_text(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "PASS cpu.virt_extension  cpu.virt_extension summary"
        );
        assert_eq!(lines[1], "FAIL iommu.groups        iommu.groups summary");
        assert_eq!(lines[2], "                         fix: add intel_iommu=on");
        assert!(text.contains("NOT ready for VFIO passthrough"));
        assert!(text.contains("first fix (iommu.groups): add intel_iommu=on"));
    }
}
