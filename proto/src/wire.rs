//! The D-Bus wire form of the model types of [`crate::device`], [`crate::ops`] and
//! [`crate::host`] (which are also what `--json` prints).
//!
//! One model type per concept: each result travels as an `a{sv}` dictionary made from the same
//! serde form `--json` prints ([`to_dict`]), keyed by the same snake_case names; a `None` is an
//! absent key, nested structs are `a{sv}` too and lists are `av`. Integers travel as `t` (or `x`
//! when negative). The client turns a dictionary back into the model type ([`from_dict`]), which
//! parses every address again, so a client never trusts an unparsed address. The one exception
//! is `ListFunctions` ([`FunctionRow`]), whose struct rows exist for a measured reason.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zbus::zvariant::{Array, Dict as ZDict, OwnedValue, Signature, Str, Type, Value};

use crate::{AddressError, PciAddress, PciFunction, SriovPf, VfOf};

/// An `a{sv}` result.
pub type Dict = HashMap<String, OwnedValue>;

/// A reply the daemon sent that does not describe what it should (or a value that cannot be
/// put on the wire).
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
    #[error(transparent)]
    Shape(#[from] serde_json::Error),
    #[error("{0}")]
    Other(String),
}

fn address(field: &'static str, text: &str) -> Result<PciAddress, WireError> {
    text.parse().map_err(|e: AddressError| WireError {
        field,
        source: e.into(),
    })
}

fn other(field: &'static str, why: impl Into<String>) -> WireError {
    WireError {
        field,
        source: WireCause::Other(why.into()),
    }
}

/// `value` as an `a{sv}` dictionary: its serde (JSON) form, field by field. `value` must
/// serialize as a struct (a JSON object).
pub fn to_dict<T: Serialize>(value: &T) -> Result<Dict, WireError> {
    let json = serde_json::to_value(value).map_err(|e| WireError {
        field: "reply",
        source: e.into(),
    })?;
    let serde_json::Value::Object(map) = json else {
        return Err(other("reply", "not a struct"));
    };
    let mut dict = Dict::with_capacity(map.len());
    for (key, value) in map {
        if let Some(value) = to_value(value) {
            let owned = OwnedValue::try_from(value).map_err(|e| other("reply", e.to_string()))?;
            dict.insert(key, owned);
        }
    }
    Ok(dict)
}

/// A dictionary [`to_dict`] made, back as the model type. `what` names it in errors.
pub fn from_dict<T: DeserializeOwned>(what: &'static str, dict: Dict) -> Result<T, WireError> {
    let mut map = serde_json::Map::with_capacity(dict.len());
    for (key, value) in dict {
        map.insert(key, to_json(what, &value)?);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| WireError {
        field: what,
        source: e.into(),
    })
}

/// Each dictionary of a list, back as the model type.
pub fn from_dicts<T: DeserializeOwned>(
    what: &'static str,
    dicts: Vec<Dict>,
) -> Result<Vec<T>, WireError> {
    dicts.into_iter().map(|d| from_dict(what, d)).collect()
}

/// Each item of a list as a dictionary.
pub fn to_dicts<T: Serialize>(values: &[T]) -> Result<Vec<Dict>, WireError> {
    values.iter().map(to_dict).collect()
}

/// A JSON value as a D-Bus value; `None` for null (an absent key).
fn to_value(json: serde_json::Value) -> Option<Value<'static>> {
    use serde_json::Value as J;
    Some(match json {
        J::Null => return None,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Value::U64(u),
            (None, Some(i)) => Value::I64(i),
            _ => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::Str(Str::from(s)),
        J::Array(items) => {
            let mut array = Array::new(&Signature::Variant);
            for item in items {
                // A null inside a list has no D-Bus form; lists of the model have none.
                if let Some(v) = to_value(item) {
                    // Cannot fail: every element is a variant.
                    let _ = array.append(Value::Value(Box::new(v)));
                }
            }
            Value::Array(array)
        }
        J::Object(map) => {
            let mut dict = ZDict::new(&Signature::Str, &Signature::Variant);
            for (key, value) in map {
                if let Some(v) = to_value(value) {
                    let _ = dict.append(Value::Str(Str::from(key)), Value::Value(Box::new(v)));
                }
            }
            Value::Dict(dict)
        }
    })
}

