//! The host capability report on hand-written roots (`tests/fixtures/host/<name>`): each holds
//! only the files its case needs, and `msr.toml` for the MSR values (see docs/host-report.md).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use passthroughd::observe::host::{self, DevCpuMsr, FixedMsrs, MsrSource};
use passthroughd::{PciIds, SysfsRoot};
use passthroughd_proto::host::{HostReport, Verdict};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn report(name: &str) -> HostReport {
    let dir = fixtures().join("host").join(name);
    assert!(dir.is_dir(), "no fixture {name}");
    let root = SysfsRoot::new(&dir);
    let msr: Box<dyn MsrSource> = match std::fs::read_to_string(dir.join("msr.toml")) {
        Ok(text) => Box::new(FixedMsrs::from_toml("/dev/cpu/0/msr", &text).unwrap()),
        // No msr.toml: the real reader, which finds no dev/cpu/0/msr (msr module not loaded).
        Err(_) => Box::new(DevCpuMsr::new(&root)),
    };
    let report = host::report(&root, &PciIds::empty(), msr.as_ref());
    // Every report round-trips through its JSON form.
    let json = serde_json::to_string(&report).unwrap();
    assert_eq!(serde_json::from_str::<HostReport>(&json).unwrap(), report);
    report
}

/// (verdict, fix) of check `id`; panics with the report when it is missing.
fn v(report: &HostReport, id: &str) -> (Verdict, Option<String>) {
    let c = report
        .check(id)
        .unwrap_or_else(|| panic!("no check {id} in {:#?}", report.checks));
    (c.verdict, c.fix.clone())
}

fn verdict(report: &HostReport, id: &str) -> Verdict {
    v(report, id).0
}

fn assert_all(report: &HostReport, ids: &[&str], want: Verdict) {
    for id in ids {
        assert_eq!(verdict(report, id), want, "{id}: {:#?}", report.check(id));
    }
}

const FIRMWARE_VTX: &str =
    "enable VT-x in the BIOS/UEFI setup (often called Intel Virtualization Technology or VT-x)";
const FIRMWARE_SVM: &str = "enable AMD-V in the BIOS/UEFI setup (often called SVM Mode or AMD-V)";

/// The fix of `id`, which must have one.
fn fix(report: &HostReport, id: &str) -> String {
    v(report, id)
        .1
        .unwrap_or_else(|| panic!("{id} has no fix: {:#?}", report.check(id)))
}

#[test]
fn intel_all_on_is_ready_with_nothing_to_fix() {
    let r = report("intel-all-on");
    for c in &r.checks {
        assert!(
            matches!(c.verdict, Verdict::Pass | Verdict::NotApplicable),
            "{c:#?}"
        );
        assert_eq!(c.fix, None, "{c:#?}");
    }
    assert!(r.overall.ready);
    assert_eq!(r.overall.verdict, Verdict::Pass);
    assert_eq!(r.overall.first_fix, None);
    let ext = r.check("cpu.virt_extension").unwrap();
    assert_eq!(ext.summary, "VT-x (vmx) present");
    assert_eq!(ext.evidence, "/proc/cpuinfo flags: vmx");
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert!(
        fw.evidence.contains("0x3a") && fw.evidence.contains("lock 1, VMX outside SMX 1"),
        "{fw:?}"
    );
    // Since 5.6 the kernel locks the register at boot itself: "by the firmware" is not known.
    assert_eq!(
        fw.summary,
        "enabled: locked with VMX on (by the firmware, or by the kernel at boot; the two cannot be told apart)"
    );
    assert_all(
        &r,
        &[
            "kvm.modules",
            "kvm.dev_kvm",
            "kvm.ept",
            "kvm.vpid",
            "kvm.nested",
            "kvm.apicv",
            "kvm.shadow_vmcs",
        ],
        Verdict::Pass,
    );
    assert!(r.check("kvm.npt").is_none(), "no AMD parameters on Intel");
    assert!(
        r.check("iommu.acpi_table")
            .unwrap()
            .summary
            .starts_with("DMAR")
    );
    assert!(
        r.check("iommu.groups")
            .unwrap()
            .summary
            .starts_with("4 IOMMU groups")
    );
    assert!(
        r.check("iommu.default_domain")
            .unwrap()
            .summary
            .contains("passthrough")
    );
    let ir = r.check("iommu.interrupt_remapping").unwrap();
    assert_eq!(ir.verdict, Verdict::Pass);
    assert!(
        ir.evidence.contains("IR-IO-APIC") && ir.evidence.contains("dmar0 ecap IR=1"),
        "{ir:?}"
    );
    assert_eq!(
        r.check("kconfig.source").unwrap().evidence,
        "/boot/config-6.12.0-test"
    );
    assert!(r.check("kconfig.amd_iommu").is_none());
    assert_eq!(
        (
            r.topology.sockets,
            r.topology.cores_per_socket,
            r.topology.threads_per_core,
            r.topology.logical_cpus
        ),
        (1, 2, 2, 4)
    );
    assert_eq!(r.cpu.microcode.as_deref(), Some("0x2b000590"));
    assert!(!r.cpu.hypervisor);
    let text = passthroughd_proto::host::render_text(&r);
    assert!(text.starts_with("PASS cpu.virt_extension"), "{text}");
    assert!(text.contains("ready for VFIO passthrough"));
}

