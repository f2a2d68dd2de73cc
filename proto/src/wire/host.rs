//! The host capability report ([`crate::host::HostReport`]) on the wire: one `a{sv}` whose keys
//! are the JSON keys, with the sections as nested `a{sv}` and the lists as `aa{sv}`. Verdicts are
//! their lowercase JSON names (`pass`, `not_applicable`) and are checked on receipt, like
//! addresses; an absent value (`fix`, `first_check`, ...) is an absent key. Converting a report
//! to this form and back gives the same report, so `passthroughctl --json host` prints what
//! `passthroughd host --json` prints.

use std::collections::BTreeMap;

use zbus::zvariant::{DeserializeDict, SerializeDict, Type};

use super::{WireError, address, unknown};
use crate::host::{
    Check, CpuFacts, HostReport, HugepagePool, HugetlbfsMount, IommuFacts, Ksm, MemoryFacts,
    NumaNode, Overall, SriovDevice, Topology, Verdict,
};

fn verdict(field: &'static str, name: &str) -> Result<Verdict, WireError> {
    Verdict::from_name(name).ok_or_else(|| unknown(field, name))
}

/// [`HostReport`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct HostReportWire {
    pub schema_version: u32,
    pub kernel_release: Option<String>,
    pub overall: OverallWire,
    pub checks: Vec<CheckWire>,
    pub cpu: CpuFactsWire,
    pub iommu: IommuFactsWire,
    pub topology: TopologyWire,
    pub numa_nodes: Vec<NumaNodeWire>,
    pub memory: MemoryFactsWire,
    pub sriov_devices: Vec<SriovDeviceWire>,
}

impl From<&HostReport> for HostReportWire {
    fn from(r: &HostReport) -> Self {
        Self {
            schema_version: r.schema_version,
            kernel_release: r.kernel_release.clone(),
            overall: OverallWire::from(&r.overall),
            checks: r.checks.iter().map(CheckWire::from).collect(),
            cpu: CpuFactsWire::from(&r.cpu),
            iommu: IommuFactsWire::from(&r.iommu),
            topology: TopologyWire::from(&r.topology),
            numa_nodes: r.numa_nodes.iter().map(NumaNodeWire::from).collect(),
            memory: MemoryFactsWire::from(&r.memory),
            sriov_devices: r.sriov_devices.iter().map(SriovDeviceWire::from).collect(),
        }
    }
}

impl TryFrom<HostReportWire> for HostReport {
    type Error = WireError;

