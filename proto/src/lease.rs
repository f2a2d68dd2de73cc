//! Leases: assignments owned by a named consumer (a libvirt domain, a Kubernetes claim, another
//! VMM), which end when their owner is done, and never outlive a host reboot.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PciAddress;

/// The kind of owner a lease has; it decides when a lease counts as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerKind {
    /// A libvirt domain, by name: stale once no QEMU runs with `-name guest=NAME`.
    Libvirt,
    /// A Kubernetes ResourceClaim, by UID: only kubelet's unprepare ends it.
    K8s,
    /// Any other VMM, by a name of its choosing: never judged stale.
    Vmm,
}

/// Who owns a lease: `libvirt:DOMAIN`, `k8s:CLAIM-UID` or `vmm:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LeaseOwner {
    pub kind: OwnerKind,
    pub name: String,
}

/// The longest owner name accepted (libvirt allows long domain names; nothing needs more).
pub const MAX_OWNER_NAME: usize = 200;

/// Why an owner was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    #[error("an owner is KIND:NAME with KIND libvirt, k8s or vmm, e.g. libvirt:vm1; got {0:?}")]
    Shape(String),
    #[error("the owner name is empty")]
    Empty,
    #[error("the owner name is {0} characters long; at most {MAX_OWNER_NAME}")]
    TooLong(usize),
    #[error(
        "the owner name contains {0:?}, which an owner name may not (no '/', no control characters)"
    )]
    Character(char),
}

impl FromStr for LeaseOwner {
    type Err = OwnerError;

    fn from_str(text: &str) -> Result<Self, OwnerError> {
        let (kind, name) = text
            .split_once(':')
            .ok_or_else(|| OwnerError::Shape(text.chars().take(40).collect()))?;
        let kind = match kind {
            "libvirt" => OwnerKind::Libvirt,
            "k8s" => OwnerKind::K8s,
            "vmm" => OwnerKind::Vmm,
            _ => return Err(OwnerError::Shape(text.chars().take(40).collect())),
        };
        if name.is_empty() {
            return Err(OwnerError::Empty);
        }
        let length = name.chars().count();
        if length > MAX_OWNER_NAME {
            return Err(OwnerError::TooLong(length));
        }
        // Owner names are libvirt domain names, claim UIDs, VMM labels: anything but a path
        // separator or a control character (they end up in logs and status lines).
        if let Some(c) = name.chars().find(|c| *c == '/' || c.is_control()) {
            return Err(OwnerError::Character(c));
        }
        Ok(Self {
            kind,
            name: name.to_owned(),
        })
    }
}

impl TryFrom<String> for LeaseOwner {
    type Error = OwnerError;
    fn try_from(text: String) -> Result<Self, OwnerError> {
        text.parse()
    }
}

impl From<LeaseOwner> for String {
    fn from(owner: LeaseOwner) -> Self {
        owner.to_string()
    }
}

impl fmt::Display for LeaseOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            OwnerKind::Libvirt => "libvirt",
            OwnerKind::K8s => "k8s",
            OwnerKind::Vmm => "vmm",
        };
        write!(f, "{kind}:{}", self.name)
    }
}

/// One lease, as `lease list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub owner: LeaseOwner,
    /// The functions it holds (a VF that does not exist now is named by its PF and index).
    pub functions: Vec<String>,
    /// Seconds since it was taken, while the daemon has known it (0 after a restart).
    pub age_secs: u64,
    /// Why it looks stale (its VM is gone), if it does; `lease end OWNER` ends it.
    pub stale: Option<String>,
}

/// What `libvirt-hook` found in a domain: the PCI functions of `<hostdev managed='no'>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DomainDevices {
    pub domain: String,
    pub functions: Vec<PciAddress>,
    /// `<hostdev managed='yes'>` functions: libvirt's own business, left alone.
    pub managed: Vec<PciAddress>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn owners_parse_strictly_and_print_back() {
        let o: LeaseOwner = "libvirt:win11-gpu".parse().unwrap();
        assert_eq!(o.kind, OwnerKind::Libvirt);
        assert_eq!(o.to_string(), "libvirt:win11-gpu");
        assert_eq!(
            "libvirt:my vm (test)".parse::<LeaseOwner>().unwrap().name,
            "my vm (test)",
            "libvirt allows spaces and brackets in names"
        );
        assert_eq!(
            "k8s:3f2b1c9e-1d2a-4b5c-9e8f-0a1b2c3d4e5f"
                .parse::<LeaseOwner>()
                .unwrap()
                .kind,
            OwnerKind::K8s
        );
        for (bad, error) in [
            ("vm1", OwnerError::Shape("vm1".into())),
            ("xen:vm1", OwnerError::Shape("xen:vm1".into())),
            ("libvirt:", OwnerError::Empty),
            ("libvirt:a/b", OwnerError::Character('/')),
            ("libvirt:a\nb", OwnerError::Character('\n')),
        ] {
            assert_eq!(bad.parse::<LeaseOwner>().unwrap_err(), error, "{bad}");
        }
        let long = format!("vmm:{}", "a".repeat(201));
        assert_eq!(
            long.parse::<LeaseOwner>().unwrap_err(),
            OwnerError::TooLong(201)
        );
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(json, "\"libvirt:win11-gpu\"");
        assert!(serde_json::from_str::<LeaseOwner>("\"libvirt:a/b\"").is_err());
    }
}
