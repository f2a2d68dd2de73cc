//! Storage faults: the state dir unusable, state.toml that cannot be written, state.toml
//! truncated, corrupted or replaced by a link, a corrupted journal. Each gives a one-line error
//! naming the file, keeps the last good state, and leaves every device where it was.
//! (A full disk and a read-only state dir on a real filesystem are in tests/vm/scenarios/assign.sh.)

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::symlink;
use std::path::Path;

use crate::common::*;
use passthroughd::Engine;
use passthroughd_proto::{AssignOptions, ReleaseOptions};

fn assign(m: &Engine, addr: &str) -> Result<(), passthroughd::Error> {
    m.assign(&caller(), &[a(addr)], AssignOptions::default())
        .map(drop)
}

fn release(m: &Engine, addr: &str) -> Result<(), passthroughd::Error> {
    m.release(&caller(), &[a(addr)], ReleaseOptions::default())
        .map(drop)
}

/// Journals left in the state dir (none once every plan is over).
fn journals(host: &Host) -> Vec<String> {
    host.state_files()
        .into_iter()
        .filter(|n| n.starts_with("journal-"))
        .collect()
}

fn one_line_naming(err: &str, file: &str) {
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains(file), "names {file}: {err}");
}

#[test]
fn a_state_file_that_cannot_be_written_undoes_the_assignment_and_keeps_the_old_one() {
    let host = Host::new();
    let (m, _) = host.open();
    assign(&m, NIC2).unwrap();
    let good = host.state_text();
    // A non-empty directory where state.toml goes: the journal can be written, the rename of the
    // new state.toml over it cannot, after the kernel steps are done.
    let state = host.state_dir().join("state.toml");
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir_all(state.join("x")).unwrap();

    let err = assign(&m, NIC).unwrap_err().to_string();
    one_line_naming(&err, "state.toml");
    assert!(err.contains("put back"), "the bind is undone: {err}");
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.sim.override_of(a(NIC)), None);
    assert!(journals(&host).is_empty(), "{:?}", host.state_files());
    // A release that cannot be recorded stays assigned: the kernel matches what is stored.
    let err = release(&m, NIC2).unwrap_err().to_string();
    one_line_naming(&err, "state.toml");
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));

    std::fs::remove_dir_all(&state).unwrap();
    std::fs::write(&state, &good).unwrap();
    assign(&m, NIC).unwrap();
    assert!(host.state_text().contains(NIC), "{}", host.state_text());
    assert!(host.state_text().contains(NIC2), "nothing lost");
}

#[test]
fn an_unusable_state_dir_refuses_before_touching_the_kernel() {
    let host = Host::new();
    let (m, _) = host.open();
    assign(&m, NIC2).unwrap();
    let good = host.state_text();
    // The state dir replaced by a file: nothing can be created in it, not even the journal.
    let moved = host.dir.path().join("state.moved");
    std::fs::rename(host.state_dir(), &moved).unwrap();
    std::fs::write(host.state_dir(), "not a directory").unwrap();
    let writes = host.sim.writes().len();

    let err = assign(&m, NIC).unwrap_err().to_string();
    one_line_naming(&err, "journal-");
    assert!(err.contains("recording the operation"), "{err}");
    let err = release(&m, NIC2).unwrap_err().to_string();
    one_line_naming(&err, "journal-");
    assert_eq!(host.sim.writes().len(), writes, "no sysfs write at all");
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));

    std::fs::remove_file(host.state_dir()).unwrap();
    std::fs::rename(&moved, host.state_dir()).unwrap();
    assert_eq!(host.state_text(), good, "the last good state is kept");
    release(&m, NIC2).unwrap();
    assert_eq!(host.driver(NIC2).as_deref(), Some("igb"));
}

/// Corrupts state.toml with `damage` and checks the next start: refused with one line naming
/// the file, the file left byte for byte, the assigned device still on vfio-pci.
fn start_refused_over(name: &str, damage: impl FnOnce(&Path, &[u8])) {
    let host = Host::new();
    {
        let (m, _) = host.open();
        assign(&m, NIC).unwrap();
    }
    let path = host.state_dir().join("state.toml");
    let good = std::fs::read(&path).unwrap();
    damage(&path, &good);
    let damaged = std::fs::read(&path).unwrap_or_default();
    let err = Engine::open(host.config()).err().unwrap().to_string();
    one_line_naming(&err, "state.toml");
    assert_eq!(
        std::fs::read(&path).unwrap_or_default(),
        damaged,
        "{name}: left as it was"
    );
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"), "{name}");
    assert!(journals(&host).is_empty(), "{name}");
}

#[test]
fn a_truncated_or_corrupted_state_file_stops_the_start_and_is_left_for_the_admin() {
    start_refused_over("truncated", |p, good| {
        std::fs::write(p, &good[..good.len() / 2]).unwrap();
    });
    start_refused_over("empty", |p, _| std::fs::write(p, "").unwrap());
    start_refused_over("not UTF-8", |p, good| {
        let mut bad = good.to_vec();
        bad[good.len() / 3] = 0xff;
        std::fs::write(p, bad).unwrap();
    });
    start_refused_over("a wrong type", |p, good| {
        let text = String::from_utf8(good.to_vec()).unwrap();
        std::fs::write(p, text.replace("address = ", "address = 7 #")).unwrap();
    });
    start_refused_over("a directory", |p, _| {
        std::fs::remove_file(p).unwrap();
        std::fs::create_dir(p).unwrap();
    });
}

#[test]
fn a_link_at_the_state_file_is_refused_without_reading_or_quoting_its_target() {
    let host = Host::new();
    {
        let (m, _) = host.open();
        assign(&m, NIC).unwrap();
    }
    let secret = host.dir.path().join("secret");
    std::fs::write(&secret, "root:$6$salt$hash:19000:0:99999:7:::\n").unwrap();
    let path = host.state_dir().join("state.toml");
    std::fs::remove_file(&path).unwrap();
    symlink(&secret, &path).unwrap();

    let err = Engine::open(host.config()).err().unwrap().to_string();
    one_line_naming(&err, "state.toml");
    assert!(err.contains("symbolic link"), "{err}");
    assert!(!err.contains("$6$"), "the target is not quoted: {err}");
    assert!(path.is_symlink(), "the link is left for the admin");
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        "root:$6$salt$hash:19000:0:99999:7:::\n"
    );
}

#[test]
fn corrupted_or_linked_journals_are_set_aside_and_the_start_goes_on() {
    let host = Host::new();
    {
        let (m, _) = host.open();
        assign(&m, NIC).unwrap();
    }
    let dir = host.state_dir();
    std::fs::write(
        dir.join("journal-1-0.json"),
        "{\"version\": 2, \"plan\": {\"ope",
    )
    .unwrap();
    std::fs::write(dir.join("journal-1-1.json"), [0xff, 0xfe, 0x00]).unwrap();
    let target = host.dir.path().join("elsewhere.json");
    std::fs::write(&target, "{}").unwrap();
    symlink(&target, dir.join("journal-1-2.json")).unwrap();

    let (m, report) = host.open();
    let lines = report.recovered.join("\n");
    for name in ["journal-1-0.json", "journal-1-1.json", "journal-1-2.json"] {
        assert!(lines.contains(name), "{name} reported: {lines}");
    }
    assert!(lines.contains("symbolic link"), "{lines}");
    assert!(journals(&host).iter().all(|n| n.ends_with(".unreadable")));
    assert_eq!(journals(&host).len(), 3, "kept for the admin to read");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "{}");
    // The stored assignment is applied as usual.
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    release(&m, NIC).unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}
