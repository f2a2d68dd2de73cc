//! The host capability report: every fact that decides whether this machine can hand PCI devices
//! to VMs through VFIO, read from a filesystem root (`/` on a host, a fixture tree in tests), with
//! one verdict per check, the evidence it read, and a one-line fix.
//!
//! Reading is best-effort: a file that is absent or unreadable becomes "unknown" in the evidence,
//! never an error, so the report is complete on any kernel. Nothing here writes or loads modules.
//!
//! Areas: [`cpu`] (extension, firmware, hypervisor), [`kvm`] (modules, /dev/kvm, parameters),
//! [`iommu`] (ACPI table, units, groups, interrupt remapping), [`vfio`], [`kconfig`], [`memory`]
//! (hugepages, NUMA, KSM), [`topology`], [`sriov`]. The checks come out in that order and the
//! overall verdict names the first failing one.

pub mod cpu;
pub mod iommu;
pub mod kconfig;
pub mod kvm;
pub mod memory;
pub mod msr;
pub mod sriov;
pub mod topology;
pub mod vfio;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use passthroughd_proto::host::{self as wire, Check, HostReport, Verdict};
use tracing::debug;

use crate::kernel::sysfs::{SysfsRoot, read_attr};
use crate::observe::pciids::PciIds;

pub use msr::{DevCpuMsr, FixedMsrs, MsrSource};

/// Builds the report for the host under `root`, reading MSRs through `msr`.
pub fn report(root: &SysfsRoot, ids: &PciIds, msr: &dyn MsrSource) -> HostReport {
    let probe = Probe::read(root, msr);
    let mut checks = Vec::new();
    cpu::checks(&probe, &mut checks);
    kvm::checks(&probe, &mut checks);
    let iommu = iommu::checks(&probe, &mut checks);
    vfio::checks(&probe, &mut checks);
    kconfig::checks(&probe, &mut checks);
    let sriov_devices = sriov::devices(root, ids, &mut checks);
    let memory = memory::facts(&probe);
    memory::checks(&probe, &memory, &mut checks);
    HostReport {
        schema_version: wire::HOST_REPORT_SCHEMA,
        kernel_release: probe.kernel_release.clone(),
        overall: wire::overall(&checks),
        checks,
        cpu: probe.cpu_facts(),
        iommu,
        topology: topology::facts(&probe),
        numa_nodes: memory::numa_nodes(&probe),
        memory,
        sriov_devices,
    }
}

/// The report of the live host under `root` (`/` on a real host), MSRs through `root`'s
/// dev/cpu/0/msr (absent in fixtures: the firmware verdict then rests on the kvm module state).
pub fn report_live(root: &SysfsRoot, ids: &PciIds) -> HostReport {
    report(root, ids, &DevCpuMsr::new(root))
}

/// CPU vendor, as far as the checks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Whether a module is there, and how we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    /// Listed in /proc/modules.
    Loaded,
    /// Compiled into the kernel (CONFIG_...=y, or in sys/module without being a loaded module).
    BuiltIn,
    /// Neither.
    Absent,
}

impl ModuleState {
    pub fn present(self) -> bool {
        self != ModuleState::Absent
    }

    pub fn word(self) -> &'static str {
        match self {
            ModuleState::Loaded => "loaded",
            ModuleState::BuiltIn => "built in",
            ModuleState::Absent => "not loaded",
        }
    }
}

/// Everything read once, shared by the checks.
#[derive(Debug)]
pub struct Probe<'a> {
    pub root: &'a SysfsRoot,
    pub msr: &'a dyn MsrSource,
    pub vendor: Vendor,
    /// First `processor` block of /proc/cpuinfo, key → value.
    pub cpuinfo: BTreeMap<String, String>,
    pub flags: BTreeSet<String>,
    /// Number of `processor` entries.
    pub cpuinfo_cpus: u32,
    /// Kernel command line words, `key` → `value` (empty for bare words). Later words win.
    pub cmdline: BTreeMap<String, String>,
    /// Names in /proc/modules; `None` when the kernel has no module support (file absent).
    pub proc_modules: Option<BTreeSet<String>>,
    pub kernel_release: Option<String>,
    pub kconfig: Option<kconfig::KernelConfig>,
    pub dmi_vendor: Option<String>,
    pub dmi_product: Option<String>,
}