    fn try_from(w: HostReportWire) -> Result<Self, WireError> {
        Ok(Self {
            schema_version: w.schema_version,
            kernel_release: w.kernel_release,
            overall: Overall::try_from(w.overall)?,
            checks: w
                .checks
                .into_iter()
                .map(Check::try_from)
                .collect::<Result<_, _>>()?,
            cpu: w.cpu.into(),
            iommu: w.iommu.into(),
            topology: w.topology.into(),
            numa_nodes: w.numa_nodes.into_iter().map(NumaNode::from).collect(),
            memory: w.memory.into(),
            sriov_devices: w
                .sriov_devices
                .into_iter()
                .map(SriovDevice::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// [`Overall`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct OverallWire {
    pub ready: bool,
    pub verdict: String,
    pub summary: String,
    pub first_check: Option<String>,
    pub first_fix: Option<String>,
}

impl From<&Overall> for OverallWire {
    fn from(o: &Overall) -> Self {
        Self {
            ready: o.ready,
            verdict: o.verdict.name().to_owned(),
            summary: o.summary.clone(),
            first_check: o.first_check.clone(),
            first_fix: o.first_fix.clone(),
        }
    }
}

impl TryFrom<OverallWire> for Overall {
    type Error = WireError;

    fn try_from(w: OverallWire) -> Result<Self, WireError> {
        Ok(Self {
            ready: w.ready,
            verdict: verdict("overall verdict", &w.verdict)?,
            summary: w.summary,
            first_check: w.first_check,
            first_fix: w.first_fix,
        })
    }
}

/// [`Check`] on the wire (`a{sv}`); no `fix` key when there is nothing to do.
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct CheckWire {
    pub id: String,
    pub verdict: String,
    pub summary: String,
    pub evidence: String,
    pub fix: Option<String>,
}

impl From<&Check> for CheckWire {
    fn from(c: &Check) -> Self {
        Self {
            id: c.id.clone(),
            verdict: c.verdict.name().to_owned(),
            summary: c.summary.clone(),
            evidence: c.evidence.clone(),
            fix: c.fix.clone(),
        }
    }
}

impl TryFrom<CheckWire> for Check {
    type Error = WireError;

    fn try_from(w: CheckWire) -> Result<Self, WireError> {
        Ok(Self {
            verdict: verdict("check verdict", &w.verdict)?,
            id: w.id,
            summary: w.summary,
            evidence: w.evidence,
            fix: w.fix,
        })
    }
}

/// [`CpuFacts`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct CpuFactsWire {
    pub vendor: Option<String>,
    pub model_name: Option<String>,
    pub microcode: Option<String>,
    pub virt_extension: Option<String>,
    pub hypervisor: bool,
    pub hypervisor_vendor: Option<String>,
}

impl From<&CpuFacts> for CpuFactsWire {
    fn from(c: &CpuFacts) -> Self {
        Self {
            vendor: c.vendor.clone(),
            model_name: c.model_name.clone(),
            microcode: c.microcode.clone(),
            virt_extension: c.virt_extension.clone(),
            hypervisor: c.hypervisor,
            hypervisor_vendor: c.hypervisor_vendor.clone(),
        }
    }
}

impl From<CpuFactsWire> for CpuFacts {
    fn from(w: CpuFactsWire) -> Self {
        Self {
            vendor: w.vendor,
            model_name: w.model_name,
            microcode: w.microcode,
            virt_extension: w.virt_extension,
            hypervisor: w.hypervisor,
            hypervisor_vendor: w.hypervisor_vendor,
        }
    }
}

/// [`IommuFacts`] on the wire (`a{sv}`); `default_domains` is `a{su}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct IommuFactsWire {
    pub acpi_tables: Vec<String>,
    pub units: Vec<String>,
    pub group_count: u32,
    pub default_domains: BTreeMap<String, u32>,
    pub interrupt_remapping: Option<bool>,
}

impl From<&IommuFacts> for IommuFactsWire {
    fn from(i: &IommuFacts) -> Self {
        Self {
            acpi_tables: i.acpi_tables.clone(),
            units: i.units.clone(),
            group_count: i.group_count,
            default_domains: i.default_domains.clone(),
            interrupt_remapping: i.interrupt_remapping,
        }
    }
}

impl From<IommuFactsWire> for IommuFacts {
    fn from(w: IommuFactsWire) -> Self {
        Self {
            acpi_tables: w.acpi_tables,
            units: w.units,
            group_count: w.group_count,
            default_domains: w.default_domains,
            interrupt_remapping: w.interrupt_remapping,
        }
    }
}

/// [`Topology`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct TopologyWire {
    pub sockets: u32,
    pub cores_per_socket: u32,
    pub threads_per_core: u32,
    pub logical_cpus: u32,
    pub isolated_cpus: String,
    pub nohz_full_cpus: String,
}

impl From<&Topology> for TopologyWire {
    fn from(t: &Topology) -> Self {
        Self {
            sockets: t.sockets,
            cores_per_socket: t.cores_per_socket,
            threads_per_core: t.threads_per_core,
            logical_cpus: t.logical_cpus,
            isolated_cpus: t.isolated_cpus.clone(),
            nohz_full_cpus: t.nohz_full_cpus.clone(),
        }
    }
}

impl From<TopologyWire> for Topology {
    fn from(w: TopologyWire) -> Self {
        Self {
            sockets: w.sockets,
            cores_per_socket: w.cores_per_socket,
            threads_per_core: w.threads_per_core,
            logical_cpus: w.logical_cpus,
            isolated_cpus: w.isolated_cpus,
            nohz_full_cpus: w.nohz_full_cpus,
        }
    }
}

/// [`HugepagePool`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct HugepagePoolWire {
    pub size_kb: u64,
    pub total: u64,
    pub free: u64,
}

