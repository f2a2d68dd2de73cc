//! The declarative config: every refusal with its exact message and position, the valid forms
//! field by field, the shipped `config.example.toml`, and a parser that never panics.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use passthroughd_proto::PciFunction;
use passthroughd_proto::config::{
    ClassMatch, Config, ConfigError, DeviceEntry, DriverChoice, IdGuard, MatchRule, Owner,
    ResetPolicy, Selector, SriovEntry, VfSelection,
};
use proptest::prelude::*;

fn a(s: &str) -> passthroughd_proto::PciAddress {
    s.parse().unwrap()
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "c.toml")
}

/// Each broken file (after `version = 1` unless it is about the version) and the full message.
const BROKEN: &[(&str, &str)] = &[
    // --- version
    (
        "[release]\n",
        "c.toml:1:1: missing version = 1 at the top of the file",
    ),
    ("version = 2\n", "c.toml:1:11: version must be 1, got 2"),
    // A byte-order mark is invisible in editors, so it takes no column.
    (
        "\u{feff}version = 2\n",
        "c.toml:1:11: version must be 1, got 2",
    ),
    (
        "version = \"1\"\n",
        "c.toml:1:11: version must be 1, got \"1\"",
    ),
    // A newer file fails on its version, not on the keys this parser does not know.
    (
        "version = 2\n[vms]\nx = 1\n",
        "c.toml:1:11: version must be 1, got 2",
    ),
    // --- unknown keys, everywhere
    (
        "version = 1\ndevices = []\n",
        "c.toml:2:1: unknown field `devices`, expected one of `version`, `device`, `sriov`, `release`, `protect`",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nmode = \"vfio\"\n",
        "c.toml:4:1: unknown field `mode`, expected one of `address`, `match`, `vendor`, `device`, `group`, `force`, `driver`, `owner`",
    ),
    (
        "version = 1\n[[device]]\nmatch = { vendor = \"0x10de\", revision = \"0xa1\" }\n",
        "c.toml:3:30: unknown field `revision`, expected one of `vendor`, `device`, `subsystem_vendor`, `subsystem_device`, `class`",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 2\nforce = true\n",
        "c.toml:5:1: unknown field `force`, expected one of `pf`, `vendor`, `device`, `count`, `assign`, `driver`, `owner`",
    ),
    (
        "version = 1\n[release]\nrest = \"never\"\n",
        "c.toml:3:1: unknown field `rest`, expected `reset`",
    ),
    (
        "version = 1\n[protect]\naddress = [\"00:1f.2\"]\n",
        "c.toml:3:1: unknown field `address`, expected `addresses`",
    ),
    // --- wrong types and shapes
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\ngroup = \"yes\"\n",
        "c.toml:4:9: invalid type: string \"yes\", expected a boolean",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nforce = 1\n",
        "c.toml:4:9: invalid type: integer `1`, expected a boolean",
    ),
    (
        "version = 1\n[device]\naddress = \"01:00.0\"\n",
        "c.toml:2:1: invalid type: map, expected an array of tables, written with double brackets: [[device]] or [[sriov]]",
    ),
    (
        "version = 1\n[[device]]\nmatch = \"0x10de\"\n",
        "c.toml:3:9: invalid type: string \"0x10de\", expected a table such as { vendor = \"0x10de\", device = \"0x2204\" }",
    ),
    (
        "version = 1\n[[device]]\naddress = 0x0100\n",
        "c.toml:3:11: invalid type: integer `256`, expected a string",
    ),
    (
        "version = 1\n[protect]\naddresses = \"00:1f.2\"\n",
        "c.toml:3:13: invalid type: string \"00:1f.2\", expected a sequence",
    ),
    (
        "version = 1\n[[device]\n",
        "c.toml:2:10: unclosed array table, expected `]`",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\naddress = \"01:00.1\"\n",
        "c.toml:4:1: duplicate key",
    ),
    // --- addresses keep the PciAddress error text
    (
        "version = 1\n[[device]]\naddress = \"0000:01:00\"\n",
        "c.toml:3:11: address: PCI address \"0000:01:00\" is not of the form DDDD:BB:DD.F or BB:DD.F",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:20.0\"\ncount = 1\n",
        "c.toml:3:6: pf: PCI address \"01:20.0\": device 0x20 is out of range (0x00 to 0x1f)",
    ),
    (
        "version = 1\n[protect]\naddresses = [\"00:1f.2\", \"00:1f.8\"]\n",
        "c.toml:3:25: addresses: PCI address \"00:1f.8\": function 8 is out of range (0 to 7)",
    ),
    // --- ids and classes: quoted hex strings only
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nvendor = 0x8086\n",
        "c.toml:4:10: invalid type: integer `32902`, expected a quoted hex string such as \"0x8086\" (ids are strings, not integers)",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nvendor = \"8086\"\n",
        "c.toml:4:10: vendor must be 0x and 1 to 4 hex digits, such as \"0x8086\"; got \"8086\"",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ndevice = \"0x15210\"\ncount = 1\n",
        "c.toml:4:10: device must be 0x and 1 to 4 hex digits, such as \"0x8086\"; got \"0x15210\"",
    ),
    (
        "version = 1\n[[device]]\nmatch = { subsystem_vendor = \"0x+123\" }\n",
        "c.toml:3:30: subsystem_vendor must be 0x and 1 to 4 hex digits, such as \"0x8086\"; got \"0x+123\"",
    ),
    (
        "version = 1\n[[device]]\nmatch = { class = \"0x020\" }\n",
        "c.toml:3:19: class must be 0x and 2, 4 or 6 hex digits (base class \"0x02\", with subclass \"0x0200\", exact \"0x020000\"); got \"0x020\"",
    ),
    // --- [[device]] shape
    (
        "version = 1\n[[device]]\ngroup = true\n",
        "c.toml:2:1: [[device]] needs address = \"DDDD:BB:DD.F\" or match = { vendor = \"0x....\", ... }",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nmatch = { vendor = \"0x10de\" }\n",
        "c.toml:4:9: [[device]] takes address or match, not both",
    ),
    (
        "version = 1\n[[device]]\nmatch = { vendor = \"0x10de\" }\ndevice = \"0x2204\"\n",
        "c.toml:4:10: vendor and device guards go with address; with match, put the ids inside it: match = { vendor = \"0x....\", device = \"0x....\" }",
    ),
    (
        "version = 1\n[[device]]\nmatch = {}\n",
        "c.toml:3:9: match needs at least one of vendor, device, subsystem_vendor, subsystem_device, class",
    ),
    // --- duplicates
    (
        "version = 1\n[[device]]\naddress = \"0000:01:00.0\"\n[[device]]\naddress = \"01:00.0\"\n",
        "c.toml:5:11: 0000:01:00.0 is already listed by the [[device]] on line 2",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 2\n",
        "c.toml:6:6: 0000:01:00.0 is already listed by the [[sriov]] on line 2",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\n[[sriov]]\npf = \"0000:01:00.0\"\ncount = 1\n",
        "c.toml:5:6: 0000:01:00.0 is already listed by the [[device]] on line 2",
    ),
    (
        "version = 1\n[[device]]\nmatch = { vendor = \"0x10de\", class = \"0x03\" }\n[[device]]\nmatch = { class = \"0x03\", vendor = \"0x10DE\" }\n",
        "c.toml:5:9: this match rule repeats the one on line 2",
    ),
    (
        "version = 1\n[protect]\naddresses = [\"0000:00:1f.2\", \"00:14.0\", \"00:1f.2\"]\n",
        "c.toml:3:41: 0000:00:1f.2 is listed twice in [protect] addresses (first on line 3)",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 4\nassign = [0, 2, 2]\n",
        "c.toml:5:17: VF index 2 is listed twice in assign",
    ),
    // --- count and assign
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 0\n",
        "c.toml:4:9: count must be between 1 and 65535, got 0",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 65536\n",
        "c.toml:4:9: count must be between 1 and 65535, got 65536",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = \"4\"\n",
        "c.toml:4:9: invalid type: string \"4\", expected i64",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\n",
        "c.toml:2:1: [[sriov]] needs count = N (1 to 65535)",
    ),
    (
        "version = 1\n[[sriov]]\ncount = 2\n",
        "c.toml:2:1: [[sriov]] needs pf = \"DDDD:BB:DD.F\"",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 4\nassign = [1, 4]\n",
        "c.toml:5:14: assign index 4 is out of range: count = 4 makes VFs 0 to 3",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 4\nassign = [-1]\n",
        "c.toml:5:11: assign index -1 is out of range: count = 4 makes VFs 0 to 3",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 4\nassign = \"none\"\n",
        "c.toml:5:10: assign must be \"all\" or a list of VF indexes such as [0, 1], got \"none\"",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 4\nassign = 2\n",
        "c.toml:5:10: invalid type: integer `2`, expected \"all\" or a list of VF indexes such as [0, 1]",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 4\nassign = [0, \"1\"]\n",
        "c.toml:5:14: invalid type: string \"1\", expected a VF index (an integer such as 0) in the assign list",
    ),
    // --- conflicts with [protect], wherever [protect] sits in the file
    (
        "version = 1\n[protect]\naddresses = [\"00:1f.2\"]\n[[device]]\naddress = \"0000:00:1f.2\"\n",
        "c.toml:5:11: address 0000:00:1f.2 is protected by [protect] addresses (line 3); remove it from one of them",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"03:00.0\"\ncount = 2\n[protect]\naddresses = [\"03:00.0\"]\n",
        "c.toml:3:6: pf 0000:03:00.0 is protected by [protect] addresses (line 6); remove it from one of them",
    ),
    // --- driver, owner, reset
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\ndriver = \"vfio_pci\"\n",
        "c.toml:4:10: driver must be \"vfio-pci\" or \"auto\", got \"vfio_pci\"",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 1\ndriver = \"mlx5_vfio_pci\"\n",
        "c.toml:5:10: driver must be \"vfio-pci\" or \"auto\", got \"mlx5_vfio_pci\"",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nowner = \"Qemu\"\n",
        "c.toml:4:9: owner \"Qemu\": user \"Qemu\" is neither a name (lowercase letters, digits, _ and -, starting with a letter or _, at most 32 characters) nor a numeric id; write \"user\" or \"user:group\"",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nowner = \"qemu:\"\n",
        "c.toml:4:9: owner \"qemu:\": group \"\" is neither a name (lowercase letters, digits, _ and -, starting with a letter or _, at most 32 characters) nor a numeric id; write \"user\" or \"user:group\"",
    ),
    (
        "version = 1\n[[sriov]]\npf = \"01:00.0\"\ncount = 1\nowner = \"qemu:kvm:x\"\n",
        "c.toml:5:9: owner \"qemu:kvm:x\": group \"kvm:x\" is neither a name (lowercase letters, digits, _ and -, starting with a letter or _, at most 32 characters) nor a numeric id; write \"user\" or \"user:group\"",
    ),
    (
        "version = 1\n[[device]]\naddress = \"01:00.0\"\nowner = \"a23456789012345678901234567890123\"\n",
        "c.toml:4:9: owner \"a23456789012345678901234567890123\": user \"a23456789012345678901234567890123\" is neither a name (lowercase letters, digits, _ and -, starting with a letter or _, at most 32 characters) nor a numeric id; write \"user\" or \"user:group\"",
    ),
    (
        "version = 1\n[release]\nreset = \"sometimes\"\n",
        "c.toml:3:9: reset must be \"never\", \"leases\" or \"always\", got \"sometimes\"",
    ),
    // Columns count characters, not bytes.
    (
        "version = 1\n[[device]] # é\nmatch = { device = \"é\", vendor = \"0xZZ\" }\n",
        "c.toml:3:34: vendor must be 0x and 1 to 4 hex digits, such as \"0x8086\"; got \"0xZZ\"",
    ),
];

