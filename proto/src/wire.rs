//! The D-Bus wire form of the results, and its conversion to and from the serde types of
//! [`crate::device`] and [`crate::ops`] (which are also what `--json` prints).
//!
//! Every result is an `a{sv}` dictionary keyed by the same snake_case names the JSON uses; a value
//! that is `None` on our side is an absent key on the wire. Addresses are canonical strings and
//! are parsed again on receipt, so a client never trusts an unparsed address.

use serde::{Deserialize, Serialize};
use zbus::zvariant::{DeserializeDict, SerializeDict, Type};

use crate::{
    AddressError, Assignment, Change, DeviceIdentity, GroupBlocker, IommuGroup, PciAddress,
    PciFunction, SriovPf, Status, VfInfo, VfOf,
};

pub mod host;

pub use host::HostReportWire;

/// A reply the daemon sent that does not describe what it should.
#[derive(Debug, thiserror::Error)]
#[error("the daemon sent a malformed {field}")]
pub struct WireError {
    field: &'static str,
    #[source]
    source: WireCause,
}

/// Why a value on the wire was rejected.
#[derive(Debug, thiserror::Error)]
enum WireCause {
    #[error(transparent)]
    Address(#[from] AddressError),
    /// A string outside the set of names the value can take (e.g. a verdict).
    #[error("unknown value {0:?}")]
    Unknown(String),
}

fn address(field: &'static str, text: &str) -> Result<PciAddress, WireError> {
    text.parse().map_err(|e: AddressError| WireError {
        field,
        source: e.into(),
    })
}

fn unknown(field: &'static str, text: &str) -> WireError {
    WireError {
        field,
        source: WireCause::Unknown(text.to_owned()),
    }
}

/// [`PciFunction`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct FunctionWire {
    pub address: String,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
    pub class: u32,
    pub vendor_name: Option<String>,
    pub device_name: Option<String>,
    pub class_name: Option<String>,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    pub iommu_group: Option<u32>,
    pub numa_node: Option<u32>,
    pub boot_vga: bool,
    pub sriov_total_vfs: Option<u32>,
    pub sriov_num_vfs: Option<u32>,
    pub sriov_drivers_autoprobe: Option<bool>,
    pub vf_pf: Option<String>,
    pub vf_index: Option<u32>,
}

impl From<&PciFunction> for FunctionWire {
    fn from(f: &PciFunction) -> Self {
        Self {
            address: f.address.to_string(),
            vendor_id: f.vendor_id,
            device_id: f.device_id,
            subsystem_vendor_id: f.subsystem_vendor_id,
            subsystem_device_id: f.subsystem_device_id,
            class: f.class,
            vendor_name: f.vendor_name.clone(),
            device_name: f.device_name.clone(),
            class_name: f.class_name.clone(),
            driver: f.driver.clone(),
            driver_override: f.driver_override.clone(),
            iommu_group: f.iommu_group,
            numa_node: f.numa_node,
            boot_vga: f.boot_vga,
            sriov_total_vfs: f.sriov.map(|s| s.total_vfs),
            sriov_num_vfs: f.sriov.map(|s| s.num_vfs),
            sriov_drivers_autoprobe: f.sriov.map(|s| s.drivers_autoprobe),
            vf_pf: f.vf_of.map(|v| v.pf.to_string()),
            vf_index: f.vf_of.map(|v| v.index),
        }
    }
}

impl TryFrom<FunctionWire> for PciFunction {
    type Error = WireError;

