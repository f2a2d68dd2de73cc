//! passthroughctl against passthroughd's D-Bus service on a private dbus-daemon: output of the
//! read commands against the tree, bad inputs with their exit codes and one-line messages,
//! authorization, error mapping, time limits, signals and the introspection contract.
//!
//! The service runs over a scripted engine here (real inventory reads, scripted mutations);
//! `dbus_engine.rs` runs the same paths over the real engine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use passthroughd::service::ServiceConfig;
use passthroughd_proto::dbus::{self as proto_dbus, ManagerProxy};
use passthroughd_proto::table;
use zbus::zvariant::OwnedValue;

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", stdout(o)))
}

#[test]
fn list_groups_and_show_print_the_tree() {
    let h = Harness::start();
    let inventory = h.inventory();

    let o = h.ctl(&["list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), table::functions(&inventory.functions));
    let o = h.ctl(&["--json", "list"]);
    assert_eq!(
        json(&o),
        serde_json::to_value(&inventory.functions).unwrap()
    );

    let o = h.ctl(&["groups"]);
    assert_eq!(stdout(&o), table::groups(&inventory.groups));
    let o = h.ctl(&["groups", "--json"]);
    assert_eq!(json(&o), serde_json::to_value(&inventory.groups).unwrap());

    // A VF, by its short address.
    let vf = inventory
        .functions
        .iter()
        .find(|f| f.vf_of.is_some())
        .unwrap();
    let short = format!(
        "{:02x}:{:02x}.{}",
        vf.address.bus(),
        vf.address.device(),
        vf.address.function()
    );
    let o = h.ctl(&["show", &short]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with(&table::function_detail(vf)),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("vf of"));
    assert!(stdout(&o).contains("passthrough"), "the readiness line");
    let o = h.ctl(&["--json", "show", &vf.address.to_string()]);
    let mut shown = json(&o);
    assert_eq!(
        shown["passthrough"]["ready"],
        vf.driver.as_deref() == Some("vfio-pci")
    );
    shown.as_object_mut().unwrap().remove("passthrough");
    assert_eq!(shown, serde_json::to_value(vf).unwrap());

    let o = h.ctl(&["--json", "status"]);
    assert_eq!(json(&o)["version"], "test");
    let o = h.ctl(&["status"]);
    assert!(
        stdout(&o).starts_with("passthroughd test, up 7s\n"),
        "{}",
        stdout(&o)
    );
    assert!(h.engine.calls().is_empty());
}

#[test]
fn a_root_caller_is_allowed_and_the_engine_gets_typed_arguments() {
    let h = Harness::start();
    let o = h.ctl(&["assign", "00:01.3", "0000:00:02.3", "--group", "--runtime"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "0000:00:01.3 igb -> vfio-pci\n0000:00:02.3 igb -> vfio-pci\n"
    );
    let o = h.ctl(&["--json", "release", "00:01.3"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)[0]["new_driver"], "igb");
    let calls = h.engine.calls();
    assert_eq!(calls.len(), 2);
    match &calls[0] {
        Call::Assign(caller, addresses, options) => {
            assert_eq!(caller.uid, 0);
            assert!(caller.bus_name.starts_with(':'));
            assert_eq!(addresses.len(), 2);
            assert_eq!(addresses[0].to_string(), "0000:00:01.3");
            assert!(options.group && options.runtime && !options.force);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&calls[1], Call::Release(_, a, o) if a.len() == 1 && !o.runtime));
}

/// (arguments, exit code, a piece of the one-line message)
const BAD_CLI_INPUTS: &[(&[&str], i32, &str)] = &[
    (&["show", "0000:01:00"], 2, "not of the form"),
    (&["show", "../../devices"], 2, "contains '/'"),
    (&["show", ""], 2, "empty PCI address"),
    (&["show", "0000:01:20.0"], 2, "device 0x20 is out of range"),
    (&["show", "0000:01:00.8"], 2, "function 8 is out of range"),
    (&["show", "0000:01:00.0 "], 2, "contains ' '"),
    (
        &["show", "0000:01:00.0;rm"],
        2,
        "contains ';' at position 12",
    ),
    (&["show", "000:01:00.0"], 2, "domain must have 4 to 8"),
    (&["show", "0000:1:00.0"], 2, "bus must have 2"),
    (&["show", "0000000000000:01:00.0"], 2, "characters long"),
    (&["show", "0001:00:00.0"], 4, "no PCI function 0001:00:00.0"),
    (&["show", "ff:1f.7"], 4, "no PCI function 0000:ff:1f.7"),
    (
        &["show", "10000:02:05.0"],
        4,
        "no PCI function 10000:02:05.0",
    ),
    (&["show"], 2, "ADDR"),
    (&["show", "00:00.0", "00:00.1"], 2, "unexpected argument"),
    (&["assign"], 2, "ADDR"),
    (&["release"], 2, "ADDR"),
    (
        &["assign", "00:01.3", "0000:00:01.3"],
        2,
        "0000:00:01.3 is named more than once",
    ),
    (
        &["release", "00:01.3", "00:01.3"],
        2,
        "named more than once",
    ),
    (&["assign", "00:01.3", "0000:00:01.x"], 2, "contains 'x'"),
    (
        &["assign", "00:01.3", "--groups"],
        2,
        "unexpected argument '--groups'",
    ),
    (
        &["release", "00:01.3", "--force"],
        2,
        "unexpected argument '--force'",
    ),
    (&["frobnicate"], 2, "unrecognized subcommand 'frobnicate'"),
    (&["list", "--bogus"], 2, "unexpected argument '--bogus'"),
    (&["list", "extra"], 2, "unexpected argument 'extra'"),
    (&["vf", "list"], 2, "PF"),
    (&["vf", "create", "00:01.0"], 2, "--count"),
    (
        &["vf", "create", "00:01.0", "--count", "x"],
        2,
        "invalid value 'x'",
    ),
    (
        &["vf", "create", "00:01.0", "--count", "-1"],
        2,
        "unexpected argument '-1'",
    ),
    (&["vf", "create", "../x", "--count", "1"], 2, "contains '/'"),
    (
        &["vf", "destroy", "00:01.0", "--runtime"],
        2,
        "unexpected argument '--runtime'",
    ),
    (
        &["vf", "frob", "00:01.0"],
        2,
        "unrecognized subcommand 'frob'",
    ),
    (&[], 2, "requires a subcommand"),
];

#[test]
fn bad_cli_inputs_get_their_exit_code_and_one_line_and_change_nothing() {
    let h = Harness::start();
    let before = h.inventory();
    for (args, code, message) in BAD_CLI_INPUTS {
        let o = h.ctl(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err:?} lacks {message:?}");
        assert!(err.starts_with("passthroughctl: "), "{args:?}: {err:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        // With --json the same failure is one JSON document on stdout.
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let o = h.ctl(&with_json);
        assert_eq!(o.status.code(), Some(*code), "{args:?}");
        assert_eq!(json(&o)["error"]["exit_code"], *code, "{args:?}");
    }
    assert!(h.engine.calls().is_empty(), "{:?}", h.engine.calls());
    assert_eq!(h.inventory().functions, before.functions);
}

#[test]
fn vf_commands_reach_the_engine_and_print_tables_or_json() {
    let h = Harness::start();
    let inventory = h.inventory();
    let pf = inventory
        .functions
        .iter()
        .find(|f| f.sriov.is_some_and(|s| s.num_vfs > 0))
        .unwrap()
        .address;
    let short = format!("{:02x}:{:02x}.{}", pf.bus(), pf.device(), pf.function());
    let o = h.ctl(&["vf", "create", &short, "--count", "3", "--assign"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("INDEX"), "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.contains("vfio-pci"), "{out}");
    let o = h.ctl(&[
        "--json",
        "vf",
        "create",
        &short,
        "--count",
        "2",
        "--runtime",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let doc = json(&o);
    assert_eq!(doc.as_array().unwrap().len(), 2);
    assert_eq!(doc[1]["index"], 1);
    assert_eq!(doc[1]["assigned"], false);
    let o = h.ctl(&["--json", "vf", "destroy", &short, "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)[0]["address"], pf.to_string());
    let calls = h.engine.calls();
    assert!(
        matches!(&calls[0], Call::VfCreate(c, p, 3, true, false, false) if c.uid == 0 && *p == pf)
    );
    assert!(matches!(&calls[1], Call::VfCreate(_, p, 2, false, true, false) if *p == pf));
    assert!(matches!(&calls[2], Call::VfDestroy(_, p, true) if *p == pf));

    // vf list: real inventory reads.
    let o = h.ctl(&["--json", "vf", "list", &pf.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let vfs = inventory.vfs_of(pf);
    let doc = json(&o);
    assert_eq!(doc.as_array().unwrap().len(), vfs.len());
    assert_eq!(doc[0]["address"], vfs[0].address.to_string());
    let o = h.ctl(&["vf", "list", &pf.to_string()]);
    assert_eq!(stdout(&o).lines().count(), vfs.len() + 1);
    // A function without SR-IOV: InvalidArgument (2); none at all: NotFound (4).
    let plain = inventory
        .functions
        .iter()
        .find(|f| f.sriov.is_none() && f.vf_of.is_none())
        .unwrap()
        .address
        .to_string();
    let o = h.ctl(&["vf", "list", &plain]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not SR-IOV capable"));
    let o = h.ctl(&["--json", "vf", "list", "ff:1f.7"]);
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(json(&o)["error"]["exit_code"], 4);

    // Engine errors: exit codes as for assign.
    for (script, code) in [
        (Script::Busy, 5),
        (Script::Refused, 5),
        (Script::NotFound, 4),
        (Script::Failed, 1),
    ] {
        *h.engine.script.lock().unwrap() = script.clone();
        for args in [
            &["vf", "create", &short, "--count", "1"][..],
            &["vf", "destroy", &short],
        ] {
            let o = h.ctl(args);
            assert_eq!(
                o.status.code(),
                Some(code),
                "{script:?} {args:?}: {}",
                stderr(&o)
            );
            assert_eq!(stderr(&o).lines().count(), 1);
            assert!(stderr(&o).starts_with(&format!("passthroughctl: vf {}", args[1])));
        }
    }
    // Mutations need root or polkit.
    *h.engine.script.lock().unwrap() = Script::Succeed;
    let calls = h.engine.calls().len();
    let o = h.ctl_as_nobody(&["vf", "create", &short, "--count", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = h.ctl_as_nobody(&["vf", "destroy", &short]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(h.engine.calls().len(), calls);
    // Reads do not.
    let o = h.ctl_as_nobody(&["vf", "list", &short]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn bus_flag_errors_and_an_unreachable_daemon() {
    let h = Harness::start();
    let o = ctl("nonsense", &["list"], false);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("neither \"system\", \"session\" nor a D-Bus address"));

    // No bus at that address.
    let missing = format!("unix:path={}/nothing-here", h.bus.dir.path().display());
    let o = ctl(&missing, &["list"], false);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).contains("systemctl start passthroughd"));
    assert_eq!(stderr(&o).lines().count(), 1);

    // A bus, but no daemon on it.
    let empty = TestBus::start();
    for args in [&["list"][..], &["--json", "status"], &["assign", "00:01.3"]] {
        let o = ctl(&empty.address, args, false);
        assert_eq!(o.status.code(), Some(69), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("is passthroughd running?"),
            "{}",
            stderr(&o)
        );
    }
    let o = ctl(&empty.address, &["--json", "list"], false);
    assert_eq!(json(&o)["error"]["exit_code"], 69);
    assert!(h.engine.calls().is_empty());
}

#[test]
fn engine_errors_map_to_names_and_exit_codes() {
    let h = Harness::start();
    for (script, code, message) in [
        (Script::NotFound, 4, "no PCI function 0000:00:01.3"),
        (
            Script::Refused,
            5,
            "0000:00:01.3 refused: it carries the default route via eth0",
        ),
        (Script::Busy, 5, "0000:00:01.3 is open by a VM"),
        (
            Script::Failed,
            1,
            "writing 0000:00:01.3/driver_override: Input/output error (os error 5)",
        ),
    ] {
        *h.engine.script.lock().unwrap() = script.clone();
        let o = h.ctl(&["assign", "00:01.3"]);
        assert_eq!(o.status.code(), Some(code), "{script:?}: {}", stderr(&o));
        assert_eq!(
            stderr(&o),
            format!("passthroughctl: assign 0000:00:01.3: {message}\n")
        );
        let o = h.ctl(&["--json", "release", "00:01.3"]);
        assert_eq!(o.status.code(), Some(code));
        assert_eq!(json(&o)["error"]["exit_code"], code);
    }
}

/// Calls the D-Bus methods directly, as a client other than passthroughctl would.
#[test]
fn bad_dbus_calls_get_error_names() {
    let h = Harness::start();
    let _rt = h.runtime.enter();
    let conn = h.client();
    let proxy = h.runtime.block_on(ManagerProxy::new(&conn)).unwrap();
    let name = |r: Result<_, proto_dbus::Error>| match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => zbus::DBusError::name(&e).to_string(),
    };
    let invalid = "org.passthroughd.Passthrough1.Error.InvalidArgument";
    h.runtime.block_on(async {
        assert_eq!(name(proxy.show("..").await.map(drop)), invalid);
        assert_eq!(name(proxy.show("0000:01:00.0\n").await.map(drop)), invalid);
        assert_eq!(name(proxy.show(&"a".repeat(10_000)).await.map(drop)), invalid);
        assert_eq!(
            name(proxy.show("0001:00:00.0").await.map(drop)),
            "org.passthroughd.Passthrough1.Error.NotFound"
        );
        assert_eq!(name(proxy.assign(&[], false, false, false).await.map(drop)), invalid);
        assert_eq!(
            name(proxy.assign(&["00:01.3", "0000:00:01.3"], false, false, false).await.map(drop)),
            invalid
        );
        assert_eq!(name(proxy.assign(&["00:01.3", "x"], false, false, false).await.map(drop)), invalid);
        assert_eq!(name(proxy.release(&[], false, false).await.map(drop)), invalid);
        assert_eq!(name(proxy.release(&["/sys/bus"], true, false).await.map(drop)), invalid);
        let err = proxy.show("0000:01:20.0").await.unwrap_err();
        assert_eq!(err.to_string(), "PCI address \"0000:01:20.0\": device 0x20 is out of range (0x00 to 0x1f)");

        // Wrong signatures and unknown methods are the bus library's errors.
        let raw = zbus::Proxy::new(&conn, proto_dbus::SERVICE, proto_dbus::PATH, proto_dbus::INTERFACE)
            .await
            .unwrap();
        let r: zbus::Result<()> = raw.call("Show", &(42u32,)).await;
        assert!(matches!(&r, Err(zbus::Error::MethodError(_, Some(m), _)) if m.contains("Signature mismatch")), "{r:?}");
        let r: zbus::Result<()> = raw.call("Assign", &(vec!["00:01.3"],)).await;
        assert!(matches!(&r, Err(zbus::Error::MethodError(_, Some(m), _)) if m.contains("Signature mismatch")), "{r:?}");
        let r: zbus::Result<()> = raw.call("Frobnicate", &()).await;
        assert!(matches!(r, Err(zbus::Error::MethodError(n, _, _)) if n.as_str() == "org.freedesktop.DBus.Error.UnknownMethod"));
    });
    assert!(h.engine.calls().is_empty(), "{:?}", h.engine.calls());
}

#[test]
fn a_non_root_caller_without_polkit_is_denied_and_nothing_changes() {
    let h = Harness::start();
    for args in [
        &["assign", "00:01.3"][..],
        &["assign", "00:01.3", "--force", "--group"],
        &["release", "00:01.3", "--runtime"],
    ] {
        let o = h.ctl_as_nobody(args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("uid 65534 is not root and polkit could not be asked"),
            "{err}"
        );
        assert!(
            err.contains("org.freedesktop.DBus.Error.ServiceUnknown"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
    }
    // Reads need no authorization.
    let o = h.ctl_as_nobody(&["--json", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(h.engine.calls().is_empty());
}

/// A stand-in polkit authority that answers as told and records the subject it was asked about.
struct FakePolkit {
    answer: (bool, bool),
    seen: Arc<Mutex<Vec<Asked>>>,
}

/// What polkit was asked: subject kind, subject name, action, flags.
type Asked = (String, String, String, u32);

#[zbus::interface(name = "org.freedesktop.PolicyKit1.Authority")]
impl FakePolkit {
    async fn check_authorization(
        &self,
        subject: (String, HashMap<String, OwnedValue>),
        action_id: String,
        _details: HashMap<String, String>,
        flags: u32,
        _cancellation_id: String,
    ) -> (bool, bool, HashMap<String, String>) {
        let name: String = subject
            .1
            .get("name")
            .and_then(|v| String::try_from(v.clone()).ok())
            .unwrap_or_default();
        self.seen
            .lock()
            .unwrap()
            .push((subject.0, name, action_id, flags));
        (self.answer.0, self.answer.1, HashMap::new())
    }
}

#[test]
fn polkit_is_asked_about_the_callers_bus_name_and_only_a_plain_yes_allows() {
    for (answer, code) in [
        ((true, false), 0),
        ((false, true), 3),
        ((false, false), 3),
        ((true, true), 3),
    ] {
        let h = Harness::start();
        let _rt = h.runtime.enter();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let _polkit = h.runtime.block_on(async {
            h.bus
                .bus()
                .builder()
                .unwrap()
                .serve_at(
                    "/org/freedesktop/PolicyKit1/Authority",
                    FakePolkit {
                        answer,
                        seen: seen.clone(),
                    },
                )
                .unwrap()
                .name("org.freedesktop.PolicyKit1")
                .unwrap()
                .build()
                .await
                .unwrap()
        });
        let o = h.ctl_as_nobody(&["assign", "00:01.3"]);
        assert_eq!(o.status.code(), Some(code), "{answer:?}: {}", stderr(&o));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let (kind, name, action, flags) = &seen[0];
        assert_eq!(kind, "system-bus-name");
        assert_eq!(action, "org.passthroughd.manage-devices");
        assert_eq!(*flags, 0, "no user interaction");
        assert!(name.starts_with(':'));
        assert_ne!(
            Some(name.as_str()),
            h.connection.unique_name().map(|n| n.as_str()),
            "never the daemon itself"
        );
        let calls = h.engine.calls();
        if code == 0 {
            match &calls[..] {
                [Call::Assign(caller, _, _)] => {
                    assert_eq!(caller.uid, 65534);
                    assert_eq!(&caller.bus_name, name, "polkit was asked about the caller");
                }
                other => panic!("{other:?}"),
            }
        } else {
            assert!(calls.is_empty(), "{calls:?}");
            assert!(stderr(&o).contains("uid 65534"), "{}", stderr(&o));
        }
    }
}

#[test]
fn a_slow_mutation_times_out_as_busy_and_still_signals_when_done() {
    let config = ServiceConfig {
        time_limit: Duration::from_millis(300),
        ..ServiceConfig::default()
    };
    let h = Harness::start_with(TestBus::start(), SHAPE, config);
    *h.engine.script.lock().unwrap() = Script::Slow(Duration::from_millis(900));
    let _rt = h.runtime.enter();
    let conn = h.client();
    let (mut driver, mut assignment) = h.runtime.block_on(async {
        let proxy = ManagerProxy::new(&conn).await.unwrap();
        (
            proxy.receive_driver_changed().await.unwrap(),
            proxy.receive_assignment_changed().await.unwrap(),
        )
    });
    let started = std::time::Instant::now();
    let o = h.ctl(&["assign", "00:01.3"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did not finish within 300 ms"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_millis(850));
    // Reads are not blocked by the slow mutation.
    let o = h.ctl(&["--json", "status"]);
    assert_eq!(o.status.code(), Some(0));
    h.runtime.block_on(async {
        use futures_util_lite::next;
        let d = tokio::time::timeout(Duration::from_secs(5), next(&mut driver))
            .await
            .unwrap();
        let args = d.args().unwrap();
        assert_eq!(
            (args.address, args.old, args.new),
            ("0000:00:01.3", "igb", "vfio-pci")
        );
        let a = tokio::time::timeout(Duration::from_secs(5), next(&mut assignment))
            .await
            .unwrap();
        let args = a.args().unwrap();
        assert_eq!((args.address, args.assigned), ("0000:00:01.3", true));
    });
}

/// `StreamExt::next` without a futures dependency.
mod futures_util_lite {
    use std::future::poll_fn;
    use std::pin::Pin;

    pub async fn next<S: zbus::export::futures_core::Stream + Unpin>(s: &mut S) -> S::Item {
        poll_fn(|cx| Pin::new(&mut *s).poll_next(cx))
            .await
            .expect("stream ended")
    }
}

/// The interface element of an introspection document, whitespace-normalized.
fn interface_element(xml: &str) -> String {
    let start = xml
        .find(r#"<interface name="org.passthroughd.Passthrough1.Manager">"#)
        .expect("interface present");
    let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
    // Comments are documentation in the checked-in file, not part of the contract.
    let mut text = xml[start..end].to_owned();
    while let Some(s) = text.find("<!--") {
        let e = s + text[s..].find("-->").unwrap() + 3;
        text.replace_range(s..e, "");
    }
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("> <", "><")
}

#[test]
fn the_served_interface_matches_the_checked_in_xml() {
    let h = Harness::start();
    let _rt = h.runtime.enter();
    let conn = h.client();
    let served = h.runtime.block_on(async {
        let proxy = zbus::fdo::IntrospectableProxy::builder(&conn)
            .destination(proto_dbus::SERVICE)
            .unwrap()
            .path(proto_dbus::PATH)
            .unwrap()
            .build()
            .await
            .unwrap();
        proxy.introspect().await.unwrap()
    });
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/org.passthroughd.Passthrough1.Manager.xml"
    );
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert_eq!(
        interface_element(&served),
        interface_element(&checked_in),
        "the served interface differs from {path}; served:\n{served}"
    );
}

#[test]
fn reads_share_a_bounded_pool_and_are_refused_at_once_when_it_is_full() {
    let config = ServiceConfig {
        readers: 2,
        read_wait: Duration::from_millis(200),
        ..ServiceConfig::default()
    };
    let h = Harness::start_with(TestBus::start(), SHAPE, config);
    *h.engine.slow_reads.lock().unwrap() = Some(Duration::from_millis(1500));
    let _rt = h.runtime.enter();
    let conn = h.client();
    let started = std::time::Instant::now();
    let results: Vec<Result<usize, String>> = h.runtime.block_on(async {
        let proxy = ManagerProxy::new(&conn).await.unwrap();
        let calls = (0..6).map(|_| {
            let proxy = proxy.clone();
            async move {
                let started = std::time::Instant::now();
                let result = proxy.list_functions().await;
                (started.elapsed(), result)
            }
        });
        let mut handles = Vec::new();
        for call in calls {
            handles.push(tokio::spawn(call));
        }
        let mut out = Vec::new();
        for h in handles {
            let (took, result) = h.await.unwrap();
            out.push(match result {
                Ok(rows) => Ok(rows.len()),
                Err(e) => {
                    assert!(took < Duration::from_millis(800), "refused late: {took:?}");
                    Err(e.to_string())
                }
            });
        }
        out
    });
    let refused: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 4, "{results:?}");
    assert!(
        refused[0].contains("busy with other reads"),
        "{}",
        refused[0]
    );
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    // Status never waits for the pool.
    *h.engine.slow_reads.lock().unwrap() = Some(Duration::from_secs(3));
    let conn2 = h.client();
    h.runtime.block_on(async {
        let proxy = ManagerProxy::new(&conn2).await.unwrap();
        let p2 = proxy.clone();
        let _busy = tokio::spawn(async move { p2.list_functions().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        proxy.status().await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(500));
    });
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn verify_prints_the_report_and_exits_by_readiness_and_needs_authorization() {
    let h = Harness::start();
    let address = h.inventory().functions[3].address.to_string();
    let out = h.ctl(&["verify", &address]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ready for a VM"), "{}", stdout(&out));
    let out = h.ctl(&["--json", "verify", &address]);
    let doc = json(&out);
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["reset_methods"][0], "flr");
    assert!(
        matches!(&h.engine.calls()[0], Call::Verify(c, a) if c.uid == 0 && a.to_string() == address)
    );
    *h.engine.script.lock().unwrap() = Script::Busy;
    let out = h.ctl(&["verify", &address]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let calls = h.engine.calls().len();
    let out = h.ctl_as_nobody(&["verify", &address]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        h.engine.calls().len(),
        calls,
        "a denied caller reaches nothing"
    );
    let out = h.ctl(&["verify", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
}