#[test]
fn intel_vtx_disabled_by_firmware_says_so_from_the_msr() {
    let r = report("intel-vtx-disabled-by-firmware");
    let fix = Some(FIRMWARE_VTX.to_owned());
    assert_eq!(v(&r, "cpu.virt_extension"), (Verdict::Fail, fix.clone()));
    assert_eq!(v(&r, "cpu.firmware_enabled"), (Verdict::Fail, fix.clone()));
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert_eq!(fw.summary, "disabled by the firmware");
    assert!(
        fw.evidence.contains("= 0x1: lock 1, VMX outside SMX 0"),
        "{fw:?}"
    );
    assert_eq!(verdict(&r, "cpu.hypervisor"), Verdict::Pass);
    assert!(!r.overall.ready);
    assert_eq!(r.overall.first_check.as_deref(), Some("cpu.virt_extension"));
    assert_eq!(r.overall.first_fix, fix);
    // The IOMMU side is fine; KVM cannot load without VT-x.
    assert_all(
        &r,
        &["iommu.groups", "iommu.interrupt_remapping"],
        Verdict::Pass,
    );
    assert_eq!(verdict(&r, "kvm.modules"), Verdict::Fail);
}

#[test]
fn amd_ivrs_host_checks_amd_parameters_and_vm_cr() {
    let r = report("amd-ivrs");
    assert_eq!(
        r.check("cpu.virt_extension").unwrap().summary,
        "AMD-V (svm) present"
    );
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert_eq!(fw.verdict, Verdict::Pass);
    assert!(
        fw.evidence.contains("VM_CR") && fw.evidence.contains("SVMDIS 0"),
        "{fw:?}"
    );
    let table = r.check("iommu.acpi_table").unwrap();
    assert_eq!(
        (table.verdict, table.summary.as_str()),
        (Verdict::Pass, "IVRS (AMD-Vi) present")
    );
    assert_all(
        &r,
        &[
            "kvm.modules",
            "kvm.npt",
            "kvm.nested",
            "iommu.units",
            "iommu.groups",
            "iommu.interrupt_remapping",
        ],
        Verdict::Pass,
    );
    assert_eq!(
        v(&r, "kvm.avic"),
        (
            Verdict::Warn,
            Some("options kvm-amd avic=1 in /etc/modprobe.d/kvm.conf, then reload kvm_amd (modprobe -r kvm_amd; modprobe kvm_amd)".to_owned())
        )
    );
    assert!(r.check("kvm.ept").is_none());
    assert!(r.check("kconfig.amd_iommu").is_some() && r.check("kconfig.intel_iommu").is_none());
    assert!(r.overall.ready);
    assert_eq!(r.overall.verdict, Verdict::Warn);
}

