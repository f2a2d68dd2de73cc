//! The declarative config file, as the daemon holds it: the last good version in force, and the
//! error of the last (re)load when the file on disk is broken.
//!
//! The daemon never writes the admin's file. It keeps a copy of the last good version in its
//! state dir, so a start with a broken (or half-edited) file still knows what the config
//! claimed and does not release it by mistake.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use passthroughd_proto::ConfigState;
use passthroughd_proto::config::Config;
use tracing::{info, warn};

use crate::store::atomic::{read_own_file, write_atomic};

/// The copy of the last good config in the state dir.
pub const LAST_GOOD: &str = "last-good-config.toml";

/// How many times a reload reads a file that changes under it before it gives up.
const READ_TRIES: u32 = 5;
/// A file modified more recently than this may be in the middle of an in-place write.
const SETTLE: Duration = Duration::from_millis(20);

/// The config in force and what the last (re)load said.
#[derive(Debug)]
pub struct ConfigSlot {
    path: PathBuf,
    state_dir: PathBuf,
    /// `None` until a good version was ever read (then nothing the config claims is touched).
    good: Option<Arc<Config>>,
    present: bool,
    error: Option<String>,
    /// The text last copied to [`LAST_GOOD`] by this daemon.
    copied: Option<String>,
}

impl ConfigSlot {
    /// Reads `path` (falling back on the last good copy when it is broken).
    pub fn open(path: &Path, state_dir: &Path) -> Self {
        let mut slot = Self {
            path: path.to_owned(),
            state_dir: state_dir.to_owned(),
            good: None,
            present: false,
            error: None,
            copied: None,
        };
        slot.reload();
        if slot.good.is_none() {
            let copy = state_dir.join(LAST_GOOD);
            if let Ok(Some(text)) = read_own_file(&copy) {
                match Config::parse(&text, &copy.display().to_string()) {
                    Ok(config) => {
                        warn!(config = %slot.path.display(),
                            "the config is broken; the last good copy is in force");
                        slot.good = Some(Arc::new(config));
                    }
                    Err(e) => warn!(error = %e, "the last good copy of the config is broken too"),
                }
            }
        }
        slot
    }

    /// Re-reads the file. A missing file is an empty desired state; a broken or unreadable one
    /// keeps the last good config in force and records why.
    pub fn reload(&mut self) -> ConfigState {
        let read = read_settled(&self.path);
        self.take(read)
    }

    /// The config file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What [`Self::reload`] does with the file once read (by [`read_settled`]).
    pub fn take(&mut self, read: std::io::Result<Option<String>>) -> ConfigState {
        let origin = self.path.display().to_string();
        match read {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.good = Some(Arc::new(Config::empty()));
                self.present = false;
                self.error = None;
            }
            Err(e) => {
                self.present = true;
                self.error = Some(format!("reading {origin}: {e}"));
            }
            Ok(None) => {
                self.present = true;
                self.error = Some(format!(
                    "{origin} kept changing while it was read ({READ_TRIES} tries): the last good \
                     config stays in force; reload once the file is written"
                ));
                warn!(config = %origin, "config changing while read; the last good one stays in force");
            }
            Ok(Some(text)) => {
                self.present = true;
                match Config::parse(&text, &origin) {
                    Ok(config) => {
                        self.good = Some(Arc::new(config));
                        self.error = None;
                        // Only a changed file is copied: a reload of the same file costs no
                        // write and no fsync.
                        if self.copied.as_deref() != Some(text.as_str()) {
                            match write_atomic(&self.state_dir, LAST_GOOD, text.as_bytes()) {
                                Ok(()) => self.copied = Some(text),
                                Err(e) => {
                                    warn!(error = %e, "cannot keep a copy of the last good config")
                                }
                            }
                        }
                        info!(config = %origin, "config loaded");
                    }
                    Err(e) => {
                        warn!(error = %e, "config not loaded; the last good one stays in force");
                        self.error = Some(e.to_string());
                    }
                }
            }
        }
        self.state()
    }

    /// The config in force; `None` when no good version was ever read.
    pub fn good(&self) -> Option<Arc<Config>> {
        self.good.clone()
    }

    pub fn state(&self) -> ConfigState {
        ConfigState {
            path: self.path.display().to_string(),
            present: self.present,
            error: self.error.clone(),
            entries: self.good.as_ref().map_or(0, |c| {
                u32::try_from(c.devices.len() + c.sriov.len()).unwrap_or(u32::MAX)
            }),
        }
    }
}

