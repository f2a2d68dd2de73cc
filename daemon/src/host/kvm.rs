//! KVM checks: the modules, /dev/kvm, and the vendor module's parameters with how to persist a
//! change.

use std::fs::OpenOptions;
use std::io;

use passthroughd_proto::host::{Check, Verdict};

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

/// Whether /proc/cpuinfo shows the CPU lacks the feature behind a parameter (`flags` and, on
/// Intel since 5.6, `vmx flags`). Parameters without a cpuinfo flag are never "lacking".
fn cpu_lacks(probe: &Probe, param: &str) -> bool {
    let flag = match param {
        "ept" | "vpid" | "npt" | "avic" => param,
        "enable_shadow_vmcs" => "shadow_vmcs",
        _ => return false,
    };
    let vmx_flags = probe
        .cpuinfo
        .get("vmx flags")
        .map(String::as_str)
        .unwrap_or("");
    !probe.has_flag(flag) && !vmx_flags.split_whitespace().any(|f| f == flag)
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
        let value = super::read_text(&path).map(|v| v.trim().to_owned());
        out.push(match value.as_deref().map(|v| (v, param_on(v))) {
            None => check(
                id,
                Verdict::NotApplicable,
                format!("{what}: this kernel has no {vendor_mod}.{param}"),
                format!("{evidence_path} absent"),
                None,
            ),
            Some((v, Some(true))) => check(
                id,
                Verdict::Pass,
                format!("{what} on"),
                format!("{evidence_path}: {v}"),
                None,
            ),
            // Off because the CPU lacks it: the module option cannot turn it on.
            Some((v, _)) if cpu_lacks(probe, param) => check(
                id,
                Verdict::Warn,
                format!("{what} off: this CPU does not have it"),
                format!("{evidence_path}: {v}; {} has no '{param}' flag", probe.cpuinfo_path()),
                probe.is_guest().then(|| {
                    format!(
                        "expose {param} to this VM from the outer host ({}): -cpu host / host-passthrough",
                        probe.hypervisor_name()
                    )
                }),
            ),
            Some((v, _)) => check(
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