#[test]
fn iommu_table_present_but_off_asks_for_intel_iommu_on() {
    let r = report("iommu-table-but-off");
    let fix = Some("add intel_iommu=on to the kernel command line".to_owned());
    assert_eq!(verdict(&r, "iommu.acpi_table"), Verdict::Pass);
    assert_eq!(v(&r, "iommu.units"), (Verdict::Fail, fix.clone()));
    assert_eq!(v(&r, "iommu.groups"), (Verdict::Fail, fix.clone()));
    assert_eq!(
        verdict(&r, "iommu.interrupt_remapping"),
        Verdict::NotApplicable
    );
    assert_eq!(verdict(&r, "iommu.default_domain"), Verdict::NotApplicable);
    assert!(!r.overall.ready);
    assert_eq!(r.overall.first_fix, fix);
    // No MSR device here: the firmware verdict rests on kvm_intel being loaded, and says so.
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert_eq!(fw.verdict, Verdict::Pass);
    assert!(
        fw.evidence.contains("msr module not loaded")
            && fw
                .evidence
                .contains("evidence used: kvm_intel module state"),
        "{fw:?}"
    );
}

#[test]
fn guest_without_vmx_is_told_about_nested_virtualization_not_the_bios() {
    let r = report("guest-no-vmx");
    let (verdict_ext, fix) = v(&r, "cpu.virt_extension");
    assert_eq!(verdict_ext, Verdict::Fail);
    let fix = fix.unwrap();
    assert!(
        fix.contains("virtual machine (QEMU)") && fix.contains("nested virtualization"),
        "{fix}"
    );
    assert_eq!(verdict(&r, "cpu.firmware_enabled"), Verdict::NotApplicable);
    assert_eq!(verdict(&r, "cpu.hypervisor"), Verdict::Warn);
    assert!(r.cpu.hypervisor);
    assert_eq!(r.cpu.hypervisor_vendor.as_deref(), Some("QEMU"));
    for c in &r.checks {
        let fix = c.fix.as_deref().unwrap_or("");
        assert!(!fix.contains("firmware") && !fix.contains("BIOS"), "{c:#?}");
    }
    assert!(
        v(&r, "iommu.acpi_table")
            .1
            .unwrap()
            .contains("virtual IOMMU")
    );
    assert_eq!(r.overall.first_check.as_deref(), Some("cpu.virt_extension"));
}

#[test]
fn no_kvm_modules_says_modprobe_and_reads_config_gz() {
    let r = report("no-kvm-modules");
    assert_eq!(
        v(&r, "kvm.modules"),
        (Verdict::Fail, Some("modprobe kvm-intel; to load it at boot: echo kvm_intel > /etc/modules-load.d/kvm.conf".to_owned()))
    );
    assert_eq!(
        v(&r, "kvm.dev_kvm"),
        (
            Verdict::Fail,
            Some("modprobe kvm-intel (creates /dev/kvm)".to_owned())
        )
    );
    assert_all(
        &r,
        &[
            "kvm.ept",
            "kvm.vpid",
            "kvm.nested",
            "kvm.apicv",
            "kvm.shadow_vmcs",
        ],
        Verdict::NotApplicable,
    );
    // Neither the MSR nor kvm_intel can vouch for the firmware.
    let (fw, fw_fix) = v(&r, "cpu.firmware_enabled");
    assert_eq!(fw, Verdict::Warn);
    assert!(fw_fix.unwrap().starts_with("modprobe msr"));
    assert_eq!(
        r.check("kconfig.source").unwrap().evidence,
        "/proc/config.gz"
    );
    assert_all(
        &r,
        &["kconfig.kvm", "kconfig.kvm_intel", "kconfig.vfio_pci"],
        Verdict::Pass,
    );
    assert_eq!(verdict(&r, "vfio.modules"), Verdict::Warn);
    assert_eq!(r.overall.first_check.as_deref(), Some("kvm.modules"));
}

