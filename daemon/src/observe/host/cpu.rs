//! CPU checks: the virtualization extension, whether the firmware enabled it, and whether we run
//! as a guest (so that a guest without vmx is told about nested virtualization, not the BIOS).

use passthroughd_proto::host::{Check, Verdict};

use super::msr::{
    FEATURE_CONTROL_LOCK, FEATURE_CONTROL_VMX_INSIDE_SMX, FEATURE_CONTROL_VMX_OUTSIDE_SMX,
    IA32_FEATURE_CONTROL, VM_CR, VM_CR_SVMDIS,
};
use super::{Probe, Vendor, check};

/// Where a user turns VT-x on: the setup screen and the names boards give the setting.
pub const FIX_VTX_FIRMWARE: &str =
    "enable VT-x in the BIOS/UEFI setup (often called Intel Virtualization Technology or VT-x)";
/// The same for AMD-V (SVM).
pub const FIX_SVM_FIRMWARE: &str =
    "enable AMD-V in the BIOS/UEFI setup (often called SVM Mode or AMD-V)";
/// The kernel that locks IA32_FEATURE_CONTROL at boot (arch/x86/kernel/cpu/feat_ctl.c, 5.6).
const FEAT_CTL_AT_BOOT: (u32, u32) = (5, 6);

/// The virtual platform DMI names, if it names one.
pub fn dmi_hypervisor(vendor: Option<&str>, product: Option<&str>) -> Option<String> {
    let vendor = vendor.unwrap_or("");
    let product = product.unwrap_or("");
    const VENDORS: &[(&str, &str)] = &[
        ("QEMU", "QEMU"),
        ("VMware", "VMware"),
        ("innotek GmbH", "VirtualBox"),
        ("Xen", "Xen"),
        ("Parallels", "Parallels"),
        ("Amazon EC2", "Amazon EC2"),
        ("Google", "Google Compute Engine"),
        ("KubeVirt", "KubeVirt"),
        ("BHYVE", "bhyve"),
        ("OpenStack", "OpenStack"),
        ("Nutanix", "Nutanix AHV"),
    ];
    if let Some((_, name)) = VENDORS.iter().find(|(v, _)| vendor.starts_with(v)) {
        return Some((*name).to_owned());
    }
    const PRODUCTS: &[(&str, &str)] = &[
        ("Virtual Machine", "Hyper-V"),
        ("VirtualBox", "VirtualBox"),
        ("KVM", "KVM"),
        ("HVM domU", "Xen"),
        ("Cloud Hypervisor", "Cloud Hypervisor"),
    ];
    PRODUCTS
        .iter()
        .find(|(p, _)| product.contains(p))
        .map(|(_, name)| (*name).to_owned())
}

fn nested_fix(probe: &Probe) -> String {
    format!(
        "this is a virtual machine ({}): enable nested virtualization on the outer host \
         (kvm-intel/kvm-amd nested=1 there) and give this VM the host CPU model (-cpu host, \
         libvirt host-passthrough)",
        probe.hypervisor_name()
    )
}

/// What the firmware-control MSR says, judged by the kernel's own rules (docs/host-report.md,
/// "Firmware enablement"): `Pass` usable, `Fail` the firmware disabled it, `Warn` VMX is locked
/// off but the kernel itself may have done it.
#[derive(Debug)]
struct MsrReading {
    verdict: Verdict,
    summary: String,
    /// The value and what was used to judge it.
    detail: String,
    fix: Option<String>,
}

/// Whether this kernel has KVM_INTEL: kvm_intel present, else its config; `None` when unknown.
fn has_kvm_intel(probe: &Probe) -> Option<bool> {
    if probe.module("kvm_intel", "KVM_INTEL").present() {
        return Some(true);
    }
    probe
        .kconfig
        .as_ref()
        .map(|k| matches!(k.get("KVM_INTEL"), Some("y" | "m")))
}