impl<'a> Probe<'a> {
    pub fn read(root: &'a SysfsRoot, msr: &'a dyn MsrSource) -> Self {
        let cpuinfo_text = read_text(&root.proc_file("cpuinfo")).unwrap_or_default();
        let mut cpuinfo = BTreeMap::new();
        let mut cpuinfo_cpus = 0;
        for line in cpuinfo_text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim();
            if key == "processor" {
                cpuinfo_cpus += 1;
            }
            if cpuinfo_cpus <= 1 {
                cpuinfo.insert(key.to_owned(), value.trim().to_owned());
            }
        }
        let flags = cpuinfo
            .get("flags")
            .map(|f| f.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let vendor = match cpuinfo.get("vendor_id").map(String::as_str) {
            Some("GenuineIntel") => Vendor::Intel,
            Some("AuthenticAMD" | "HygonGenuine") => Vendor::Amd,
            _ => Vendor::Other,
        };
        let cmdline = read_text(&root.proc_file("cmdline"))
            .map(|text| parse_cmdline(&text))
            .unwrap_or_default();
        let proc_modules = read_text(&root.proc_file("modules")).map(|text| {
            text.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        });
        let kernel_release = read_text(&root.proc_file("sys/kernel/osrelease"))
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        let kconfig = kconfig::KernelConfig::find(root, kernel_release.as_deref());
        let dmi = |name: &'static str| {
            read_text(&root.sys_path("class/dmi/id").join(name))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        Probe {
            root,
            msr,
            vendor,
            flags,
            cpuinfo_cpus,
            cmdline,
            proc_modules,
            kernel_release,
            kconfig,
            dmi_vendor: dmi("sys_vendor"),
            dmi_product: dmi("product_name"),
            cpuinfo,
        }
    }

    /// `path` as the host names it, for evidence.
    pub fn show(&self, path: &Path) -> String {
        shown(self.root, path)
    }

    /// "/proc/cpuinfo", for evidence.
    pub fn cpuinfo_path(&self) -> String {
        self.show(&self.root.proc_file("cpuinfo"))
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.contains(flag)
    }

    /// The words of cpuinfo's `vmx flags` line (Intel, kernels since 5.8 with VMX enabled);
    /// `None` when there is no such line.
    pub fn vmx_flags(&self) -> Option<BTreeSet<&str>> {
        self.cpuinfo
            .get("vmx flags")
            .map(|f| f.split_whitespace().collect())
    }

    /// (major, minor) of the running kernel, from its release (`6.12.0-1-amd64` → (6, 12)).
    pub fn kernel_version(&self) -> Option<(u32, u32)> {
        let release = self.kernel_release.as_deref()?;
        let mut parts = release.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((major, minor.parse().ok()?))
    }

    /// `vmx` or `svm`, when the CPU (as the kernel shows it) has one.
    pub fn virt_extension(&self) -> Option<&'static str> {
        if self.has_flag("vmx") {
            Some("vmx")
        } else if self.has_flag("svm") {
            Some("svm")
        } else {
            None
        }
    }

    /// The hypervisor we run under, when there is one: (`true`, name from DMI when it says).
    pub fn hypervisor(&self) -> (bool, Option<String>) {
        let dmi = cpu::dmi_hypervisor(self.dmi_vendor.as_deref(), self.dmi_product.as_deref());
        (self.has_flag("hypervisor") || dmi.is_some(), dmi)
    }

    pub fn is_guest(&self) -> bool {
        self.hypervisor().0
    }

    /// "QEMU", or "unnamed hypervisor" when DMI does not say, for messages.
    pub fn hypervisor_name(&self) -> String {
        self.hypervisor()
            .1
            .unwrap_or_else(|| "unnamed hypervisor: no DMI".to_owned())
    }

    /// How the hypervisor was detected, for evidence.
    pub fn hypervisor_evidence(&self) -> String {
        let flag = if self.has_flag("hypervisor") {
            format!("{} flags: hypervisor", self.cpuinfo_path())
        } else {
            format!("{} flags: no hypervisor flag", self.cpuinfo_path())
        };
        let dmi = match (&self.dmi_vendor, &self.dmi_product) {
            (None, None) => format!(
                "no DMI ({} absent)",
                self.show(&self.root.sys_path("class/dmi/id"))
            ),
            (v, p) => format!(
                "DMI sys_vendor '{}', product_name '{}'",
                v.as_deref().unwrap_or("?"),
                p.as_deref().unwrap_or("?")
            ),
        };
        format!("{flag}; {dmi}")
    }

    /// Whether `name` (underscore form, `kvm_intel`) is loaded or built in. `config` is the
    /// Kconfig symbol that builds it, to tell "built in" from "absent" where sys/module is silent.
    pub fn module(&self, name: &str, config: &str) -> ModuleState {
        if let Some(loaded) = &self.proc_modules
            && loaded.contains(name)
        {
            return ModuleState::Loaded;
        }
        if self.kconfig.as_ref().and_then(|k| k.get(config)) == Some("y") {
            return ModuleState::BuiltIn;
        }
        let dir = self.root.module_dir().join(name);
        // A loaded module has `initstate`; a built-in one with parameters has a directory only.
        if dir.is_dir() {
            if dir.join("initstate").exists() {
                return ModuleState::Loaded;
            }
            return ModuleState::BuiltIn;
        }
        ModuleState::Absent
    }

    /// A module parameter (`Y`, `N`, `1`, `0`, ...), `None` when absent.
    pub fn module_param(&self, module: &'static str, name: &'static str) -> Option<String> {
        read_text(&self.root.module_param(module, name)).map(|v| v.trim().to_owned())
    }

    /// The value of a kernel command line option, `Some("")` for a bare word.
    pub fn cmdline_opt(&self, key: &str) -> Option<&str> {
        self.cmdline.get(key).map(String::as_str)
    }

    fn cpu_facts(&self) -> wire::CpuFacts {
        let (hypervisor, hypervisor_vendor) = self.hypervisor();
        wire::CpuFacts {
            vendor: self.cpuinfo.get("vendor_id").cloned(),
            model_name: self.cpuinfo.get("model name").cloned(),
            microcode: self.cpuinfo.get("microcode").cloned(),
            virt_extension: self.virt_extension().map(str::to_owned),
            hypervisor,
            hypervisor_vendor,
        }
    }
}