/// A D-Bus value as JSON, whatever its exact type.
fn to_json(what: &'static str, value: &Value<'_>) -> Result<serde_json::Value, WireError> {
    use serde_json::Value as J;
    Ok(match value {
        Value::U8(n) => J::from(*n),
        Value::Bool(b) => J::Bool(*b),
        Value::I16(n) => J::from(*n),
        Value::U16(n) => J::from(*n),
        Value::I32(n) => J::from(*n),
        Value::U32(n) => J::from(*n),
        Value::I64(n) => J::from(*n),
        Value::U64(n) => J::from(*n),
        Value::F64(n) => J::from(*n),
        Value::Str(s) => J::String(s.to_string()),
        Value::Signature(s) => J::String(s.to_string()),
        Value::ObjectPath(p) => J::String(p.to_string()),
        Value::Value(inner) => to_json(what, inner)?,
        Value::Array(array) => J::Array(
            array
                .inner()
                .iter()
                .map(|v| to_json(what, v))
                .collect::<Result<_, _>>()?,
        ),
        Value::Dict(dict) => {
            let mut map = serde_json::Map::new();
            for (k, v) in dict.iter() {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    other => to_json(what, other)?.to_string(),
                };
                map.insert(key, to_json(what, v)?);
            }
            J::Object(map)
        }
        Value::Structure(s) => J::Array(
            s.fields()
                .iter()
                .map(|v| to_json(what, v))
                .collect::<Result<_, _>>()?,
        ),
        #[allow(unreachable_patterns)]
        _ => return Err(other(what, "a value of a type the daemon never sends")),
    })
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
    pub in_use_by: String,
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
            in_use_by: text(&f.in_use_by),
        }
    }
}

impl TryFrom<FunctionRow> for PciFunction {
    type Error = WireError;

