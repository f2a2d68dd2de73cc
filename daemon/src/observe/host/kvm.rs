//! KVM checks: the modules, /dev/kvm, and the vendor module's parameters with how to persist a
//! change.

use std::fs::OpenOptions;
use std::io;

use passthroughd_proto::host::{Check, Verdict};

use super::msr::{
    IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2,
    PIN_POSTED_INTERRUPTS, PROC_SECONDARY_CONTROLS, PROC_TPR_SHADOW, PROC2_APIC_REGISTER_VIRT,
    PROC2_VIRTUAL_INTR_DELIVERY, PROC2_VMCS_SHADOWING,
};
use super::{ModuleState, Probe, Vendor, check, dir_names, param_on};

/// (parameter, check id, what it is) of kvm_intel.
const INTEL_PARAMS: &[(&str, &str, &str)] = &[
    ("ept", "kvm.ept", "EPT (two-dimensional paging)"),
    ("vpid", "kvm.vpid", "VPID (tagged TLB)"),
    ("nested", "kvm.nested", "nested virtualization"),
    ("enable_apicv", "kvm.apicv", "APICv (virtual interrupts)"),
    (
        "enable_shadow_vmcs",
        "kvm.shadow_vmcs",
        "shadow VMCS (faster nested guests)",
    ),
];
/// The same for kvm_amd.
const AMD_PARAMS: &[(&str, &str, &str)] = &[
    ("npt", "kvm.npt", "NPT (nested paging)"),
    ("avic", "kvm.avic", "AVIC (virtual interrupts)"),
    ("nested", "kvm.nested", "nested virtualization"),
];

/// Whether the CPU has the feature behind a module parameter. The vendor modules force a
/// parameter off when the CPU lacks its feature (vmx.c/svm.c hardware_setup), so an option cannot
/// turn it on; see docs/host-report.md, "Module parameters".
#[derive(Debug, Clone, PartialEq, Eq)]
enum Support {
    Has,
    /// Lacks it; the evidence.
    Lacks(String),
    /// Cannot tell; why.
    Unknown(String),
}

/// The allowed-1 settings of the VMX capability MSRs: (pin-based, primary, secondary), the last
/// 0 when the CPU has no secondary controls (then 0x48b is not to be read).
fn vmx_capability_msrs(probe: &Probe) -> Result<(u64, u64, u64, String), String> {
    let pin = probe.msr.read(IA32_VMX_PINBASED_CTLS)?;
    let proc1 = probe.msr.read(IA32_VMX_PROCBASED_CTLS)?;
    let proc2 = if proc1 & PROC_SECONDARY_CONTROLS != 0 {
        probe.msr.read(IA32_VMX_PROCBASED_CTLS2)?
    } else {
        0
    };
    let shown = format!(
        "{} MSR 0x481 = {pin:#x}, MSR 0x482 = {proc1:#x}, MSR 0x48b = {proc2:#x}",
        probe.msr.describe()
    );
    Ok((pin, proc1, proc2, shown))
}

/// Whether the CPU has the feature behind `param`; `None` for a parameter with no CPU feature of
/// its own (`nested`).
fn cpu_support(probe: &Probe, param: &str) -> Option<Support> {
    let cpuinfo = probe.cpuinfo_path();
    let vmx_flags = probe.vmx_flags();
    let no_vmx_flags = |why: String| {
        Support::Unknown(format!(
            "{cpuinfo} has no 'vmx flags' line (kernels before 5.8) and the VMX capability MSRs \
             were not read: {why}"
        ))
    };
    match param {
        // Listed in `flags` on every kernel that shows vmx/svm (Intel also in `vmx flags`).
        "ept" | "vpid" | "npt" | "avic" => {
            let has =
                probe.has_flag(param) || vmx_flags.as_ref().is_some_and(|f| f.contains(param));
            Some(if has {
                Support::Has
            } else {
                Support::Lacks(format!("{cpuinfo} has no '{param}' flag"))
            })
        }
        "enable_shadow_vmcs" => Some(match &vmx_flags {
            Some(f) if f.contains("shadow_vmcs") => Support::Has,
            Some(_) => Support::Lacks(format!("{cpuinfo} vmx flags: no shadow_vmcs")),
            None => match vmx_capability_msrs(probe) {
                Ok((_, _, proc2, _)) if proc2 & PROC2_VMCS_SHADOWING != 0 => Support::Has,
                Ok((_, _, _, shown)) => Support::Lacks(format!(
                    "{shown} (VMX allowed-1 controls): lacks VMCS shadowing"
                )),
                Err(why) => no_vmx_flags(why),
            },
        }),
        // vmx.c: enable_apicv = 0 unless APIC-register virtualization, virtual-interrupt
        // delivery and posted interrupts (each needing the TPR shadow) are all there: the
        // aggregate `apicv` of `vmx flags` (arch/x86/kernel/cpu/feat_ctl.c).
        "enable_apicv" => Some(match &vmx_flags {
            Some(f) if f.contains("apicv") => Support::Has,
            Some(f) => {
                let lacks: Vec<&str> = ["vtpr", "vapic_reg", "vid", "posted_intr"]
                    .into_iter()
                    .filter(|p| !f.contains(p))
                    .collect();
                Support::Lacks(format!(
                    "{cpuinfo} vmx flags: no apicv (it needs vtpr, vapic_reg, vid, posted_intr; \
                     lacks {})",
                    lacks.join(", ")
                ))
            }
            None => match vmx_capability_msrs(probe) {
                Ok((pin, proc1, proc2, shown)) => {
                    let lacks: Vec<&str> = [
                        (proc1 & PROC_TPR_SHADOW, "TPR shadow"),
                        (
                            proc2 & PROC2_APIC_REGISTER_VIRT,
                            "APIC-register virtualization",
                        ),
                        (
                            proc2 & PROC2_VIRTUAL_INTR_DELIVERY,
                            "virtual-interrupt delivery",
                        ),
                        (pin & PIN_POSTED_INTERRUPTS, "posted interrupts"),
                    ]
                    .into_iter()
                    .filter(|(bit, _)| *bit == 0)
                    .map(|(_, name)| name)
                    .collect();
                    if lacks.is_empty() {
                        Support::Has
                    } else {
                        Support::Lacks(format!(
                            "{shown} (VMX allowed-1 controls): lacks {}",
                            lacks.join(", ")
                        ))
                    }
                }
                Err(why) => no_vmx_flags(why),
            },
        }),
        _ => None,
    }
}