#[test]
fn hugepages_on_two_numa_nodes() {
    let r = report("hugepages-two-numa-nodes");
    assert_eq!(r.numa_nodes.len(), 2);
    let (n0, n1) = (&r.numa_nodes[0], &r.numa_nodes[1]);
    assert_eq!((n0.cpus.as_str(), n1.cpus.as_str()), ("0-3", "4-7"));
    assert_eq!(
        (n0.distances.clone(), n1.distances.clone()),
        (vec![10, 21], vec![21, 10])
    );
    assert_eq!(
        (n0.memory_total_kb, n1.memory_free_kb),
        (Some(32_768_000), Some(20_000_001))
    );
    let pools = |n: &passthroughd_proto::host::NumaNode| {
        n.hugepages
            .iter()
            .map(|p| (p.size_kb, p.total, p.free))
            .collect::<Vec<_>>()
    };
    assert_eq!(pools(n0), vec![(2048, 512, 500), (1_048_576, 4, 4)]);
    assert_eq!(pools(n1), vec![(2048, 512, 400), (1_048_576, 4, 3)]);
    let global: Vec<_> = r
        .memory
        .hugepages
        .iter()
        .map(|p| (p.size_kb, p.total, p.free))
        .collect();
    assert_eq!(global, vec![(2048, 1024, 900), (1_048_576, 8, 7)]);
    assert_eq!(r.memory.hugetlbfs_mounts.len(), 2);
    assert_eq!(
        r.memory.hugetlbfs_mounts[0].page_size.as_deref(),
        Some("1024M")
    );
    assert_eq!(
        (r.memory.ksm.run, r.memory.ksm.pages_sharing),
        (Some(1), Some(1234))
    );
    assert_all(
        &r,
        &["memory.hugepages", "memory.hugetlbfs", "memory.ksm"],
        Verdict::Pass,
    );
    assert_eq!(
        (
            r.topology.sockets,
            r.topology.cores_per_socket,
            r.topology.threads_per_core,
            r.topology.logical_cpus
        ),
        (2, 4, 1, 8)
    );
    let text = passthroughd_proto::host::render_text(&r);
    assert!(text.contains("numa node1 cpus 4-7"), "{text}");
}

/// virt-host-validate decides the table from the CPU vendor and misses this one.
#[test]
fn intel_iommu_under_an_amd_cpu_is_reported_as_dmar() {
    let r = report("amd-cpu-intel-iommu");
    let t = r.check("iommu.acpi_table").unwrap();
    assert_eq!(t.verdict, Verdict::Pass);
    assert!(t.summary.starts_with("DMAR (Intel VT-d) present"), "{t:?}");
    assert!(t.summary.contains("under an AMD CPU"));
    assert_eq!(t.evidence, "/sys/firmware/acpi/tables: DMAR");
    assert!(r.check("kconfig.intel_iommu").is_some() && r.check("kconfig.amd_iommu").is_none());
    assert_all(
        &r,
        &[
            "iommu.groups",
            "iommu.interrupt_remapping",
            "cpu.virt_extension",
            "kvm.modules",
        ],
        Verdict::Pass,
    );
    assert!(r.overall.ready);
}

/// SR-IOV facts come from the inventory scan: the captured VM tree has the igb PF with 7 VFs.
#[test]
fn sriov_devices_from_the_captured_vm_tree() {
    let root = SysfsRoot::new(fixtures().join("vm-6.12/before"));
    let r = host::report(&root, &PciIds::empty(), &FixedMsrs::default());
    let igb: Vec<_> = r
        .sriov_devices
        .iter()
        .map(|d| (d.address.to_string(), d.total_vfs, d.num_vfs))
        .collect();
    assert_eq!(igb, vec![("0000:01:00.0".to_owned(), 7, 0)]);
    assert_eq!(verdict(&r, "sriov.devices"), Verdict::Pass);
    // The captured tree has iommu_groups but no proc/: the report still comes out whole.
    assert_eq!(verdict(&r, "iommu.groups"), Verdict::Pass);
    assert_eq!(verdict(&r, "kconfig.source"), Verdict::Warn);
}