impl From<&HugepagePool> for HugepagePoolWire {
    fn from(p: &HugepagePool) -> Self {
        Self {
            size_kb: p.size_kb,
            total: p.total,
            free: p.free,
        }
    }
}

impl From<HugepagePoolWire> for HugepagePool {
    fn from(w: HugepagePoolWire) -> Self {
        Self {
            size_kb: w.size_kb,
            total: w.total,
            free: w.free,
        }
    }
}

/// [`NumaNode`] on the wire (`a{sv}`); `distances` is `au`.
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct NumaNodeWire {
    pub id: u32,
    pub cpus: String,
    pub memory_total_kb: Option<u64>,
    pub memory_free_kb: Option<u64>,
    pub distances: Vec<u32>,
    pub hugepages: Vec<HugepagePoolWire>,
}

impl From<&NumaNode> for NumaNodeWire {
    fn from(n: &NumaNode) -> Self {
        Self {
            id: n.id,
            cpus: n.cpus.clone(),
            memory_total_kb: n.memory_total_kb,
            memory_free_kb: n.memory_free_kb,
            distances: n.distances.clone(),
            hugepages: n.hugepages.iter().map(HugepagePoolWire::from).collect(),
        }
    }
}

impl From<NumaNodeWire> for NumaNode {
    fn from(w: NumaNodeWire) -> Self {
        Self {
            id: w.id,
            cpus: w.cpus,
            memory_total_kb: w.memory_total_kb,
            memory_free_kb: w.memory_free_kb,
            distances: w.distances,
            hugepages: w.hugepages.into_iter().map(HugepagePool::from).collect(),
        }
    }
}

/// [`HugetlbfsMount`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct HugetlbfsMountWire {
    pub mount_point: String,
    pub page_size: Option<String>,
}

/// [`Ksm`] on the wire (`a{sv}`); empty without KSM.
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct KsmWire {
    pub run: Option<u32>,
    pub pages_sharing: Option<u64>,
}

/// [`MemoryFacts`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct MemoryFactsWire {
    pub total_kb: Option<u64>,
    pub default_hugepage_kb: Option<u64>,
    pub hugepages: Vec<HugepagePoolWire>,
    pub hugetlbfs_mounts: Vec<HugetlbfsMountWire>,
    pub ksm: KsmWire,
}

impl From<&MemoryFacts> for MemoryFactsWire {
    fn from(m: &MemoryFacts) -> Self {
        Self {
            total_kb: m.total_kb,
            default_hugepage_kb: m.default_hugepage_kb,
            hugepages: m.hugepages.iter().map(HugepagePoolWire::from).collect(),
            hugetlbfs_mounts: m
                .hugetlbfs_mounts
                .iter()
                .map(|h| HugetlbfsMountWire {
                    mount_point: h.mount_point.clone(),
                    page_size: h.page_size.clone(),
                })
                .collect(),
            ksm: KsmWire {
                run: m.ksm.run,
                pages_sharing: m.ksm.pages_sharing,
            },
        }
    }
}

impl From<MemoryFactsWire> for MemoryFacts {
    fn from(w: MemoryFactsWire) -> Self {
        Self {
            total_kb: w.total_kb,
            default_hugepage_kb: w.default_hugepage_kb,
            hugepages: w.hugepages.into_iter().map(HugepagePool::from).collect(),
            hugetlbfs_mounts: w
                .hugetlbfs_mounts
                .into_iter()
                .map(|h| HugetlbfsMount {
                    mount_point: h.mount_point,
                    page_size: h.page_size,
                })
                .collect(),
            ksm: Ksm {
                run: w.ksm.run,
                pages_sharing: w.ksm.pages_sharing,
            },
        }
    }
}

