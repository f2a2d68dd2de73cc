//! What the plugin prepared, kept on the node: unprepare must work from local state alone (the
//! claim may be gone from the API server) and after a plugin restart. One JSON file per claim
//! UID, written atomically after the lease is taken and removed after it ends.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cdi::{ClaimInfo, PreparedDevice};

/// A prepared claim: who it is and what it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedClaim {
    pub claim: ClaimInfo,
    pub devices: Vec<PreparedDevice>,
}

/// Why a value kubelet sent was refused before use (it names files and a lease owner).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimIdError {
    #[error("the claim UID {0:?} is not a Kubernetes UID (1 to 64 of a-z, 0-9, '-')")]
    Uid(String),
    #[error(
        "the claim {what} {value:?} is not a Kubernetes name (a DNS label for a namespace, a DNS subdomain for a name)"
    )]
    Name { what: &'static str, value: String },
}

/// Checks a claim's UID, namespace and name: they become file names, a lease owner and API
/// paths, so only what Kubernetes itself allows passes (and nothing that is a path).
pub fn check_claim_id(uid: &str, namespace: &str, name: &str) -> Result<(), ClaimIdError> {
    let uid_ok = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !uid_ok {
        return Err(ClaimIdError::Uid(uid.chars().take(80).collect()));
    }
    for (what, value, ok) in [
        ("namespace", namespace, is_dns_label(namespace)),
        ("name", name, is_dns_subdomain(name)),
    ] {
        if !ok {
            return Err(ClaimIdError::Name {
                what,
                value: value.chars().take(80).collect(),
            });
        }
    }
    Ok(())
}

/// A DNS label (RFC 1123): what Kubernetes allows as a namespace or a request name.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// A DNS subdomain (RFC 1123): dot-separated labels, at most 253 bytes; what Kubernetes allows
/// as an object's name and a driver's.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// The directory of prepared claims.
#[derive(Debug, Clone)]
pub struct ClaimStore {
    dir: PathBuf,
}

impl ClaimStore {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("claims");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// `uid` must have passed [`check_claim_id`].
    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    /// The claim's record; `Ok(None)` when it was never prepared (or is unprepared).
    pub fn get(&self, uid: &str) -> std::io::Result<Option<PreparedClaim>> {
        match std::fs::read(self.path(uid)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", self.path(uid).display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn put(&self, prepared: &PreparedClaim) -> std::io::Result<()> {
        crate::cdi::write_json(&self.path(&prepared.claim.uid), prepared)
    }

    pub fn remove(&self, uid: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(uid)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Every prepared claim (unreadable records are skipped with a warning: one bad file must
    /// not hide the others).
    pub fn all(&self) -> Vec<PreparedClaim> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut claims: Vec<PreparedClaim> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| match std::fs::read(e.path()) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(claim) => Some(claim),
                    Err(err) => {
                        tracing::warn!(file = %e.path().display(), "unreadable claim record: {err}");
                        None
                    }
                },
                Err(_) => None,
            })
            .collect();
        claims.sort_by(|a, b| a.claim.uid.cmp(&b.claim.uid));
        claims
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_kubernetes_shaped_ids_pass() {
        assert!(check_claim_id("0f9e8d7c-1111-2222-3333-444455556666", "vms", "vm1-nic").is_ok());
        for (uid, ns, name) in [
            ("", "vms", "a"),
            ("../../etc", "vms", "a"),
            ("ABC", "vms", "a"),
            (&"a".repeat(65), "vms", "a"),
            ("u1", "", "a"),
            ("u1", "vms", "a/b"),
            ("u1", "vms", ".."),
            ("u1", &"n".repeat(64), "a"),
            ("u1", "a.b", "a"),
            ("u1", "vms", "a..b"),
            ("u1", "vms", "-a"),
            ("u1", "vms", &"n".repeat(254)),
        ] {
            assert!(
                check_claim_id(uid, ns, name).is_err(),
                "{uid:?} {ns:?} {name:?}"
            );
        }
    }
}
