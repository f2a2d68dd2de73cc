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

const FIRMWARE_VTX: &str = "enable VT-x (Intel Virtualization Technology) in the firmware setup";

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
