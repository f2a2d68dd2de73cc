//! libvirt's domain XML, read as the libvirt hook needs it: the host PCI functions of a
//! domain's `<devices>`, unmanaged (to lease) and managed (libvirt's own). A small, strict,
//! read-only DOM: no DTD, so no entity expansion; the input is bounded before it is parsed.

use std::io::Read;

use roxmltree::{Document, Node, ParsingOptions};

use crate::PciAddress;
use crate::lease::DomainDevices;

/// The largest domain XML read (libvirt's own limit for a domain XML file is 10 MiB).
pub const MAX_XML: usize = 16 << 20;

/// Why a domain XML could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainXmlError {
    #[error("the domain XML is larger than {} MiB", MAX_XML >> 20)]
    TooLarge,
    #[error("the domain XML is not UTF-8")]
    NotUtf8,
    #[error("the domain XML is malformed: {0}")]
    Malformed(String),
    #[error("the document's root is <{0}>, not a libvirt <domain>")]
    NotDomain(String),
    #[error("the domain XML has no <name>")]
    NoName,
    /// One device entry is unusable; `which` says which (`hostdev 2`, `interface 1`).
    #[error("{which}: {why}")]
    Device { which: String, why: String },
}

/// The PCI functions of a domain's `<devices>`: unmanaged ones (to lease) and managed ones
/// (libvirt's). Only the source address counts; the guest-side `<address>` is not the host's.
pub fn domain_devices(xml: &str) -> Result<DomainDevices, DomainXmlError> {
    let options = ParsingOptions {
        allow_dtd: false,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(xml, options)
        .map_err(|e| DomainXmlError::Malformed(escape_controls(&e.to_string())))?;
    let root = doc.root_element();
    if !is(root, "domain") {
        return Err(DomainXmlError::NotDomain(root.tag_name().name().to_owned()));
    }
    let domain = child(root, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or(DomainXmlError::NoName)?
        .to_owned();
    let mut found = DomainDevices {
        domain,
        ..DomainDevices::default()
    };
    let (mut hostdevs, mut interfaces) = (0, 0);
    for devices in root.children().filter(|n| is(*n, "devices")) {
        for device in devices.children().filter(Node::is_element) {
            let which = if is(device, "hostdev") {
                hostdevs += 1;
                if device.attribute("mode").unwrap_or("subsystem") != "subsystem"
                    || device.attribute("type") != Some("pci")
                {
                    continue; // USB, SCSI, mdev, LXC capabilities: not ours
                }
                format!("hostdev {hostdevs}")
            } else if is(device, "interface") {
                interfaces += 1;
                if device.attribute("type") != Some("hostdev") {
                    continue;
                }
                format!("interface {interfaces} (type='hostdev')")
            } else {
                continue;
            };
            let fail = |why: String| DomainXmlError::Device {
                which: which.clone(),
                why,
            };
            let managed = match device.attribute("managed") {
                // libvirt's default for a hostdev is managed='no'.
                None | Some("no") => false,
                Some("yes") => true,
                Some(other) => {
                    return Err(fail(format!("managed={other:?} is neither yes nor no")));
                }
            };
            let address = source_address(device).map_err(fail)?;
            if found.functions.contains(&address) || found.managed.contains(&address) {
                return Err(DomainXmlError::Device {
                    which,
                    why: format!("{address} is named twice in the domain"),
                });
            }
            if managed {
                found.managed.push(address);
            } else {
                found.functions.push(address);
            }
        }
    }
    Ok(found)
}

/// The parser quotes the character it stopped at, a newline among them; libvirt logs the
/// hook's message as one line.
fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// An element of libvirt's (empty) namespace called `name`.
fn is(node: Node<'_, '_>, name: &str) -> bool {
    node.is_element() && node.tag_name().name() == name && node.tag_name().namespace().is_none()
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| is(*n, name))
}

/// `<source><address domain= bus= slot= function=/></source>`, as the host's PCI address.
fn source_address(device: Node<'_, '_>) -> Result<PciAddress, String> {
    let address = child(device, "source")
        .ok_or("it has no <source>")?
        .children()
        .find(|n| is(*n, "address"))
        .ok_or("its <source> has no <address>")?;
    if let Some(kind) = address.attribute("type")
        && kind != "pci"
    {
        return Err(format!(
            "its source address has type='{kind}', not a PCI address"
        ));
    }
    let number = |name: &str, max: u32, required: bool| -> Result<u32, String> {
        match address.attribute(name) {
            None if !required => Ok(0),
            None => Err(format!("its source address has no {name}")),
            Some(text) => libvirt_number(text).filter(|n| *n <= max).ok_or_else(|| {
                format!("its source address has {name}={text:?}, not 0 to {max:#x}")
            }),
        }
    };
    let domain = number("domain", 0xffff, false)?;
    let bus = number("bus", 0xff, true)?;
    let slot = number("slot", 0x1f, true)?;
    let function = number("function", 7, true)?;
    // Each part was range-checked above, so the narrowing conversions cannot fail.
    PciAddress::new(
        domain,
        u8::try_from(bus).unwrap_or(u8::MAX),
        u8::try_from(slot).unwrap_or(u8::MAX),
        u8::try_from(function).unwrap_or(u8::MAX),
    )
    .ok_or_else(|| "its source address is out of range".to_owned())
}

/// A number as libvirt reads one (`strtoul` with base 0): `0x1f` hex, `017` octal, `15` decimal.
fn libvirt_number(text: &str) -> Option<u32> {
    let text = text.trim();
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if text.len() > 1 && text.starts_with('0') {
        u32::from_str_radix(&text[1..], 8).ok()
    } else {
        text.parse().ok()
    }
}

/// Reads the domain XML from `input`, at most [`MAX_XML`] bytes.
pub fn read_xml(input: impl Read) -> Result<String, DomainXmlError> {
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_XML).unwrap_or(u64::MAX) + 1;
    input
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| DomainXmlError::Malformed(format!("reading stdin: {e}")))?;
    if bytes.len() > MAX_XML {
        return Err(DomainXmlError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|_| DomainXmlError::NotUtf8)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    /// Every `tests/libvirt-xml/NAME.xml` against `NAME.expected`: `lease ADDR...`,
    /// `managed ADDR...` lines, or `error: TEXT` (a part of the message).
    #[test]
    fn domain_documents_give_the_expected_leases_or_errors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/libvirt-xml");
        let mut checked = 0;
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "xml"))
            .collect();
        names.sort();
        for path in names {
            let xml = std::fs::read_to_string(&path).unwrap();
            let expected = std::fs::read_to_string(path.with_extension("expected"))
                .unwrap_or_else(|_| panic!("{} has no .expected file", path.display()));
            let got = match domain_devices(&xml) {
                Ok(d) => describe(&d),
                Err(e) => format!("error: {e}"),
            };
            let expected = expected.trim();
            if let Some(part) = expected.strip_prefix("error: ") {
                assert!(
                    got.starts_with("error: ") && got.contains(part),
                    "{}: expected an error with {part:?}, got {got:?}",
                    path.display()
                );
            } else {
                assert_eq!(got.trim(), expected, "{}", path.display());
            }
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} documents");
    }

    fn describe(d: &DomainDevices) -> String {
        let join = |v: &[PciAddress]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "domain {}\nlease {}\nmanaged {}",
            d.domain,
            join(&d.functions),
            join(&d.managed)
        )
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
    }

    #[test]
    fn a_ten_mib_document_is_read_and_a_larger_one_refused() {
        let filler = format!("<metadata><blob>{}</blob></metadata>", "x".repeat(10 << 20));
        let xml = format!(
            "<domain type='kvm'><name>big</name>{filler}<devices>\
             <hostdev mode='subsystem' type='pci' managed='no'><source>\
             <address domain='0x0000' bus='0x05' slot='0x10' function='0x2'/></source></hostdev>\
             </devices></domain>"
        );
        assert!(xml.len() > 10 << 20);
        let read = read_xml(xml.as_bytes()).unwrap();
        let devices = domain_devices(&read).unwrap();
        assert_eq!(devices.functions, ["0000:05:10.2".parse().unwrap()]);
        let huge = "x".repeat(MAX_XML + 1);
        assert_eq!(
            read_xml(huge.as_bytes()).unwrap_err(),
            DomainXmlError::TooLarge
        );
        assert_eq!(
            read_xml(&[0xff, 0xfe][..]).unwrap_err(),
            DomainXmlError::NotUtf8
        );
    }

    #[test]
    fn numbers_are_read_as_libvirt_reads_them() {
        assert_eq!(libvirt_number("0x1f"), Some(31));
        assert_eq!(libvirt_number("0X0a"), Some(10));
        assert_eq!(libvirt_number("010"), Some(8));
        assert_eq!(libvirt_number("0"), Some(0));
        assert_eq!(libvirt_number("16"), Some(16));
        assert_eq!(libvirt_number("0x"), None);
        assert_eq!(libvirt_number("09"), None);
        assert_eq!(libvirt_number("-1"), None);
    }
}