#[test]
fn iommu_facts_give_scripts_numbers() {
    let r = report("amd-cpu-intel-iommu");
    assert_eq!(r.iommu.acpi_tables, vec!["DMAR".to_owned()]);
    assert_eq!(r.iommu.units, vec!["dmar0".to_owned()]);
    assert_eq!(r.iommu.group_count, 18);
    assert_eq!(r.iommu.default_domains.get("identity"), Some(&18));
    assert_eq!(r.iommu.interrupt_remapping, Some(true));
    let off = report("iommu-table-but-off");
    assert_eq!(
        (off.iommu.group_count, off.iommu.interrupt_remapping),
        (0, Some(false))
    );
}

// Issue 17: advice that was wrong on real hosts. Each test below failed before its fix.

/// Item 1: the fix names the place a user looks, the BIOS/UEFI setup and the setting's names.
#[test]
fn amd_svm_disabled_by_firmware_names_the_bios_setting() {
    let r = report("amd-svm-disabled-by-firmware");
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert_eq!(
        (fw.verdict, fw.fix.as_deref()),
        (Verdict::Fail, Some(FIRMWARE_SVM))
    );
    assert!(fw.evidence.contains("= 0x18: SVMDIS 1"), "{fw:?}");
    // The kernel clears svm from cpuinfo when SVMDIS is set (arch/x86/kernel/cpu/amd.c).
    assert_eq!(
        v(&r, "cpu.virt_extension"),
        (Verdict::Fail, Some(FIRMWARE_SVM.to_owned()))
    );
    assert_eq!(r.overall.first_fix.as_deref(), Some(FIRMWARE_SVM));
    // kvm stays loaded, kvm_amd refused: neither modprobe nor udev can help.
    for id in ["kvm.modules", "kvm.dev_kvm"] {
        let f = fix(&r, id);
        assert!(
            f.contains("cpu.virt_extension") && f.contains(FIRMWARE_SVM),
            "{id}: {f}"
        );
        assert!(!f.contains("modprobe") && !f.contains("udev"), "{id}: {f}");
    }
}

/// Item 2: /dev/kvm is created by kvm_intel/kvm_amd (kvm_init), so with only kvm loaded the
/// cause is whatever keeps the vendor module out, not udev.
#[test]
fn dev_kvm_missing_because_the_vendor_module_refused_points_at_the_firmware() {
    let r = report("intel-vtx-off-kvm-loaded");
    let (dev, dev_fix) = v(&r, "kvm.dev_kvm");
    assert_eq!(dev, Verdict::Fail);
    let dev_fix = dev_fix.unwrap();
    assert!(!dev_fix.contains("udev"), "{dev_fix}");
    assert!(
        dev_fix.starts_with("first fix cpu.virt_extension: ") && dev_fix.contains(FIRMWARE_VTX),
        "{dev_fix}"
    );
    assert!(
        r.check("kvm.dev_kvm")
            .unwrap()
            .summary
            .contains("kvm_intel, which creates it, is not loaded")
    );
    assert_eq!(
        v(&r, "cpu.firmware_enabled"),
        (Verdict::Fail, Some(FIRMWARE_VTX.to_owned()))
    );
}

/// Item 2, the other first cause: the vendor module is simply not loaded.
#[test]
fn dev_kvm_missing_with_only_kvm_loaded_says_modprobe_the_vendor_module() {
    let r = report("kvm-without-kvm-intel");
    assert_eq!(
        v(&r, "kvm.dev_kvm"),
        (
            Verdict::Fail,
            Some("modprobe kvm-intel (kvm_intel creates /dev/kvm; kvm alone does not)".to_owned())
        )
    );
    assert_eq!(verdict(&r, "cpu.firmware_enabled"), Verdict::Pass);
    assert!(fix(&r, "kvm.modules").starts_with("modprobe kvm-intel;"));
}

