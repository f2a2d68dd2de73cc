//! Hotplug over the simulated kernel: functions that appear are claimed when (and only when) the
//! desired state claims them, through the same planners and executor; functions that go away
//! stay claimed and are claimed again when they come back; an event never touches functions it
//! does not name; a storm of events is a few passes while readers keep answering.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use passthroughd::Engine;
use passthroughd::kernel::Kernel;
use passthroughd::kernel::events::{Action, DeviceEvent};
use passthroughd::service::events::{LONGEST, QUIET, next_batch};
use passthroughd_proto::{AssignOptions, PciAddress};
use passthroughd_testkit::sim::SimDevice;

fn nic2_device() -> SimDevice {
    let mut nic2 = SimDevice::new(a(NIC2), 0x020000, Some("igb"), 6);
    nic2.device_id = 0x10c9;
    nic2
}

fn set(addresses: &[PciAddress]) -> BTreeSet<PciAddress> {
    addresses.iter().copied().collect()
}

fn added(m: &Engine, addresses: &[PciAddress]) -> passthroughd::engine::HotplugReport {
    m.device_events(&caller(), &set(addresses), &BTreeSet::new())
        .unwrap()
}

fn vfs_of(host: &Host, n: u32) -> Vec<PciAddress> {
    (0..n)
        .map(|i| host.sim.vf_address(a(PF), i).unwrap())
        .collect()
}

#[test]
fn a_configured_device_that_goes_and_comes_back_is_claimed_again() {
    let host = Host::new();
    host.write_config(&format!("version = 1\n[[device]]\naddress = \"{NIC2}\"\n"));
    let (m, _) = host.open();
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));
    host.sim.remove_device(a(NIC2)).unwrap();
    let report = m
        .device_events(&caller(), &BTreeSet::new(), &set(&[a(NIC2)]))
        .unwrap();
    assert_eq!(report.removed, [a(NIC2)]);
    let status = m.status();
    let nic2 = status
        .assignments
        .iter()
        .find(|x| x.address == a(NIC2))
        .unwrap();
    assert!(
        nic2.state.as_deref().unwrap().starts_with("absent"),
        "{nic2:?}"
    );
    assert!(
        status.hotplug.iter().any(|l| l.contains("removed")),
        "{:?}",
        status.hotplug
    );
    // Back, as a rescan brings it: on its host driver, no override.
    host.sim.add_device(&nic2_device()).unwrap();
    assert_eq!(host.driver(NIC2).as_deref(), Some("igb"));
    let report = added(&m, &[a(NIC2)]);
    assert_eq!(report.apply.changes.len(), 1, "{:?}", report.apply);
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));
    assert!(
        m.status()
            .hotplug
            .iter()
            .any(|l| l.contains("claimed by [[device]]"))
    );
}

#[test]
fn an_event_touches_only_the_functions_it_names() {
    let host = Host::new();
    host.write_config(&format!(
        "version = 1\n[[device]]\naddress = \"{NIC}\"\n[[device]]\naddress = \"{NIC2}\"\n"
    ));
    let (m, _) = host.open();
    // NIC moved back to igb by hand: drift, which only apply (or NIC's own event) undoes.
    let root = host.root();
    host.sim
        .write(&root.pci_device_attr(a(NIC), "driver_override"), b"\n")
        .unwrap();
    host.sim
        .write(&root.pci_device_unbind(a(NIC)), NIC.as_bytes())
        .unwrap();
    host.sim
        .write(&root.pci_drivers_probe(), NIC.as_bytes())
        .unwrap();
    host.sim.remove_device(a(NIC2)).unwrap();
    host.sim.add_device(&nic2_device()).unwrap();
    added(&m, &[a(NIC2)]);
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));
    assert_eq!(
        host.driver(NIC).as_deref(),
        Some("igb"),
        "drift of another function left alone"
    );
    // An unconfigured function that appears is left alone too.
    let writes = host.sim.writes().len();
    let mut other = SimDevice::new(a("0000:07:00.0"), 0x020000, Some("e1000e"), 30);
    other.device_id = 0x10d3;
    host.sim.add_device(&other).unwrap();
    let report = added(&m, &[a("0000:07:00.0")]);
    assert!(report.apply.changes.is_empty() && report.apply.refused.is_empty());
    assert_eq!(host.sim.writes().len(), writes, "nothing written");
    // A function that vanished before its event was handled: nothing to do, no error.
    let report = added(&m, &[a("0000:08:00.0")]);
    assert!(report.apply.changes.is_empty());
}

