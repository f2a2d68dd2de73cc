//! The journal: before a plan touches sysfs, the executor records it in a file of its own under
//! the state dir, written atomically; the file is removed when the plan is over, done or
//! undone. A file still there at start means the daemon died running it, and recovery finishes
//! or undoes the plan. A journal describes exactly one plan in flight: it is removed before the
//! plan's locks are let go, so a later operation on the same devices never starts while an older
//! journal about them exists, and a restart never replays something already superseded.
//!
//! When a plan starts being undone, its journal is rewritten with `undoing = true`: a crash in
//! the middle of an undo must go on undoing, not finish what was being taken back.
//!
//! One file per plan (`journal-PID-N.json`) because plans on different IOMMU groups run in
//! parallel; names are built from numbers only. JSON because plans are nested enums.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::store::atomic::{read_own_file, remove_durably, write_atomic};

/// Version 2 journals a whole plan; version 1 journals (an intent per operation) are set aside.
const VERSION: i64 = 2;
const PREFIX: &str = "journal-";
const SUFFIX: &str = ".json";

#[derive(Debug, Serialize, Deserialize)]
struct JournalFile<P> {
    version: i64,
    #[serde(default)]
    undoing: bool,
    plan: P,
}

/// A journaled plan; [`JournalEntry::finish`] removes it.
#[derive(Debug)]
pub struct JournalEntry {
    dir: PathBuf,
    name: String,
}

/// A journal file left by a previous run: its plan and whether it was being undone, or why it
/// could not be read.
pub type Pending<P> = (JournalEntry, Result<(P, bool), String>);

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl JournalEntry {
    /// Records `plan` durably. Nothing may touch sysfs before this returns `Ok`.
    pub fn begin<P: Serialize>(dir: &Path, plan: &P) -> Result<Self, StoreError> {
        let name = format!(
            "{PREFIX}{}-{}{SUFFIX}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let entry = Self {
            dir: dir.to_owned(),
            name,
        };
        entry.write(plan, false)?;
        Ok(entry)
    }

    fn write<P: Serialize>(&self, plan: &P, undoing: bool) -> Result<(), StoreError> {
        let path = self.dir.join(&self.name);
        let file = JournalFile {
            version: VERSION,
            undoing,
            plan,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Unusable {
            path: path.clone(),
            why: format!("cannot encode the plan: {e}"),
        })?;
        write_atomic(&self.dir, &self.name, &text).map_err(|source| StoreError::Io {
            what: "recording the operation in",
            path,
            source,
        })
    }

    /// The plan is being undone from here on: a crash must go on undoing it.
    pub fn mark_undoing<P: Serialize>(&self, plan: &P) -> Result<(), StoreError> {
        self.write(plan, true)
    }

    /// The plan is over (done or undone): forget it.
    pub fn finish(&self) -> Result<(), StoreError> {
        remove_durably(&self.dir, &self.name).map_err(|source| StoreError::Io {
            what: "removing the journal",
            path: self.dir.join(&self.name),
            source,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An entry recovery cannot act on: renamed out of the way (kept for the admin to read)
    /// so the next start does not trip over it again.
    pub fn set_aside(self) -> Result<(), StoreError> {
        let from = self.dir.join(&self.name);
        let to = self.dir.join(format!("{}.unreadable", self.name));
        std::fs::rename(&from, &to).map_err(|source| StoreError::Io {
            what: "setting aside",
            path: from,
            source,
        })
    }
}

/// Journal files left by a previous run, oldest first, each with its plan or why it could not
/// be read. Recovery handles each, then calls [`JournalEntry::finish`] on the handle. Files of
/// the journal's first version (`journal-*.toml`) are listed as unreadable.
pub fn pending<P: DeserializeOwned>(dir: &Path) -> Result<Vec<Pending<P>>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                what: "reading",
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let old = name.ends_with(".toml");
        if !(name.starts_with(PREFIX) && (name.ends_with(SUFFIX) || old)) {
            continue;
        }
        let modified = entry.metadata().and_then(|m| m.modified()).ok();
        let plan = if old {
            Err("a journal of an older passthroughd (format version 1)".to_owned())
        } else {
            read(&entry.path())
        };
        found.push((modified, name, plan));
    }
    found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(found
        .into_iter()
        .map(|(_, name, plan)| {
            (
                JournalEntry {
                    dir: dir.to_owned(),
                    name,
                },
                plan,
            )
        })
        .collect())
}

fn read<P: DeserializeOwned>(path: &Path) -> Result<(P, bool), String> {
    let text = match read_own_file(path) {
        Ok(Some(text)) => text,
        Ok(None) => return Err("it disappeared".into()),
        Err(StoreError::Unusable { why, .. }) => return Err(why),
        Err(e) => return Err(e.to_string()),
    };
    parse(&text)
}

/// A journal file's plan and whether it was being undone, or why it cannot be used.
pub fn parse<P: DeserializeOwned>(text: &str) -> Result<(P, bool), String> {
    let version: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match version.get("version").and_then(serde_json::Value::as_i64) {
        Some(VERSION) => {}
        Some(v) => return Err(format!("journal format version {v}")),
        None => return Err("no format version".into()),
    }
    let file: JournalFile<P> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok((file.plan, file.undoing))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Plan {
        steps: Vec<String>,
    }

    #[test]
    fn plans_survive_until_finished_and_remember_an_undo() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan {
            steps: vec!["bind".into()],
        };
        let entry = JournalEntry::begin(dir.path(), &plan).unwrap();
        let found = pending::<Plan>(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1.as_ref().unwrap(), &(plan.clone(), false));
        entry.mark_undoing(&plan).unwrap();
        let found = pending::<Plan>(dir.path()).unwrap();
        assert_eq!(found[0].1.as_ref().unwrap(), &(plan, true));
        entry.finish().unwrap();
        assert!(pending::<Plan>(dir.path()).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    proptest::proptest! {
        /// Whatever a journal file holds, recovery gets its plan or a reason, never a panic.
        #[test]
        fn arbitrary_journal_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("journal-1-0.json"), &bytes).unwrap();
            let found = pending::<Plan>(dir.path()).unwrap();
            proptest::prop_assert_eq!(found.len(), 1);
            if let Err(why) = &found[0].1 {
                proptest::prop_assert!(!why.is_empty());
            }
        }
    }

    #[test]
    fn unreadable_and_old_journals_are_named_not_acted_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal-1-0.json"), "{\"version\": 9}").unwrap();
        std::fs::write(dir.path().join("journal-1-1.toml"), "version = 1").unwrap();
        std::fs::write(dir.path().join("journal-1-2.json"), "garbage").unwrap();
        let found = pending::<Plan>(dir.path()).unwrap();
        assert_eq!(found.len(), 3);
        for (_, plan) in &found {
            assert!(plan.is_err());
        }
        for (entry, _) in found {
            entry.set_aside().unwrap();
        }
        assert!(pending::<Plan>(dir.path()).unwrap().is_empty());
    }
}
