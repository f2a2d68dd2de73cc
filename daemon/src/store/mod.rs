//! What the daemon keeps on disk: state.toml (assignments that outlive it) and the journal
//! (the plan in flight), both written atomically.

pub mod atomic;
pub mod config;
pub mod journal;
pub mod state;
