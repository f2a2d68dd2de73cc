//! Vendor, device and class names from the system's `pci.ids` (Debian package `pci.ids`).
//!
//! The file is optional: without it every function is still listed, by its ids alone.

use std::collections::HashMap;
use std::path::Path;

/// Where distributions install the database, most common first.
pub const DEFAULT_PATHS: &[&str] = &["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// An in-memory index of `pci.ids`.
#[derive(Debug, Default)]
pub struct PciIds {
    vendors: HashMap<u16, Vendor>,
    /// Base class names (`C 02  Network controller`).
    classes: HashMap<u8, Box<str>>,
    /// Subclass names keyed by (base class, subclass) (`\t00  Ethernet controller`).
    subclasses: HashMap<(u8, u8), Box<str>>,
}

#[derive(Debug, Default)]
struct Vendor {
    name: Box<str>,
    devices: HashMap<u16, Box<str>>,
}

impl PciIds {
    /// An empty database: lookups find nothing and callers show ids.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Loads the first database found at [`DEFAULT_PATHS`], or an empty one.
    pub fn load_system() -> Self {
        DEFAULT_PATHS
            .iter()
            .find_map(|path| Self::load(Path::new(path)).ok())
            .unwrap_or_default()
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        Ok(Self::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Parses the `pci.ids` format: `VVVV  name` vendor lines, `\tDDDD  name` device lines,
    /// `\t\t` subsystem lines (ignored), then `C CC  name` classes with `\tSS  name` subclasses.
    pub fn parse(text: &str) -> Self {
        let mut ids = Self::default();
        let mut vendor: Option<u16> = None;
        let mut class: Option<u8> = None;
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') || line.starts_with("\t\t") {
                continue;
            }
            if let Some(rest) = line.strip_prefix("C ") {
                vendor = None;
                class = split_entry(rest).and_then(|(id, name)| {
                    let id = u8::from_str_radix(id, 16).ok()?;
                    ids.classes.insert(id, name.into());
                    Some(id)
                });
            } else if let Some(rest) = line.strip_prefix('\t') {
                let Some((id, name)) = split_entry(rest) else {
                    continue;
                };
                if let Some(v) = vendor {
                    if let (Ok(device), Some(entry)) =
                        (u16::from_str_radix(id, 16), ids.vendors.get_mut(&v))
                    {
                        entry.devices.insert(device, name.into());
                    }
                } else if let (Some(c), Ok(sub)) = (class, u8::from_str_radix(id, 16)) {
                    ids.subclasses.insert((c, sub), name.into());
                }
            } else {
                // A vendor line; anything else (unknown sections) ends the current vendor.
                class = None;
                vendor = split_entry(line).and_then(|(id, name)| {
                    let id = u16::from_str_radix(id, 16).ok()?;
                    ids.vendors.insert(
                        id,
                        Vendor {
                            name: name.into(),
                            devices: HashMap::new(),
                        },
                    );
                    Some(id)
                });
            }
        }
        ids
    }

    pub fn vendor(&self, vendor: u16) -> Option<&str> {
        self.vendors.get(&vendor).map(|v| &*v.name)
    }

    pub fn device(&self, vendor: u16, device: u16) -> Option<&str> {
        self.vendors
            .get(&vendor)
            .and_then(|v| v.devices.get(&device))
            .map(|name| &**name)
    }

    /// The subclass name for a 24-bit class code, or the base class name when the subclass
    /// is unknown.
    pub fn class(&self, class: u32) -> Option<&str> {
        let base = (class >> 16) as u8;
        let sub = (class >> 8) as u8;
        self.subclasses
            .get(&(base, sub))
            .or_else(|| self.classes.get(&base))
            .map(|name| &**name)
    }
}

/// Splits `XXXX  name` into the id and the name.
fn split_entry(rest: &str) -> Option<(&str, &str)> {
    let (id, name) = rest.split_once("  ")?;
    Some((id.trim(), name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# comment
8086  Intel Corporation
\t10c9  82576 Gigabit Network Connection
\t\t8086 a03c  Ethernet Server Adapter
\t10ca  82576 Virtual Function
1af4  Red Hat, Inc.
\t1000  Virtio network device
C 02  Network controller
\t00  Ethernet controller
\t\t00  prog-if
C 06  Bridge
\t04  PCI bridge
";

    #[test]
    fn looks_up_vendors_devices_and_classes() {
        let ids = PciIds::parse(SAMPLE);
        assert_eq!(ids.vendor(0x8086), Some("Intel Corporation"));
        assert_eq!(ids.device(0x8086, 0x10ca), Some("82576 Virtual Function"));
        assert_eq!(ids.device(0x1af4, 0x1000), Some("Virtio network device"));
        assert_eq!(ids.device(0x1af4, 0x10ca), None);
        assert_eq!(ids.vendor(0xabcd), None);
        assert_eq!(ids.class(0x020000), Some("Ethernet controller"));
        assert_eq!(ids.class(0x060400), Some("PCI bridge"));
        // Unknown subclass falls back to the base class.
        assert_eq!(ids.class(0x068000), Some("Bridge"));
        assert_eq!(ids.class(0xff0000), None);
    }

    #[test]
    fn system_database_parses_when_installed() {
        let Some(path) = DEFAULT_PATHS.iter().map(Path::new).find(|p| p.exists()) else {
            return; // Not installed here; the empty-database path is covered above.
        };
        let ids = PciIds::load(path).unwrap();
        assert_eq!(ids.vendor(0x8086), Some("Intel Corporation"));
        assert!(
            ids.device(0x8086, 0x10c9)
                .is_some_and(|n| n.contains("82576"))
        );
    }
}