/// Item 3: before 5.6 the kernel keeps vmx in cpuinfo when the firmware locked VMX off, so only
/// the MSR shows it; `modprobe kvm-intel` would fail with "disabled by bios".
#[test]
fn firmware_disabled_vtx_on_a_pre_5_6_kernel_gives_no_modprobe_fix() {
    let r = report("intel-vtx-disabled-kernel-5.4");
    assert_eq!(verdict(&r, "cpu.virt_extension"), Verdict::Pass);
    assert_eq!(
        v(&r, "cpu.firmware_enabled"),
        (Verdict::Fail, Some(FIRMWARE_VTX.to_owned()))
    );
    for id in ["kvm.modules", "kvm.dev_kvm"] {
        let f = fix(&r, id);
        assert!(!f.contains("modprobe"), "{id}: {f}");
        assert!(
            f.starts_with("first fix cpu.firmware_enabled: ") && f.contains(FIRMWARE_VTX),
            "{id}: {f}"
        );
    }
    assert_eq!(
        r.overall.first_check.as_deref(),
        Some("cpu.firmware_enabled")
    );
}

/// Item 4: value 0 (unlocked, kernels before 5.6) is not "enabled by the firmware".
#[test]
fn unlocked_feature_control_is_not_called_enabled_by_the_firmware() {
    let r = report("intel-feature-control-unlocked-4.19");
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert_eq!((fw.verdict, fw.fix.as_deref()), (Verdict::Pass, None));
    assert!(!fw.summary.contains("enabled by the firmware"), "{fw:?}");
    assert_eq!(
        fw.summary,
        "unlocked: the firmware left VMX to the OS, and kvm_intel turns it on and locks the register when it first enables VMX (kernels before 5.6)"
    );
    assert!(fw.evidence.contains("= 0x0: lock 0"), "{fw:?}");
    assert!(fw.evidence.contains("kernel 4.19.0-test"), "{fw:?}");
}

/// Item 4: value 3 (VMX only inside SMX) without a measured launch: Linux refuses VMX.
#[test]
fn vmx_only_inside_smx_is_a_firmware_failure_without_tboot() {
    let r = report("intel-vmx-only-inside-smx");
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert_eq!(fw.verdict, Verdict::Fail);
    assert_eq!(
        fw.summary,
        "the firmware enabled VMX only inside SMX (for a TXT measured launch): without tboot Linux refuses VMX"
    );
    assert!(
        fw.evidence
            .contains("= 0x3: lock 1, VMX outside SMX 0, VMX inside SMX 1"),
        "{fw:?}"
    );
    let f = fw.fix.clone().unwrap();
    assert!(f.starts_with(FIRMWARE_VTX) && f.contains("tboot"), "{f}");
    assert_eq!(v(&r, "cpu.virt_extension").1, Some(f));
}

/// Item 4: since 5.6 a kernel built without KVM_INTEL locks the register with VMX off itself
/// (arch/x86/kernel/cpu/feat_ctl.c): the BIOS is not the known culprit.
#[test]
fn a_kernel_without_kvm_intel_does_not_blame_the_bios() {
    let r = report("intel-kernel-without-kvm-intel");
    let fw = r.check("cpu.firmware_enabled").unwrap();
    assert_eq!(fw.verdict, Verdict::Warn);
    assert!(!fw.summary.contains("disabled by the firmware"), "{fw:?}");
    assert!(fw.evidence.contains("CONFIG_KVM_INTEL not set"), "{fw:?}");
    for id in ["cpu.firmware_enabled", "cpu.virt_extension"] {
        let f = fix(&r, id);
        assert!(
            f.starts_with("boot a kernel built with CONFIG_KVM_INTEL=y or m"),
            "{id}: {f}"
        );
    }
    assert_eq!(verdict(&r, "kconfig.kvm_intel"), Verdict::Fail);
}

/// Item 5: the kernel forces enable_apicv off when the CPU lacks APICv; the option does nothing.
#[test]
fn apicv_missing_from_the_cpu_gets_no_module_option() {
    let r = report("intel-no-apicv");
    let c = r.check("kvm.apicv").unwrap();
    assert_eq!((c.verdict, c.fix.as_deref()), (Verdict::Warn, None));
    assert_eq!(
        c.summary,
        "APICv (virtual interrupts) off: this CPU does not have it"
    );
    assert!(
        c.evidence.contains("vmx flags: no apicv")
            && c.evidence.contains("lacks vapic_reg, vid, posted_intr"),
        "{c:?}"
    );
    assert_all(
        &r,
        &["kvm.ept", "kvm.vpid", "kvm.nested", "kvm.shadow_vmcs"],
        Verdict::Pass,
    );
    assert_eq!(r.overall.first_check.as_deref(), Some("kvm.apicv"));
    assert_eq!(r.overall.first_fix, None);
}