/// The file's text once it holds still; `None` when it kept changing. A file replaced (another
/// inode at the path) or written in place (size or times moving, or modified within [`SETTLE`])
/// while it is read would hand the parser part of a file, and part of a config can be a valid
/// config with fewer entries, whose devices the next apply would release.
pub fn read_settled(path: &Path) -> std::io::Result<Option<String>> {
    let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
        (
            a.dev(),
            a.ino(),
            a.len(),
            a.mtime(),
            a.mtime_nsec(),
            a.ctime(),
            a.ctime_nsec(),
        ) == (
            b.dev(),
            b.ino(),
            b.len(),
            b.mtime(),
            b.mtime_nsec(),
            b.ctime(),
            b.ctime_nsec(),
        )
    };
    for _ in 0..READ_TRIES {
        let mut file = File::open(path)?;
        let before = file.metadata()?;
        // A modification time in the future (a clock set back) counts as settled.
        let age = before
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or(SETTLE);
        if age < SETTLE {
            std::thread::sleep(SETTLE - age);
            continue;
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let after = file.metadata()?;
        let at_path = std::fs::metadata(path)?;
        if same(&before, &after) && same(&after, &at_path) && text.len() as u64 == after.len() {
            return Ok(Some(text));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    const FIRST: &str = "version = 1\n[[device]]\naddress = \"0000:01:00.0\"\n";
    const SECOND: &str = "[[device]]\naddress = \"0000:02:00.0\"\n";

    #[test]
    fn a_config_written_in_place_during_reloads_is_never_taken_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, format!("{FIRST}{SECOND}")).unwrap();
        let mut slot = ConfigSlot::open(&path, dir.path());
        assert_eq!(slot.state().entries, 2);
        let until = Instant::now() + Duration::from_secs(1);
        let (mut whole, mut refused, mut half) = (0, 0, 0);
        let stalled = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            // An editor writing in place: the first half alone is a valid config of 1 entry.
            scope.spawn(|| {
                while Instant::now() < until {
                    let started = Instant::now();
                    let mut file = File::create(&path).unwrap();
                    file.write_all(FIRST.as_bytes()).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                    file.write_all(SECOND.as_bytes()).unwrap();
                    drop(file);
                    // A writer held up for SETTLE or longer (a loaded machine) is a file at
                    // rest as far as anyone can tell: what the test cannot hold against it.
                    if started.elapsed() >= SETTLE {
                        stalled.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(40));
                }
            });
            while Instant::now() < until {
                let state = slot.reload();
                match state.error {
                    None => whole += 1,
                    // Changing, or empty (truncated, not yet written): both keep the last good.
                    Some(_) => refused += 1,
                }
                if state.entries != 2 {
                    half += 1;
                }
            }
        });
        println!("{whole} reloads read the whole file, {refused} kept the last good one");
        assert!(whole > 0);
        assert!(
            half == 0 || stalled.into_inner(),
            "{half} reloads took a half-written config"
        );
    }

    #[test]
    fn a_config_replaced_by_rename_is_read_whole_old_or_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FIRST).unwrap();
        std::thread::sleep(SETTLE);
        let mut slot = ConfigSlot::open(&path, dir.path());
        assert_eq!(slot.state().entries, 1);
        let new = dir.path().join("config.toml.new");
        std::fs::write(&new, format!("{FIRST}{SECOND}")).unwrap();
        std::fs::rename(&new, &path).unwrap();
        let state = slot.reload();
        assert_eq!((state.error, state.entries), (None, 2));
    }
}
