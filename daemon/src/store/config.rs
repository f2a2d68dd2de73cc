//! The declarative config file, as the daemon holds it: the last good version in force, and the
//! error of the last (re)load when the file on disk is broken.
//!
//! The daemon never writes the admin's file. It keeps a copy of the last good version in its
//! state dir, so a start with a broken (or half-edited) file still knows what the config
//! claimed and does not release it by mistake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use passthroughd_proto::ConfigState;
use passthroughd_proto::config::Config;
use tracing::{info, warn};

use crate::store::atomic::{read_own_file, write_atomic};

/// The copy of the last good config in the state dir.
pub const LAST_GOOD: &str = "last-good-config.toml";

/// The config in force and what the last (re)load said.
#[derive(Debug)]
pub struct ConfigSlot {
    path: PathBuf,
    state_dir: PathBuf,
    /// `None` until a good version was ever read (then nothing the config claims is touched).
    good: Option<Arc<Config>>,
    present: bool,
    error: Option<String>,
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
        let origin = self.path.display().to_string();
        match std::fs::read_to_string(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.good = Some(Arc::new(Config::empty()));
                self.present = false;
                self.error = None;
            }
            Err(e) => {
                self.present = true;
                self.error = Some(format!("reading {origin}: {e}"));
            }
            Ok(text) => {
                self.present = true;
                match Config::parse(&text, &origin) {
                    Ok(config) => {
                        self.good = Some(Arc::new(config));
                        self.error = None;
                        if let Err(e) = write_atomic(&self.state_dir, LAST_GOOD, text.as_bytes()) {
                            warn!(error = %e, "cannot keep a copy of the last good config");
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
