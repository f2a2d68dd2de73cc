//! passthroughd as a library: everything the daemon does, with a thin `main.rs` on top.
//!
//! The folders follow the architecture:
//! - [`kernel`]: the one seam to the kernel: sysfs paths and reads relative to a root, timed
//!   writes, the driver and SR-IOV sequences, uevents.
//! - [`observe`]: read-only views of the host: inventory, IOMMU groups, pci.ids, the blast-radius
//!   guard, the host capability report.
//! - [`engine`]: plans (what to write, decided by pure planners), the executor that journals and
//!   runs them, crash recovery, locks, and the desired state.
//! - [`store`]: state.toml, the journal, atomic files.
//! - [`service`]: the D-Bus interface, authorization, error names.
//!
//! Kernel state is read relative to a [`kernel::sysfs::SysfsRoot`], so the same code runs
//! against the live `/sys`, a tree captured from a real kernel, or a simulated one (the
//! `passthroughd-testkit` crate, which is test support and not part of the daemon).

pub mod engine;
pub mod error;
pub mod kernel;
pub mod observe;
pub mod service;
pub mod store;

pub use engine::{Caller, Engine, EngineConfig};
pub use error::{Error, ErrorKind};
pub use kernel::sysfs::SysfsRoot;
pub use observe::inventory::{Inventory, InventoryError};
pub use observe::pciids::PciIds;
