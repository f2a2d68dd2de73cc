//! Prepare and unprepare: a claim allocated to this node becomes a lease owned by its UID
//! (through the daemon), a CDI spec and KubeVirt's metadata; unprepare undoes that from local
//! state alone. Also what the node offers, for the ResourceSlices.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::resource::v1::ResourceClaim;
use passthroughd_proto::PciAddress;

use crate::cdi::{ClaimInfo, Files, POD_CLAIM_NAME, PreparedDevice};
use crate::claims::{ClaimStore, PreparedClaim, check_claim_id, is_dns_label};
use crate::daemon::Daemon;
use crate::slices::{OfferedDevice, address_of};

/// A claim as kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    pub namespace: String,
    pub uid: String,
    pub name: String,
}

/// One prepared device, as kubelet's answer holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub request_names: Vec<String>,
    pub pool_name: String,
    pub device_name: String,
    pub cdi_device_ids: Vec<String>,
}

/// The node's side of the plugin.
pub struct Plugin {
    pub driver: String,
    /// The pool: the node's name.
    pub pool: String,
    daemon: Daemon,
    cluster: kube::Client,
    files: Files,
    store: ClaimStore,
    sysfs: PathBuf,
    /// Claims are prepared one at a time: the daemon serializes the writes anyway, and two
    /// prepares of the same claim must not race on its files.
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Woken when what the node offers may have changed.
    pub changed: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("driver", &self.driver)
            .field("pool", &self.pool)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    pub fn new(
        driver: String,
        pool: String,
        daemon: Daemon,
        cluster: kube::Client,
        files: Files,
        store: ClaimStore,
        sysfs: PathBuf,
    ) -> Self {
        Self {
            driver,
            pool,
            daemon,
            cluster,
            files,
            store,
            sysfs,
            one_at_a_time: tokio::sync::Mutex::new(()),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    /// Prepares one claim; the error is the one line kubelet shows (and retries on).
    pub async fn prepare(&self, claim: &ClaimRef) -> Result<Vec<Answer>, String> {
        check_claim_id(&claim.uid, &claim.namespace, &claim.name).map_err(|e| e.to_string())?;
        let _one = self.one_at_a_time.lock().await;
        let started = std::time::Instant::now();
        let result = self.prepare_locked(claim).await;
        let ms = started.elapsed().as_millis();
        match &result {
            Ok(devices) => tracing::info!(
                claim = %claim.uid, devices = devices.len(), ms,
                "prepared {}/{}", claim.namespace, claim.name
            ),
            Err(e) => tracing::warn!(
                claim = %claim.uid, ms,
                "prepare of {}/{} failed: {e}", claim.namespace, claim.name
            ),
        }
        result
    }

    async fn prepare_locked(&self, claim: &ClaimRef) -> Result<Vec<Answer>, String> {
        let uid = &claim.uid;
        if let Some(prepared) = self
            .store
            .get(uid)
            .map_err(|e| format!("local state: {e}"))?
        {
            // Prepared before (kubelet retries, or restarted): the same answer. Taking the lease
            // again changes nothing while it is held, and takes it back after a reboot or after
            // someone ended it by hand; the device nodes are read again, since a rebind may have
            // given them new numbers.
            let addresses: Vec<PciAddress> = prepared.devices.iter().map(|d| d.address).collect();
            self.daemon
                .lease_start(uid, &addresses)
                .await
                .map_err(|e| e.to_string())?;
            let devices = prepared
                .devices
                .iter()
                .map(|d| self.located(d.request.clone(), d.device.clone(), d.address))
                .collect::<Result<Vec<_>, _>>()?;
            self.files
                .write(&prepared.claim, &devices)
                .map_err(|e| format!("writing the CDI spec: {e}"))?;
            if devices != prepared.devices {
                tracing::info!(claim = %uid, "device nodes changed since the claim was prepared");
                self.store
                    .put(&PreparedClaim {
                        claim: prepared.claim,
                        devices: devices.clone(),
                    })
                    .map_err(|e| format!("recording the claim: {e}"))?;
            }
            return Ok(self.answers(uid, &devices));
        }
        let object = crate::cluster::get_claim(&self.cluster, &claim.namespace, &claim.name)
            .await
            .map_err(|e| e.one_line())?;
        let (info, wanted) = self.allocated_here(claim, &object)?;
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let addresses: Vec<PciAddress> = wanted.iter().map(|(_, _, a)| *a).collect();
        self.daemon
            .lease_start(uid, &addresses)
            .await
            .map_err(|e| e.to_string())?;
        // From here on a failure gives the lease back: kubelet retries the whole prepare.
        let finished = async {
            let devices = wanted
                .into_iter()
                .map(|(request, device, address)| self.located(request, device, address))
                .collect::<Result<Vec<_>, _>>()?;
            self.files
                .write(&info, &devices)
                .map_err(|e| format!("writing the CDI spec: {e}"))?;
            let prepared = PreparedClaim {
                claim: info,
                devices,
            };
            self.store
                .put(&prepared)
                .map_err(|e| format!("recording the claim: {e}"))?;
            Ok::<_, String>(prepared)
        };
        match finished.await {
            Ok(prepared) => {
                self.changed.notify_one();
                Ok(self.answers(uid, &prepared.devices))
            }
            Err(e) => {
                let _ = self.files.remove(uid);
                if let Err(end) = self.daemon.lease_end(uid).await {
                    tracing::error!(claim = %uid, "giving the lease back failed: {end}");
                }
                Err(e)
            }
        }
    }

    /// A leased device with the nodes a container needs, read from sysfs now: the lease has
    /// just bound it to vfio-pci, so its group is the one `/dev/vfio/GROUP` stands for.
    fn located(
        &self,
        request: String,
        device: String,
        address: PciAddress,
    ) -> Result<PreparedDevice, String> {
        let group = iommu_group(&self.sysfs, address)
            .ok_or_else(|| format!("{address} is in no IOMMU group"))?;
        Ok(PreparedDevice {
            request,
            pool: self.pool.clone(),
            device,
            address,
            iommu_group: group,
            iommufd_node: iommufd_node(&self.sysfs, address),
        })
    }

    /// Checks the claim kubelet named against the API server's copy and picks the allocation
    /// results that are this driver's on this node: (request, device name, address) each.
    #[allow(clippy::type_complexity)]
    fn allocated_here(
        &self,
        asked: &ClaimRef,
        claim: &ResourceClaim,
    ) -> Result<(ClaimInfo, Vec<(String, String, PciAddress)>), String> {
        let uid = claim.metadata.uid.as_deref().unwrap_or_default();
        if uid != asked.uid {
            return Err(format!(
                "claim {}/{} has UID {uid:?} in the API server, not {:?}: it was deleted and made again",
                asked.namespace, asked.name, asked.uid
            ));
        }
        let results = claim
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .ok_or_else(|| format!("claim {}/{} is not allocated", asked.namespace, asked.name))?
            .devices
            .as_ref()
            .and_then(|d| d.results.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut wanted = Vec::new();
        for result in results.iter().filter(|r| r.driver == self.driver) {
            if result.pool != self.pool {
                return Err(format!(
                    "device {} of claim {}/{} is in pool {:?}, not this node's ({:?})",
                    result.device, asked.namespace, asked.name, result.pool, self.pool
                ));
            }
            if result.admin_access == Some(true) {
                return Err(format!(
                    "device {}: admin access is not offered (a passed-through device has one user)",
                    result.device
                ));
            }
            let address = address_of(&result.device).ok_or_else(|| {
                format!("{:?} is not a device this driver published", result.device)
            })?;
            // A subrequest ("nic/intel") belongs to its request, the name pods refer to. It
            // becomes a directory of KubeVirt's metadata path, so only a DNS label passes.
            let request = result
                .request
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            if !is_dns_label(&request) {
                return Err(format!(
                    "claim {}/{} names request {:?}, which is not a DNS label",
                    asked.namespace, asked.name, result.request
                ));
            }
            wanted.push((request, result.device.clone(), address));
        }
        let info = ClaimInfo {
            namespace: asked.namespace.clone(),
            name: asked.name.clone(),
            uid: asked.uid.clone(),
            pod_claim_name: claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(POD_CLAIM_NAME))
                .filter(|n| check_claim_id("u", "ns", n).is_ok())
                .cloned(),
        };
        Ok((info, wanted))
    }

    fn answers(&self, uid: &str, devices: &[PreparedDevice]) -> Vec<Answer> {
        devices
            .iter()
            .map(|d| Answer {
                request_names: vec![d.request.clone()],
                pool_name: d.pool.clone(),
                device_name: d.device.clone(),
                cdi_device_ids: Files::cdi_ids(uid, d),
            })
            .collect()
    }

    /// Unprepares one claim from local state: ends its lease (an unknown claim is success),
    /// then removes its files. A lease the daemon cannot end yet (a process still holds the
    /// device) is an error, and everything stays for kubelet's retry.
    pub async fn unprepare(&self, claim: &ClaimRef) -> Result<(), String> {
        check_claim_id(&claim.uid, &claim.namespace, &claim.name).map_err(|e| e.to_string())?;
        let _one = self.one_at_a_time.lock().await;
        // The lease is ended even without a record: a prepare killed between taking the lease
        // and recording the claim leaves exactly that.
        let ended = self
            .daemon
            .lease_end(&claim.uid)
            .await
            .map_err(|e| e.to_string())?;
        self.files
            .remove(&claim.uid)
            .map_err(|e| format!("removing the CDI spec: {e}"))?;
        self.store
            .remove(&claim.uid)
            .map_err(|e| format!("removing the claim record: {e}"))?;
        if ended {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// What the node offers: every function that could be passed through (an endpoint in an
    /// IOMMU group; an SR-IOV PF only while it has no VFs, which are offered instead), and
    /// whether it is free (no lease, no process holds it).
    pub async fn offered(&self) -> Result<Vec<OfferedDevice>, String> {
        let rows = self.daemon.functions().await.map_err(|e| e.to_string())?;
        let leased: HashSet<String> = self
            .daemon
            .leases()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .flat_map(|l| l.functions)
            .collect();
        Ok(rows
            .into_iter()
            .filter(|row| row.class >> 16 != 0x06 && row.sriov_num_vfs == 0)
            .filter_map(|row| {
                let address: PciAddress = row.address.parse().ok()?;
                let iommu_group = u32::try_from(row.iommu_group).ok()?;
                Some(OfferedDevice {
                    address,
                    vendor_id: row.vendor_id,
                    device_id: row.device_id,
                    iommu_group,
                    numa_node: u32::try_from(row.numa_node).ok(),
                    pcie_root: pcie_root(&self.sysfs, address),
                    pf: row.vf_pf.parse().ok(),
                    free: !leased.contains(&row.address) && row.in_use_by.is_empty(),
                })
            })
            .collect())
    }

    /// The claims this plugin has prepared.
    pub fn prepared(&self) -> Vec<PreparedClaim> {
        self.store.all()
    }
}

/// The IOMMU group of a function, from its `iommu_group` link.
fn iommu_group(sysfs: &Path, address: PciAddress) -> Option<u32> {
    let link = sysfs
        .join("bus/pci/devices")
        .join(address.to_string())
        .join("iommu_group");
    std::fs::read_link(link)
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

/// The iommufd device node of a function bound to vfio-pci (`/dev/vfio/devices/vfioN`), when
/// the kernel has one (`vfio-dev/vfioN` in sysfs).
fn iommufd_node(sysfs: &Path, address: PciAddress) -> Option<String> {
    let dir = sysfs
        .join("bus/pci/devices")
        .join(address.to_string())
        .join("vfio-dev");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("vfio") && name[4..].bytes().all(|b| b.is_ascii_digit()))
        .map(|name| format!("/dev/vfio/devices/{name}"))
}

/// The PCIe root a function hangs under, as Kubernetes names it: the `pciDDDD:BB` directory
/// its sysfs path starts from.
fn pcie_root(sysfs: &Path, address: PciAddress) -> Option<String> {
    let link = std::fs::read_link(sysfs.join("bus/pci/devices").join(address.to_string())).ok()?;
    link.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .find(|c| c.starts_with("pci") && c.len() > 3 && c.contains(':'))
}