/// [`SriovDevice`] on the wire (`a{sv}`); the address is parsed again on receipt.
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct SriovDeviceWire {
    pub address: String,
    pub vendor_id: u16,
    pub device_id: u16,
    pub name: Option<String>,
    pub driver: Option<String>,
    pub total_vfs: u32,
    pub num_vfs: u32,
}

impl From<&SriovDevice> for SriovDeviceWire {
    fn from(d: &SriovDevice) -> Self {
        Self {
            address: d.address.to_string(),
            vendor_id: d.vendor_id,
            device_id: d.device_id,
            name: d.name.clone(),
            driver: d.driver.clone(),
            total_vfs: d.total_vfs,
            num_vfs: d.num_vfs,
        }
    }
}

impl TryFrom<SriovDeviceWire> for SriovDevice {
    type Error = WireError;

    fn try_from(w: SriovDeviceWire) -> Result<Self, WireError> {
        Ok(Self {
            address: address("SR-IOV device address", &w.address)?,
            vendor_id: w.vendor_id,
            device_id: w.device_id,
            name: w.name,
            driver: w.driver,
            total_vfs: w.total_vfs,
            num_vfs: w.num_vfs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HOST_REPORT_SCHEMA, overall};
    use std::collections::HashMap;
    use zbus::zvariant::{LE, OwnedValue, serialized::Context, to_bytes};

    fn round_trip(report: &HostReport) -> HostReport {
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, &HostReportWire::from(report)).unwrap();
        let wire: HostReportWire = bytes.deserialize().unwrap().0;
        HostReport::try_from(wire).unwrap()
    }

    fn check(id: &str, verdict: Verdict, fix: Option<&str>) -> Check {
        Check {
            id: id.to_owned(),
            verdict,
            summary: format!("{id} summary"),
            evidence: "read".to_owned(),
            fix: fix.map(str::to_owned),
        }
    }

    /// Every field set, every verdict used, options both present and absent.
    fn report() -> HostReport {
        let checks = vec![
            check("cpu.virt_extension", Verdict::Pass, None),
            check(
                "kvm.nested",
                Verdict::Warn,
                Some("options kvm-intel nested=1"),
            ),
            check("iommu.groups", Verdict::Fail, Some("add intel_iommu=on")),
            check("kvm.avic", Verdict::NotApplicable, None),
        ];
        let pool = HugepagePool {
            size_kb: 2048,
            total: 512,
            free: 500,
        };
        HostReport {
            schema_version: HOST_REPORT_SCHEMA,
            kernel_release: Some("6.12.0".into()),
            overall: overall(&checks),
            checks,
            cpu: CpuFacts {
                vendor: Some("GenuineIntel".into()),
                model_name: Some("Xeon".into()),
                microcode: None,
                virt_extension: Some("vmx".into()),
                hypervisor: true,
                hypervisor_vendor: Some("QEMU".into()),
            },
            iommu: IommuFacts {
                acpi_tables: vec!["DMAR".into()],
                units: vec!["dmar0".into(), "dmar1".into()],
                group_count: 12,
                default_domains: [("identity".to_owned(), 10), ("DMA-FQ".to_owned(), 2)]
                    .into_iter()
                    .collect(),
                interrupt_remapping: Some(false),
            },
            topology: Topology {
                sockets: 2,
                cores_per_socket: 8,
                threads_per_core: 2,
                logical_cpus: 32,
                isolated_cpus: "2-3".into(),
                nohz_full_cpus: String::new(),
            },
            numa_nodes: vec![
                NumaNode {
                    id: 0,
                    cpus: "0-15".into(),
                    memory_total_kb: Some(1 << 24),
                    memory_free_kb: None,
                    distances: vec![10, 21],
                    hugepages: vec![pool.clone()],
                },
                NumaNode {
                    id: 1,
                    ..NumaNode::default()
                },
            ],
            memory: MemoryFacts {
                total_kb: Some(1 << 25),
                default_hugepage_kb: Some(2048),
                hugepages: vec![pool],
                hugetlbfs_mounts: vec![
                    HugetlbfsMount {
                        mount_point: "/dev/hugepages".into(),
                        page_size: None,
                    },
                    HugetlbfsMount {
                        mount_point: "/mnt/1g".into(),
                        page_size: Some("1G".into()),
                    },
                ],
                ksm: Ksm {
                    run: Some(1),
                    pages_sharing: Some(3),
                },
            },
            sriov_devices: vec![SriovDevice {
                address: "0000:01:00.0".parse().unwrap(),
                vendor_id: 0x8086,
                device_id: 0x10c9,
                name: None,
                driver: Some("igb".into()),
                total_vfs: 7,
                num_vfs: 2,
            }],
        }
    }

    #[test]
    fn the_signature_is_a_dict() {
        assert_eq!(HostReportWire::SIGNATURE.to_string(), "a{sv}");
        assert_eq!(<Vec<CheckWire>>::SIGNATURE.to_string(), "aa{sv}");
        assert_eq!(IommuFactsWire::SIGNATURE.to_string(), "a{sv}");
    }

    #[test]
    fn a_report_survives_the_wire_and_prints_the_same_json() {
        let r = report();
        let back = round_trip(&r);
        assert_eq!(back, r);
        assert_eq!(
            serde_json::to_string_pretty(&back).unwrap(),
            serde_json::to_string_pretty(&r).unwrap()
        );
        // Empty sections too: no KSM, no nodes, no tables, nothing known.
        let mut bare = r;
        bare.memory = MemoryFacts::default();
        bare.numa_nodes.clear();
        bare.iommu = IommuFacts::default();
        bare.cpu = CpuFacts::default();
        bare.kernel_release = None;
        bare.checks.clear();
        bare.overall = overall(&[]);
        assert_eq!(round_trip(&bare), bare);
    }

    #[test]
    fn absent_values_are_absent_keys_and_verdicts_are_names() {
        let ctxt = Context::new_dbus(LE, 0);
        let wire = HostReportWire::from(&report());
        let check_bytes = to_bytes(ctxt, &wire.checks[0]).unwrap();
        let map: HashMap<String, OwnedValue> = check_bytes.deserialize().unwrap().0;
        assert!(!map.contains_key("fix"));
        assert_eq!(String::try_from(map["verdict"].clone()).unwrap(), "pass");
        let with_fix = to_bytes(ctxt, &wire.checks[1]).unwrap();
        let map: HashMap<String, OwnedValue> = with_fix.deserialize().unwrap().0;
        assert!(map.contains_key("fix"));
        let bytes = to_bytes(ctxt, &wire).unwrap();
        let map: HashMap<String, OwnedValue> = bytes.deserialize().unwrap().0;
        assert_eq!(map["checks"].value_signature().to_string(), "aa{sv}");
        assert_eq!(map["overall"].value_signature().to_string(), "a{sv}");
    }

    #[test]
    fn an_unknown_verdict_or_address_from_the_daemon_is_an_error() {
        let mut wire = HostReportWire::from(&report());
        wire.checks[2].verdict = "FAIL".into();
        let err = HostReport::try_from(wire).unwrap_err();
        assert_eq!(err.to_string(), "the daemon sent a malformed check verdict");
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "unknown value \"FAIL\""
        );
        let mut wire = HostReportWire::from(&report());
        wire.overall.verdict = "ok".into();
        assert!(HostReport::try_from(wire).is_err());
        let mut wire = HostReportWire::from(&report());
        wire.sriov_devices[0].address = "../x".into();
        let err = HostReport::try_from(wire).unwrap_err();
        assert!(err.to_string().contains("SR-IOV device address"), "{err}");
    }
}