    /// A row's placeholders ("" and -1, totals of 0) become absent values again.
    fn try_from(r: FunctionRow) -> Result<Self, WireError> {
        let text = |v: String| (!v.is_empty()).then_some(v);
        let number = |field: &'static str, v: i64| -> Result<Option<u32>, WireError> {
            match v {
                -1 => Ok(None),
                n => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| other(field, format!("value {n}"))),
            }
        };
        let sriov = (r.sriov_total_vfs > 0).then_some(SriovPf {
            total_vfs: r.sriov_total_vfs,
            num_vfs: r.sriov_num_vfs,
            drivers_autoprobe: r.sriov_drivers_autoprobe,
        });
        let vf_of = match text(r.vf_pf) {
            Some(pf) => Some(VfOf {
                pf: address("VF's PF address", &pf)?,
                index: r.vf_index,
            }),
            None => None,
        };
        Ok(Self {
            address: address("function address", &r.address)?,
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
            sriov,
            vf_of,
            in_use_by: text(r.in_use_by),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        ApplyReport, Assignment, Change, DeviceIdentity, GroupBlocker, IommuGroup, PlannedChange,
        Refusal, Status, VfInfo,
    };
    use zbus::zvariant::serialized::Context;
    use zbus::zvariant::{LE, to_bytes};

    /// Through D-Bus bytes and back, as a reply travels.
    fn round_trip<T: Serialize + DeserializeOwned>(value: &T) -> T {
        let dict = to_dict(value).unwrap();
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, &dict).unwrap();
        let back: Dict = bytes.deserialize().unwrap().0;
        from_dict("test value", back).unwrap()
    }

    fn function() -> PciFunction {
        PciFunction {
            address: "0000:01:10.2".parse().unwrap(),
            vendor_id: 0x8086,
            device_id: 0x10ca,
            subsystem_vendor_id: 0x8086,
            subsystem_device_id: 0,
            class: 0x020000,
            vendor_name: Some("Intel Corporation".into()),
            device_name: None,
            class_name: Some("Ethernet controller".into()),
            driver: None,
            driver_override: Some("vfio-pci".into()),
            iommu_group: Some(17),
            numa_node: None,
            boot_vga: false,
            sriov: None,
            vf_of: Some(VfOf {
                pf: "0000:01:00.0".parse().unwrap(),
                index: 1,
            }),
            in_use_by: Some("qemu-system-x86 (pid 4242, VM win11)".into()),
        }
    }

    #[test]
    fn signatures_are_dicts_and_rows() {
        assert_eq!(Dict::SIGNATURE.to_string(), "a{sv}");
        assert_eq!(FunctionRow::SIGNATURE.to_string(), "(sqqqqusssssxxbuubsus)");
    }

    #[test]
    fn a_function_survives_a_list_row_and_a_dict() {
        let f = function();
        assert_eq!(PciFunction::try_from(FunctionRow::from(&f)).unwrap(), f);
        let mut pf = f.clone();
        pf.vf_of = None;
        pf.sriov = Some(SriovPf {
            total_vfs: 7,
            num_vfs: 0,
            drivers_autoprobe: false,
        });
        pf.iommu_group = None;
        assert_eq!(PciFunction::try_from(FunctionRow::from(&pf)).unwrap(), pf);
        assert_eq!(round_trip(&f), f);
        assert_eq!(round_trip(&pf), pf);
    }

    #[test]
    fn absent_values_are_absent_keys() {
        let dict = to_dict(&function()).unwrap();
        assert!(dict.contains_key("driver_override"));
        assert!(!dict.contains_key("driver"));
        assert!(!dict.contains_key("numa_node"));
        assert!(!dict.contains_key("sriov"));
    }

    #[test]
    fn every_model_type_survives_the_wire() {
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
        assert_eq!(round_trip(&group), group);
        let status = Status {
            version: "0.1.0".into(),
            uptime_secs: 42,
            assignments: vec![Assignment {
                address: "0000:01:00.0".parse().unwrap(),
                vf: None,
                identity: DeviceIdentity {
                    vendor_id: 1,
                    device_id: 2,
                    subsystem_vendor_id: 3,
                    subsystem_device_id: 4,
                },
                previous_driver: Some("igb".into()),
                persistent: true,
                sources: vec!["request".into(), "config".into()],
                refused: None,
                state: Some("drift: on igb".into()),
            }],
            vf_sets: Vec::new(),
            config: None,
            refused: vec![Refusal {
                entry: "[[device]] 0000:02:00.0 (line 4)".into(),
                function: Some("0000:02:00.0".into()),
                reason: "the address holds 15b3:1017".into(),
            }],
            leases: vec![crate::LeaseInfo {
                owner: "libvirt:vm1".parse().unwrap(),
                functions: vec!["0000:01:10.0".into()],
                age_secs: 3,
                stale: None,
            }],
            hotplug: vec!["0000:01:10.0 appeared: claimed".into()],
            pending: vec!["assign (IOMMU group 4): pending".into()],
            unfinished: Vec::new(),
            last_errors: vec!["x".into()],
        };
        assert_eq!(round_trip(&status), status);
        let change = Change {
            address: "0000:01:00.0".parse().unwrap(),
            old_driver: Some("igb".into()),
            new_driver: None,
        };
        assert_eq!(round_trip(&change), change);
        let vf = VfInfo {
            index: 2,
            address: "0000:01:10.4".parse().unwrap(),
            driver: Some("vfio-pci".into()),
            iommu_group: Some(20),
            assigned: true,
            in_use_by: Some("qemu (pid 7)".into()),
        };
        assert_eq!(round_trip(&vf), vf);
        let report = ApplyReport {
            dry_run: true,
            changes: vec![PlannedChange {
                entry: "[[device]] 0000:01:00.0 (line 3)".into(),
                function: "0000:01:00.0".into(),
                from: Some("igb".into()),
                to: Some("vfio-pci".into()),
            }],
            refused: vec![Refusal {
                entry: "x".into(),
                function: None,
                reason: "y".into(),
            }],
            ..ApplyReport::default()
        };
        assert_eq!(round_trip(&report), report);
    }

    #[test]
    fn a_malformed_address_from_the_daemon_is_an_error() {
        let row = FunctionRow {
            address: "../x".into(),
            ..FunctionRow::default()
        };
        let err = PciFunction::try_from(row).unwrap_err();
        assert!(err.to_string().contains("malformed function address"));
        let mut dict = to_dict(&function()).unwrap();
        dict.insert(
            "address".into(),
            OwnedValue::try_from(Value::from("../x")).unwrap(),
        );
        assert!(from_dict::<PciFunction>("function", dict).is_err());
    }
}
