//! `state.toml`: what the daemon was asked to keep, re-applied at every start.
//!
//! ```toml
//! version = 3
//!
//! [[assignment]]                 # a function that is not a VF
//! address = "0000:01:00.0"
//! vendor_id = "8086"
//! device_id = "10c9"
//! subsystem_vendor_id = "8086"
//! subsystem_device_id = "a03c"
//! previous_driver = "igb"
//! source = "request"             # `assign` without --runtime; "config"; or "lease" with
//!                                # owner = "libvirt:vm1" and boot_id (the boot it was taken in)
//!
//! [[vfs]]                        # VFs of one PF, by index: never by their own addresses
//! pf = "0000:05:00.0"
//! vendor_id = "8086"             # the PF's ids: a VF is recognized through its PF
//! device_id = "10c9"
//! subsystem_vendor_id = "8086"
//! subsystem_device_id = "a03c"
//! count = 4                      # VFs this source created (absent: it only assigns VFs)
//! assigned = [0, 1, 2, 3]        # VF indexes on vfio-pci
//! source = "request"
//! ```
//!
//! One entry per (function or PF, source): a function claimed by a request and by the config
//! has two entries and stays assigned until both let go.
//!
//! The daemon is the only writer. Every write is atomic ([`write_atomic`]), so a crash leaves
//! either the old or the new file. A file with a version we do not know is an error and is
//! never overwritten: a newer daemon wrote it.

use std::path::{Path, PathBuf};

use passthroughd_proto::{DeviceIdentity, LeaseOwner, PciAddress};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::store::atomic::{one_line, read_own_file, write_atomic};

pub const STATE_FILE: &str = "state.toml";
/// Version 3 stores VF assignments by (PF, index) and says where each entry comes from;
/// version 2 added `[[vfs]]`. Older files are read (every entry a request) and written back
/// as version 3, which older daemons refuse rather than misread.
pub const STATE_VERSION: i64 = 3;
const READABLE_VERSIONS: &[i64] = &[1, 2, 3];

/// Who asked for a stored entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `assign` or `vf create` without `--runtime`.
    #[default]
    Request,
    /// An entry of the declarative config (kept so that removing the entry releases it).
    Config,
    /// A lease (`owner`), valid only during the boot it was taken in (`boot_id`).
    Lease,
}

/// VFs of one PF: the count a source created and the VF indexes it assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVfs {
    pub pf: PciAddress,
    #[serde(flatten)]
    pub identity: StoredIdentity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default)]
    pub assigned: Vec<u32>,
    #[serde(default)]
    pub source: Source,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<LeaseOwner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// One stored assignment of a function that is not a VF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAssignment {
    pub address: PciAddress,
    #[serde(flatten)]
    pub identity: StoredIdentity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_driver: Option<String>,
    #[serde(default)]
    pub source: Source,
    /// For a lease: who holds it, and the boot it was taken in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<LeaseOwner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// Ids as 4-digit hex strings, the way `lspci -n` shows them, so the file reads naturally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HexIdentity", into = "HexIdentity")]
pub struct StoredIdentity(pub DeviceIdentity);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HexIdentity {
    vendor_id: String,
    device_id: String,
    subsystem_vendor_id: String,
    subsystem_device_id: String,
}

impl From<StoredIdentity> for HexIdentity {
    fn from(StoredIdentity(id): StoredIdentity) -> Self {
        Self {
            vendor_id: format!("{:04x}", id.vendor_id),
            device_id: format!("{:04x}", id.device_id),
            subsystem_vendor_id: format!("{:04x}", id.subsystem_vendor_id),
            subsystem_device_id: format!("{:04x}", id.subsystem_device_id),
        }
    }
}

