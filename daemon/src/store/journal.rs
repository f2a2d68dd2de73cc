//! The intent journal: before an operation touches sysfs it records what it is about to do
//! (operation, functions, their previous drivers and identities) in its own file under the
//! state dir, written atomically; the file is removed when the operation is over, whether it
//! succeeded or was rolled back. A file still there at start means the daemon died mid-way,
//! and `Manager::open` finishes or undoes it (see `manager::recover`).
//!
//! One file per operation (`journal-PID-N.toml`) because operations on different IOMMU groups
//! run in parallel; names are built from numbers only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use passthroughd_proto::PciAddress;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::store::state::{StoredIdentity, one_line, remove_durably, write_atomic};

const VERSION: i64 = 1;
const PREFIX: &str = "journal-";
const SUFFIX: &str = ".toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Assign,
    Release,
    /// `vf create`: [`Intent::vf`] says what.
    #[serde(rename = "vf-create")]
    VfCreate,
    /// `vf destroy`: [`Intent::vf`] says what.
    #[serde(rename = "vf-destroy")]
    VfDestroy,
}

/// What a VF operation is about to do to a PF, and what to put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfIntent {
    pub pf: PciAddress,
    #[serde(flatten)]
    pub identity: StoredIdentity,
    /// The count asked for (0 for destroy).
    pub count: u32,
    /// VF indexes that go to vfio-pci.
    #[serde(default)]
    pub assign: Vec<u32>,
    /// `sriov_numvfs` and `sriov_drivers_autoprobe` before the operation.
    pub previous_count: u32,
    pub previous_autoprobe: bool,
}

/// One function an operation moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentFunction {
    pub address: PciAddress,
    #[serde(flatten)]
    pub identity: StoredIdentity,
    /// The driver it had before the assignment (assign: now; release: as recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_driver: Option<String>,
}

/// What an operation is about to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub version: i64,
    pub operation: Operation,
    /// Assign: the result goes into state.toml. Release: it comes out of state.toml.
    pub persistent: bool,
    #[serde(default, rename = "function")]
    pub functions: Vec<IntentFunction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf: Option<VfIntent>,
}

impl Intent {
    pub fn new(operation: Operation, persistent: bool, functions: Vec<IntentFunction>) -> Self {
        Self {
            version: VERSION,
            operation,
            persistent,
            functions,
            vf: None,
        }
    }

    /// A VF operation on one PF.
    pub fn for_vfs(operation: Operation, persistent: bool, vf: VfIntent) -> Self {
        Self {
            version: VERSION,
            operation,
            persistent,
            functions: Vec::new(),
            vf: Some(vf),
        }
    }
}

/// A recorded intent; [`JournalEntry::finish`] removes it.
#[derive(Debug)]
pub struct JournalEntry {
    dir: PathBuf,
    name: String,
}

/// A leftover journal file and its intent, or why it could not be read.
pub type Pending = (JournalEntry, Result<Intent, String>);

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl JournalEntry {
    /// Records `intent` durably. Nothing may touch sysfs before this returns `Ok`.
    pub fn begin(dir: &Path, intent: &Intent) -> Result<Self, Error> {
        let name = format!(
            "{PREFIX}{}-{}{SUFFIX}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let text = toml::to_string(intent)
            .map_err(|e| Error::Failed(format!("encoding the journal: {e}")))?;
        write_atomic(dir, &name, text.as_bytes()).map_err(|e| {
            Error::Failed(format!(
                "recording the operation in {}: {e}; nothing was changed",
                dir.display()
            ))
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            name,
        })
    }

    /// The operation is over (done or undone): forget it.
    pub fn finish(self) -> Result<(), Error> {
        remove_durably(&self.dir, &self.name).map_err(|e| {
            Error::Failed(format!(
                "removing journal {} in {}: {e}",
                self.name,
                self.dir.display()
            ))
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An entry recovery cannot act on: renamed out of the way (kept for the admin to read)
    /// so the next start does not trip over it again.
    pub fn set_aside(self) -> Result<(), Error> {
        let from = self.dir.join(&self.name);
        let to = self.dir.join(format!("{}.unreadable", self.name));
        std::fs::rename(&from, &to)
            .map_err(|e| Error::Failed(format!("setting aside {}: {e}", from.display())))
    }
}

/// Journal files left by a previous run, oldest first, each with its intent or why it could
/// not be read. Recovery handles each, then calls [`JournalEntry::finish`] on the handle.
pub fn pending(dir: &Path) -> Result<Vec<Pending>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Failed(format!("reading {}: {e}", dir.display()))),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !(name.starts_with(PREFIX) && name.ends_with(SUFFIX)) {
            continue;
        }
        let modified = entry.metadata().and_then(|m| m.modified()).ok();
        let intent = std::fs::read_to_string(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|text| toml::from_str::<Intent>(&text).map_err(|e| one_line(&e)))
            .and_then(|i| {
                if i.version == VERSION {
                    Ok(i)
                } else {
                    Err(format!("journal format version {}", i.version))
                }
            });
        found.push((modified, name, intent));
    }
    found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(found
        .into_iter()
        .map(|(_, name, intent)| {
            (
                JournalEntry {
                    dir: dir.to_owned(),
                    name,
                },
                intent,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use passthroughd_proto::DeviceIdentity;

    #[test]
    fn intents_survive_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let intent = Intent::new(
            Operation::Assign,
            true,
            vec![IntentFunction {
                address: "0000:01:00.0".parse().unwrap(),
                identity: StoredIdentity(DeviceIdentity {
                    vendor_id: 0x8086,
                    device_id: 0x10d3,
                    subsystem_vendor_id: 0x8086,
                    subsystem_device_id: 0xa01f,
                }),
                previous_driver: Some("e1000e".into()),
            }],
        );
        let entry = JournalEntry::begin(dir.path(), &intent).unwrap();
        let found = pending(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1.as_ref().unwrap(), &intent);
        entry.finish().unwrap();
        assert!(pending(dir.path()).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