/// A config matching the igb VF ids, and 3 VFs made by `echo 3 > sriov_numvfs` by hand
/// (igbvf binds them), not yet handled.
fn three_echoed_vfs_and_a_match_rule() -> (Host, Engine, Vec<PciAddress>) {
    let host = sriov_host();
    host.write_config(
        "version = 1\n[[device]]\nmatch = { vendor = \"0x8086\", device = \"0x10ca\" }\n",
    );
    let (m, _) = host.open();
    host.sim
        .write(&host.root().pci_device_attr(a(PF), "sriov_numvfs"), b"3")
        .unwrap();
    let vfs = vfs_of(&host, 3);
    (host, m, vfs)
}

#[test]
fn a_vf_is_claimed_while_another_tool_still_holds_its_pf_making_the_next_ones() {
    let (host, m, vfs) = three_echoed_vfs_and_a_match_rule();
    // The kernel holds the PF's lock until the write has made its last VF; the event for the
    // first comes before that.
    let pf_lock = host.sim.hold_device_lock(a(PF));
    std::thread::scope(|scope| {
        let pass = scope.spawn(|| added(&m, &vfs[..1]));
        let until = Instant::now() + Duration::from_secs(10);
        while !pass.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let finished_under_the_lock = pass.is_finished();
        drop(pf_lock);
        let report = pass.join().unwrap();
        assert!(
            finished_under_the_lock,
            "the hotplug pass waited for the PF's lock"
        );
        assert_eq!(report.apply.changes.len(), 1, "{:?}", report.apply);
    });
    assert_eq!(host.sim.driver_of(vfs[0]).as_deref(), Some("vfio-pci"));
    assert_eq!(host.sim.driver_of(vfs[1]).as_deref(), Some("igbvf"));
}

#[test]
fn vfs_made_by_another_tool_are_claimed_by_a_match_rule_and_nothing_else_is() {
    let (host, m, vfs) = three_echoed_vfs_and_a_match_rule();
    assert!(
        vfs.iter()
            .all(|v| host.sim.driver_of(*v).as_deref() == Some("igbvf"))
    );
    let mut burst = vfs.clone();
    burst.push(a(NIC));
    let report = added(&m, &burst);
    assert_eq!(report.apply.changes.len(), 3, "{:?}", report.apply);
    assert!(
        vfs.iter()
            .all(|v| host.sim.driver_of(*v).as_deref() == Some("vfio-pci"))
    );
    assert_eq!(
        host.driver(NIC).as_deref(),
        Some("igb"),
        "the PF id does not match"
    );
    let sources: Vec<Vec<String>> = m.assignments().into_iter().map(|x| x.sources).collect();
    assert_eq!(sources, vec![vec!["config".to_owned()]; 3]);
}

