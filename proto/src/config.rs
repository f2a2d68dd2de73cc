//! The declarative config (`/etc/passthroughd/config.toml`): which functions belong to vfio-pci,
//! which PFs get VFs, how functions are reset on release, and what is never touched.
//!
//! `config.example.toml` at the repository root documents every key. Parsing is strict: an
//! unknown key, a wrong type, a bad address or id, a duplicate or a conflict is a [`ConfigError`]
//! that names the file, line and column, because a typo silently ignored would leave a device on
//! the host (or hand the wrong one to a VM) with nothing saying why.
//!
//! The module reads in three layers: a raw serde layer that keeps every value's byte span, a
//! validation layer that turns it into the typed structs below, and helpers that turn byte
//! offsets into line and column.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{PciAddress, PciFunction};

/// The only `version` this parser reads.
pub const VERSION: i64 = 1;

/// The desired state a config file describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Config {
    pub devices: Vec<DeviceEntry>,
    pub sriov: Vec<SriovEntry>,
    pub release: ReleasePolicy,
    /// Never unbound by any request, config entry or lease.
    pub protect: Vec<PciAddress>,
}

/// One `[[device]]`: a function (or its whole IOMMU group), or every function a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceEntry {
    pub selector: Selector,
    /// Take the whole IOMMU group (bridges excluded).
    pub group: bool,
    /// Override the soft guards (route/address in use, boot display).
    pub force: bool,
    pub driver: DriverChoice,
    pub owner: Option<Owner>,
    /// Line of the `[[device]]` header, for status lines and logs.
    pub line: u32,
}

/// What a `[[device]]` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// One address; `identity` keeps the entry from applying if a different card sits there.
    Address {
        address: PciAddress,
        identity: IdGuard,
    },
    /// Every function the rule matches, now and when one appears later.
    Match(MatchRule),
}

/// Optional vendor/device ids an address must carry for its entry to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct IdGuard {
    pub vendor: Option<u16>,
    pub device: Option<u16>,
}

/// Ids a `match` selects functions by; absent keys match anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct MatchRule {
    pub vendor: Option<u16>,
    pub device: Option<u16>,
    pub subsystem_vendor: Option<u16>,
    pub subsystem_device: Option<u16>,
    pub class: Option<ClassMatch>,
}

/// A class pattern, as precise as the digits written: `"0x02"` matches the base class,
/// `"0x0200"` the base class and subclass, `"0x020000"` the whole 24-bit class code (with the
/// programming interface). Serializes as the string it was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum ClassMatch {
    /// Base class only, e.g. `0x02` (network).
    Base(u8),
    /// Base class and subclass, e.g. `0x0200` (Ethernet): `base << 8 | subclass`.
    Subclass(u16),
    /// The full class code, e.g. `0x0c0330` (xHCI USB); at most 24 bits.
    Exact(u32),
}

/// One `[[sriov]]`: VFs of one PF, created at boot and when the PF appears.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SriovEntry {
    pub pf: PciAddress,
    pub identity: IdGuard,
    /// 1..=65535 here; the PF's `sriov_totalvfs` is checked when applied.
    pub count: u16,
    /// VFs handed to vfio-pci; the rest keep the host VF driver.
    pub assign: VfSelection,
    pub driver: DriverChoice,
    pub owner: Option<Owner>,
    /// Line of the `[[sriov]]` header.
    pub line: u32,
}

/// Which VFs of a `[[sriov]]` entry go to vfio-pci.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VfSelection {
    All,
    /// VF indexes (`virtfnN`), each below the entry's `count`.
    Indexes(BTreeSet<u16>),
}

/// The driver a selected function is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum DriverChoice {
    #[default]
    #[serde(rename = "vfio-pci")]
    VfioPci,
    /// The allowlisted vfio-pci variant the kernel offers for the device, else vfio-pci.
    #[serde(rename = "auto")]
    Auto,
}

