//! CPU checks: the virtualization extension, whether the firmware enabled it, and whether we run
//! as a guest (so that a guest without vmx is told about nested virtualization, not the BIOS).

use passthroughd_proto::host::{Check, Verdict};

use super::msr::{
    FEATURE_CONTROL_LOCK, FEATURE_CONTROL_VMX_OUTSIDE_SMX, IA32_FEATURE_CONTROL, VM_CR,
    VM_CR_SVMDIS,
};
use super::{Probe, Vendor, check};

pub const FIX_VTX_FIRMWARE: &str =
    "enable VT-x (Intel Virtualization Technology) in the firmware setup";
pub const FIX_SVM_FIRMWARE: &str = "enable SVM (AMD-V) in the firmware setup";

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

/// What the MSR says about firmware enablement: `Some(Ok(enabled, detail))` or why unread.
fn firmware_msr(probe: &Probe) -> Option<Result<(bool, String), String>> {
    match probe.vendor {
        Vendor::Intel => Some(probe.msr.read(IA32_FEATURE_CONTROL).map(|v| {
            let lock = v & FEATURE_CONTROL_LOCK != 0;
            let vmx = v & FEATURE_CONTROL_VMX_OUTSIDE_SMX != 0;
            let detail = format!(
                "{} MSR 0x3a (IA32_FEATURE_CONTROL) = {v:#x}: lock {}, VMX outside SMX {}",
                probe.msr.describe(),
                u8::from(lock),
                u8::from(vmx)
            );
            // Unlocked: the kernel sets VMX and locks the register itself at boot.
            (!lock || vmx, detail)
        })),
        Vendor::Amd => Some(probe.msr.read(VM_CR).map(|v| {
            let disabled = v & VM_CR_SVMDIS != 0;
            let detail = format!(
                "{} MSR 0xc0010114 (VM_CR) = {v:#x}: SVMDIS {}",
                probe.msr.describe(),
                u8::from(disabled)
            );
            (!disabled, detail)
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
            let (summary, evidence) = match &msr {
                Some(Ok((false, detail))) => (
                    "the firmware disabled the virtualization extension".to_owned(),
                    format!("{}; {detail}", flags_evidence("neither vmx nor svm")),
                ),
                _ => (
                    "no vmx or svm: disabled in the firmware (the kernel hides vmx when the \
                     firmware locked it off) or not supported by this CPU"
                        .to_owned(),
                    flags_evidence("neither vmx nor svm; no hypervisor flag"),
                ),
            };
            let fix = match probe.vendor {
                Vendor::Other => None,
                _ => Some(firmware_fix.to_owned()),
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
        (Some(Ok((true, detail))), _) => check(
            "cpu.firmware_enabled",
            Verdict::Pass,
            "enabled by the firmware",
            detail.clone(),
            None,
        ),
        // A guest's MSR is whatever the hypervisor emulates; only a bare-metal firmware can
        // be "set up".
        (Some(Ok((false, detail))), _) if guest => check(
            "cpu.firmware_enabled",
            Verdict::Fail,
            format!(
                "the hypervisor ({}) reports virtualization disabled to this guest",
                probe.hypervisor_name()
            ),
            detail.clone(),
            Some(nested_fix(probe)),
        ),
        (Some(Ok((false, detail))), _) => check(
            "cpu.firmware_enabled",
            Verdict::Fail,
            "disabled by the firmware",
            detail.clone(),
            Some(firmware_fix.to_owned()),
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
}
