//! PCI function addresses (`DDDD:BB:DD.F`), parsed strictly.
//!
//! Every address that reaches the daemon from a caller, a config file or the kernel goes through
//! [`PciAddress::from_str`] before any path is built from it, so a path can only ever contain the
//! canonical form printed by [`fmt::Display`]: lowercase hex, no separators other than `:` and `.`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI function address: segment (domain), bus, device, function.
///
/// Orders by domain, then bus, device and function, which is the order `lspci` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

/// Longest text we accept: an 8-digit domain plus `:BB:DD.F`. Longer input is rejected before
/// anything else so an error message never echoes a huge caller-supplied string.
const MAX_LEN: usize = 8 + 1 + 2 + 1 + 2 + 1 + 1;

/// Why a string is not a PCI address. The message names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("empty PCI address; expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:01:00.0")]
    Empty,
    #[error("PCI address is {0} characters long; at most {MAX_LEN} are allowed (DDDDDDDD:BB:DD.F)")]
    TooLong(usize),
    #[error(
        "PCI address {input:?} contains {ch:?} at position {pos}; only hex digits, ':' and '.' are allowed"
    )]
    BadCharacter { input: String, ch: char, pos: usize },
    #[error("PCI address {0:?} is not of the form DDDD:BB:DD.F or BB:DD.F")]
    Shape(String),
    #[error("PCI address {input:?}: the {field} must have {expected} hex digits, not {got}")]
    FieldLength {
        input: String,
        field: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error("PCI address {input:?}: device {value:#04x} is out of range (0x00 to 0x1f)")]
    DeviceRange { input: String, value: u8 },
    #[error("PCI address {input:?}: function {value} is out of range (0 to 7)")]
    FunctionRange { input: String, value: u8 },
}

impl PciAddress {
    /// Builds an address from its parts, checking the same ranges as the parser.
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device <= 0x1f && function <= 7).then_some(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    pub fn domain(&self) -> u32 {
        self.domain
    }
    pub fn bus(&self) -> u8 {
        self.bus
    }
    pub fn device(&self) -> u8 {
        self.device
    }
    pub fn function(&self) -> u8 {
        self.function
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(AddressError::Empty);
        }
        // Count characters, not bytes, so the message matches what the user typed.
        let len = input.chars().count();
        if len > MAX_LEN {
            return Err(AddressError::TooLong(len));
        }
        if let Some((pos, ch)) = input
            .chars()
            .enumerate()
            .find(|&(_, c)| !(c.is_ascii_hexdigit() || c == ':' || c == '.'))
        {
            return Err(AddressError::BadCharacter {
                input: input.to_owned(),
                ch,
                pos,
            });
        }

        let shape = || AddressError::Shape(input.to_owned());
        let (rest, function) = input.split_once('.').ok_or_else(shape)?;
        let fields: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match fields.as_slice() {
            [domain, bus, device] => (Some(*domain), *bus, *device),
            [bus, device] => (None, *bus, *device),
            _ => return Err(shape()),
        };
        if function.contains('.') {
            return Err(shape());
        }

        let length =
            |field: &'static str, expected: &'static str, got: usize| AddressError::FieldLength {
                input: input.to_owned(),
                field,
                expected,
                got,
            };
        let domain = match domain {
            None => 0,
            Some(d) if (4..=8).contains(&d.len()) => hex(d),
            Some(d) => return Err(length("domain", "4 to 8", d.len())),
        };
        if bus.len() != 2 {
            return Err(length("bus", "2", bus.len()));
        }
        if device.len() != 2 {
            return Err(length("device", "2", device.len()));
        }
        if function.len() != 1 {
            return Err(length("function", "1", function.len()));
        }
        // The character check above guarantees hex digits, and the lengths bound the values.
        let (bus, device, function) = (hex(bus) as u8, hex(device) as u8, hex(function) as u8);
        if device > 0x1f {
            return Err(AddressError::DeviceRange {
                input: input.to_owned(),
                value: device,
            });
        }
        if function > 7 {
            return Err(AddressError::FunctionRange {
                input: input.to_owned(),
                value: function,
            });
        }
        Ok(Self {
            domain,
            bus,
            device,
            function,
        })
    }
}