/// IA32_FEATURE_CONTROL by the rules of feat_ctl.c (5.6+: the kernel locks the register at boot,
/// setting VMX only when built with KVM_INTEL, and clears cpuinfo's vmx when VMX is not enabled
/// for the launch mode) and of kvm_intel before 5.6 (it sets VMX and locks the register when it
/// first enables VMX; it refuses VMX-inside-SMX-only without tboot).
fn intel_feature_control(probe: &Probe, v: u64) -> MsrReading {
    let lock = v & FEATURE_CONTROL_LOCK != 0;
    let outside = v & FEATURE_CONTROL_VMX_OUTSIDE_SMX != 0;
    let inside = v & FEATURE_CONTROL_VMX_INSIDE_SMX != 0;
    let version = probe.kernel_version();
    // An unknown release is judged as a current kernel.
    let locks_at_boot = version.is_none_or(|v| v >= FEAT_CTL_AT_BOOT);
    let kvm_intel = has_kvm_intel(probe);
    let config = if probe.module("kvm_intel", "KVM_INTEL").present() {
        "kvm_intel present".to_owned()
    } else if let Some(k) = &probe.kconfig {
        format!(
            "{}: CONFIG_KVM_INTEL{}",
            probe.show(&k.source),
            k.get("KVM_INTEL")
                .map_or_else(|| " not set".to_owned(), |v| format!("={v}"))
        )
    } else {
        "kernel config not found".to_owned()
    };
    let detail = format!(
        "{} MSR 0x3a (IA32_FEATURE_CONTROL) = {v:#x}: lock {}, VMX outside SMX {}, VMX inside SMX {}; \
         kernel {}, {config}",
        probe.msr.describe(),
        u8::from(lock),
        u8::from(outside),
        u8::from(inside),
        probe.kernel_release.as_deref().unwrap_or("release unknown"),
    );
    let reading = |verdict, summary: &str, fix: Option<String>| MsrReading {
        verdict,
        summary: summary.to_owned(),
        detail: detail.clone(),
        fix,
    };
    if !lock {
        return if locks_at_boot {
            reading(
                Verdict::Pass,
                "unlocked: the firmware left VMX to the OS, and the kernel turns it on and locks \
                 the register itself",
                None,
            )
        } else {
            reading(
                Verdict::Pass,
                "unlocked: the firmware left VMX to the OS, and kvm_intel turns it on and locks the \
                 register when it first enables VMX (kernels before 5.6)",
                None,
            )
        };
    }
    if outside {
        return reading(
            Verdict::Pass,
            if locks_at_boot {
                "enabled: locked with VMX on (by the firmware, or by the kernel at boot; the two \
                 cannot be told apart)"
            } else {
                "enabled: locked with VMX on (by the firmware, or by kvm_intel; the two cannot be \
                 told apart)"
            },
            None,
        );
    }
    if inside {
        // Linux enables VMX inside SMX only under tboot; a 5.6+ kernel that kept vmx accepted it.
        if version.is_some_and(|v| v >= FEAT_CTL_AT_BOOT) && probe.has_flag("vmx") {
            return reading(
                Verdict::Pass,
                "enabled for a measured launch: VMX only inside SMX, which the kernel accepted \
                 (booted through tboot)",
                None,
            );
        }
        return reading(
            Verdict::Fail,
            "the firmware enabled VMX only inside SMX (for a TXT measured launch): without tboot \
             Linux refuses VMX",
            Some(format!(
                "{FIX_VTX_FIRMWARE}, or boot through tboot (TXT measured launch)"
            )),
        );
    }
    if locks_at_boot && kvm_intel == Some(false) {
        return reading(
            Verdict::Warn,
            "locked with VMX off, maybe by this kernel: built without KVM_INTEL, it locks the \
             register that way at boot when the firmware left it unlocked",
            Some(format!(
                "boot a kernel built with CONFIG_KVM_INTEL=y or m (see kconfig.kvm_intel); if VMX \
                 is still locked off there, {FIX_VTX_FIRMWARE}"
            )),
        );
    }
    reading(
        Verdict::Fail,
        if locks_at_boot && kvm_intel.is_none() {
            "disabled by the firmware (unless this kernel lacks KVM_INTEL: its config was not found)"
        } else {
            "disabled by the firmware"
        },
        Some(FIX_VTX_FIRMWARE.to_owned()),
    )
}

/// What the MSR says about firmware enablement, or why it could not be read; `None` for an
/// unknown vendor.
fn firmware_msr(probe: &Probe) -> Option<Result<MsrReading, String>> {
    match probe.vendor {
        Vendor::Intel => Some(
            probe
                .msr
                .read(IA32_FEATURE_CONTROL)
                .map(|v| intel_feature_control(probe, v)),
        ),
        // Only the firmware sets SVMDIS; the kernel then clears svm from cpuinfo
        // (arch/x86/kernel/cpu/amd.c) and kvm_amd refuses to load.
        Vendor::Amd => Some(probe.msr.read(VM_CR).map(|v| {
            let disabled = v & VM_CR_SVMDIS != 0;
            let detail = format!(
                "{} MSR 0xc0010114 (VM_CR) = {v:#x}: SVMDIS {}",
                probe.msr.describe(),
                u8::from(disabled)
            );
            if disabled {
                MsrReading {
                    verdict: Verdict::Fail,
                    summary: "disabled by the firmware".to_owned(),
                    detail,
                    fix: Some(FIX_SVM_FIRMWARE.to_owned()),
                }
            } else {
                MsrReading {
                    verdict: Verdict::Pass,
                    summary: "enabled by the firmware (VM_CR.SVMDIS clear)".to_owned(),
                    detail,
                    fix: None,
                }
            }
        })),
        Vendor::Other => None,
    }
}