    fn try_from(w: FunctionWire) -> Result<Self, WireError> {
        let sriov = w.sriov_total_vfs.map(|total_vfs| SriovPf {
            total_vfs,
            num_vfs: w.sriov_num_vfs.unwrap_or(0),
            drivers_autoprobe: w.sriov_drivers_autoprobe.unwrap_or(true),
        });
        let vf_of = match (&w.vf_pf, w.vf_index) {
            (Some(pf), Some(index)) => Some(VfOf {
                pf: address("VF's PF address", pf)?,
                index,
            }),
            _ => None,
        };
        Ok(Self {
            address: address("function address", &w.address)?,
            vendor_id: w.vendor_id,
            device_id: w.device_id,
            subsystem_vendor_id: w.subsystem_vendor_id,
            subsystem_device_id: w.subsystem_device_id,
            class: w.class,
            vendor_name: w.vendor_name,
            device_name: w.device_name,
            class_name: w.class_name,
            driver: w.driver,
            driver_override: w.driver_override,
            iommu_group: w.iommu_group,
            numa_node: w.numa_node,
            boot_vga: w.boot_vga,
            sriov,
            vf_of,
        })
    }
}

/// [`PciFunction`] as one row of `ListFunctions`, whose reply is `a(sqqqqusssssxxbuubsu)`.
///
/// A struct rather than `a{sv}`: a host lists thousands of functions, and dictionaries cost
/// 2.4x the bytes and 5x the encoding and decoding time (4,096 functions: 1.4 MB and ~33 ms
/// against 0.6 MB and ~6 ms), which was most of a `list --json` round trip. systemd's ListUnits
/// makes the same choice. Absent values: "" for a string, -1 for a number, `sriov_total_vfs` 0
/// for "not an SR-IOV PF" (then `sriov_num_vfs` and `sriov_drivers_autoprobe` mean nothing),
/// `vf_pf` "" for "not a VF" (then `vf_index` means nothing). `Show` still answers `a{sv}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Type)]
#[zvariant(crate = "zbus::zvariant")]
pub struct FunctionRow {
    pub address: String,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
    pub class: u32,
    pub vendor_name: String,
    pub device_name: String,
    pub class_name: String,
    pub driver: String,
    pub driver_override: String,
    pub iommu_group: i64,
    pub numa_node: i64,
    pub boot_vga: bool,
    pub sriov_total_vfs: u32,
    pub sriov_num_vfs: u32,
    pub sriov_drivers_autoprobe: bool,
    pub vf_pf: String,
    pub vf_index: u32,
}

impl From<&PciFunction> for FunctionRow {
    fn from(f: &PciFunction) -> Self {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let number = |v: Option<u32>| v.map_or(-1, i64::from);
        Self {
            address: f.address.to_string(),
            vendor_id: f.vendor_id,
            device_id: f.device_id,
            subsystem_vendor_id: f.subsystem_vendor_id,
            subsystem_device_id: f.subsystem_device_id,
            class: f.class,
            vendor_name: text(&f.vendor_name),
            device_name: text(&f.device_name),
            class_name: text(&f.class_name),
            driver: text(&f.driver),
            driver_override: text(&f.driver_override),
            iommu_group: number(f.iommu_group),
            numa_node: number(f.numa_node),
            boot_vga: f.boot_vga,
            sriov_total_vfs: f.sriov.map_or(0, |s| s.total_vfs),
            sriov_num_vfs: f.sriov.map_or(0, |s| s.num_vfs),
            sriov_drivers_autoprobe: f.sriov.is_some_and(|s| s.drivers_autoprobe),
            vf_pf: f.vf_of.map(|v| v.pf.to_string()).unwrap_or_default(),
            vf_index: f.vf_of.map_or(0, |v| v.index),
        }
    }
}

/// A row's placeholders ("" and -1, totals of 0) become the absent values of [`FunctionWire`],
/// so a row is then checked and converted exactly as a dictionary is.
impl TryFrom<FunctionRow> for FunctionWire {
    type Error = WireError;

