//! `passthroughctl host` against the service on a private dbus-daemon, serving fixture roots:
//! the JSON is byte for byte what `passthroughd host --json` prints for the same root (the
//! library report, pretty-printed; `daemon/tests/integration/host_cli.rs` ties the daemon binary to the same
//! string), the text is `render_text` with one verdict line per check, and a host that is not
//! ready is still exit 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use crate::common::*;
use passthroughd::observe::host;
use passthroughd::{PciIds, SysfsRoot};
use passthroughd_proto::host::{HostReport, render_text};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/host")
        .join(name)
}

/// What the daemon builds for `root`, and what `passthroughd host --json` prints for it.
fn expected(root: &std::path::Path) -> (HostReport, String) {
    let report = host::report_live(&SysfsRoot::new(root), &PciIds::empty());
    let json = serde_json::to_string_pretty(&report).unwrap() + "\n";
    (report, json)
}

#[test]
fn host_json_and_text_are_the_daemons_report_of_the_root_it_serves() {
    for (name, ready) in [
        ("intel-all-on", true),
        ("intel-vtx-disabled-by-firmware", false),
        ("amd-ivrs", true),
        ("iommu-table-but-off", false),
    ] {
        let root = fixture(name);
        let h = Harness::start_on_root(&root);
        let (report, json) = expected(&root);
        assert_eq!(report.overall.ready, ready, "{name}: {:#?}", report.overall);

        let o = h.ctl(&["--json", "host"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        assert_eq!(stdout(&o), json, "{name}");
        assert!(o.stderr.is_empty(), "{name}: {}", stderr(&o));
        // One document, and it reads back as the same report.
        let back: HostReport = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(back, report, "{name}");

        // Not ready is a successful report: exit 0 in text form too.
        let o = h.ctl(&["host"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        let text = stdout(&o);
        assert_eq!(text, render_text(&report), "{name}");
        let lines: Vec<&str> = text.lines().collect();
        for check in &report.checks {
            let line = lines
                .iter()
                .find(|l| l.split_whitespace().nth(1) == Some(check.id.as_str()))
                .unwrap_or_else(|| panic!("{name}: no line for {}:\n{text}", check.id));
            assert!(
                line.starts_with(check.verdict.label()),
                "{name}: {line:?} does not start with {}",
                check.verdict.label()
            );
        }
        assert!(
            report
                .checks
                .iter()
                .any(|c| text.contains(&format!("PASS {}", c.id))),
            "{name}: no PASS line"
        );
        if !ready {
            assert!(text.lines().any(|l| l.starts_with("FAIL ")), "{name}");
        }
        // The overall verdict closes the report (followed only by its indented first fix).
        let verdict = format!(
            "{} {}",
            report.overall.verdict.label(),
            report.overall.summary
        );
        let last_unindented = lines.iter().rev().find(|l| !l.starts_with(' ')).unwrap();
        assert_eq!(*last_unindented, verdict, "{name}");
        assert!(
            lines.last() == Some(&verdict.as_str())
                || lines.last().unwrap().starts_with("     first"),
            "{name}: {:?}",
            lines.last()
        );
    }
}

#[test]
fn host_needs_no_authorization() {
    let root = fixture("intel-all-on");
    let h = Harness::start_on_root(&root);
    let o = h.ctl_as_nobody(&["--json", "host"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), expected(&root).1);
    assert!(h.engine.calls().is_empty());
}

#[test]
fn host_without_a_daemon_is_unreachable() {
    let empty = TestBus::start();
    let o = ctl(&empty.address, &["--json", "host"], false);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["error"]["exit_code"], 69);
}

#[test]
fn host_help_says_not_ready_is_exit_0() {
    let o = std::process::Command::new(ctl_path())
        .args(["host", "--help"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let help = stdout(&o);
    assert!(
        help.contains("Exit status 0 means the report was produced"),
        "{help}"
    );
}