/// Splits a kernel command line into options. Words after a lone `--` go to init, not the kernel.
pub fn parse_cmdline(text: &str) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    for word in text.split_whitespace() {
        if word == "--" {
            break;
        }
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        // The kernel treats `-` and `_` in parameter names alike.
        options.insert(key.replace('-', "_"), value.to_owned());
    }
    options
}

/// Reads a whole text file; `None` when absent or unreadable (logged at debug).
pub fn read_text(path: &Path) -> Option<String> {
    match read_attr(path) {
        Ok(value) => value,
        Err(e) => {
            debug!(path = %path.display(), error = %e.source, "unreadable");
            None
        }
    }
}

/// Names in a directory, sorted; empty when it is absent.
pub fn dir_names(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The path as it appears on the host, for evidence: `ROOT/sys/x` → `/sys/x`.
pub fn shown(root: &SysfsRoot, path: &Path) -> String {
    match path.strip_prefix(root.root()) {
        Ok(rel) => PathBuf::from("/").join(rel).display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// Shorthand to build a check.
pub fn check(
    id: &str,
    verdict: Verdict,
    summary: impl Into<String>,
    evidence: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        id: id.to_owned(),
        verdict,
        summary: summary.into(),
        evidence: evidence.into(),
        fix,
    }
}

/// A parameter value `Y`/`1` as on, `N`/`0` as off.
pub fn param_on(value: &str) -> Option<bool> {
    match value {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_options_stop_at_the_init_separator() {
        let c = parse_cmdline("BOOT_IMAGE=/vmlinuz intel_iommu=on iommu=pt quiet -- --foo=1\n");
        assert_eq!(c.get("intel_iommu").map(String::as_str), Some("on"));
        assert_eq!(c.get("iommu").map(String::as_str), Some("pt"));
        assert_eq!(c.get("quiet").map(String::as_str), Some(""));
        assert!(!c.contains_key("__foo"));
        let c = parse_cmdline("vfio-pci.ids=8086:10ca");
        assert!(c.contains_key("vfio_pci.ids"));
    }

    #[test]
    fn kernel_version_from_the_release() {
        let msr = FixedMsrs::default();
        let version = |release: &str| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("proc/sys/kernel")).unwrap();
            std::fs::write(dir.path().join("proc/sys/kernel/osrelease"), release).unwrap();
            let root = SysfsRoot::new(dir.path());
            Probe::read(&root, &msr).kernel_version()
        };
        assert_eq!(version("6.12.0-1-amd64\n"), Some((6, 12)));
        assert_eq!(version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(version("4.19.0"), Some((4, 19)));
        assert_eq!(version("6.8-rc1"), Some((6, 8)));
        assert_eq!(version("weird"), None);
    }
}