    fn try_from(r: FunctionRow) -> Result<Self, WireError> {
        let text = |v: String| (!v.is_empty()).then_some(v);
        let number = |field: &'static str, v: i64| -> Result<Option<u32>, WireError> {
            match v {
                -1 => Ok(None),
                n => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| unknown(field, &n.to_string())),
            }
        };
        let pf = r.sriov_total_vfs > 0;
        let vf = !r.vf_pf.is_empty();
        Ok(Self {
            address: r.address,
            vendor_id: r.vendor_id,
            device_id: r.device_id,
            subsystem_vendor_id: r.subsystem_vendor_id,
            subsystem_device_id: r.subsystem_device_id,
            class: r.class,
            vendor_name: text(r.vendor_name),
            device_name: text(r.device_name),
            class_name: text(r.class_name),
            driver: text(r.driver),
            driver_override: text(r.driver_override),
            iommu_group: number("IOMMU group", r.iommu_group)?,
            numa_node: number("NUMA node", r.numa_node)?,
            boot_vga: r.boot_vga,
            sriov_total_vfs: pf.then_some(r.sriov_total_vfs),
            sriov_num_vfs: pf.then_some(r.sriov_num_vfs),
            sriov_drivers_autoprobe: pf.then_some(r.sriov_drivers_autoprobe),
            vf_pf: text(r.vf_pf),
            vf_index: vf.then_some(r.vf_index),
        })
    }
}

impl TryFrom<FunctionRow> for PciFunction {
    type Error = WireError;

    fn try_from(r: FunctionRow) -> Result<Self, WireError> {
        PciFunction::try_from(FunctionWire::try_from(r)?)
    }
}

/// A group member that blocks viability: (member, host driver).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
#[zvariant(crate = "zbus::zvariant")]
pub struct BlockerWire(pub String, pub String);

/// [`IommuGroup`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct GroupWire {
    pub id: u32,
    pub members: Vec<String>,
    pub domain_type: Option<String>,
    pub viable: bool,
    pub blockers: Vec<BlockerWire>,
}

impl From<&IommuGroup> for GroupWire {
    fn from(g: &IommuGroup) -> Self {
        Self {
            id: g.id,
            members: g.members.iter().map(ToString::to_string).collect(),
            domain_type: g.domain_type.clone(),
            viable: g.viable,
            blockers: g
                .blockers
                .iter()
                .map(|b| BlockerWire(b.member.clone(), b.driver.clone()))
                .collect(),
        }
    }
}

impl TryFrom<GroupWire> for IommuGroup {
    type Error = WireError;

    fn try_from(w: GroupWire) -> Result<Self, WireError> {
        Ok(Self {
            id: w.id,
            members: w
                .members
                .iter()
                .map(|m| address("group member", m))
                .collect::<Result<_, _>>()?,
            domain_type: w.domain_type,
            viable: w.viable,
            blockers: w
                .blockers
                .into_iter()
                .map(|BlockerWire(member, driver)| GroupBlocker { member, driver })
                .collect(),
        })
    }
}

/// [`Change`] on the wire (`a{sv}`); an absent driver key means "no driver".
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct ChangeWire {
    pub address: String,
    pub old_driver: Option<String>,
    pub new_driver: Option<String>,
}

impl From<&Change> for ChangeWire {
    fn from(c: &Change) -> Self {
        Self {
            address: c.address.to_string(),
            old_driver: c.old_driver.clone(),
            new_driver: c.new_driver.clone(),
        }
    }
}

impl TryFrom<ChangeWire> for Change {
    type Error = WireError;

    fn try_from(w: ChangeWire) -> Result<Self, WireError> {
        Ok(Self {
            address: address("changed address", &w.address)?,
            old_driver: w.old_driver,
            new_driver: w.new_driver,
        })
    }
}

/// [`Assignment`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct AssignmentWire {
    pub address: String,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
    pub previous_driver: Option<String>,
    pub persistent: bool,
    pub refused: Option<String>,
}

impl From<&Assignment> for AssignmentWire {
    fn from(a: &Assignment) -> Self {
        Self {
            address: a.address.to_string(),
            vendor_id: a.identity.vendor_id,
            device_id: a.identity.device_id,
            subsystem_vendor_id: a.identity.subsystem_vendor_id,
            subsystem_device_id: a.identity.subsystem_device_id,
            previous_driver: a.previous_driver.clone(),
            persistent: a.persistent,
            refused: a.refused.clone(),
        }
    }
}