/// Item 5 before 5.8 (no `vmx flags` line): the VMX capability MSRs decide, for APICv and for
/// shadow VMCS alike; cpuinfo's silence is no evidence.
#[test]
fn vmx_capability_msrs_decide_support_where_cpuinfo_has_no_vmx_flags() {
    let r = report("intel-5.4-vmx-capability-msrs");
    let apicv = r.check("kvm.apicv").unwrap();
    assert_eq!((apicv.verdict, apicv.fix.as_deref()), (Verdict::Warn, None));
    assert!(
        apicv.summary.ends_with("this CPU does not have it"),
        "{apicv:?}"
    );
    assert!(
        apicv.evidence.contains("MSR 0x48b")
            && apicv.evidence.contains("lacks")
            && apicv.evidence.contains("posted interrupts"),
        "{apicv:?}"
    );
    // Shadow VMCS: the CPU has it (IA32_VMX_PROCBASED_CTLS2 bit 46), so the option is the fix.
    assert_eq!(
        v(&r, "kvm.shadow_vmcs"),
        (
            Verdict::Warn,
            Some("options kvm-intel enable_shadow_vmcs=1 in /etc/modprobe.d/kvm.conf, then reload kvm_intel (modprobe -r kvm_intel; modprobe kvm_intel)".to_owned())
        )
    );
}

/// Item 5 without evidence: say that support cannot be told, and how to tell.
#[test]
fn feature_support_without_evidence_says_it_cannot_tell() {
    let r = report("intel-5.4-apicv-off-no-msr");
    let c = r.check("kvm.apicv").unwrap();
    assert_eq!(c.verdict, Verdict::Warn);
    assert_eq!(
        c.summary,
        "APICv (virtual interrupts) off; cannot tell whether this CPU has it"
    );
    assert!(c.evidence.contains("no 'vmx flags'"), "{c:?}");
    let f = c.fix.clone().unwrap();
    assert!(
        f.starts_with("modprobe msr and run this again as root"),
        "{f}"
    );
}

/// Item 6: a 1G pool is usable only through a hugetlbfs mount with pagesize=1G.
#[test]
fn a_1g_pool_without_a_1g_hugetlbfs_mount_warns() {
    let r = report("hugepages-1g-mount-2m-only");
    let c = r.check("memory.hugetlbfs").unwrap();
    assert_eq!(c.verdict, Verdict::Warn);
    assert_eq!(
        c.summary,
        "1G hugepages are reserved (4) but no hugetlbfs mount has pagesize=1G: QEMU and libvirt cannot use them"
    );
    assert!(c.evidence.contains("/dev/hugepages pagesize 2M"), "{c:?}");
    let f = c.fix.clone().unwrap();
    assert!(
        f.contains("mount -t hugetlbfs -o pagesize=1G")
            && f.contains("fstab")
            && f.contains("systemd mount unit"),
        "{f}"
    );
    assert!(r.overall.ready);
    assert_eq!(r.overall.first_check.as_deref(), Some("memory.hugetlbfs"));
}

#[test]
fn no_iommu_table_on_bare_metal_names_the_vendors_firmware_switch() {
    let intel = report("intel-iommu-off-in-firmware");
    assert_eq!(verdict(&intel, "iommu.acpi_table"), Verdict::Fail);
    let fix_intel = fix(&intel, "iommu.acpi_table");
    assert!(fix_intel.contains("VT-d"), "{fix_intel}");
    assert!(!fix_intel.contains("AMD"), "{fix_intel}");
    let amd = report("amd-iommu-off-in-firmware");
    assert_eq!(verdict(&amd, "iommu.acpi_table"), Verdict::Fail);
    let fix_amd = fix(&amd, "iommu.acpi_table");
    assert!(fix_amd.contains("AMD-Vi"), "{fix_amd}");
    assert!(!fix_amd.contains("VT-d"), "{fix_amd}");
}
