//! `passthroughctl libvirt-hook` as libvirt runs it (arguments, the domain XML on stdin),
//! against the service on a private bus with a scripted engine; and `lease`, `show --qemu`.
//!
//! The hook must never hang libvirt or block VMs it has nothing to do with: no-op operations
//! and domains without unmanaged PCI hostdevs never touch the bus (shown with a bus that does
//! not exist); a refused lease is one line and a non-zero exit; a start it gives up waiting for
//! is ended again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use passthroughd_proto::PciAddress;

/// A domain XML with one `<hostdev>` per (address, managed).
fn domain(name: &str, hostdevs: &[(&str, &str)]) -> String {
    let devices: String = hostdevs
        .iter()
        .map(|(address, managed)| {
            let a: PciAddress = address.parse().unwrap();
            format!(
                "<hostdev mode='subsystem' type='pci' managed='{managed}'><source>\
                 <address domain='{:#06x}' bus='{:#04x}' slot='{:#04x}' function='{:#x}'/>\
                 </source></hostdev>",
                a.domain(),
                a.bus(),
                a.device(),
                a.function()
            )
        })
        .collect();
    format!("<domain type='qemu'><name>{name}</name><devices>{devices}</devices></domain>")
}

/// Runs the hook with `xml` on stdin (libvirt's way), against `bus`.
fn hook(bus: &str, args: &[&str], xml: &str) -> Output {
    let mut child = Command::new(ctl_path())
        .arg("--bus")
        .arg(bus)
        .arg("libvirt-hook")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .spawn()
        .unwrap();
    // The hook may exit without reading (a no-op): a closed pipe is fine, as it is for libvirt.
    let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
    child.wait_with_output().unwrap()
}

const NOWHERE: &str = "unix:path=/nonexistent/passthroughd-test-bus";

#[test]
fn operations_other_than_prepare_and_release_never_touch_the_daemon() {
    let xml = domain("vm1", &[("0000:01:00.0", "no")]);
    for (op, sub) in [
        ("start", "begin"),
        ("started", "begin"),
        ("stopped", "end"),
        ("reconnect", "begin"),
        ("migrate", "begin"),
        ("restore", "begin"),
    ] {
        let started = Instant::now();
        let out = hook(NOWHERE, &["vm1", op, sub, "-"], &xml);
        assert!(out.status.success(), "{op} {sub}: {}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(5), "{op} {sub}");
        assert!(out.stderr.is_empty(), "{op} {sub}: {}", stderr(&out));
    }
}

#[test]
fn a_domain_without_unmanaged_pci_hostdevs_starts_without_the_daemon() {
    for xml in [
        domain("plain", &[]),
        domain("plain", &[("0000:01:00.0", "yes")]),
        "<domain type='qemu'><name>plain</name><devices><hostdev mode='subsystem' \
         type='usb'><source><vendor id='0x1'/><product id='0x2'/></source></hostdev>\
         </devices></domain>"
            .to_owned(),
    ] {
        for (op, sub) in [("prepare", "begin"), ("release", "end")] {
            let out = hook(NOWHERE, &["plain", op, sub, "-"], &xml);
            assert!(out.status.success(), "{op}: {}\n{xml}", stderr(&out));
        }
    }
    // With an unmanaged one and no daemon: the VM does not start, and the line says why.
    let out = hook(
        NOWHERE,
        &["vm1", "prepare", "begin", "-"],
        &domain("vm1", &[("0000:01:00.0", "no")]),
    );
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("passthroughd running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn prepare_leases_the_unmanaged_functions_and_release_ends_the_lease() {
    let h = Harness::start();
    let f = h.inventory();
    let (one, two, managed) = (
        f.functions[3].address.to_string(),
        f.functions[4].address.to_string(),
        f.functions[5].address.to_string(),
    );
    let xml = domain(
        "vm1",
        &[
            (one.as_str(), "no"),
            (managed.as_str(), "yes"),
            (two.as_str(), "no"),
        ],
    );
    let out = hook(&h.bus.address, &["vm1", "prepare", "begin", "-"], &xml);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("leased"), "{}", stdout(&out));
    let calls = h.engine.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let Call::LeaseStart(caller, owner, addresses) = &calls[0] else {
        panic!("{calls:?}")
    };
    assert_eq!(caller.uid, nix_uid());
    assert_eq!(owner.to_string(), "libvirt:vm1");
    let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    assert_eq!(
        addresses,
        [one.clone(), two.clone()],
        "managed='yes' is left alone"
    );

    let listed = h.ctl(&["lease", "list"]);
    assert!(
        stdout(&listed).contains("lease libvirt:vm1:"),
        "{}",
        stdout(&listed)
    );
    let listed = h.ctl(&["--json", "lease", "list"]);
    let doc: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(doc[0]["owner"], "libvirt:vm1");

    // Other operations in between change nothing.
    for (op, sub) in [("start", "begin"), ("started", "begin"), ("stopped", "end")] {
        assert!(
            hook(&h.bus.address, &["vm1", op, sub, "-"], &xml)
                .status
                .success()
        );
    }
    assert_eq!(h.engine.calls().len(), 1);
    let out = hook(&h.bus.address, &["vm1", "release", "end", "-"], &xml);
    assert!(out.status.success(), "{}", stderr(&out));
    let calls = h.engine.calls();
    assert!(
        matches!(&calls[1], Call::LeaseEnd(_, o) if o.to_string() == "libvirt:vm1"),
        "{calls:?}"
    );
    // Ending it again (libvirt calls release after a failed start too) is not an error.
    let out = hook(&h.bus.address, &["vm1", "release", "end", "-"], &xml);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn nix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_refused_lease_is_one_line_and_a_nonzero_exit() {
    let h = Harness::start();
    *h.engine.script.lock().unwrap() = Script::Refused;
    let address = h.inventory().functions[3].address.to_string();
    let out = hook(
        &h.bus.address,
        &["vm2", "prepare", "begin", "-"],
        &domain("vm2", &[(address.as_str(), "no")]),
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let line = stderr(&out);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("domain vm2"), "{line}");
    assert!(line.contains("refused"), "{line}");
}

#[test]
fn bad_xml_fails_the_start_cleanly_and_asks_nothing() {
    let h = Harness::start();
    for (xml, says) in [
        ("<domain><name>vm1</name><devices>".to_owned(), "malformed"),
        (
            domain("other", &[("0000:01:00.0", "no")]),
            "for domain \"other\"",
        ),
        (
            "<domain><name>vm1</name><devices><hostdev type='pci'><source><address \
             bus='0x01' slot='0x20' function='0'/></source></hostdev></devices></domain>"
                .to_owned(),
            "slot",
        ),
    ] {
        let out = hook(&h.bus.address, &["vm1", "prepare", "begin", "-"], &xml);
        assert_eq!(out.status.code(), Some(2), "{xml}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1);
    }
    assert!(h.engine.calls().is_empty(), "{:?}", h.engine.calls());
}

#[test]
fn a_start_the_hook_gives_up_on_is_ended_again() {
    let h = Harness::start();
    *h.engine.script.lock().unwrap() = Script::Slow(Duration::from_secs(4));
    let address = h.inventory().functions[3].address.to_string();
    let started = Instant::now();
    let out = hook(
        &h.bus.address,
        &["slow", "prepare", "begin", "-", "--timeout", "1"],
        &domain("slow", &[(address.as_str(), "no")]),
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did not answer within 1 s"),
        "{}",
        stderr(&out)
    );
    let calls = h.engine.calls();
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::LeaseEnd(_, o) if o.to_string() == "libvirt:slow")),
        "{calls:?}"
    );
}