/// Who may open `/dev/vfio/N`: a user name or numeric id, optionally with a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub user: String,
    pub group: Option<String>,
}

/// When a function is reset through VFIO before it returns to its host driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResetPolicy {
    #[default]
    Never,
    /// When a lease ends.
    Leases,
    Always,
}

/// The `[release]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct ReleasePolicy {
    pub reset: ResetPolicy,
}

/// Why a config file was refused, and where. Displays as `ORIGIN:LINE:COLUMN: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{origin}:{line}:{column}: {message}")]
pub struct ConfigError {
    /// What the file is called (its path as given).
    pub origin: String,
    /// 1-based.
    pub line: u32,
    /// 1-based, in characters.
    pub column: u32,
    /// One line.
    pub message: String,
}

impl Config {
    /// The desired state of a missing config file: nothing to apply, nothing protected.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses and validates a config file. `origin` is what messages call the file.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let pos = Positions { text, origin };
        // The version first, so a newer file is refused for its version, not for its new keys.
        let head: RawHead = toml::from_str(text).map_err(|e| pos.toml_error(&e))?;
        check_version(head.version.as_ref(), &pos)?;
        let raw: RawFile = toml::from_str(text).map_err(|e| pos.toml_error(&e))?;
        validate(raw, &pos)
    }
}

impl IdGuard {
    /// Whether a function with these ids may be taken; absent guards accept anything.
    pub fn accepts(&self, vendor: u16, device: u16) -> bool {
        self.vendor.is_none_or(|v| v == vendor) && self.device.is_none_or(|d| d == device)
    }

    pub fn is_empty(&self) -> bool {
        self.vendor.is_none() && self.device.is_none()
    }
}

impl MatchRule {
    /// Whether `f` carries every id this rule names.
    pub fn matches(&self, f: &PciFunction) -> bool {
        self.vendor.is_none_or(|v| v == f.vendor_id)
            && self.device.is_none_or(|d| d == f.device_id)
            && self
                .subsystem_vendor
                .is_none_or(|v| v == f.subsystem_vendor_id)
            && self
                .subsystem_device
                .is_none_or(|d| d == f.subsystem_device_id)
            && self.class.is_none_or(|c| c.matches(f.class))
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `vendor=0x10de device=0x2204 class=0x0300`, naming only the keys given.
impl fmt::Display for MatchRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = [
            ("vendor", self.vendor),
            ("device", self.device),
            ("subsystem_vendor", self.subsystem_vendor),
            ("subsystem_device", self.subsystem_device),
        ];
        let mut parts: Vec<String> = ids
            .iter()
            .filter_map(|(key, id)| id.map(|id| format!("{key}={id:#06x}")))
            .collect();
        if let Some(class) = self.class {
            parts.push(format!("class={class}"));
        }
        f.write_str(&parts.join(" "))
    }
}

impl ClassMatch {
    /// Whether the 24-bit class code `class` falls under this pattern.
    pub fn matches(&self, class: u32) -> bool {
        match *self {
            Self::Base(base) => (class >> 16) & 0xff == u32::from(base),
            Self::Subclass(sub) => (class >> 8) & 0xffff == u32::from(sub),
            Self::Exact(code) => class & 0xff_ffff == code,
        }
    }
}

impl fmt::Display for ClassMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Base(v) => write!(f, "0x{v:02x}"),
            Self::Subclass(v) => write!(f, "0x{v:04x}"),
            Self::Exact(v) => write!(f, "0x{v:06x}"),
        }
    }
}

impl From<ClassMatch> for String {
    fn from(class: ClassMatch) -> Self {
        class.to_string()
    }
}

impl DeviceEntry {
    /// `[[device]] 0000:01:00.3 (line 7)` or `[[device]] match vendor=0x10de (line 12)`.
    pub fn label(&self) -> String {
        match &self.selector {
            Selector::Address { address, .. } => {
                format!("[[device]] {address} (line {})", self.line)
            }
            Selector::Match(rule) => format!("[[device]] match {rule} (line {})", self.line),
        }
    }
}