impl TryFrom<HexIdentity> for StoredIdentity {
    type Error = String;
    fn try_from(h: HexIdentity) -> Result<Self, String> {
        let id = |name: &str, text: &str| {
            u16::from_str_radix(text.trim_start_matches("0x"), 16)
                .map_err(|_| format!("{name} {text:?} is not a 16-bit hex id"))
        };
        Ok(Self(DeviceIdentity {
            vendor_id: id("vendor_id", &h.vendor_id)?,
            device_id: id("device_id", &h.device_id)?,
            subsystem_vendor_id: id("subsystem_vendor_id", &h.subsystem_vendor_id)?,
            subsystem_device_id: id("subsystem_device_id", &h.subsystem_device_id)?,
        }))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    version: i64,
    #[serde(default, rename = "assignment", skip_serializing_if = "Vec::is_empty")]
    assignments: Vec<StoredAssignment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    vfs: Vec<StoredVfs>,
}

/// The stored entries, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub assignments: Vec<StoredAssignment>,
    pub vfs: Vec<StoredVfs>,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Reads `state.toml`; an absent file is an empty state.
    pub fn load(state_dir: &Path) -> Result<Self, StoreError> {
        let path = Self::path(state_dir);
        match read_own_file(&path)? {
            Some(text) => Self::parse(&text, &path),
            None => Ok(Self::default()),
        }
    }

