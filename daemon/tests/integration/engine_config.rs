//! The declarative config over the simulated kernel: applied at start, `apply --dry-run` and
//! `apply`, drift, edits, a broken reload, removed entries released, who wins between the config
//! and requests, identity guards, match rules, [protect], and a config-made VF set removed.

#![allow(clippy::unwrap_used)]

use crate::common::*;
use passthroughd::ErrorKind;
use passthroughd::kernel::Kernel;
use passthroughd_proto::{ApplyReport, AssignOptions, ReleaseOptions};

fn vf(host: &Host, index: u32) -> String {
    host.sim.vf_address(a(PF), index).unwrap().to_string()
}

/// Puts `addr` back on its host driver behind the daemon's back, as a hand `echo` would.
fn hand_release(host: &Host, addr: &str) {
    let root = host.root();
    let a = a(addr);
    host.sim
        .write(&root.pci_device_attr(a, "driver_override"), b"\n")
        .unwrap();
    host.sim
        .write(&root.pci_device_unbind(a), addr.as_bytes())
        .unwrap();
    host.sim
        .write(&root.pci_drivers_probe(), addr.as_bytes())
        .unwrap();
}

fn nothing_to_do(report: &ApplyReport) -> bool {
    report.is_empty()
}

const CONFIG: &str = r#"version = 1

[[device]]
address = "0000:01:00.0"
vendor = "0x8086"
device = "0x10c9"

[[sriov]]
pf = "0000:05:00.0"
count = 3
assign = [0, 2]
"#;

#[test]
fn the_config_is_applied_at_start_and_a_second_apply_has_nothing_to_do() {
    let host = sriov_host();
    host.write_config(CONFIG);
    let (m, report) = host.open();
    assert!(
        report.apply.refused.is_empty(),
        "{:?}",
        report.apply.refused
    );
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    let drivers: Vec<_> = (0..3)
        .map(|i| host.driver(&vf(&host, i)).unwrap_or_default())
        .collect();
    assert_eq!(drivers, ["vfio-pci", "igbvf", "vfio-pci"]);
    for i in [0, 2] {
        assert_eq!(
            host.sim.bind_history(a(&vf(&host, i))),
            ["vfio-pci"],
            "VF {i} never met igbvf"
        );
    }
    let state = host.state_text();
    assert!(state.contains("source = \"config\""), "{state}");
    assert!(state.contains("assigned = [0, 2]"), "{state}");
    let status = m.status();
    let nic = status
        .assignments
        .iter()
        .find(|x| x.address == a(NIC))
        .unwrap();
    assert_eq!(nic.sources, ["config"]);
    assert_eq!(status.config.as_ref().unwrap().entries, 2);
    let writes = host.sim.writes().len();
    let dry = m.apply(&caller(), true).unwrap();
    assert!(nothing_to_do(&dry), "{dry:?}");
    let again = m.apply(&caller(), false).unwrap();
    assert!(nothing_to_do(&again), "{again:?}");
    assert_eq!(
        host.sim.writes().len(),
        writes,
        "idempotent: nothing written"
    );
    // A restart changes nothing either.
    drop(m);
    let (_m, report) = host.open();
    assert!(report.apply.changes.is_empty(), "{:?}", report.apply);
    assert_eq!(host.sim.writes().len(), writes);
}

#[test]
fn drift_is_shown_by_dry_run_and_status_and_undone_only_by_apply() {
    let host = sriov_host();
    host.write_config(CONFIG);
    let (m, _) = host.open();
    hand_release(&host, NIC);
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    let nic = m
        .status()
        .assignments
        .into_iter()
        .find(|x| x.address == a(NIC))
        .unwrap();
    assert!(
        nic.state.as_deref().unwrap().starts_with("drift: on igb"),
        "{nic:?}"
    );
    let writes = host.sim.writes().len();
    let dry = m.apply(&caller(), true).unwrap();
    assert_eq!(dry.changes.len(), 1, "{dry:?}");
    assert_eq!(dry.changes[0].function, NIC);
    assert_eq!(dry.changes[0].from.as_deref(), Some("igb"));
    assert_eq!(dry.changes[0].to.as_deref(), Some("vfio-pci"));
    assert!(
        dry.changes[0]
            .entry
            .contains("[[device]] 0000:01:00.0 (line 3)")
    );
    assert_eq!(host.sim.writes().len(), writes, "a dry run writes nothing");
    let done = m.apply(&caller(), false).unwrap();
    assert_eq!(done.changes.len(), 1);
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    assert!(nothing_to_do(&m.apply(&caller(), true).unwrap()));
}