impl SriovEntry {
    /// `[[sriov]] 0000:01:00.0 (line 20)`.
    pub fn label(&self) -> String {
        format!("[[sriov]] {} (line {})", self.pf, self.line)
    }
}

impl VfSelection {
    /// Whether VF `index` (`virtfnN`) goes to vfio-pci.
    pub fn contains(&self, index: u32) -> bool {
        match self {
            Self::All => true,
            Self::Indexes(set) => u16::try_from(index).is_ok_and(|i| set.contains(&i)),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(group) => write!(f, "{}:{group}", self.user),
            None => f.write_str(&self.user),
        }
    }
}

impl fmt::Display for DriverChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::VfioPci => "vfio-pci",
            Self::Auto => "auto",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw layer: the file as serde sees it, every value with its byte span. Everything optional is
// `Option` so that a missing key is reported by validation, at the entry, in our words.

/// Only the version; unknown keys are ignored here so a newer file fails on its version.
#[derive(Deserialize)]
struct RawHead {
    version: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    // Checked by `RawHead`; any type is accepted here.
    #[serde(rename = "version")]
    _version: Option<toml::Value>,
    #[serde(default, deserialize_with = "array_of_tables")]
    device: Vec<Spanned<RawDevice>>,
    #[serde(default, deserialize_with = "array_of_tables")]
    sriov: Vec<Spanned<RawSriov>>,
    release: Option<RawRelease>,
    protect: Option<RawProtect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[device]] table")]
struct RawDevice {
    address: Option<Spanned<String>>,
    #[serde(rename = "match")]
    rule: Option<Spanned<RawMatch>>,
    vendor: Option<Spanned<HexText>>,
    device: Option<Spanned<HexText>>,
    group: Option<bool>,
    force: Option<bool>,
    driver: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as { vendor = \"0x10de\", device = \"0x2204\" }"
)]
struct RawMatch {
    vendor: Option<Spanned<HexText>>,
    device: Option<Spanned<HexText>>,
    subsystem_vendor: Option<Spanned<HexText>>,
    subsystem_device: Option<Spanned<HexText>>,
    class: Option<Spanned<HexText>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[sriov]] table")]
