//! What the container runtime and KubeVirt read: one CDI spec per prepared claim (its VFIO
//! device nodes), and the KubeVirt device metadata file, mounted into the container through an
//! extra CDI device of the same spec.
//!
//! CDI: <https://github.com/cncf-tags/container-device-interface/blob/main/SPEC.md> (0.5.0).
//! The metadata format is KEP-5304's `metadata.resource.k8s.io/v1alpha1` `DeviceMetadata`, as
//! KubeVirt 1.9 reads it; it is young and not in k8s-openapi, so its types are defined here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use passthroughd_proto::PciAddress;

/// The CDI kind of the plugin's devices (`vendor/class`).
pub const CDI_KIND: &str = "passthroughd.io/vfio";
pub const CDI_VERSION: &str = "0.5.0";
/// The attribute KubeVirt reads a device's PCI address from.
pub const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
pub const METADATA_API_VERSION: &str = "metadata.resource.k8s.io/v1alpha1";
/// Where KubeVirt looks for metadata inside the container.
pub const METADATA_ROOT: &str = "/var/run/kubernetes.io/dra-device-attributes";
/// The annotation of a claim made from a template, naming the claim in the pod spec.
pub const POD_CLAIM_NAME: &str = "resource.kubernetes.io/pod-claim-name";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<CdiDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdiDevice {
    pub name: String,
    pub container_edits: ContainerEdits,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceNode {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    pub options: Vec<String>,
}

/// KEP-5304's device metadata, as KubeVirt decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMetadata {
    pub api_version: String,
    pub kind: String,
    pub metadata: ClaimRef,
    /// For a claim made from a template: its name in the pod spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_claim_name: Option<String>,
    pub requests: Vec<RequestMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMetadata {
    pub name: String,
    pub devices: Vec<DeviceMetadataEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMetadataEntry {
    pub driver: String,
    pub pool: String,
    /// The device's name in its ResourceSlice.
    pub name: String,
    pub attributes: BTreeMap<String, AttributeValue>,
}

/// One typed value, as in a ResourceSlice (`{"string": "0000:01:10.0"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttributeValue {
    String(String),
    Int(i64),
    Bool(bool),
}

/// One device of a prepared claim, as the spec needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedDevice {
    /// The request of the claim it was allocated for (its top-level name).
    pub request: String,
    pub pool: String,
    /// The ResourceSlice device name.
    pub device: String,
    pub address: PciAddress,
    pub iommu_group: u32,
    /// `/dev/vfio/devices/vfioN`, when the kernel offers iommufd's device node.
    pub iommufd_node: Option<String>,
}

/// The claim a spec is written for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Set for a claim made from a template: its name in the pod spec.
    pub pod_claim_name: Option<String>,
}

/// Where the plugin writes: CDI specs for the runtime, metadata files for KubeVirt.
#[derive(Debug, Clone)]
pub struct Files {
    pub cdi_dir: PathBuf,
    /// `<plugin-dir>/metadata`: one directory per claim UID.
    pub metadata_dir: PathBuf,
    pub driver: String,
}

impl Files {
    pub fn spec_path(&self, claim_uid: &str) -> PathBuf {
        self.cdi_dir
            .join(format!("passthroughd.io-vfio_{claim_uid}.json"))
    }

    /// Where the metadata of one request of a claim is written (and mounted from).
    pub fn metadata_path(&self, claim_uid: &str, request: &str) -> PathBuf {
        self.metadata_dir
            .join(claim_uid)
            .join(request)
            .join(format!("{}-metadata.json", self.driver))
    }

    /// The CDI ids kubelet passes to the runtime for `device` of the claim.
    pub fn cdi_ids(claim_uid: &str, device: &PreparedDevice) -> Vec<String> {
        vec![
            format!("{CDI_KIND}={}", device_entry_name(claim_uid, device)),
            format!(
                "{CDI_KIND}={}",
                metadata_entry_name(claim_uid, &device.request)
            ),
        ]
    }

