//! ResourceSlices: what the node offers, one pool per node.
//!
//! [`build_slices`] turns the node's PCI functions into the slices of one pool, and
//! [`Publisher`] keeps the API server's copy equal to them. The scheduler only trusts a pool
//! whose slices all carry the same, highest generation and whose count matches
//! `resourceSliceCount`, so every change rewrites the whole pool under a new generation.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use passthroughd_proto::PciAddress;

use crate::cluster::ClusterError;

/// One PCI function the node offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedDevice {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub iommu_group: u32,
    pub numa_node: Option<u32>,
    /// The PCIe root the function hangs under, as Kubernetes names it ("pci0000:00"), when known.
    pub pcie_root: Option<String>,
    /// For an SR-IOV VF, its PF.
    pub pf: Option<PciAddress>,
    /// Not leased, not in use: a claim may get it.
    pub free: bool,
}

/// Kubernetes refuses a slice with more devices than this.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// Kubernetes refuses a device with more attributes and capacities (together) than this.
pub const MAX_ATTRIBUTES_PER_DEVICE: usize = 32;
/// Kubernetes refuses a string attribute longer than this.
const MAX_STRING_VALUE: usize = 64;
/// Kubernetes refuses an object name longer than this (a DNS subdomain).
const MAX_NAME: usize = 253;

/// "0000:01:10.0" -> "pci-0000-01-10-0" (a DNS label, as device names must be).
pub fn device_name(address: PciAddress) -> String {
    format!(
        "pci-{:04x}-{:02x}-{:02x}-{:x}",
        address.domain(),
        address.bus(),
        address.device(),
        address.function()
    )
}

/// The inverse; None for a name that is not one of ours.
pub fn address_of(device_name: &str) -> Option<PciAddress> {
    let rest = device_name.strip_prefix("pci-")?;
    let [domain, bus, device, function] = *rest.split('-').collect::<Vec<_>>() else {
        return None;
    };
    let address: PciAddress = format!("{domain}:{bus}:{device}.{function}").parse().ok()?;
    // Only the canonical spelling is ours: "pci-0-1-2-3" parses, but we never wrote it.
    (self::device_name(address) == device_name).then_some(address)
}

/// The slices of one pool (named after the node) holding `devices`, sorted by address, at most
/// [`MAX_DEVICES_PER_SLICE`] to a slice. No devices, no slices: an empty pool says nothing a
/// missing one does not. A device listed twice is offered once (the API server refuses
/// duplicate names in a slice).
pub fn build_slices(
    driver: &str,
    node: &str,
    owner: &OwnerReference,
    generation: i64,
    devices: &[OfferedDevice],
) -> Vec<ResourceSlice> {
    let mut sorted: Vec<&OfferedDevice> = devices.iter().collect();
    sorted.sort_by_key(|device| device.address);
    sorted.dedup_by_key(|device| device.address);

    let chunks: Vec<&[&OfferedDevice]> = sorted.chunks(MAX_DEVICES_PER_SLICE).collect();
    let count = i64::try_from(chunks.len()).unwrap_or(i64::MAX);
    chunks
        .iter()
        .enumerate()
        .map(|(n, chunk)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(node, driver, n)),
                owner_references: Some(vec![owner.clone()]),
                ..ObjectMeta::default()
            },
            spec: ResourceSliceSpec {
                driver: driver.to_owned(),
                node_name: Some(node.to_owned()),
                pool: ResourcePool {
                    name: node.to_owned(),
                    generation,
                    resource_slice_count: count,
                },
                devices: Some(chunk.iter().map(|device| describe(device)).collect()),
                ..ResourceSliceSpec::default()
            },
        })
        .collect()
}

/// One function as a DRA device. Names without a domain are the driver's own attributes.
fn describe(offered: &OfferedDevice) -> Device {
    let string = |value: String| DeviceAttribute {
        string: Some(value),
        ..DeviceAttribute::default()
    };
    let int = |value: u32| DeviceAttribute {
        int: Some(i64::from(value)),
        ..DeviceAttribute::default()
    };
    let boolean = |value: bool| DeviceAttribute {
        bool: Some(value),
        ..DeviceAttribute::default()
    };

    let mut attributes = BTreeMap::new();
    let mut set = |name: &str, value: DeviceAttribute| attributes.insert(name.to_owned(), value);
    set(
        "resource.kubernetes.io/pciBusID",
        string(offered.address.to_string()),
    );
    // The API server refuses the whole slice over one long string; leave an odd root out.
    if let Some(root) = offered
        .pcie_root
        .as_ref()
        .filter(|root| root.len() <= MAX_STRING_VALUE)
    {
        set("resource.kubernetes.io/pcieRoot", string(root.clone()));
    }
    set("vendorID", string(format!("{:04x}", offered.vendor_id)));
    set("deviceID", string(format!("{:04x}", offered.device_id)));
    set("iommuGroup", int(offered.iommu_group));
    if let Some(numa) = offered.numa_node {
        set("numaNode", int(numa));
    }
    if let Some(pf) = offered.pf {
        set("pfAddress", string(pf.to_string()));
    }
    set("free", boolean(offered.free));
    set("sriovVF", boolean(offered.pf.is_some()));

    Device {
        name: device_name(offered.address),
        attributes: Some(attributes),
        ..Device::default()
    }
}

/// "<node>-<driver>-<n>" as a DNS subdomain. Names are stable, so a republished pool replaces
/// its slices in place instead of piling up new ones.
fn slice_name(node: &str, driver: &str, n: usize) -> String {
    let base = dns_subdomain(&format!("{node}-{driver}"));
    let name = format!("{base}-{n}");
    if name.len() <= MAX_NAME {
        return name;
    }
    // Too long: keep a prefix and a hash of the whole, so two long node names sharing a prefix
    // still get different names.
    let tail = format!(
        "-{:016x}-{n}",
        fnv1a(format!("{node}\0{driver}").as_bytes())
    );
    let prefix = base[..MAX_NAME - tail.len()].trim_end_matches(['-', '.']);
    format!("{prefix}{tail}")
}