#[test]
fn an_edit_shows_in_dry_run_and_apply_does_it() {
    let host = sriov_host();
    host.write_config(CONFIG);
    let (m, _) = host.open();
    host.write_config(&format!(
        "{CONFIG}\n[[device]]\naddress = \"{PAIR0}\"\ngroup = true\n"
    ));
    let state = m.reload();
    assert_eq!(state.error, None);
    assert_eq!(state.entries, 3);
    let writes = host.sim.writes().len();
    let dry = m.apply(&caller(), true).unwrap();
    let moved: Vec<&str> = dry.changes.iter().map(|c| c.function.as_str()).collect();
    assert_eq!(moved, [PAIR0, PAIR1], "{dry:?}");
    assert_eq!(host.sim.writes().len(), writes);
    assert_eq!(host.driver(PAIR0).as_deref(), Some("e1000e"));
    m.apply(&caller(), false).unwrap();
    assert_eq!(host.driver(PAIR0).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver(PAIR1).as_deref(), Some("vfio-pci"));
    // A count change resizes through 0, keeping the assigned VFs on vfio-pci.
    host.write_config(&CONFIG.replace("count = 3", "count = 4"));
    m.reload();
    let dry = m.apply(&caller(), true).unwrap();
    assert_eq!(dry.vfs.len(), 1, "{dry:?}");
    assert_eq!((dry.vfs[0].from, dry.vfs[0].to), (3, 4));
    m.apply(&caller(), false).unwrap();
    let drivers: Vec<_> = (0..4)
        .map(|i| host.driver(&vf(&host, i)).unwrap_or_default())
        .collect();
    assert_eq!(drivers, ["vfio-pci", "igbvf", "vfio-pci", "igbvf"]);
    // The group entry is gone from the file: its functions go back to their drivers.
    assert_eq!(host.driver(PAIR0).as_deref(), Some("e1000e"));
    assert!(nothing_to_do(&m.apply(&caller(), true).unwrap()));
}

#[test]
fn a_broken_reload_keeps_the_last_good_config_and_says_where() {
    let host = sriov_host();
    host.write_config(CONFIG);
    let (m, _) = host.open();
    host.write_config("version = 1\n\n[[device]]\naddres = \"0000:01:00.0\"\n");
    let state = m.reload();
    let error = state.error.unwrap();
    assert!(
        error.starts_with(&format!("{}:4:", host.config_path().display())),
        "{error}"
    );
    assert!(!error.contains('\n'));
    assert_eq!(state.entries, 2, "the last good config stays in force");
    let dry = m.apply(&caller(), true).unwrap();
    assert!(nothing_to_do(&dry), "{dry:?}");
    assert!(dry.config.error.is_some());
    let status = m.status();
    assert!(status.config.unwrap().error.is_some());
    assert!(
        status.last_errors.iter().any(|e| e.contains(":4:")),
        "{:?}",
        status.last_errors
    );
    assert_eq!(
        host.driver(NIC).as_deref(),
        Some("vfio-pci"),
        "nothing released"
    );
    // A restart with the broken file keeps the last good one too (a copy in the state dir).
    drop(m);
    let (m, report) = host.open();
    assert!(report.apply.changes.is_empty(), "{:?}", report.apply);
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    assert!(m.status().config.unwrap().error.is_some());
}

#[test]
fn a_removed_entry_is_released_to_its_host_driver_and_vf_sets_are_removed() {
    let host = sriov_host();
    host.write_config(CONFIG);
    let (m, _) = host.open();
    host.write_config("version = 1\n");
    m.reload();
    let dry = m.apply(&caller(), true).unwrap();
    assert!(
        dry.changes
            .iter()
            .any(|c| c.function == NIC && c.to.as_deref() == Some("igb")),
        "{dry:?}"
    );
    assert_eq!(dry.vfs.len(), 1);
    assert_eq!((dry.vfs[0].from, dry.vfs[0].to), (3, 0));
    m.apply(&caller(), false).unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(
        std::fs::read_to_string(host.root().pci_device_attr(a(PF), "sriov_numvfs"))
            .unwrap()
            .trim(),
        "0"
    );
    assert!(
        !host.state_text().contains("config"),
        "{}",
        host.state_text()
    );
    assert!(m.assignments().is_empty());
    assert!(nothing_to_do(&m.apply(&caller(), true).unwrap()));
}