    /// The state in `text`, the contents of `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, StoreError> {
        let bad = |why: String| StoreError::Unusable {
            path: path.to_owned(),
            why,
        };
        // Check the version before the schema: a newer layout must be named as such.
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(one_line(&e)))?;
        match table.get("version").and_then(toml::Value::as_integer) {
            Some(v) if READABLE_VERSIONS.contains(&v) => {}
            Some(v) => {
                return Err(bad(format!(
                    "format version {v}, this passthroughd understands version \
                     {STATE_VERSION}; it was left untouched (upgrade passthroughd or move it away)"
                )));
            }
            None => return Err(bad("no format version".into())),
        }
        let file: StateFile = toml::from_str(text).map_err(|e| bad(one_line(&e)))?;
        let mut state = Self {
            assignments: file.assignments,
            vfs: file.vfs,
        };
        state.sort();
        Ok(state)
    }

    fn sort(&mut self) {
        self.assignments
            .sort_by(|a, b| (a.address, a.source, &a.owner).cmp(&(b.address, b.source, &b.owner)));
        self.vfs.sort_by(|a, b| {
            (a.pf, a.source, a.count.is_none(), &a.owner).cmp(&(
                b.pf,
                b.source,
                b.count.is_none(),
                &b.owner,
            ))
        });
    }

    /// The text of `state.toml`, entries sorted (what [`Self::parse`] reads back as `self`).
    pub fn to_toml(&self) -> Result<String, String> {
        let mut sorted = self.clone();
        sorted.sort();
        let file = StateFile {
            version: STATE_VERSION,
            assignments: sorted.assignments,
            vfs: sorted.vfs,
        };
        toml::to_string(&file).map_err(|e| format!("cannot encode it: {e}"))
    }

    /// Writes `state.toml` atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), StoreError> {
        let path = Self::path(state_dir);
        let text = self.to_toml().map_err(|why| StoreError::Unusable {
            path: path.clone(),
            why,
        })?;
        write_atomic(state_dir, STATE_FILE, text.as_bytes()).map_err(|source| StoreError::Io {
            what: "writing",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    use super::*;

    fn identity() -> StoredIdentity {
        StoredIdentity(DeviceIdentity {
            vendor_id: 0x8086,
            device_id: 0x10c9,
            subsystem_vendor_id: 0x8086,
            subsystem_device_id: 0xa03c,
        })
    }

    fn entry(address: &str, source: Source) -> StoredAssignment {
        StoredAssignment {
            address: address.parse().unwrap(),
            identity: identity(),
            previous_driver: Some("igb".into()),
            source,
            owner: None,
            boot_id: None,
        }
    }

    #[test]
    fn round_trips_sorted_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), State::default());
        let state = State {
            assignments: vec![
                entry("0000:02:00.0", Source::Request),
                entry("0000:01:00.0", Source::Config),
                entry("0000:01:00.0", Source::Request),
            ],
            vfs: vec![StoredVfs {
                pf: "0000:05:00.0".parse().unwrap(),
                identity: identity(),
                count: None,
                assigned: vec![2],
                source: Source::Request,
                owner: None,
                boot_id: None,
            }],
        };
        state.save(dir.path()).unwrap();
        let loaded = State::load(dir.path()).unwrap();
        let order: Vec<_> = loaded
            .assignments
            .iter()
            .map(|a| (a.address.to_string(), a.source))
            .collect();
        assert_eq!(
            order,
            [
                ("0000:01:00.0".to_owned(), Source::Request),
                ("0000:01:00.0".to_owned(), Source::Config),
                ("0000:02:00.0".to_owned(), Source::Request)
            ]
        );
        assert_eq!(loaded.vfs, state.vfs);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![STATE_FILE.to_owned()]);
        let text = std::fs::read_to_string(State::path(dir.path())).unwrap();
        assert!(text.starts_with("version = 3\n"), "{text}");
        assert!(text.contains("vendor_id = \"8086\""), "{text}");
        assert!(text.contains("previous_driver = \"igb\""), "{text}");
        assert!(text.contains("source = \"config\""), "{text}");
        assert!(!text.contains("count"), "no count: only assigned: {text}");
    }

    #[test]
    fn versions_1_and_2_are_read_as_requests() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = "version = 1\n\n[[assignment]]\naddress = \"0000:01:00.0\"\nvendor_id = \"8086\"\n\
                  device_id = \"10c9\"\nsubsystem_vendor_id = \"8086\"\nsubsystem_device_id = \"a03c\"\n";
        std::fs::write(State::path(dir.path()), v1).unwrap();
        let state = State::load(dir.path()).unwrap();
        assert_eq!(state.assignments.len(), 1);
        assert_eq!(state.assignments[0].source, Source::Request);
        let v2 = "version = 2\n\n[[vfs]]\npf = \"0000:01:00.0\"\nvendor_id = \"8086\"\n\
                  device_id = \"10c9\"\nsubsystem_vendor_id = \"8086\"\nsubsystem_device_id = \"a03c\"\n\
                  count = 4\nassigned = [0, 2]\n";
        std::fs::write(State::path(dir.path()), v2).unwrap();
        let state = State::load(dir.path()).unwrap();
        assert_eq!(state.vfs[0].count, Some(4));
        assert_eq!(state.vfs[0].assigned, [0, 2]);
        assert_eq!(state.vfs[0].source, Source::Request);
        state.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(State::path(dir.path())).unwrap();
        assert!(text.starts_with("version = 3\n"), "{text}");
        assert_eq!(State::load(dir.path()).unwrap(), state);
    }

    /// A valid file of two entries, for the damage below.
    const GOOD: &str = "version = 3\n\n[[assignment]]\naddress = \"0000:01:00.0\"\n\
        vendor_id = \"8086\"\ndevice_id = \"10c9\"\nsubsystem_vendor_id = \"8086\"\n\
        subsystem_device_id = \"a03c\"\nprevious_driver = \"igb\"\nsource = \"request\"\n\n\
        [[vfs]]\npf = \"0000:05:00.0\"\nvendor_id = \"8086\"\ndevice_id = \"10c9\"\n\
        subsystem_vendor_id = \"8086\"\nsubsystem_device_id = \"a03c\"\ncount = 4\n\
        assigned = [0, 1]\nsource = \"config\"\n";

    /// Loads `bytes` as state.toml: a state, or one line that names the file.
    fn load_or_one_line(bytes: &[u8]) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(State::path(dir.path()), bytes).unwrap();
        if let Err(e) = State::load(dir.path()) {
            let line = e.to_string();
            prop_assert!(!line.contains('\n'), "{line}");
            prop_assert!(line.contains(STATE_FILE), "{line}");
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            load_or_one_line(&bytes)?;
        }

        #[test]
        fn a_damaged_file_loads_or_fails_in_one_line(
            cut in 0..GOOD.len(),
            at in 0..GOOD.len(),
            byte in any::<u8>(),
        ) {
            let mut bytes = GOOD.as_bytes()[..cut.max(1)].to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            load_or_one_line(&bytes)?;
        }
    }

    #[test]
    fn the_damage_base_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(State::path(dir.path()), GOOD).unwrap();
        let state = State::load(dir.path()).unwrap();
        assert_eq!((state.assignments.len(), state.vfs.len()), (1, 1));
    }

    #[test]
    fn unknown_versions_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = State::path(dir.path());
        std::fs::write(&path, "version = 4\n[[assignment]]\nwhatever = 1\n").unwrap();
        let err = State::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("version 4"), "{err}");
        assert!(!err.contains('\n'));
        std::fs::write(&path, "[[assignment]]\n").unwrap();
        assert!(
            State::load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("no format version")
        );
        std::fs::write(&path, "version = 1\n[[assignment]]\naddress = \"../x\"\n").unwrap();
        assert!(State::load(dir.path()).is_err());
    }
}