#[test]
fn a_configured_pf_that_appears_gets_its_vfs_and_an_sriov_entry_claims_echoed_vfs() {
    let host = sriov_host();
    host.write_config(&format!(
        "version = 1\n[[sriov]]\npf = \"{PF}\"\ncount = 3\nassign = [1]\n"
    ));
    let (m, _) = host.open();
    assert_eq!(
        host.sim.driver_of(vfs_of(&host, 3)[1]).as_deref(),
        Some("vfio-pci")
    );
    // The PF goes (its VFs with it) and comes back without VFs, as after a rescan.
    for vf in vfs_of(&host, 3) {
        host.sim.remove_device(vf).unwrap();
    }
    host.sim.remove_device(a(PF)).unwrap();
    m.device_events(&caller(), &BTreeSet::new(), &set(&[a(PF)]))
        .unwrap();
    host.sim.add_device(&pf_device()).unwrap();
    std::fs::write(host.root().pci_device_attr(a(PF), "sriov_numvfs"), "0\n").unwrap();
    let report = added(&m, &[a(PF)]);
    assert_eq!(report.apply.vfs.len(), 1, "{:?}", report.apply);
    let drivers: Vec<_> = vfs_of(&host, 3)
        .iter()
        .map(|v| host.sim.driver_of(*v).unwrap_or_default())
        .collect();
    assert_eq!(drivers, ["igbvf", "vfio-pci", "igbvf"]);
    // Someone destroys and re-creates 3 VFs by hand: VF 1 is claimed again on its event.
    let numvfs = host.root().pci_device_attr(a(PF), "sriov_numvfs");
    host.sim.write(&numvfs, b"0").unwrap();
    host.sim.write(&numvfs, b"3").unwrap();
    added(&m, &vfs_of(&host, 3));
    let drivers: Vec<_> = vfs_of(&host, 3)
        .iter()
        .map(|v| host.sim.driver_of(*v).unwrap_or_default())
        .collect();
    assert_eq!(drivers, ["igbvf", "vfio-pci", "igbvf"]);
    // Another count by hand is drift: refused with a reason, nothing changed.
    host.sim.write(&numvfs, b"0").unwrap();
    host.sim.write(&numvfs, b"2").unwrap();
    let report = added(&m, &vfs_of(&host, 2));
    assert!(
        report.apply.refused[0]
            .reason
            .contains("apply sets the count"),
        "{report:?}"
    );
    assert_eq!(std::fs::read_to_string(&numvfs).unwrap().trim(), "2");
}

#[test]
fn a_persistent_assignment_whose_device_comes_back_is_reapplied() {
    let host = Host::new();
    let (m, _) = host.open();
    m.assign(&caller(), &[a(NIC2)], AssignOptions::default())
        .unwrap();
    host.sim.remove_device(a(NIC2)).unwrap();
    m.device_events(&caller(), &BTreeSet::new(), &set(&[a(NIC2)]))
        .unwrap();
    host.sim.add_device(&nic2_device()).unwrap();
    added(&m, &[a(NIC2)]);
    assert_eq!(host.driver(NIC2).as_deref(), Some("vfio-pci"));
    // A runtime assignment is not: it ended with the device.
    let (m2, _) = (m, ());
    m2.assign(
        &caller(),
        &[a(NIC)],
        AssignOptions {
            runtime: true,
            ..AssignOptions::default()
        },
    )
    .unwrap();
    host.sim.remove_device(a(NIC)).unwrap();
    let mut nic = SimDevice::new(a(NIC), 0x020000, Some("igb"), 4);
    nic.device_id = 0x10c9;
    nic.parent = Some(a(ROOT_PORT));
    host.sim.add_device(&nic).unwrap();
    added(&m2, &[a(NIC)]);
    assert_eq!(host.driver(NIC).as_deref(), Some("igb"));
}

