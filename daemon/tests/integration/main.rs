//! The daemon's integration tests, one module per subject, linked into one test binary: each
//! separate binary under tests/ would link the whole daemon again (about 100 MB of debug build
//! apiece), which cost minutes of linking and ran CI's disk full. Run one subject with
//! `cargo test -p passthroughd --test integration engine_assign::`.

mod common;

mod daemon_bus;
mod dbus_activation;
mod engine_assign;
mod engine_cache;
mod engine_config;
mod engine_defects;
mod engine_faults;
mod engine_guard;
mod engine_hotplug;
mod engine_leases;
mod engine_persist;
mod engine_sriov;
mod engine_verify;
mod fuzz_replay;
mod host_cli;
mod host_fixtures;
mod inventory_fixtures;
mod inventory_synthetic;
mod storage_faults;