    /// The spec of the claim: a CDI device per function (the VFIO container node and its
    /// group's node, plus the iommufd node), and one per request mounting its metadata file.
    pub fn spec(&self, claim: &ClaimInfo, devices: &[PreparedDevice]) -> Spec {
        let mut entries: Vec<CdiDevice> = devices
            .iter()
            .map(|d| {
                let mut nodes = vec![
                    node("/dev/vfio/vfio"),
                    node(&format!("/dev/vfio/{}", d.iommu_group)),
                ];
                nodes.extend(d.iommufd_node.as_deref().map(node));
                CdiDevice {
                    name: device_entry_name(&claim.uid, d),
                    container_edits: ContainerEdits {
                        device_nodes: nodes,
                        mounts: Vec::new(),
                    },
                }
            })
            .collect();
        for request in requests(devices) {
            entries.push(CdiDevice {
                name: metadata_entry_name(&claim.uid, request),
                container_edits: ContainerEdits {
                    device_nodes: Vec::new(),
                    mounts: vec![Mount {
                        host_path: self
                            .metadata_path(&claim.uid, request)
                            .display()
                            .to_string(),
                        container_path: self.container_metadata_path(claim, request),
                        options: vec!["ro".into(), "bind".into()],
                    }],
                },
            });
        }
        Spec {
            cdi_version: CDI_VERSION.into(),
            kind: CDI_KIND.into(),
            devices: entries,
        }
    }

    /// Where KubeVirt reads the request's metadata inside the container.
    pub fn container_metadata_path(&self, claim: &ClaimInfo, request: &str) -> String {
        let (kind, name) = match &claim.pod_claim_name {
            Some(pod_claim) => ("resourceclaimtemplates", pod_claim.as_str()),
            None => ("resourceclaims", claim.name.as_str()),
        };
        format!(
            "{METADATA_ROOT}/{kind}/{name}/{request}/{}-metadata.json",
            self.driver
        )
    }

    /// The metadata of one request.
    pub fn metadata(
        &self,
        claim: &ClaimInfo,
        request: &str,
        devices: &[PreparedDevice],
    ) -> DeviceMetadata {
        DeviceMetadata {
            api_version: METADATA_API_VERSION.into(),
            kind: "DeviceMetadata".into(),
            metadata: ClaimRef {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                uid: claim.uid.clone(),
            },
            pod_claim_name: claim.pod_claim_name.clone(),
            requests: vec![RequestMetadata {
                name: request.to_owned(),
                devices: devices
                    .iter()
                    .filter(|d| d.request == request)
                    .map(|d| DeviceMetadataEntry {
                        driver: self.driver.clone(),
                        pool: d.pool.clone(),
                        name: d.device.clone(),
                        attributes: BTreeMap::from([(
                            PCI_BUS_ID.to_owned(),
                            AttributeValue::String(d.address.to_string()),
                        )]),
                    })
                    .collect(),
            }],
        }
    }

    /// Writes the metadata files, then the spec (each atomically, each only when its content
    /// changed), so a runtime that sees the spec finds the files it mounts.
    pub fn write(&self, claim: &ClaimInfo, devices: &[PreparedDevice]) -> std::io::Result<()> {
        for request in requests(devices) {
            let metadata = self.metadata(claim, request, devices);
            write_json(&self.metadata_path(&claim.uid, request), &metadata)?;
        }
        write_json(&self.spec_path(&claim.uid), &self.spec(claim, devices))
    }

    /// Removes the claim's spec and metadata; what is already gone is fine.
    pub fn remove(&self, claim_uid: &str) -> std::io::Result<()> {
        ignore_missing(std::fs::remove_file(self.spec_path(claim_uid)))?;
        ignore_missing(std::fs::remove_dir_all(self.metadata_dir.join(claim_uid)))
    }
}

fn node(path: &str) -> DeviceNode {
    DeviceNode { path: path.into() }
}

/// CDI device names allow `[A-Za-z0-9_.:-]`: claim UIDs, device names and request names (DNS
/// labels) are all within that.
fn device_entry_name(claim_uid: &str, device: &PreparedDevice) -> String {
    format!("{claim_uid}-{}", device.device)
}