impl TryFrom<AssignmentWire> for Assignment {
    type Error = WireError;

    fn try_from(w: AssignmentWire) -> Result<Self, WireError> {
        Ok(Self {
            address: address("assignment address", &w.address)?,
            identity: DeviceIdentity {
                vendor_id: w.vendor_id,
                device_id: w.device_id,
                subsystem_vendor_id: w.subsystem_vendor_id,
                subsystem_device_id: w.subsystem_device_id,
            },
            previous_driver: w.previous_driver,
            persistent: w.persistent,
            refused: w.refused,
        })
    }
}

/// [`Status`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct StatusWire {
    pub version: String,
    pub uptime_secs: u64,
    pub assignments: Vec<AssignmentWire>,
    pub last_errors: Vec<String>,
}

impl From<&Status> for StatusWire {
    fn from(s: &Status) -> Self {
        Self {
            version: s.version.clone(),
            uptime_secs: s.uptime_secs,
            assignments: s.assignments.iter().map(AssignmentWire::from).collect(),
            last_errors: s.last_errors.clone(),
        }
    }
}

impl TryFrom<StatusWire> for Status {
    type Error = WireError;

    fn try_from(w: StatusWire) -> Result<Self, WireError> {
        Ok(Self {
            version: w.version,
            uptime_secs: w.uptime_secs,
            assignments: w
                .assignments
                .into_iter()
                .map(Assignment::try_from)
                .collect::<Result<_, _>>()?,
            last_errors: w.last_errors,
        })
    }
}

/// [`VfInfo`] on the wire (`a{sv}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, SerializeDict, DeserializeDict, Type)]
#[zvariant(signature = "dict", crate = "zbus::zvariant")]
pub struct VfWire {
    pub index: u32,
    pub address: String,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    pub assigned: bool,
    pub in_use_by: Option<String>,
}

impl From<&VfInfo> for VfWire {
    fn from(v: &VfInfo) -> Self {
        Self {
            index: v.index,
            address: v.address.to_string(),
            driver: v.driver.clone(),
            iommu_group: v.iommu_group,
            assigned: v.assigned,
            in_use_by: v.in_use_by.clone(),
        }
    }
}

impl TryFrom<VfWire> for VfInfo {
    type Error = WireError;