pub fn checks(probe: &Probe, out: &mut Vec<Check>) {
    let guest = probe.is_guest();
    let flags_evidence = |ext: &str| format!("{} flags: {ext}", probe.cpuinfo_path());
    let firmware_fix = match probe.vendor {
        Vendor::Amd => FIX_SVM_FIRMWARE,
        _ => FIX_VTX_FIRMWARE,
    };
    let msr = firmware_msr(probe);

    // cpu.virt_extension
    out.push(match probe.virt_extension() {
        Some("vmx") => check(
            "cpu.virt_extension",
            Verdict::Pass,
            "VT-x (vmx) present",
            flags_evidence("vmx"),
            None,
        ),
        Some(_) => check(
            "cpu.virt_extension",
            Verdict::Pass,
            "AMD-V (svm) present",
            flags_evidence("svm"),
            None,
        ),
        None if guest => check(
            "cpu.virt_extension",
            Verdict::Fail,
            format!(
                "no vmx or svm: this is a virtual machine ({}) and the outer host does not \
                 expose nested virtualization",
                probe.hypervisor_name()
            ),
            format!(
                "{} flags: neither vmx nor svm; {}",
                probe.cpuinfo_path(),
                probe.hypervisor_evidence()
            ),
            Some(nested_fix(probe)),
        ),
        None => {
            let no_flag = flags_evidence("neither vmx nor svm");
            let generic_fix = match probe.vendor {
                Vendor::Other => None,
                _ => Some(firmware_fix.to_owned()),
            };
            let (summary, evidence, fix) = match &msr {
                // The kernel hides vmx/svm when VMX/SVM is not enabled for it; the MSR says who.
                Some(Ok(r)) if r.verdict == Verdict::Fail => (
                    "the firmware disabled the virtualization extension".to_owned(),
                    format!("{no_flag}; {}", r.detail),
                    r.fix.clone(),
                ),
                Some(Ok(r)) if r.verdict == Verdict::Warn => (
                    "no vmx: VMX is locked off, and this kernel may have done it itself (see \
                     cpu.firmware_enabled)"
                        .to_owned(),
                    format!("{no_flag}; {}", r.detail),
                    r.fix.clone(),
                ),
                _ => (
                    "no vmx or svm: disabled in the firmware (the kernel hides vmx/svm when the \
                     firmware locked it off) or not supported by this CPU"
                        .to_owned(),
                    flags_evidence("neither vmx nor svm; no hypervisor flag"),
                    generic_fix,
                ),
            };
            check("cpu.virt_extension", Verdict::Fail, summary, evidence, fix)
        }
    });

    // cpu.firmware_enabled
    let (module, module_cfg) = match probe.vendor {
        Vendor::Amd => ("kvm_amd", "KVM_AMD"),
        _ => ("kvm_intel", "KVM_INTEL"),
    };
    let module_state = probe.module(module, module_cfg);
    out.push(match (&msr, probe.virt_extension()) {
        (None, _) => check(
            "cpu.firmware_enabled",
            Verdict::NotApplicable,
            "unknown CPU vendor: no known firmware switch to check",
            format!(
                "{} vendor_id: {}",
                probe.cpuinfo_path(),
                probe.cpuinfo.get("vendor_id").map_or("?", String::as_str)
            ),
            None,
        ),
        (Some(Ok(r)), _) if r.verdict == Verdict::Pass => check(
            "cpu.firmware_enabled",
            Verdict::Pass,
            r.summary.clone(),
            r.detail.clone(),
            None,
        ),
        // A guest's MSR is whatever the hypervisor emulates; only a bare-metal firmware can
        // be "set up".
        (Some(Ok(r)), _) if guest => check(
            "cpu.firmware_enabled",
            Verdict::Fail,
            format!(
                "the hypervisor ({}) reports virtualization disabled to this guest",
                probe.hypervisor_name()
            ),
            r.detail.clone(),
            Some(nested_fix(probe)),
        ),
        (Some(Ok(r)), _) => check(
            "cpu.firmware_enabled",
            r.verdict,
            r.summary.clone(),
            r.detail.clone(),
            r.fix.clone(),
        ),
        (Some(Err(why)), None) => check(
            "cpu.firmware_enabled",
            Verdict::NotApplicable,
            "no extension to enable (see cpu.virt_extension)",
            format!("MSR not read: {why}"),
            None,
        ),
        (Some(Err(why)), Some(_)) if module_state.present() => check(
            "cpu.firmware_enabled",
            Verdict::Pass,
            format!(
                "enabled: {module} is {}, and it refuses to load when the firmware disabled it",
                module_state.word()
            ),
            format!("MSR not read ({why}); evidence used: {module} module state"),
            None,
        ),
        (Some(Err(why)), Some(_)) => check(
            "cpu.firmware_enabled",
            Verdict::Warn,
            format!("cannot tell: the MSR is not readable and {module} is not loaded"),
            format!("MSR not read ({why}); {module} not loaded"),
            Some(format!(
                "modprobe msr and run this again as root (or modprobe {})",
                module.replace('_', "-")
            )),
        ),
    });

    // cpu.hypervisor
    out.push(if guest {
        check(
            "cpu.hypervisor",
            Verdict::Warn,
            format!(
                "running as a guest ({}): devices passed through here go through the outer \
                 host's (virtual) IOMMU",
                probe.hypervisor_name()
            ),
            probe.hypervisor_evidence(),
            None,
        )
    } else {
        check(
            "cpu.hypervisor",
            Verdict::Pass,
            "bare metal",
            probe.hypervisor_evidence(),
            None,
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmi_names_virtual_platforms_and_not_real_ones() {
        assert_eq!(
            dmi_hypervisor(Some("QEMU"), Some("Standard PC (Q35 + ICH9, 2009)")).as_deref(),
            Some("QEMU")
        );
        assert_eq!(
            dmi_hypervisor(Some("Microsoft Corporation"), Some("Virtual Machine")).as_deref(),
            Some("Hyper-V")
        );
        assert_eq!(
            dmi_hypervisor(Some("Dell Inc."), Some("PowerEdge R750")),
            None
        );
        assert_eq!(dmi_hypervisor(None, None), None);
    }

    /// A root with only cpuinfo (vmx listed or not) and the kernel release.
    fn root(release: &str, vmx: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc/sys/kernel")).unwrap();
        std::fs::write(
            dir.path().join("proc/cpuinfo"),
            format!(
                "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu msr {}lm\n",
                if vmx { "vmx " } else { "" }
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("proc/sys/kernel/osrelease"), release).unwrap();
        dir
    }

    fn feature_control(release: &str, vmx: bool, value: u64) -> MsrReading {
        let dir = root(release, vmx);
        let sysfs = crate::kernel::sysfs::SysfsRoot::new(dir.path());
        let msr = crate::observe::host::FixedMsrs::new("msr", [(IA32_FEATURE_CONTROL, value)]);
        let probe = Probe::read(&sysfs, &msr);
        intel_feature_control(&probe, value)
    }

    #[test]
    fn vmx_inside_smx_only_passes_where_the_kernel_kept_vmx() {
        // 5.6+: the kernel clears vmx unless VMX is enabled for the launch mode, so a kept vmx
        // with only the inside-SMX bit means a tboot launch.
        let tboot = feature_control("6.12.0", true, 0x3);
        assert_eq!(tboot.verdict, Verdict::Pass, "{tboot:?}");
        assert!(tboot.summary.contains("tboot"), "{tboot:?}");
        // Before 5.6 cpuinfo keeps vmx regardless: no evidence of tboot.
        let old = feature_control("5.4.0", true, 0x3);
        assert_eq!(old.verdict, Verdict::Fail, "{old:?}");
        assert!(old.fix.unwrap().contains("tboot"));
    }

    #[test]
    fn locked_without_vmx_and_an_unknown_kernel_config_says_what_is_unknown() {
        let r = feature_control("6.12.0", false, 0x1);
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r.summary.contains("its config was not found"), "{r:?}");
        assert!(
            r.detail.ends_with("kernel 6.12.0, kernel config not found"),
            "{r:?}"
        );
        // Before 5.6 the kernel never locks the register at boot: the firmware did.
        let old = feature_control("5.4.0", true, 0x1);
        assert_eq!(
            (old.verdict, old.summary.as_str()),
            (Verdict::Fail, "disabled by the firmware")
        );
        assert_eq!(old.fix.as_deref(), Some(FIX_VTX_FIRMWARE));
    }
}