#[test]
fn a_storm_of_events_is_a_few_passes_and_readers_keep_answering() {
    let host = sriov_host();
    host.write_config(
        "version = 1\n[[device]]\nmatch = { vendor = \"0x8086\", device = \"0x10ca\" }\n",
    );
    let (m, _) = host.open();
    m.enable_inventory_cache();
    host.sim
        .write(&host.root().pci_device_attr(a(PF), "sriov_numvfs"), b"7")
        .unwrap();
    let vfs = vfs_of(&host, 7);
    let m = Arc::new(m);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // 1,000 events in ten bursts of 100 (add and change events for the 7 VFs and the PF).
    let sender = std::thread::spawn(move || {
        for burst in 0..10 {
            for n in 0..100 {
                let address = if n % 8 == 7 { a(PF) } else { vfs[n % 8] };
                let action = if (n + burst) % 3 == 0 {
                    Action::Other
                } else {
                    Action::Add
                };
                tx.send(DeviceEvent { action, address }).unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let t = Instant::now();
                m.invalidate_inventory();
                m.snapshot().unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        })
    };
    let (passes, events) = runtime.block_on(async {
        let (mut passes, mut events) = (0, 0);
        while let Some(batch) = next_batch(&mut rx, QUIET, LONGEST).await {
            passes += 1;
            events += batch.events;
            let m = Arc::clone(&m);
            tokio::task::spawn_blocking(move || {
                m.device_events(&caller(), &batch.added, &batch.removed)
                    .unwrap()
            })
            .await
            .unwrap();
        }
        (passes, events)
    });
    sender.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut latencies = reader.join().unwrap();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "1,000 events in {passes} passes; {} reads during the storm, p99 {:?}",
        latencies.len(),
        p99
    );
    assert_eq!(events, 1000);
    assert!(passes <= 3, "{passes} passes");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    let on_vfio = vfs_of(&host, 7)
        .iter()
        .filter(|v| host.sim.driver_of(**v).as_deref() == Some("vfio-pci"))
        .count();
    assert_eq!(on_vfio, 7);
}

#[test]
fn the_early_claim_reads_what_the_daemon_last_applied_and_sets_the_override() {
    use passthroughd::engine::early::claimed;
    let host = sriov_host();
    host.write_config(&format!(
        "version = 1\n\
         [[device]]\naddress = \"{NIC2}\"\n\
         [[device]]\naddress = \"{PAIR0}\"\ngroup = true\n\
         [[device]]\nmatch = {{ vendor = \"0x8086\", device = \"0x10ca\" }}\n\
         [[sriov]]\npf = \"{PF}\"\ncount = 2\nassign = [1]\n\
         [protect]\naddresses = [\"{DISK}\"]\n"
    ));
    {
        let (m, _) = host.open();
        m.assign(&caller(), &[a(NIC)], AssignOptions::default())
            .unwrap();
    }
    // A later edit of the file is not what the daemon applied: the claim ignores it.
    host.write_config("version = 1\n");
    let root = host.root();
    let dir = host.state_dir();
    let why = |addr: &str| claimed(&root, &dir, a(addr)).unwrap();
    assert_eq!(why(NIC2).unwrap(), "[[device]] 0000:03:00.0 (line 2)");
    assert!(why(PAIR1).unwrap().contains("0000:02:00.0"), "its group");
    assert_eq!(why(NIC).unwrap(), format!("stored request {NIC}"));
    let vf1 = host.sim.vf_address(a(PF), 1).unwrap().to_string();
    assert!(
        why(&vf1).is_some(),
        "a VF the match rule (and the entry) claims"
    );
    assert_eq!(why(ROUTED), None, "not claimed");
    assert_eq!(why(DISK), None, "protected");
    assert_eq!(why(ROOT_PORT), None, "a bridge never");
    // The entry point the udev rule runs: the override is set, once.
    host.sim.remove_device(a(NIC2)).unwrap();
    let mut nic2 = nic2_device();
    nic2.driver = None;
    host.sim.add_device(&nic2).unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_passthroughd"))
        .args(["--sysfs-root", root.root().to_str().unwrap()])
        .args(["--state-dir", dir.to_str().unwrap()])
        .args(["claim", NIC2])
        .output()
        .unwrap();
    println!("passthroughd claim took {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("driver_override=vfio-pci"));
    let value = std::fs::read_to_string(root.pci_device_attr(a(NIC2), "driver_override")).unwrap();
    assert_eq!(value.trim(), "vfio-pci");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_passthroughd"))
        .args(["--sysfs-root", root.root().to_str().unwrap()])
        .args(["--state-dir", dir.to_str().unwrap()])
        .args(["claim", ROUTED])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty());
    let value =
        std::fs::read_to_string(root.pci_device_attr(a(ROUTED), "driver_override")).unwrap();
    assert_eq!(
        value.trim(),
        "(null)",
        "an unclaimed function is left alone"
    );
}