    fn try_from(w: VfWire) -> Result<Self, WireError> {
        Ok(Self {
            index: w.index,
            address: address("VF address", &w.address)?,
            driver: w.driver,
            iommu_group: w.iommu_group,
            assigned: w.assigned,
            in_use_by: w.in_use_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::zvariant::{LE, serialized::Context, to_bytes};

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + for<'de> Deserialize<'de> + Type,
    {
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, value).unwrap();
        bytes.deserialize().unwrap().0
    }

    fn function() -> PciFunction {
        PciFunction {
            address: "0000:01:10.2".parse().unwrap(),
            vendor_id: 0x8086,
            device_id: 0x10ca,
            subsystem_vendor_id: 0x8086,
            subsystem_device_id: 1,
            class: 0x020000,
            vendor_name: Some("Intel Corporation".into()),
            device_name: None,
            class_name: Some("Ethernet controller".into()),
            driver: None,
            driver_override: Some("vfio-pci".into()),
            iommu_group: Some(12),
            numa_node: None,
            boot_vga: false,
            sriov: None,
            vf_of: Some(VfOf {
                pf: "0000:01:00.0".parse().unwrap(),
                index: 1,
            }),
        }
    }

    #[test]
    fn signatures_are_dicts() {
        assert_eq!(FunctionWire::SIGNATURE.to_string(), "a{sv}");
        assert_eq!(GroupWire::SIGNATURE.to_string(), "a{sv}");
        assert_eq!(<Vec<ChangeWire>>::SIGNATURE.to_string(), "aa{sv}");
        assert_eq!(StatusWire::SIGNATURE.to_string(), "a{sv}");
    }

    #[test]
    fn a_function_survives_a_list_row() {
        assert_eq!(FunctionRow::SIGNATURE.to_string(), "(sqqqqusssssxxbuubsu)");
        let mut f = function();
        let row = round_trip(&FunctionRow::from(&f));
        assert_eq!((row.driver.as_str(), row.numa_node), ("", -1));
        assert_eq!(PciFunction::try_from(row).unwrap(), f);
        f.vf_of = None;
        f.driver = Some("igb".into());
        f.driver_override = None;
        f.iommu_group = Some(0);
        f.numa_node = Some(1);
        for autoprobe in [true, false] {
            f.sriov = Some(SriovPf {
                total_vfs: 7,
                num_vfs: 3,
                drivers_autoprobe: autoprobe,
            });
            let back = PciFunction::try_from(round_trip(&FunctionRow::from(&f))).unwrap();
            assert_eq!(back, f);
        }
        let mut bad = FunctionRow::from(&f);
        bad.iommu_group = -2;
        assert!(PciFunction::try_from(bad.clone()).is_err());
        bad.iommu_group = i64::from(u32::MAX) + 1;
        assert!(PciFunction::try_from(bad.clone()).is_err());
        bad.iommu_group = 3;
        bad.vf_pf = "../x".into();
        assert!(PciFunction::try_from(bad).is_err());
    }

    #[test]
    fn a_function_survives_the_wire() {
        let mut f = function();
        assert_eq!(
            PciFunction::try_from(round_trip(&FunctionWire::from(&f))).unwrap(),
            f
        );
        f.vf_of = None;
        f.sriov = Some(SriovPf {
            total_vfs: 7,
            num_vfs: 0,
            drivers_autoprobe: false,
        });
        f.numa_node = Some(1);
        assert_eq!(
            PciFunction::try_from(round_trip(&FunctionWire::from(&f))).unwrap(),
            f
        );
    }

    #[test]
    fn absent_values_are_absent_keys() {
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, &FunctionWire::from(&function())).unwrap();
        let map: std::collections::HashMap<String, zbus::zvariant::OwnedValue> =
            bytes.deserialize().unwrap().0;
        assert!(map.contains_key("driver_override"));
        assert!(!map.contains_key("driver"));
        assert!(!map.contains_key("numa_node"));
        assert!(!map.contains_key("sriov_total_vfs"));
    }

    #[test]
    fn groups_status_and_changes_survive_the_wire() {
        let group = IommuGroup {
            id: 3,
            members: vec!["0000:00:1f.0".parse().unwrap()],
            domain_type: None,
            viable: false,
            blockers: vec![GroupBlocker {
                member: "0000:00:1f.0".into(),
                driver: "lpc_ich".into(),
            }],
        };
        assert_eq!(
            IommuGroup::try_from(round_trip(&GroupWire::from(&group))).unwrap(),
            group
        );
        let status = Status {
            version: "0.1.0".into(),
            uptime_secs: 42,
            assignments: vec![Assignment {
                address: "0000:01:00.0".parse().unwrap(),
                identity: DeviceIdentity {
                    vendor_id: 1,
                    device_id: 2,
                    subsystem_vendor_id: 3,
                    subsystem_device_id: 4,
                },
                previous_driver: Some("igb".into()),
                persistent: true,
                refused: None,
            }],
            last_errors: vec!["x".into()],
        };
        assert_eq!(
            Status::try_from(round_trip(&StatusWire::from(&status))).unwrap(),
            status
        );
        let change = Change {
            address: "0000:01:00.0".parse().unwrap(),
            old_driver: Some("igb".into()),
            new_driver: None,
        };
        assert_eq!(
            Change::try_from(round_trip(&ChangeWire::from(&change))).unwrap(),
            change
        );
    }

    #[test]
    fn a_malformed_address_from_the_daemon_is_an_error() {
        let wire = FunctionWire {
            address: "../x".into(),
            ..FunctionWire::default()
        };
        let err = PciFunction::try_from(wire).unwrap_err();
        assert!(err.to_string().contains("malformed function address"));
    }
}
