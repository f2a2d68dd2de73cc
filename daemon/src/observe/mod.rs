//! Read-only views of the host: what is there and what would break. Nothing here writes.

pub mod groups;
pub mod guard;
pub mod host;
pub mod inventory;
pub mod passthrough;
pub mod pciids;