struct RawSriov {
    pf: Option<Spanned<String>>,
    vendor: Option<Spanned<HexText>>,
    device: Option<Spanned<HexText>>,
    count: Option<Spanned<i64>>,
    assign: Option<Spanned<RawAssign>>,
    driver: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [release] table")]
struct RawRelease {
    reset: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [protect] table")]
struct RawProtect {
    addresses: Option<Vec<Spanned<String>>>,
}

/// An id or class: a string only, so `vendor = 0x8086` (a TOML integer, 32902) is refused with
/// a message saying to quote it rather than silently read as decimal.
struct HexText(String);

impl<'de> Deserialize<'de> for HexText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HexText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a quoted hex string such as \"0x8086\" (ids are strings, not integers)",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HexText, E> {
                Ok(HexText(s.to_owned()))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// `assign`: `"all"` or a list of VF indexes, each with its span.
enum RawAssign {
    All,
    Indexes(Vec<Spanned<i64>>),
    /// A string other than "all"; validation names it.
    Other(String),
}

const ASSIGN_EXPECTED: &str = "\"all\" or a list of VF indexes such as [0, 1]";

impl<'de> Deserialize<'de> for RawAssign {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAssign;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(ASSIGN_EXPECTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawAssign, E> {
                Ok(if s == "all" {
                    RawAssign::All
                } else {
                    RawAssign::Other(s.to_owned())
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawAssign, A::Error> {
                let mut indexes = Vec::new();
                while let Some(index) = seq.next_element::<Spanned<VfIndex>>()? {
                    indexes.push(Spanned::new(index.span(), index.into_inner().0));
                }
                Ok(RawAssign::Indexes(indexes))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// One element of an `assign` list; its own type so a wrong element says what belongs there.
struct VfIndex(i64);

impl<'de> Deserialize<'de> for VfIndex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = VfIndex;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a VF index (an integer such as 0) in the assign list")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<VfIndex, E> {
                Ok(VfIndex(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<VfIndex, E> {
                Ok(VfIndex(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_i64(V)
    }
}

/// `[[device]]` and `[[sriov]]`: an array of tables. Its own visitor so `[device]` (single
/// brackets) is refused with the fix rather than serde's "expected a sequence".
fn array_of_tables<'de, D, T>(deserializer: D) -> Result<Vec<Spanned<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<Spanned<T>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of tables, written with double brackets: [[device]] or [[sriov]]")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = seq.next_element()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_seq(V(std::marker::PhantomData))
}

// ---------------------------------------------------------------------------------------------
// Validation: raw values to typed ones, then the checks that span entries (duplicates,
// conflicts with [protect]). Each check stops at its first error; one message at a time.

fn check_version(
    version: Option<&Spanned<toml::Value>>,
    pos: &Positions,
) -> Result<(), ConfigError> {
    match version {
        None => Err(pos.error(0, "missing version = 1 at the top of the file")),
        Some(v) if v.get_ref().as_integer() == Some(VERSION) => Ok(()),
        Some(v) => Err(pos.at(v, format!("version must be {VERSION}, got {}", v.get_ref()))),
    }
}

fn validate(raw: RawFile, pos: &Positions) -> Result<Config, ConfigError> {
    let mut claims = Claims::default();
    // [protect] first, wherever it sits in the file: entries are checked against it.
    let mut protect = Vec::new();
    for text in raw.protect.and_then(|p| p.addresses).unwrap_or_default() {
        protect.push(claims.protect(&text, pos)?);
    }
    let devices = raw
        .device
        .iter()
        .map(|entry| device_entry(entry, &mut claims, pos))
        .collect::<Result<_, _>>()?;
    let sriov = raw
        .sriov
        .iter()
        .map(|entry| sriov_entry(entry, &mut claims, pos))
        .collect::<Result<_, _>>()?;
    let reset = match raw.release.and_then(|r| r.reset) {
        None => ResetPolicy::default(),
        Some(text) => match text.get_ref().as_str() {
            "never" => ResetPolicy::Never,
            "leases" => ResetPolicy::Leases,
            "always" => ResetPolicy::Always,
            other => {
                return Err(pos.at(
                    &text,
                    format!("reset must be \"never\", \"leases\" or \"always\", got {other:?}"),
                ));
            }
        },
    };
    Ok(Config {
        devices,
        sriov,
        release: ReleasePolicy { reset },
        protect,
    })
}

/// What the entries read so far have claimed, for the checks between entries: each address
/// is protected, a [[device]] or an [[sriov]] pf at most once, and no match rule repeats.
#[derive(Default)]
struct Claims {
    /// Protected address → line of its [protect] entry.
    protected: BTreeMap<PciAddress, u32>,
    /// Address → line and kind of the entry that names it.
    entries: BTreeMap<PciAddress, (u32, &'static str)>,
    /// Match rules with the line of their [[device]].
    rules: Vec<(MatchRule, u32)>,
}

impl Claims {
    fn protect(
        &mut self,
        text: &Spanned<String>,
        pos: &Positions,
    ) -> Result<PciAddress, ConfigError> {
        let address = parse_address(text, "addresses", pos)?;
        let line = pos.line_of(text.span().start);
        if let Some(first) = self.protected.insert(address, line) {
            return Err(pos.at(
                text,
                format!("{address} is listed twice in [protect] addresses (first on line {first})"),
            ));
        }
        Ok(address)
    }

    /// Parses the address under `key` of the `kind` entry on `line` and claims it.
    fn entry(
        &mut self,
        text: &Spanned<String>,
        key: &str,
        kind: &'static str,
        line: u32,
        pos: &Positions,
    ) -> Result<PciAddress, ConfigError> {
        let address = parse_address(text, key, pos)?;
        if let Some(protected) = self.protected.get(&address) {
            return Err(pos.at(
                text,
                format!(
                    "{key} {address} is protected by [protect] addresses (line {protected}); \
                     remove it from one of them"
                ),
            ));
        }
        if let Some((first, kind)) = self.entries.insert(address, (line, kind)) {
            return Err(pos.at(
                text,
                format!("{address} is already listed by the {kind} on line {first}"),
            ));
        }
        Ok(address)
    }

    fn rule(&mut self, rule: MatchRule, line: u32) -> Result<(), String> {
        if let Some((_, first)) = self.rules.iter().find(|(r, _)| *r == rule) {
            return Err(format!("this match rule repeats the one on line {first}"));
        }
        self.rules.push((rule, line));
        Ok(())
    }
}

fn device_entry(
    entry: &Spanned<RawDevice>,
    claims: &mut Claims,
    pos: &Positions,
) -> Result<DeviceEntry, ConfigError> {
    let header = entry.span().start;
    let line = pos.line_of(header);
    let raw = entry.get_ref();
    let selector = match (&raw.address, &raw.rule) {
        (Some(_), Some(rule)) => {
            return Err(pos.at(rule, "[[device]] takes address or match, not both"));
        }
        (None, None) => {
            return Err(pos.error(
                header,
                "[[device]] needs address = \"DDDD:BB:DD.F\" or match = { vendor = \"0x....\", ... }",
            ));
        }
        (Some(text), None) => Selector::Address {
            address: claims.entry(text, "address", "[[device]]", line, pos)?,
            identity: id_guard(raw.vendor.as_ref(), raw.device.as_ref(), pos)?,
        },
        (None, Some(rule)) => {
            if let Some(guard) = raw.vendor.as_ref().or(raw.device.as_ref()) {
                return Err(pos.at(
                    guard,
                    "vendor and device guards go with address; with match, put the ids inside it: match = { vendor = \"0x....\", device = \"0x....\" }",
                ));
            }
            let parsed = parse_match(rule, pos)?;
            claims.rule(parsed, line).map_err(|m| pos.at(rule, m))?;
            Selector::Match(parsed)
        }
    };
    Ok(DeviceEntry {
        selector,
        group: raw.group.unwrap_or(false),
        force: raw.force.unwrap_or(false),
        driver: parse_driver(raw.driver.as_ref(), pos)?,
        owner: parse_owner(raw.owner.as_ref(), pos)?,
        line,
    })
}

fn sriov_entry(
    entry: &Spanned<RawSriov>,
    claims: &mut Claims,
    pos: &Positions,
) -> Result<SriovEntry, ConfigError> {
    let header = entry.span().start;
    let line = pos.line_of(header);
    let raw = entry.get_ref();
    let Some(pf) = &raw.pf else {
        return Err(pos.error(header, "[[sriov]] needs pf = \"DDDD:BB:DD.F\""));
    };
    let pf = claims.entry(pf, "pf", "[[sriov]]", line, pos)?;
    let identity = id_guard(raw.vendor.as_ref(), raw.device.as_ref(), pos)?;
    let Some(count) = &raw.count else {
        return Err(pos.error(header, "[[sriov]] needs count = N (1 to 65535)"));
    };
    let count = match u16::try_from(*count.get_ref()) {
        Ok(n) if n >= 1 => n,
        _ => {
            return Err(pos.at(
                count,
                format!("count must be between 1 and 65535, got {}", count.get_ref()),
            ));
        }
    };
    let assign = match &raw.assign {
        // The section exists to give VFs to VMs, so all of them unless a list says otherwise.
        None => VfSelection::All,
        Some(assign) => parse_assign(assign, count, pos)?,
    };
    Ok(SriovEntry {
        pf,
        identity,
        count,
        assign,
        driver: parse_driver(raw.driver.as_ref(), pos)?,
        owner: parse_owner(raw.owner.as_ref(), pos)?,
        line,
    })
}

fn id_guard(
    vendor: Option<&Spanned<HexText>>,
    device: Option<&Spanned<HexText>>,
    pos: &Positions,
) -> Result<IdGuard, ConfigError> {
    Ok(IdGuard {
        vendor: parse_id(vendor, "vendor", pos)?,
        device: parse_id(device, "device", pos)?,
    })
}

fn parse_address(
    text: &Spanned<String>,
    key: &str,
    pos: &Positions,
) -> Result<PciAddress, ConfigError> {
    text.get_ref()
        .parse()
        .map_err(|e| pos.at(text, format!("{key}: {e}")))
}

/// `"0x8086"`: `0x` and 1 to 4 hex digits.
fn parse_id(
    text: Option<&Spanned<HexText>>,
    key: &str,
    pos: &Positions,
) -> Result<Option<u16>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let s = &text.get_ref().0;
    hex_digits(s)
        .filter(|d| (1..=4).contains(&d.len()))
        .and_then(|d| u16::from_str_radix(d, 16).ok())
        .map(Some)
        .ok_or_else(|| {
            pos.at(
                text,
                format!("{key} must be 0x and 1 to 4 hex digits, such as \"0x8086\"; got {s:?}"),
            )
        })
}

/// `"0x02"`, `"0x0200"` or `"0x020000"`; see [`ClassMatch`].
fn parse_class(text: &Spanned<HexText>, pos: &Positions) -> Result<ClassMatch, ConfigError> {
    let s = &text.get_ref().0;
    let value = hex_digits(s).and_then(|d| Some((d.len(), u32::from_str_radix(d, 16).ok()?)));
    match value {
        Some((2, v)) => Ok(ClassMatch::Base(v as u8)),
        Some((4, v)) => Ok(ClassMatch::Subclass(v as u16)),
        Some((6, v)) => Ok(ClassMatch::Exact(v)),
        _ => Err(pos.at(
            text,
            format!(
                "class must be 0x and 2, 4 or 6 hex digits (base class \"0x02\", with subclass \"0x0200\", exact \"0x020000\"); got {s:?}"
            ),
        )),
    }
}

/// The digits after a `0x` prefix, when they are all hex digits (`from_str_radix` alone would
/// also take a sign).
fn hex_digits(s: &str) -> Option<&str> {
    s.strip_prefix("0x")
        .filter(|d| d.chars().all(|c| c.is_ascii_hexdigit()))
}

fn parse_match(rule: &Spanned<RawMatch>, pos: &Positions) -> Result<MatchRule, ConfigError> {
    let raw = rule.get_ref();
    let parsed = MatchRule {
        vendor: parse_id(raw.vendor.as_ref(), "vendor", pos)?,
        device: parse_id(raw.device.as_ref(), "device", pos)?,
        subsystem_vendor: parse_id(raw.subsystem_vendor.as_ref(), "subsystem_vendor", pos)?,
        subsystem_device: parse_id(raw.subsystem_device.as_ref(), "subsystem_device", pos)?,
        class: raw
            .class
            .as_ref()
            .map(|c| parse_class(c, pos))
            .transpose()?,
    };
    if parsed.is_empty() {
        // An empty rule would match every function on the host.
        return Err(pos.at(
            rule,
            "match needs at least one of vendor, device, subsystem_vendor, subsystem_device, class",
        ));
    }
    Ok(parsed)
}

fn parse_assign(
    assign: &Spanned<RawAssign>,
    count: u16,
    pos: &Positions,
) -> Result<VfSelection, ConfigError> {
    match assign.get_ref() {
        RawAssign::All => Ok(VfSelection::All),
        RawAssign::Other(s) => Err(pos.at(
            assign,
            format!("assign must be {ASSIGN_EXPECTED}, got {s:?}"),
        )),
        RawAssign::Indexes(list) => {
            let mut set = BTreeSet::new();
            for index in list {
                let value = *index.get_ref();
                let Some(vf) = u16::try_from(value).ok().filter(|&i| i < count) else {
                    return Err(pos.at(
                        index,
                        format!(
                            "assign index {value} is out of range: count = {count} makes VFs 0 to {}",
                            count - 1
                        ),
                    ));
                };
                if !set.insert(vf) {
                    return Err(pos.at(index, format!("VF index {vf} is listed twice in assign")));
                }
            }
            Ok(VfSelection::Indexes(set))
        }
    }
}

fn parse_driver(
    text: Option<&Spanned<String>>,
    pos: &Positions,
) -> Result<DriverChoice, ConfigError> {
    match text.map(|t| (t, t.get_ref().as_str())) {
        None | Some((_, "vfio-pci")) => Ok(DriverChoice::VfioPci),
        Some((_, "auto")) => Ok(DriverChoice::Auto),
        Some((t, other)) => Err(pos.at(
            t,
            format!("driver must be \"vfio-pci\" or \"auto\", got {other:?}"),
        )),
    }
}

fn parse_owner(
    text: Option<&Spanned<String>>,
    pos: &Positions,
) -> Result<Option<Owner>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let s = text.get_ref();
    let (user, group) = match s.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (s.as_str(), None),
    };
    for (what, name) in [("user", Some(user)), ("group", group)] {
        let Some(name) = name else { continue };
        if !valid_account(name) {
            return Err(pos.at(
                text,
                format!(
                    "owner {s:?}: {what} {name:?} is neither a name (lowercase letters, digits, _ and -, \
                     starting with a letter or _, at most 32 characters) nor a numeric id; \
                     write \"user\" or \"user:group\""
                ),
            ));
        }
    }
    Ok(Some(Owner {
        user: user.to_owned(),
        group: group.map(str::to_owned),
    }))
}

/// A user or group as `useradd` accepts it (`^[a-z_][a-z0-9_-]*[$]?$`, at most 32 characters),
/// or a numeric id.
fn valid_account(name: &str) -> bool {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name.parse::<u32>().is_ok();
    }
    let body = name.strip_suffix('$').unwrap_or(name);
    let mut chars = body.chars();
    name.len() <= 32
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

// ---------------------------------------------------------------------------------------------
// Positions: byte offsets (serde spans) to 1-based line and column, and errors built from them.

struct Positions<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Positions<'_> {
    /// An error at byte `offset`; messages are kept to one line.
    fn error(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.line_column(offset);
        ConfigError {
            origin: self.origin.to_owned(),
            line,
            column,
            message: one_line(&message.into()),
        }
    }

    /// An error at the start of a spanned value.
    fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(value.span().start, message)
    }

    /// A syntax or type error from the toml crate; one without a span is placed at the start.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        self.error(e.span().map_or(0, |s| s.start), e.message())
    }

    fn line_of(&self, offset: usize) -> u32 {
        self.line_column(offset).0
    }

    /// Line and column (in characters) of byte `offset`; past the end means just after the
    /// last character, and an offset inside a character counts as that character. A leading
    /// byte-order mark is not counted: editors do not show it.
    fn line_column(&self, offset: usize) -> (u32, u32) {
        let before = self
            .text
            .char_indices()
            .take_while(|&(i, c)| i + c.len_utf8() <= offset)
            .filter(|&(i, c)| !(i == 0 && c == '\u{feff}'))
            .map(|(_, c)| c);
        let (mut line, mut column) = (1u32, 1u32);
        for c in before {
            if c == '\n' {
                line = line.saturating_add(1);
                column = 1;
            } else {
                column = column.saturating_add(1);
            }
        }
        (line, column)
    }
}

/// Folds a multi-line message (the toml crate's can have several) into one line.
fn one_line(message: &str) -> String {
    message
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