/// The first failed CPU check (no extension, or the firmware disabled it): the vendor module
/// cannot load until it is fixed, so module advice points there instead.
fn cpu_blocker(out: &[Check]) -> Option<&Check> {
    out.iter().find(|c| {
        matches!(c.id.as_str(), "cpu.virt_extension" | "cpu.firmware_enabled")
            && c.verdict == Verdict::Fail
    })
}

/// "first fix ID: FIX; THEN", for a check blocked by `blocker`.
fn after(blocker: &Check, then: &str) -> String {
    match &blocker.fix {
        Some(fix) => format!("first fix {}: {fix}; {then}", blocker.id),
        None => format!("first fix {}; {then}", blocker.id),
    }
}

pub fn checks(probe: &Probe, out: &mut Vec<Check>) {
    let kvm = probe.module("kvm", "KVM");
    let intel = probe.module("kvm_intel", "KVM_INTEL");
    let amd = probe.module("kvm_amd", "KVM_AMD");
    // Which vendor module this host should have: by the extension, else by the vendor.
    let want_amd = match probe.virt_extension() {
        Some("svm") => true,
        Some(_) => false,
        None => probe.vendor == Vendor::Amd,
    };
    let (vendor_mod, vendor_state, params) = if intel.present() && !amd.present() {
        ("kvm_intel", intel, INTEL_PARAMS)
    } else if amd.present() || want_amd {
        ("kvm_amd", amd, AMD_PARAMS)
    } else {
        ("kvm_intel", intel, INTEL_PARAMS)
    };
    // Other KVM back ends (kvm_pvm runs guests without hardware extensions).
    let others: Vec<String> = dir_names(&probe.root.module_dir())
        .into_iter()
        .filter(|m| m.starts_with("kvm_") && m != "kvm_intel" && m != "kvm_amd")
        .collect();
    let modules_shown = probe.show(&probe.root.proc_file("modules"));
    let evidence = format!(
        "{modules_shown} and {}: kvm {}, {vendor_mod} {}{}",
        probe.show(&probe.root.module_dir()),
        kvm.word(),
        vendor_state.word(),
        if others.is_empty() {
            String::new()
        } else {
            format!(", also {}", others.join(", "))
        }
    );
    let modprobe = vendor_mod.replace('_', "-");
    let blocker = cpu_blocker(out).cloned();
    out.push(match (kvm.present(), vendor_state.present()) {
        (true, true) => check(
            "kvm.modules",
            Verdict::Pass,
            format!("kvm {}, {vendor_mod} {}", kvm.word(), vendor_state.word()),
            evidence,
            None,
        ),
        (true, false) if !others.is_empty() => check(
            "kvm.modules",
            Verdict::Warn,
            format!(
                "kvm {}, but no {vendor_mod}: KVM runs on {} instead of the hardware extension",
                kvm.word(),
                others.join(", ")
            ),
            evidence,
            None,
        ),
        _ => {
            let (summary, fix) = match &blocker {
                // modprobe would fail ("disabled by bios", "not supported by CPU").
                Some(b) => (
                    format!(
                        "{vendor_mod} is not loaded: it cannot load while {} fails",
                        b.id
                    ),
                    after(b, &format!("{vendor_mod} cannot load before that")),
                ),
                None => (
                    format!("{vendor_mod} is not loaded"),
                    format!(
                        "modprobe {modprobe}; to load it at boot: echo {vendor_mod} > \
                         /etc/modules-load.d/kvm.conf"
                    ),
                ),
            };
            check("kvm.modules", Verdict::Fail, summary, evidence, Some(fix))
        }
    });

    // kvm.dev_kvm
    let dev = probe.root.dev_path("kvm");
    let dev_shown = probe.show(&dev);
    out.push(match OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(_) => check(
            "kvm.dev_kvm",
            Verdict::Pass,
            format!("{dev_shown} present and accessible"),
            format!("opened {dev_shown} read-write"),
            None,
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => check(
            "kvm.dev_kvm",
            Verdict::Warn,
            format!("{dev_shown} present but not accessible to this user"),
            format!("open {dev_shown} read-write: {e}"),
            Some("run as root, or add the user to the kvm group".to_owned()),
        ),
        // /dev/kvm is registered by kvm_init(), which kvm_intel/kvm_amd call when they load:
        // with only kvm loaded it cannot exist, whatever udev does.
        Err(e) if vendor_state.present() || !others.is_empty() => check(
            "kvm.dev_kvm",
            Verdict::Fail,
            format!("{dev_shown} missing"),
            format!("open {dev_shown}: {e}"),
            Some(
                "udev did not create it: udevadm trigger, or check that kvm loaded without errors"
                    .to_owned(),
            ),
        ),
        Err(e) => check(
            "kvm.dev_kvm",
            Verdict::Fail,
            format!("{dev_shown} missing: {vendor_mod}, which creates it, is not loaded"),
            format!(
                "open {dev_shown}: {e}; {vendor_mod} {}",
                vendor_state.word()
            ),
            Some(match &blocker {
                Some(b) => after(b, &format!("{dev_shown} appears when {vendor_mod} loads")),
                None if kvm.present() => format!(
                    "modprobe {modprobe} ({vendor_mod} creates {dev_shown}; kvm alone does not)"
                ),
                None => format!("modprobe {modprobe} (creates {dev_shown})"),
            }),
        ),
    });

    // Parameters.
    for &(param, id, what) in params {
        if vendor_state == ModuleState::Absent {
            out.push(check(
                id,
                Verdict::NotApplicable,
                format!("{vendor_mod} not loaded"),
                format!(
                    "no {}",
                    probe.show(&probe.root.module_dir().join(vendor_mod))
                ),
                None,
            ));
            continue;
        }
        let path = probe
            .root
            .module_dir()
            .join(vendor_mod)
            .join("parameters")
            .join(param);
        let evidence_path = probe.show(&path);
        let Some(v) = super::read_text(&path).map(|v| v.trim().to_owned()) else {
            out.push(check(
                id,
                Verdict::NotApplicable,
                format!("{what}: this kernel has no {vendor_mod}.{param}"),
                format!("{evidence_path} absent"),
                None,
            ));
            continue;
        };
        if param_on(&v) == Some(true) {
            out.push(check(
                id,
                Verdict::Pass,
                format!("{what} on"),
                format!("{evidence_path}: {v}"),
                None,
            ));
            continue;
        }
        out.push(match cpu_support(probe, param) {
            // Off because the CPU lacks it: the module forces it off, the option cannot help.
            Some(Support::Lacks(why)) => check(
                id,
                Verdict::Warn,
                format!("{what} off: this CPU does not have it"),
                format!("{evidence_path}: {v}; {why}"),
                probe.is_guest().then(|| {
                    format!(
                        "expose {what} to this VM from the outer host ({}): -cpu host / host-passthrough",
                        probe.hypervisor_name()
                    )
                }),
            ),
            Some(Support::Unknown(why)) => check(
                id,
                Verdict::Warn,
                format!("{what} off; cannot tell whether this CPU has it"),
                format!("{evidence_path}: {v}; {why}"),
                Some(format!(
                    "modprobe msr and run this again as root to tell whether the CPU has it; if \
                     it does: options {modprobe} {param}=1 in /etc/modprobe.d/kvm.conf, then \
                     reload {vendor_mod}"
                )),
            ),
            Some(Support::Has) | None => check(
                id,
                Verdict::Warn,
                format!("{what} off"),
                format!("{evidence_path}: {v}"),
                Some(format!(
                    "options {modprobe} {param}=1 in /etc/modprobe.d/kvm.conf, then reload \
                     {vendor_mod} (modprobe -r {vendor_mod}; modprobe {vendor_mod})"
                )),
            ),
        });
    }
}
