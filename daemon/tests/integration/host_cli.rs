//! `passthroughd host` (the offline subcommand) prints exactly the library report of its root:
//! `--json` is `serde_json::to_string_pretty(report_live(root))` plus a newline, and text is
//! `render_text`. `cli/tests/integration/dbus_host.rs` checks `passthroughctl host` against the same strings,
//! so the two commands print the same report.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use passthroughd::observe::host;
use passthroughd::{PciIds, SysfsRoot};
use passthroughd_proto::host::render_text;

#[test]
fn the_host_subcommand_prints_the_library_report() {
    for name in ["intel-all-on", "intel-vtx-disabled-by-firmware"] {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/host")
            .join(name);
        let report = host::report_live(&SysfsRoot::new(&root), &PciIds::empty());
        let run = |json: bool| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_passthroughd"));
            c.arg("--sysfs-root")
                .arg(&root)
                .args(["--pci-ids", "/dev/null", "host"]);
            if json {
                c.arg("--json");
            }
            let o = c.output().unwrap();
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8(o.stdout).unwrap()
        };
        assert_eq!(
            run(true),
            serde_json::to_string_pretty(&report).unwrap() + "\n",
            "{name}"
        );
        assert_eq!(run(false), render_text(&report), "{name}");
    }
}
