//! `state.toml`: the persistent assignments, re-applied at every start.
//!
//! ```toml
//! version = 1
//!
//! [[assignment]]
//! address = "0000:01:00.0"
//! vendor_id = "8086"
//! device_id = "10c9"
//! subsystem_vendor_id = "8086"
//! subsystem_device_id = "a03c"
//! previous_driver = "igb"
//!
//! [[vfs]]
//! pf = "0000:01:00.0"
//! vendor_id = "8086"
//! device_id = "10c9"
//! subsystem_vendor_id = "8086"
//! subsystem_device_id = "a03c"
//! count = 4
//! assigned = [0, 1, 2, 3]
//! ```
//!
//! The daemon is the only writer. Every write is atomic (temp file in the same directory,
//! fsync, rename, fsync the directory), so a crash leaves either the old or the new file. A file
//! with a version we do not know is an error and is never overwritten: a newer daemon wrote it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use passthroughd_proto::{DeviceIdentity, PciAddress};
use serde::{Deserialize, Serialize};

use crate::error::Error;

pub const STATE_FILE: &str = "state.toml";
/// Version 2 added `[[vfs]]`; version 1 files (assignments only) are read as they are and
/// written back as version 2. The bump keeps an older daemon from silently dropping VFs.
pub const STATE_VERSION: i64 = 2;
const READABLE_VERSIONS: &[i64] = &[1, 2];

/// The VFs a persistent `vf create` made: recorded by the PF's address and identity, the count
/// and the VF indexes on vfio-pci, never by the VFs' own addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVfs {
    pub pf: PciAddress,
    #[serde(flatten)]
    pub identity: StoredIdentity,
    pub count: u32,
    #[serde(default)]
    pub assigned: Vec<u32>,
}

/// One persistent assignment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAssignment {
    pub address: PciAddress,
    #[serde(flatten)]
    pub identity: StoredIdentity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_driver: Option<String>,
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
    #[serde(default, rename = "assignment")]
    assignments: Vec<StoredAssignment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    vfs: Vec<StoredVfs>,
}

/// The persisted assignments, sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub assignments: Vec<StoredAssignment>,
    /// Persistent VFs, sorted by PF address.
    pub vfs: Vec<StoredVfs>,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Reads `state.toml`; an absent file is an empty state.
    pub fn load(state_dir: &Path) -> Result<Self, Error> {
        let path = Self::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::Failed(format!("reading {}: {e}", path.display()))),
        };
        let bad = |why: String| Error::Failed(format!("{} is unusable: {why}", path.display()));
        // Check the version before the schema: a newer layout must be named as such.
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(one_line(&e)))?;
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
        let file: StateFile = toml::from_str(&text).map_err(|e| bad(one_line(&e)))?;
        let mut assignments = file.assignments;
        assignments.sort_by_key(|a| a.address);
        let mut vfs = file.vfs;
        vfs.sort_by_key(|v| v.pf);
        Ok(Self { assignments, vfs })
    }

    /// Writes `state.toml` atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), Error> {
        let file = StateFile {
            version: STATE_VERSION,
            assignments: self.assignments.clone(),
            vfs: self.vfs.clone(),
        };
        let text = toml::to_string(&file)
            .map_err(|e| Error::Failed(format!("encoding {STATE_FILE}: {e}")))?;
        write_atomic(state_dir, STATE_FILE, text.as_bytes()).map_err(|e| {
            Error::Failed(format!(
                "writing {STATE_FILE} in {}: {e}",
                state_dir.display()
            ))
        })
    }

    pub fn get(&self, address: PciAddress) -> Option<&StoredAssignment> {
        self.assignments.iter().find(|a| a.address == address)
    }

    /// Adds or replaces the entry for its address.
    pub fn upsert(&mut self, entry: StoredAssignment) {
        self.assignments.retain(|a| a.address != entry.address);
        self.assignments.push(entry);
        self.assignments.sort_by_key(|a| a.address);
    }

    /// Adds or replaces the VF entry of its PF.
    pub fn upsert_vfs(&mut self, entry: StoredVfs) {
        self.vfs.retain(|v| v.pf != entry.pf);
        self.vfs.push(entry);
        self.vfs.sort_by_key(|v| v.pf);
    }

    pub fn remove_vfs(&mut self, pf: PciAddress) -> bool {
        let before = self.vfs.len();
        self.vfs.retain(|v| v.pf != pf);
        before != self.vfs.len()
    }

    pub fn remove(&mut self, address: PciAddress) -> bool {
        let before = self.assignments.len();
        self.assignments.retain(|a| a.address != address);
        before != self.assignments.len()
    }
}

/// TOML errors span several lines (a source excerpt); our messages are one line.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replaces `dir/name` with `contents` so that a crash leaves the old or the new file: a temp
/// file in the same directory (same filesystem, so rename is atomic), fsync, rename, fsync dir.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    temp.write_all(contents)?;
    temp.as_file().sync_all()?;
    // On error the temp file is removed when the returned error drops it.
    temp.persist(dir.join(name)).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Removes `dir/name` and makes the removal durable; absent is fine.
pub fn remove_durably(dir: &Path, name: &str) -> io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => File::open(dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(address: &str) -> StoredAssignment {
        StoredAssignment {
            address: address.parse().unwrap(),
            identity: StoredIdentity(DeviceIdentity {
                vendor_id: 0x8086,
                device_id: 0x10c9,
                subsystem_vendor_id: 0x8086,
                subsystem_device_id: 0xa03c,
            }),
            previous_driver: Some("igb".into()),
        }
    }

    #[test]
    fn round_trips_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), State::default());
        let mut state = State::default();
        state.upsert(entry("0000:02:00.0"));
        state.upsert(entry("0000:01:00.0"));
        state.save(dir.path()).unwrap();
        state.remove("0000:02:00.0".parse().unwrap());
        state.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), state);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![STATE_FILE.to_owned()]);
        let text = std::fs::read_to_string(State::path(dir.path())).unwrap();
        assert!(text.starts_with("version = 2\n"), "{text}");
        assert!(text.contains("vendor_id = \"8086\""), "{text}");
        assert!(text.contains("previous_driver = \"igb\""), "{text}");
    }

    #[test]
    fn version_1_is_read_and_written_back_as_2_with_vfs() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = "version = 1\n\n[[assignment]]\naddress = \"0000:01:00.0\"\nvendor_id = \"8086\"\n\
                  device_id = \"10c9\"\nsubsystem_vendor_id = \"8086\"\nsubsystem_device_id = \"a03c\"\n";
        std::fs::write(State::path(dir.path()), v1).unwrap();
        let mut state = State::load(dir.path()).unwrap();
        assert_eq!(state.assignments.len(), 1);
        assert!(state.vfs.is_empty());
        state.upsert_vfs(StoredVfs {
            pf: "0000:01:00.0".parse().unwrap(),
            identity: entry("0000:01:00.0").identity,
            count: 4,
            assigned: vec![0, 2],
        });
        state.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(State::path(dir.path())).unwrap();
        assert!(text.starts_with("version = 2\n"), "{text}");
        assert!(text.contains("[[vfs]]"), "{text}");
        assert_eq!(State::load(dir.path()).unwrap(), state);
    }

    #[test]
    fn unknown_versions_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = State::path(dir.path());
        std::fs::write(&path, "version = 3\n[[assignment]]\nwhatever = 1\n").unwrap();
        let err = State::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("version 3"), "{err}");
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