#[test]
fn lease_start_and_end_from_the_cli_for_other_vmms() {
    let h = Harness::start();
    let address = h.inventory().functions[3].address.to_string();
    let out = h.ctl(&["lease", "start", "vmm:ch-1", &address]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = h.ctl(&["lease", "end", "vmm:ch-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = h.ctl(&["lease", "end", "vmm:ch-1"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "no lease: NotFound: {}",
        stderr(&out)
    );
    for bad in ["ch-1", "xen:vm", "vmm:", "vmm:a/b"] {
        let out = h.ctl(&["lease", "end", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
    assert_eq!(
        h.engine.calls().len(),
        3,
        "bad owners never reach the daemon"
    );
}

#[test]
fn show_prints_ready_to_paste_vmm_arguments_with_group_companions() {
    let h = Harness::start();
    let inventory = h.inventory();
    // A group with two endpoints or more, and its members.
    let group = inventory
        .groups
        .iter()
        .find(|g| {
            g.members
                .iter()
                .filter(|m| inventory.function(**m).is_some_and(|f| !f.is_bridge()))
                .count()
                >= 2
        })
        .expect("the synthetic host has a shared group");
    let members: Vec<String> = group
        .members
        .iter()
        .filter(|m| inventory.function(**m).is_some_and(|f| !f.is_bridge()))
        .map(ToString::to_string)
        .collect();
    let first = members[0].as_str();
    let qemu = stdout(&h.ctl(&["show", first, "--qemu"]));
    let expected: String = members
        .iter()
        .map(|m| format!("-device vfio-pci,host={m}\n"))
        .collect();
    assert_eq!(qemu, expected);
    let ch = stdout(&h.ctl(&["show", first, "--cloud-hypervisor"]));
    assert!(
        ch.starts_with("--device path=/sys/bus/pci/devices/"),
        "{ch}"
    );
    assert_eq!(ch.matches("path=").count(), members.len(), "{ch}");
    let xml = stdout(&h.ctl(&["show", first, "--libvirt"]));
    assert_eq!(xml.matches("<hostdev ").count(), members.len(), "{xml}");
    assert!(xml.contains("managed='no'"), "{xml}");
    let out = h.ctl(&["show", first, "--qemu", "--libvirt"]);
    assert_eq!(out.status.code(), Some(2), "one VMM at a time");
}
