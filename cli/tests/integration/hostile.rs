//! Hostile callers on a real `dbus-daemon`: every mutating method called raw (`dbus-send`) by
//! uid 65534 without polkit, and oversized, malformed, mistyped and duplicate arguments from
//! root. Each case gets its error name at once and nothing reaches the engine (the scripted
//! engine records every call). The number of cases is printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use crate::common::*;
use passthroughd_proto::dbus as proto_dbus;

const INVALID: &str = "org.passthroughd.Passthrough1.Error.InvalidArgument";
const DENIED: &str = "org.passthroughd.Passthrough1.Error.PermissionDenied";

/// `dbus-send` as uid 65534: the error name it printed, or "ok".
fn send_as_nobody(bus: &str, method: &str, args: &[&str]) -> String {
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "dbus-send",
        ])
        .arg(format!("--bus={bus}"))
        .args(["--print-reply", "--reply-timeout=20000"])
        .arg(format!("--dest={}", proto_dbus::SERVICE))
        .arg(proto_dbus::PATH)
        .arg(format!("{}.{method}", proto_dbus::INTERFACE))
        .args(args)
        .output()
        .unwrap();
    if o.status.success() {
        return "ok".into();
    }
    // "Error org.x.Error.Name: message"
    let err = stderr(&o);
    err.strip_prefix("Error ")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or(&err)
        .to_owned()
}