/// Value of a string already known to hold at most 8 hex digits.
fn hex(digits: &str) -> u32 {
    digits
        .chars()
        .fold(0, |acc, c| (acc << 4) | c.to_digit(16).unwrap_or(0))
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<PciAddress, AddressError> {
        s.parse()
    }

    #[test]
    fn accepts_long_and_short_forms() {
        let a = parse("0000:01:00.3").unwrap();
        assert_eq!(
            (a.domain(), a.bus(), a.device(), a.function()),
            (0, 1, 0, 3)
        );
        assert_eq!(parse("01:00.3").unwrap(), a);
        assert_eq!(parse("0000:0A:1F.7").unwrap().to_string(), "0000:0a:1f.7");
        assert!(
            parse("ab:cd.0")
                .unwrap_err()
                .to_string()
                .contains("device 0xcd")
        );
    }

    #[test]
    fn accepts_vmd_domains() {
        let a = parse("10000:02:05.0").unwrap();
        assert_eq!(a.domain(), 0x10000);
        assert_eq!(a.to_string(), "10000:02:05.0");
        assert_eq!(
            parse("ffffffff:ff:1f.7").unwrap().to_string(),
            "ffffffff:ff:1f.7"
        );
        // Leading zeros in a long domain are allowed and printed canonically.
        assert_eq!(
            parse("00000000:00:00.0").unwrap().to_string(),
            "0000:00:00.0"
        );
    }

    #[test]
    fn orders_like_lspci() {
        let mut v: Vec<PciAddress> = ["0001:00:00.0", "0000:01:00.1", "0000:01:00.0", "00:1f.0"]
            .iter()
            .map(|s| parse(s).unwrap())
            .collect();
        v.sort();
        let printed: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            printed,
            [
                "0000:00:1f.0",
                "0000:01:00.0",
                "0000:01:00.1",
                "0001:00:00.0"
            ]
        );
    }

    #[test]
    fn new_checks_ranges() {
        assert!(PciAddress::new(0, 0, 0x1f, 7).is_some());
        assert!(PciAddress::new(0, 0, 0x20, 0).is_none());
        assert!(PciAddress::new(0, 0, 0, 8).is_none());
    }

    /// Each malformed input with the message it must produce (a substring of it).
    const MALFORMED: &[(&str, &str)] = &[
        ("", "empty PCI address"),
        ("0000:01:00.0 ", "contains ' ' at position 12"),
        (" 0000:01:00.0", "contains ' ' at position 0"),
        ("0000:01: 00.0", "contains ' ' at position 8"),
        ("0000:01:00.0\n", "contains '\\n' at position 12"),
        ("0000:01:00.0\0", "contains '\\0' at position 12"),
        ("\t01:00.0", "contains '\\t' at position 0"),
        ("../../devices", "contains '/' at position 2"),
        ("0000:01:00.0/../x", "is 17 characters long"),
        ("0000:01:00/0", "contains '/' at position 10"),
        ("0000:01:00.0;rm", "contains ';' at position 12"),
        ("0000:01:00.g", "contains 'g' at position 11"),
        ("0000:01:00.-1", "contains '-' at position 11"),
        ("+000:01:00.0", "contains '+' at position 0"),
        ("0000:01:00.é", "contains 'é' at position 11"),
        ("000000000000:01:00.0", "is 20 characters long"),
        ("0000:01:00", "not of the form"),
        ("0000:01:00:0", "not of the form"),
        ("0000.01.00.0", "not of the form"),
        ("0000:01:00.0.1", "not of the form"),
        (":01:00.0", "the domain must have 4 to 8 hex digits, not 0"),
        ("0000::00.0", "the bus must have 2 hex digits, not 0"),
        ("0:01:00.0", "the domain must have 4 to 8 hex digits, not 1"),
        (
            "000:01:00.0",
            "the domain must have 4 to 8 hex digits, not 3",
        ),
        (
            "123456789:1:00.0",
            "the domain must have 4 to 8 hex digits, not 9",
        ),
        ("0000:1:00.0", "the bus must have 2 hex digits, not 1"),
        ("0000:001:00.0", "the bus must have 2 hex digits, not 3"),
        ("0000:01:0.0", "the device must have 2 hex digits, not 1"),
        ("0000:01:000.0", "the device must have 2 hex digits, not 3"),
        ("0000:01:00.", "the function must have 1 hex digits, not 0"),
        (
            "0000:01:00.00",
            "the function must have 1 hex digits, not 2",
        ),
        ("0000:01:20.0", "device 0x20 is out of range"),
        ("0000:01:ff.0", "device 0xff is out of range"),
        ("0000:01:00.8", "function 8 is out of range"),
        ("0000:01:00.f", "function 15 is out of range"),
        ("1:2:3.4", "the domain must have 4 to 8 hex digits, not 1"),
        ("0000:01:00:00.0", "not of the form"),
        ("....", "not of the form"),
        (":::.", "not of the form"),
        ("01.00.0", "not of the form"),
    ];

    #[test]
    fn rejects_malformed_inputs_with_a_message_naming_the_fault() {
        assert!(MALFORMED.len() >= 30);
        for (input, expected) in MALFORMED {
            let err = parse(input).expect_err(input);
            let message = err.to_string();
            assert!(
                message.contains(expected),
                "{input:?}: message {message:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn serializes_as_canonical_string() {
        let a = parse("00:1F.2").unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"0000:00:1f.2\"");
        let back: PciAddress = serde_json::from_str("\"0000:00:1f.2\"").unwrap();
        assert_eq!(back, a);
        let bad = serde_json::from_str::<PciAddress>("\"../x\"").unwrap_err();
        assert!(bad.to_string().contains("contains '/'"));
    }

    fn any_address() -> impl Strategy<Value = PciAddress> {
        (any::<u32>(), any::<u8>(), 0u8..=0x1f, 0u8..=7)
            .prop_map(|(d, b, dev, f)| PciAddress::new(d, b, dev, f).unwrap())
    }

    proptest! {
        #[test]
        fn print_then_parse_is_identity(a in any_address()) {
            let printed = a.to_string();
            prop_assert_eq!(parse(&printed).unwrap(), a);
            prop_assert_eq!(parse(&printed.to_uppercase()).unwrap(), a);
            // Canonical: printing a parsed address gives back the same text.
            prop_assert_eq!(parse(&printed).unwrap().to_string(), printed);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = parse(&s);
        }

        #[test]
        fn address_like_strings_never_panic(s in "[0-9a-fA-F:.x/ ]{0,20}") {
            if let Ok(a) = parse(&s) {
                // Anything accepted prints to something that parses to the same value.
                prop_assert_eq!(parse(&a.to_string()).unwrap(), a);
            }
        }
    }
}
