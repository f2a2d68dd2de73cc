//! passthroughd as a library: everything the daemon does, with a thin `main.rs` on top.
//!
//! Kernel state is read relative to a [`sysfs::SysfsRoot`], so the same code runs against the
//! live `/sys`, a tree captured from a real kernel, or a synthetic one.

pub mod authz;
pub mod binder;
pub mod error;
pub mod groups;
pub mod guard;
pub mod host;
pub mod inventory;
pub mod journal;
pub mod kernel;
pub mod manager;
pub mod pciids;
pub mod service;
pub mod sim;
pub mod state;
pub mod synthetic;
pub mod sysfs;
pub mod uevents;

pub use error::{Error, ErrorKind};
pub use inventory::{Inventory, InventoryError};
pub use manager::{Caller, Manager, ManagerConfig};
pub use pciids::PciIds;
pub use sysfs::SysfsRoot;
