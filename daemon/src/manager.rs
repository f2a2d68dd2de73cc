//! The engine: every operation the daemon offers, as plain blocking calls. The D-Bus service
//! (`service.rs`) is a thin layer over this; tests drive it directly over a simulated kernel.
//!
//! Concurrency contract: methods take `&self`; operations on different IOMMU groups may run in
//! parallel, operations touching the same group are serialized, and `inventory`/`status`
//! never wait for a slow bind. Callers run these on a blocking thread, never on the async
//! dispatch path.

use std::path::PathBuf;
use std::sync::Arc;

use passthroughd_proto::{AssignOptions, Assignment, Change, PciAddress, ReleaseOptions, Status};

use crate::error::Error;
use crate::kernel::Kernel;
use crate::{Inventory, PciIds, SysfsRoot};

/// Who asked, for the log line every mutation writes (authorization happens before this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Unique bus name (`:1.42`), or a fixed label for the daemon's own start-up work.
    pub bus_name: String,
}

/// Everything the engine needs from its environment.
pub struct ManagerConfig {
    pub root: SysfsRoot,
    /// Holds state.toml and the journal.
    pub state_dir: PathBuf,
    /// The one seam for kernel-facing writes.
    pub kernel: Arc<dyn Kernel>,
    pub ids: Arc<PciIds>,
}

impl std::fmt::Debug for ManagerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerConfig")
            .field("root", &self.root)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// What start-up did: journal recovery and persisted assignments re-applied or refused.
#[derive(Debug, Clone, Default)]
pub struct StartupReport {
    pub recovered: Vec<String>,
    pub applied: Vec<PciAddress>,
    pub refused: Vec<(PciAddress, String)>,
}

#[derive(Debug)]
pub struct Manager {
    config: ManagerConfig,
}

impl Manager {
    /// Loads state, finishes or rolls back whatever the journal says was in flight, then
    /// re-applies persisted assignments (refusing any whose address now holds another device).
    pub fn open(config: ManagerConfig) -> Result<(Self, StartupReport), Error> {
        let _ = config;
        todo!("issue 3: engine")
    }

    /// A fresh scan of functions and groups.
    pub fn inventory(&self) -> Result<Inventory, Error> {
        Ok(Inventory::scan(&self.config.root, &self.config.ids)?)
    }

    /// Every assignment the daemon knows of, persistent or runtime.
    pub fn assignments(&self) -> Vec<Assignment> {
        todo!("issue 3: engine")
    }

    /// Binds each function (or with `group`, each function's whole group) to vfio-pci.
    /// All or nothing: on any failure, functions already moved go back to their drivers.
    pub fn assign(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: AssignOptions,
    ) -> Result<Vec<Change>, Error> {
        let _ = (caller, addresses, options);
        todo!("issue 3: engine")
    }

    /// Returns each function to the driver it had before assignment (or the kernel's choice).
    pub fn release(
        &self,
        caller: &Caller,
        addresses: &[PciAddress],
        options: ReleaseOptions,
    ) -> Result<Vec<Change>, Error> {
        let _ = (caller, addresses, options);
        todo!("issue 3: engine")
    }

    pub fn status(&self) -> Status {
        todo!("issue 3: engine")
    }
}