#[test]
fn broken_files_are_refused_with_position_and_message() {
    assert!(BROKEN.len() >= 24);
    let mut failures = Vec::new();
    for (text, expected) in BROKEN {
        match parse(text) {
            Ok(config) => failures.push(format!("{text:?}: accepted as {config:?}")),
            Err(e) => {
                let got = e.to_string();
                if got != *expected {
                    failures.push(format!(
                        "{text:?}:\n  expected {expected}\n  got      {got}"
                    ));
                }
                assert!(!got.contains('\n'), "{got:?} is not one line");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn error_fields_and_std_error() {
    let e = Config::parse(
        "version = 1\n\n  bogus = 1\n",
        "/etc/passthroughd/config.toml",
    )
    .unwrap_err();
    assert_eq!(e.origin, "/etc/passthroughd/config.toml");
    assert_eq!((e.line, e.column), (3, 3));
    assert!(e.message.starts_with("unknown field `bogus`"));
    let boxed: Box<dyn std::error::Error> = Box::new(e);
    assert!(
        boxed
            .to_string()
            .starts_with("/etc/passthroughd/config.toml:3:3: ")
    );
}

#[test]
fn minimal_file_is_the_empty_state() {
    let config = parse("version = 1\n").unwrap();
    assert_eq!(config, Config::empty());
    assert!(config.devices.is_empty() && config.sriov.is_empty() && config.protect.is_empty());
    assert_eq!(config.release.reset, ResetPolicy::Never);
    // Empty tables are as good as absent ones.
    assert_eq!(
        parse("version = 1\n[release]\n[protect]\n").unwrap(),
        Config::empty()
    );
}

/// The block from the format's description, comments included.
const SPEC_EXAMPLE: &str = r#"
version = 1                       # required; anything else is an error

[[device]]                        # one function (or its whole group) to hand to vfio-pci
address = "0000:01:00.3"          # or: match = { vendor = "0x10de", device = "0x2204" }
vendor = "0x8086"                 # optional identity guard with address
device = "0x1521"
group = false
force = false
driver = "vfio-pci"
owner = "qemu:kvm"

[[sriov]]
pf = "0000:01:00.0"
count = 4
assign = "all"

[release]
reset = "leases"

[protect]
addresses = ["0000:00:1f.2"]
"#;

#[test]
fn the_full_format_parses_field_by_field() {
    let config = parse(SPEC_EXAMPLE).unwrap();
    assert_eq!(
        config.devices,
        [DeviceEntry {
            selector: Selector::Address {
                address: a("0000:01:00.3"),
                identity: IdGuard {
                    vendor: Some(0x8086),
                    device: Some(0x1521),
                },
            },
            group: false,
            force: false,
            driver: DriverChoice::VfioPci,
            owner: Some(Owner {
                user: "qemu".into(),
                group: Some("kvm".into()),
            }),
            line: 4,
        }]
    );
    assert_eq!(
        config.sriov,
        [SriovEntry {
            pf: a("0000:01:00.0"),
            identity: IdGuard::default(),
            count: 4,
            assign: VfSelection::All,
            driver: DriverChoice::VfioPci,
            owner: None,
            line: 13,
        }]
    );
    assert_eq!(config.release.reset, ResetPolicy::Leases);
    assert_eq!(config.protect, [a("00:1f.2")]);
    assert_eq!(
        config.devices[0].label(),
        "[[device]] 0000:01:00.3 (line 4)"
    );
    assert_eq!(config.sriov[0].label(), "[[sriov]] 0000:01:00.0 (line 13)");
}

fn function(vendor: u16, device: u16, sub: (u16, u16), class: u32) -> PciFunction {
    PciFunction {
        address: a("0000:05:00.0"),
        vendor_id: vendor,
        device_id: device,
        subsystem_vendor_id: sub.0,
        subsystem_device_id: sub.1,
        class,
        vendor_name: None,
        device_name: None,
        class_name: None,
        driver: None,
        driver_override: None,
        iommu_group: None,
        numa_node: None,
        boot_vga: false,
        sriov: None,
        vf_of: None,
        in_use_by: None,
    }
}

#[test]
fn match_rules_parse_and_match() {
    let config = parse(
        r#"version = 1
[[device]]
match = { vendor = "0x10de", device = "0x2204" }
group = true
[[device]]
match = { class = "0x02" }
[[device]]
match = { class = "0x0108", subsystem_vendor = "0x144D" }
driver = "auto"
[[device]]
match = { vendor = "0x1912", subsystem_device = "0x15", class = "0x0c0330" }
owner = "107"
"#,
    )
    .unwrap();
    let rules: Vec<MatchRule> = config
        .devices
        .iter()
        .map(|d| match d.selector {
            Selector::Match(rule) => rule,
            Selector::Address { .. } => panic!("{d:?} is not a match"),
        })
        .collect();
    assert_eq!(
        rules,
        [
            MatchRule {
                vendor: Some(0x10de),
                device: Some(0x2204),
                ..MatchRule::default()
            },
            MatchRule {
                class: Some(ClassMatch::Base(0x02)),
                ..MatchRule::default()
            },
            MatchRule {
                subsystem_vendor: Some(0x144d),
                class: Some(ClassMatch::Subclass(0x0108)),
                ..MatchRule::default()
            },
            MatchRule {
                vendor: Some(0x1912),
                subsystem_device: Some(0x0015),
                class: Some(ClassMatch::Exact(0x0c0330)),
                ..MatchRule::default()
            },
        ]
    );
    let lines: Vec<u32> = config.devices.iter().map(|d| d.line).collect();
    assert_eq!(lines, [2, 5, 7, 10]);
    assert!(config.devices[0].group && !config.devices[1].group);
    assert_eq!(config.devices[2].driver, DriverChoice::Auto);
    assert_eq!(
        config.devices[3].owner,
        Some(Owner {
            user: "107".into(),
            group: None
        })
    );
    assert_eq!(
        config.devices[0].label(),
        "[[device]] match vendor=0x10de device=0x2204 (line 2)"
    );
    assert_eq!(
        config.devices[3].label(),
        "[[device]] match vendor=0x1912 subsystem_device=0x0015 class=0x0c0330 (line 10)"
    );

    // The class matches as precisely as it was written.
    let gpu = function(0x10de, 0x2204, (0x1458, 0x403b), 0x030000);
    let nic = function(0x8086, 0x1521, (0x8086, 0x0001), 0x020000);
    let infiniband = function(0x15b3, 0x101d, (0x15b3, 0x0001), 0x020700);
    let nvme = function(0x144d, 0xa808, (0x144d, 0xa801), 0x010802);
    let xhci = function(0x1912, 0x0014, (0x1912, 0x0015), 0x0c0330);
    let ehci = function(0x1912, 0x0014, (0x1912, 0x0015), 0x0c0320);
    assert!(rules[0].matches(&gpu) && !rules[0].matches(&nic));
    assert!(rules[1].matches(&nic) && rules[1].matches(&infiniband) && !rules[1].matches(&gpu));
    assert!(rules[2].matches(&nvme));
    assert!(!rules[2].matches(&function(0x144d, 0xa808, (0x144d, 0xa801), 0x010601)));
    assert!(!rules[2].matches(&function(0x1000, 0xa808, (0x1000, 0xa801), 0x010802)));
    assert!(rules[3].matches(&xhci) && !rules[3].matches(&ehci));
    assert!(ClassMatch::Subclass(0x0200).matches(0x020000));
    assert!(!ClassMatch::Subclass(0x0200).matches(0x020700));
    assert!(ClassMatch::Exact(0x020000).matches(0x020000));
    assert!(!ClassMatch::Exact(0x020000).matches(0x020001));
}

#[test]
fn assign_lists_and_vf_selection() {
    let config = parse(
        r#"version = 1
[[sriov]]
pf = "0000:3b:00.0"
vendor = "0x8086"
count = 8
assign = [0, 7, 3]
driver = "auto"
owner = "qemu:107"

[[sriov]]
pf = "3b:00.1"
device = "0x1593"
count = 65535

[[sriov]]
pf = "10000:01:00.0"
count = 2
assign = []
"#,
    )
    .unwrap();
    let [first, second, third] = config.sriov.as_slice() else {
        panic!("{:?}", config.sriov)
    };
    assert_eq!(first.pf, a("0000:3b:00.0"));
    assert_eq!(
        first.identity,
        IdGuard {
            vendor: Some(0x8086),
            device: None
        }
    );
    assert_eq!(first.count, 8);
    assert_eq!(
        first.assign,
        VfSelection::Indexes(BTreeSet::from([0, 3, 7]))
    );
    assert_eq!(first.driver, DriverChoice::Auto);
    assert_eq!(first.owner.as_ref().unwrap().to_string(), "qemu:107");
    assert_eq!(first.line, 2);
    assert!(first.assign.contains(3) && !first.assign.contains(1));
    assert!(!first.assign.contains(65536 + 3));

    // assign defaults to every VF.
    assert_eq!(
        (second.count, second.assign.clone()),
        (65535, VfSelection::All)
    );
    assert!(second.assign.contains(u32::MAX));
    assert_eq!(second.line, 10);
    assert_eq!(second.label(), "[[sriov]] 0000:3b:00.1 (line 10)");

    // An empty list creates VFs and leaves all of them to the host VF driver.
    assert_eq!(third.assign, VfSelection::Indexes(BTreeSet::new()));
    assert!(!third.assign.contains(0));
    assert_eq!(third.pf.to_string(), "10000:01:00.0");
}

#[test]
fn identity_guards_accept_only_their_ids() {
    let both = IdGuard {
        vendor: Some(0x8086),
        device: Some(0x1521),
    };
    assert!(both.accepts(0x8086, 0x1521));
    assert!(!both.accepts(0x8086, 0x1522) && !both.accepts(0x10de, 0x1521));
    let vendor_only = IdGuard {
        vendor: Some(0x8086),
        device: None,
    };
    assert!(vendor_only.accepts(0x8086, 0xffff) && !vendor_only.accepts(0x8087, 0x1521));
    assert!(IdGuard::default().accepts(0, 0));
}

#[test]
fn owner_names_and_ids() {
    let owner = |text: &str| {
        let file = format!("version = 1\n[[device]]\naddress = \"01:00.0\"\nowner = {text:?}\n");
        parse(&file).map(|c| c.devices[0].owner.clone().unwrap())
    };
    for good in [
        "qemu",
        "_svc",
        "libvirt-qemu",
        "machine$",
        "a1_b-2",
        "0",
        "4294967294",
    ] {
        assert_eq!(owner(good).unwrap().user, good);
    }
    let long = "a".repeat(32);
    assert_eq!(owner(&long).unwrap().user, long);
    assert_eq!(
        owner("qemu:kvm").unwrap(),
        Owner {
            user: "qemu".into(),
            group: Some("kvm".into())
        }
    );
    for bad in [
        "",
        ":kvm",
        "1qemu",
        "qe mu",
        "qemu$x",
        "$",
        "4294967296",
        "-x",
        "qemu:KVM",
    ] {
        assert!(owner(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn serializes_for_json_output() {
    let config = parse(
        r#"version = 1
[[device]]
address = "01:00.0"
vendor = "0x10de"
[[device]]
match = { class = "0x0c03" }
driver = "auto"
[[sriov]]
pf = "02:00.0"
count = 2
assign = [1]
[release]
reset = "always"
[protect]
addresses = ["00:1f.2"]
"#,
    )
    .unwrap();
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "devices": [
                {
                    "selector": {"address": {
                        "address": "0000:01:00.0",
                        "identity": {"vendor": 0x10de, "device": null}
                    }},
                    "group": false, "force": false, "driver": "vfio-pci", "owner": null, "line": 2
                },
                {
                    "selector": {"match": {
                        "vendor": null, "device": null, "subsystem_vendor": null,
                        "subsystem_device": null, "class": "0x0c03"
                    }},
                    "group": false, "force": false, "driver": "auto", "owner": null, "line": 5
                }
            ],
            "sriov": [{
                "pf": "0000:02:00.0", "identity": {"vendor": null, "device": null}, "count": 2,
                "assign": {"indexes": [1]}, "driver": "vfio-pci", "owner": null, "line": 8
            }],
            "release": {"reset": "always"},
            "protect": ["0000:00:1f.2"]
        })
    );
    assert_eq!(
        serde_json::to_value(VfSelection::All).unwrap(),
        serde_json::json!("all")
    );
}

#[test]
fn the_shipped_example_parses_and_says_what_it_shows() {
    let text = include_str!("../../config.example.toml");
    let config = Config::parse(text, "config.example.toml").unwrap();

    let [gpu, nic, nvme, usb] = config.devices.as_slice() else {
        panic!("{:?}", config.devices)
    };
    assert_eq!(
        gpu.selector,
        Selector::Address {
            address: a("0000:01:00.0"),
            identity: IdGuard {
                vendor: Some(0x10de),
                device: Some(0x2204)
            },
        }
    );
    assert!(gpu.group && !gpu.force);
    assert_eq!(gpu.driver, DriverChoice::VfioPci);
    assert_eq!(gpu.owner.as_ref().unwrap().to_string(), "qemu:kvm");
    assert_eq!(
        nic.selector,
        Selector::Address {
            address: a("0000:02:00.1"),
            identity: IdGuard {
                vendor: None,
                device: Some(0x1521)
            },
        }
    );
    assert!(!nic.group && !nic.force && nic.owner.is_none());
    assert_eq!(
        nvme.selector,
        Selector::Match(MatchRule {
            vendor: Some(0x144d),
            class: Some(ClassMatch::Subclass(0x0108)),
            ..MatchRule::default()
        })
    );
    assert_eq!(
        usb.selector,
        Selector::Match(MatchRule {
            vendor: Some(0x1912),
            device: Some(0x0014),
            subsystem_vendor: Some(0x1912),
            subsystem_device: Some(0x0014),
            class: Some(ClassMatch::Exact(0x0c0330)),
        })
    );
    assert_eq!(usb.owner.as_ref().unwrap().user, "libvirt-qemu");
    // Labels point at the [[device]] headers of the file.
    for entry in &config.devices {
        let line = text.lines().nth(entry.line as usize - 1).unwrap();
        assert!(line.starts_with("[[device]]"), "{}", entry.label());
    }

    let [vfs] = config.sriov.as_slice() else {
        panic!("{:?}", config.sriov)
    };
    assert_eq!(vfs.pf, a("0000:03:00.0"));
    assert_eq!(
        vfs.identity,
        IdGuard {
            vendor: Some(0x15b3),
            device: Some(0x101d)
        }
    );
    assert_eq!(vfs.count, 4);
    assert_eq!(vfs.assign, VfSelection::Indexes(BTreeSet::from([0, 1])));
    assert_eq!(vfs.driver, DriverChoice::Auto);
    assert_eq!(vfs.owner.as_ref().unwrap().to_string(), "1000");
    assert_eq!(text.lines().nth(vfs.line as usize - 1), Some("[[sriov]]"));

    assert_eq!(config.release.reset, ResetPolicy::Leases);
    assert_eq!(config.protect, [a("0000:00:1f.2"), a("0000:00:14.0")]);

    // Every key of the format appears in the example, so it documents all of them.
    for key in [
        "version",
        "[[device]]",
        "address",
        "match",
        "vendor",
        "device",
        "subsystem_vendor",
        "subsystem_device",
        "class",
        "group",
        "force",
        "driver",
        "owner",
        "[[sriov]]",
        "pf",
        "count",
        "assign",
        "[release]",
        "reset",
        "[protect]",
        "addresses",
    ] {
        let set = text.lines().any(|l| {
            let l = l.trim_start();
            !l.starts_with('#') && (l.starts_with(key) || l.contains(&format!(" {key} =")))
        });
        assert!(set, "config.example.toml never sets {key}");
    }
}

/// Pieces of config-like files, valid and not, so generated files reach validation and not only
/// the TOML parser: a version line, then tables of a few keys each, and now and then junk.
const DEVICE_KEYS: &[&str] = &[
    "address = \"01:00.0\"",
    "address = \"0000:02:00.0\"",
    "address = \"01:00\"",
    "match = { vendor = \"0x10de\" }",
    "match = { class = \"0x0\" }",
    "match = {}",
    "vendor = \"0x8086\"",
    "device = 0x10",
    "group = true",
    "driver = \"auto\"",
    "owner = \"qemu:\"",
    "bogus = 1",
];
const SRIOV_KEYS: &[&str] = &[
    "pf = \"0000:01:00.0\"",
    "pf = \"02:00.0\"",
    "vendor = \"0x8086\"",
    "count = 4",
    "count = 0",
    "assign = [0, 1, 1]",
    "assign = [5]",
    "assign = \"all\"",
    "owner = \"0:kvm\"",
    "bogus = 1",
];
const OTHER_KEYS: &[&str] = &[
    "reset = \"leases\"",
    "reset = \"sometimes\"",
    "addresses = [\"01:00.0\", \"00:1f.2\"]",
    "addresses = [\"02:00.0\", \"02:00.0\"]",
    "bogus = 1",
];
const JUNK: &[&str] = &["\"", "é = \"ü\"", "[[", "x = [1,", "\u{feff}", "\t = 1", ""];

fn config_like() -> impl Strategy<Value = String> {
    use proptest::sample::{select, subsequence};
    let version = prop_oneof![4 => Just("version = 1"), 1 => Just("version = 2"), 1 => Just("")];
    let table = prop_oneof![
        5 => subsequence(DEVICE_KEYS, 0..4).prop_map(|k| ("[[device]]", k)),
        4 => subsequence(SRIOV_KEYS, 0..4).prop_map(|k| ("[[sriov]]", k)),
        1 => subsequence(OTHER_KEYS, 0..2).prop_map(|k| ("[release]", k)),
        1 => subsequence(OTHER_KEYS, 0..2).prop_map(|k| ("[protect]", k)),
        1 => subsequence(DEVICE_KEYS, 0..2).prop_map(|k| ("[device]", k)),
    ];
    let junk = proptest::option::weighted(0.2, (any::<usize>(), select(JUNK)));
    (
        version,
        proptest::collection::vec(table, 0..6),
        junk,
        any::<bool>(),
    )
        .prop_map(|(version, tables, junk, crlf)| {
            let mut lines = vec![version];
            for (header, keys) in tables {
                lines.push(header);
                lines.extend(keys);
            }
            if let Some((at, text)) = junk {
                lines.insert(at % (lines.len() + 1), text);
            }
            lines.join(if crlf { "\r\n" } else { "\n" })
        })
}

fn check_position(text: &str, result: &Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        let lines: Vec<&str> = text.split('\n').collect();
        prop_assert!(e.line >= 1 && e.line as usize <= lines.len(), "{e}");
        let width = lines[e.line as usize - 1].chars().count();
        prop_assert!(e.column >= 1 && e.column as usize <= width + 1, "{e}");
        prop_assert!(!e.to_string().contains('\n'), "{e}");
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics_and_errors_point_inside_it(text in any::<String>()) {
        let result = Config::parse(&text, "p.toml");
        check_position(&text, &result)?;
    }

    #[test]
    fn config_like_text_never_panics_and_errors_point_inside_it(text in config_like()) {
        let result = Config::parse(&text, "p.toml");
        check_position(&text, &result)?;
    }
}
