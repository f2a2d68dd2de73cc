//! passthroughctl's integration tests (a private bus, the real binary), one module per subject,
//! linked into one test binary: each separate binary under tests/ would link the daemon and the
//! CLI again (about 100 MB of debug build apiece). Run one subject with
//! `cargo test -p passthroughctl --test integration dbus_vf::`.

mod common;

mod apply;
mod dbus_cli;
mod dbus_engine;
mod dbus_host;
mod dbus_vf;
mod hostile;
mod libvirt_hook;
mod load;