#[test]
fn hostile_callers_are_refused_at_once_and_reach_nothing() {
    let h = Harness::start();
    let pf = h
        .inventory()
        .functions
        .iter()
        .find(|f| f.sriov.is_some())
        .unwrap()
        .address
        .to_string();
    let mut cases = 0;

    // Every mutating method, with valid arguments, from an unprivileged uid.
    let array = "array:string:0000:00:01.3";
    let pf_arg = format!("string:{pf}");
    let unprivileged: [(&str, Vec<&str>); 9] = [
        (
            "Assign",
            vec![array, "boolean:false", "boolean:false", "boolean:false"],
        ),
        ("Release", vec![array, "boolean:false", "boolean:false"]),
        (
            "VfCreate",
            vec![
                &pf_arg,
                "uint32:2",
                "boolean:true",
                "boolean:false",
                "boolean:false",
            ],
        ),
        ("VfDestroy", vec![&pf_arg, "boolean:true"]),
        ("Apply", vec!["boolean:false"]),
        ("Reload", vec![]),
        ("LeaseStart", vec!["string:libvirt:vm1", array]),
        ("LeaseEnd", vec!["string:libvirt:vm1"]),
        ("Verify", vec!["string:0000:00:01.3"]),
    ];
    for (method, args) in &unprivileged {
        assert_eq!(
            send_as_nobody(&h.bus.address, method, args),
            DENIED,
            "{method} as uid 65534"
        );
        cases += 1;
    }
    // Reads stay open to everyone.
    assert_eq!(send_as_nobody(&h.bus.address, "ListFunctions", &[]), "ok");

    // Oversized, malformed and duplicate arguments from root.
    let _rt = h.runtime.enter();
    let conn = h.client();
    let raw = h
        .runtime
        .block_on(zbus::Proxy::new(
            &conn,
            proto_dbus::SERVICE,
            proto_dbus::PATH,
            proto_dbus::INTERFACE,
        ))
        .unwrap();
    let error_name = |r: zbus::Result<zbus::message::Message>| match r {
        Ok(_) => "ok".to_owned(),
        Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        Err(e) => format!("transport: {e}"),
    };
    let mib = "0".repeat(1 << 20);
    let many: Vec<String> = (0..100_000)
        .map(|i| format!("0000:{:02x}:{:02x}.{}", i % 256, (i / 256) % 32, i % 8))
        .collect();
    let twice = vec!["0000:00:01.3".to_owned(), "00:01.3".to_owned()];
    let one = vec!["0000:00:01.3".to_owned()];
    let bad = |name: &str| vec![name.to_owned()];
    h.runtime.block_on(async {
        let expect_invalid: Vec<(&str, zbus::Result<zbus::message::Message>)> = vec![
            ("Show, 1 MiB", raw.call_method("Show", &(&mib,)).await),
            ("Verify, 1 MiB", raw.call_method("Verify", &(&mib,)).await),
            (
                "Assign, one 1 MiB address",
                raw.call_method("Assign", &(bad(&mib), false, false, false))
                    .await,
            ),
            (
                "Assign, 100,000 addresses",
                raw.call_method("Assign", &(&many, false, false, false))
                    .await,
            ),
            (
                "Release, 100,000 addresses",
                raw.call_method("Release", &(&many, true, false)).await,
            ),
            (
                "LeaseStart, 100,000 addresses",
                raw.call_method("LeaseStart", &("libvirt:vm1", &many)).await,
            ),
            (
                "LeaseStart, 1 MiB owner",
                raw.call_method("LeaseStart", &(format!("libvirt:{mib}"), &one))
                    .await,
            ),
            (
                "LeaseEnd, 1 MiB owner",
                raw.call_method("LeaseEnd", &(format!("libvirt:{mib}"),))
                    .await,
            ),
            (
                "LeaseEnd, owner with a newline",
                raw.call_method("LeaseEnd", &("libvirt:vm1\nx",)).await,
            ),
            (
                "LeaseEnd, owner with a path",
                raw.call_method("LeaseEnd", &("libvirt:../../etc",)).await,
            ),
            (
                "LeaseEnd, unknown kind",
                raw.call_method("LeaseEnd", &("root:vm1",)).await,
            ),
            (
                "VfCreate, 1 MiB PF",
                raw.call_method("VfCreate", &(&mib, 1u32, false, false, false))
                    .await,
            ),
            (
                "VfCreate, 4,294,967,295 VFs",
                raw.call_method("VfCreate", &(&pf, u32::MAX, false, false, false))
                    .await,
            ),
            (
                "VfDestroy, a path",
                raw.call_method("VfDestroy", &("/sys/bus/pci", true)).await,
            ),
            (
                "Assign, a path",
                raw.call_method("Assign", &(bad("../../../dev/mem"), false, false, false))
                    .await,
            ),
            (
                "Assign, the same function twice",
                raw.call_method("Assign", &(&twice, false, false, false))
                    .await,
            ),
            (
                "Release, the same function twice",
                raw.call_method("Release", &(&twice, false, false)).await,
            ),
            (
                "LeaseStart, the same function twice",
                raw.call_method("LeaseStart", &("libvirt:vm1", &twice))
                    .await,
            ),
            (
                "Assign, no address",
                raw.call_method("Assign", &(Vec::<String>::new(), false, false, false))
                    .await,
            ),
        ];
        for (case, result) in expect_invalid {
            assert_eq!(error_name(result), INVALID, "{case}");
            cases += 1;
        }
        // Types D-Bus allows but the methods do not take: bytes that are not UTF-8 where a
        // string array goes, nesting, a wrong arity. The bus library refuses them by signature.
        let mistyped: Vec<(&str, zbus::Result<zbus::message::Message>)> = vec![
            (
                "Assign, bytes (not UTF-8)",
                raw.call_method("Assign", &(vec![0xffu8, 0xfe, 0x00], false, false, false))
                    .await,
            ),
            (
                "Assign, arrays nested 4 deep",
                raw.call_method(
                    "Assign",
                    &(vec![vec![vec![one.clone()]]], false, false, false),
                )
                .await,
            ),
            (
                "Show, a variant",
                raw.call_method("Show", &(zbus::zvariant::Value::from(7u32),))
                    .await,
            ),
            (
                "Release, missing arguments",
                raw.call_method("Release", &(&one,)).await,
            ),
            (
                "VfCreate, a negative count",
                raw.call_method("VfCreate", &(&pf, -1i32, false, false, false))
                    .await,
            ),
        ];
        for (case, result) in mistyped {
            // zbus answers a signature mismatch under its own name.
            let name = error_name(result);
            assert!(
                [
                    "org.freedesktop.zbus.Error",
                    "org.freedesktop.DBus.Error.InvalidArgs"
                ]
                .contains(&name.as_str()),
                "{case}: {name}"
            );
            cases += 1;
        }
    });
    // A NUL inside a string is not D-Bus at all: the bus drops the sender's connection before
    // the daemon sees anything, and the daemon goes on serving others.
    h.runtime.block_on(async {
        let conn = h.bus.bus().builder().unwrap().build().await.unwrap();
        let raw = zbus::Proxy::new(
            &conn,
            proto_dbus::SERVICE,
            proto_dbus::PATH,
            proto_dbus::INTERFACE,
        )
        .await
        .unwrap();
        let r = raw
            .call_method("Assign", &(bad("0000:00:01.3\0"), false, false, false))
            .await;
        assert!(error_name(r).starts_with("transport: "), "a NUL");
        cases += 1;
    });
    assert_eq!(
        send_as_nobody(&h.bus.address, "ListFunctions", &[]),
        "ok",
        "still serving"
    );
    assert!(
        h.engine.calls().is_empty(),
        "reached the engine: {:?}",
        h.engine.calls()
    );
    println!("hostile: {cases} cases refused with their error names, none reached the engine");
    assert_eq!(cases, 34);
}