fn metadata_entry_name(claim_uid: &str, request: &str) -> String {
    format!("{claim_uid}-metadata-{request}")
}

fn requests(devices: &[PreparedDevice]) -> std::collections::BTreeSet<&str> {
    devices.iter().map(|d| d.request.as_str()).collect()
}

fn ignore_missing(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, unless the file
/// already holds exactly that.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    if std::fs::read(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    // Readable by all: the container runtime reads the spec, and KubeVirt's virt-launcher
    // (not root) reads the metadata it mounts. The temporary file starts out 0600.
    file.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::io::Write::write_all(&mut file, &text)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vf() -> PreparedDevice {
        PreparedDevice {
            request: "nic".into(),
            pool: "node-a".into(),
            device: "pci-0000-01-10-0".into(),
            address: "0000:01:10.0".parse().unwrap(),
            iommu_group: 12,
            iommufd_node: Some("/dev/vfio/devices/vfio0".into()),
        }
    }

    fn claim(pod_claim_name: Option<&str>) -> ClaimInfo {
        ClaimInfo {
            namespace: "vms".into(),
            name: "vm1-nic-x7k2p".into(),
            uid: "0f9e8d7c-1111-2222-3333-444455556666".into(),
            pod_claim_name: pod_claim_name.map(Into::into),
        }
    }

    fn files(dir: &Path) -> Files {
        Files {
            cdi_dir: dir.join("cdi"),
            metadata_dir: dir.join("plugin/metadata"),
            driver: "vfio.passthroughd.io".into(),
        }
    }

    #[test]
    fn the_spec_holds_the_group_nodes_and_mounts_the_metadata_where_kubevirt_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let claim = claim(Some("nic"));
        files.write(&claim, &[vf()]).unwrap();
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(files.spec_path(&claim.uid)).unwrap()).unwrap();
        assert_eq!(spec["cdiVersion"], "0.5.0");
        assert_eq!(spec["kind"], "passthroughd.io/vfio");
        let nodes: Vec<&str> = spec["devices"][0]["containerEdits"]["deviceNodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            nodes,
            ["/dev/vfio/vfio", "/dev/vfio/12", "/dev/vfio/devices/vfio0"]
        );
        let mount = &spec["devices"][1]["containerEdits"]["mounts"][0];
        assert_eq!(
            mount["containerPath"],
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/nic/nic/vfio.passthroughd.io-metadata.json"
        );
        // The mounted file decodes the way KubeVirt decodes it.
        let host = std::fs::read(mount["hostPath"].as_str().unwrap()).unwrap();
        let metadata: serde_json::Value = serde_json::from_slice(&host).unwrap();
        assert_eq!(metadata["apiVersion"], "metadata.resource.k8s.io/v1alpha1");
        assert_eq!(metadata["kind"], "DeviceMetadata");
        assert_eq!(
            metadata["requests"][0]["devices"][0]["attributes"]["resource.kubernetes.io/pciBusID"]
                ["string"],
            "0000:01:10.0"
        );
        let ids = Files::cdi_ids(&claim.uid, &vf());
        let names: Vec<String> = spec["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| format!("passthroughd.io/vfio={}", d["name"].as_str().unwrap()))
            .collect();
        assert_eq!(ids, names, "every CDI id names a device of the spec");
        files.remove(&claim.uid).unwrap();
        assert!(!files.spec_path(&claim.uid).exists());
        assert!(!files.metadata_dir.join(&claim.uid).exists());
        files.remove(&claim.uid).unwrap();
    }

    #[test]
    fn a_claim_made_directly_is_found_under_resourceclaims_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            files(dir.path()).container_metadata_path(&claim(None), "nic"),
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/vm1-nic-x7k2p/nic/vfio.passthroughd.io-metadata.json"
        );
    }

    #[test]
    fn an_unchanged_file_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_json(&path, &vf()).unwrap();
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_json(&path, &vf()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
    }
}