/// Lowercase, only [a-z0-9.-], every dot-separated part starting and ending alphanumeric.
/// Node and driver names already are DNS subdomains; this only guards against odd input.
fn dns_subdomain(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let parts: Vec<&str> = cleaned
        .split('.')
        .map(|part| part.trim_matches('-'))
        .filter(|part| !part.is_empty())
        .collect();
    if parts.is_empty() {
        "slice".to_owned()
    } else {
        parts.join(".")
    }
}

/// FNV-1a, 64 bits: a hash that never changes between Rust releases (names must stay stable).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Keeps the node's slices in the API server equal to what it was last given.
pub struct Publisher {
    slices: Api<ResourceSlice>,
    driver: String,
    node: String,
    owner: OwnerReference,
    /// The highest pool generation seen in the API server or written; the next write goes
    /// above it, so no two different contents ever share a generation.
    generation: i64,
}

impl fmt::Debug for Publisher {
    // kube's Api has no Debug; what identifies a publisher is its driver, node and generation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("driver", &self.driver)
            .field("node", &self.node)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(client: Client, driver: String, node: String, owner: OwnerReference) -> Self {
        Self {
            slices: Api::all(client),
            driver,
            node,
            owner,
            generation: 0,
        }
    }

    /// Makes the API server hold exactly the slices for `devices`. When what is there already
    /// says the same, nothing is written. Otherwise the pool gets a generation above the
    /// highest found (a restarted plugin never reuses one), its slices are created or replaced,
    /// and surplus slices are deleted. Returns whether it wrote.
    pub async fn publish(&mut self, devices: &[OfferedDevice]) -> Result<bool, ClusterError> {
        let existing = self.list().await?;
        let found = existing
            .iter()
            .map(|slice| slice.spec.pool.generation)
            .max()
            .unwrap_or(0);
        self.generation = self.generation.max(found);

        let current = build_slices(&self.driver, &self.node, &self.owner, found, devices);
        if same_content(&current, &existing) {
            return Ok(false);
        }

        self.generation += 1;
        let wanted = build_slices(
            &self.driver,
            &self.node,
            &self.owner,
            self.generation,
            devices,
        );
        let mut stale: BTreeMap<String, ResourceSlice> = existing
            .into_iter()
            .map(|slice| (slice.metadata.name.clone().unwrap_or_default(), slice))
            .collect();
        // Write the new generation first, then delete what it no longer needs: consumers
        // ignore slices of an older generation, so leftovers never mislead them.
        for mut slice in wanted {
            let name = slice.metadata.name.clone().unwrap_or_default();
            match stale.remove(&name) {
                Some(old) => {
                    // The old version makes the replace conditional: a concurrent writer
                    // gets us a 409 instead of being silently overwritten.
                    slice.metadata.resource_version = old.metadata.resource_version;
                    self.slices
                        .replace(&name, &PostParams::default(), &slice)
                        .await
                        .map_err(|e| {
                            ClusterError::request(format!("cannot update ResourceSlice {name}"), e)
                        })?;
                }
                None => {
                    self.slices
                        .create(&PostParams::default(), &slice)
                        .await
                        .map_err(|e| {
                            ClusterError::request(format!("cannot create ResourceSlice {name}"), e)
                        })?;
                }
            }
        }
        for name in stale.keys() {
            self.delete(name).await?;
        }
        Ok(true)
    }

    /// This driver's slices for this node. The field selector saves the transfer; the filter
    /// here makes sure, should a server ignore the selector, that we never touch another's.
    async fn list(&self) -> Result<Vec<ResourceSlice>, ClusterError> {
        let selector = format!("spec.nodeName={},spec.driver={}", self.node, self.driver);
        let listed = self
            .slices
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|e| ClusterError::request("cannot list ResourceSlices", e))?;
        Ok(listed
            .items
            .into_iter()
            .filter(|slice| {
                slice.spec.driver == self.driver
                    && slice.spec.node_name.as_deref() == Some(self.node.as_str())
            })
            .collect())
    }

    /// Deletes one slice; one that is already gone is fine.
    async fn delete(&self, name: &str) -> Result<(), ClusterError> {
        match self.slices.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(ClusterError::request(
                format!("cannot delete ResourceSlice {name}"),
                e,
            )),
        }
    }
}

/// Whether the API server's slices say what `wanted` says: the same names, owners and specs.
/// Server-set metadata (uid, versions, timestamps) does not count.
fn same_content(wanted: &[ResourceSlice], existing: &[ResourceSlice]) -> bool {
    let content = |slices: &[ResourceSlice]| {
        let mut content: Vec<_> = slices
            .iter()
            .map(|slice| {
                (
                    slice.metadata.name.clone(),
                    slice.metadata.owner_references.clone(),
                    slice.spec.clone(),
                )
            })
            .collect();
        content.sort_by(|a, b| a.0.cmp(&b.0));
        content
    };
    content(wanted) == content(existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_names_become_dns_subdomains() {
        assert_eq!(dns_subdomain("Node_1.Example..com-"), "node-1.example.com");
        assert_eq!(dns_subdomain("-.-"), "slice");
        assert_eq!(
            slice_name("node-1", "passthroughd.example.com", 2),
            "node-1-passthroughd.example.com-2"
        );
    }

    #[test]
    fn the_name_hash_is_fnv1a() {
        // Published test vectors: a changed hash would rename every long-named slice.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