#[test]
fn release_refuses_what_the_config_claims_and_a_request_keeps_it_after_the_entry_goes() {
    let host = sriov_host();
    host.write_config(CONFIG);
    let (m, _) = host.open();
    let err = m
        .release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(
        err.to_string().contains("[[device]] 0000:01:00.0 (line 3)"),
        "{err}"
    );
    assert_eq!(host.driver(NIC).as_deref(), Some("vfio-pci"));
    // A request on the same function: it stays until both let go.
    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    host.write_config("version = 1\n");
    m.reload();
    m.apply(&caller(), false).unwrap();
    assert_eq!(
        host.driver(NIC).as_deref(),
        Some("vfio-pci"),
        "the request holds it"
    );
    assert_eq!(m.assignments()[0].sources, ["request"]);
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}

#[test]
fn identity_guards_protect_and_guards_refuse_with_reasons_and_the_rest_is_applied() {
    let host = sriov_host();
    host.write_config(&format!(
        "version = 1\n\n\
         [[device]]\naddress = \"{NIC}\"\nvendor = \"0x15b3\"\ndevice = \"0x1017\"\n\n\
         [[device]]\naddress = \"{ROUTED}\"\n\n\
         [[device]]\naddress = \"{PAIR0}\"\n\n\
         [[device]]\naddress = \"{NIC2}\"\n\n\
         [protect]\naddresses = [\"{DISK}\"]\n"
    ));
    let (m, report) = host.open();
    let reasons: Vec<String> = report
        .apply
        .refused
        .iter()
        .map(|r| format!("{} | {}", r.entry, r.reason))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("8086:10c9") && reasons[0].contains("15b3:1017"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("default route"), "{reasons:?}");
    assert!(
        reasons[2].contains(&format!("{PAIR1} (bound to e1000e)")),
        "{reasons:?}"
    );
    assert_eq!(
        host.driver(NIC2).as_deref(),
        Some("vfio-pci"),
        "the rest is applied"
    );
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
    assert_eq!(host.driver(ROUTED).as_deref(), Some("e1000e"));
    let status = m.status();
    assert_eq!(status.refused.len(), 3, "status says what was not applied");
    // [protect] wins over every request.
    let err = m
        .assign(&caller(), &[a(DISK)], AssignOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("[protect]"), "{err}");
    // apply exits 5: the CLI reads `refused`; the report still lists NIC2 as done.
    let again = m.apply(&caller(), false).unwrap();
    assert_eq!(again.refused.len(), 3);
    assert!(again.changes.is_empty());
}

#[test]
fn a_match_rule_claims_exactly_the_functions_it_matches() {
    let host = sriov_host();
    // VFs made by another tool, plain echo.
    host.sim
        .write(&host.root().pci_device_attr(a(PF), "sriov_numvfs"), b"2")
        .unwrap();
    host.write_config(
        "version = 1\n\n[[device]]\nmatch = { vendor = \"0x8086\", device = \"0x10ca\" }\n",
    );
    let (m, report) = host.open();
    assert!(
        report.apply.refused.is_empty(),
        "{:?}",
        report.apply.refused
    );
    assert_eq!(report.apply.changes.len(), 2, "{:?}", report.apply.changes);
    for i in 0..2 {
        assert_eq!(host.driver(&vf(&host, i)).as_deref(), Some("vfio-pci"));
    }
    assert_eq!(
        host.driver(NIC).as_deref(),
        Some("igb"),
        "the PF (10c9) is not matched"
    );
    assert_eq!(host.driver(PF).as_deref(), Some("igb"));
    let sources: Vec<_> = m
        .assignments()
        .iter()
        .map(|x| x.vf.unwrap().index)
        .collect();
    assert_eq!(sources, [0, 1]);
}
