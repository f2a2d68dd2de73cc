//! The plugin's only way to touch the host: passthroughd's D-Bus API. A claim is one more lease
//! owner (`k8s:CLAIM-UID`), so the daemon's guards, IOMMU group rule, plan and crash journal
//! apply to it as to any lease.

use passthroughd_proto::dbus::{Bus, ManagerProxy};
use passthroughd_proto::wire::{FunctionRow, from_dicts};
use passthroughd_proto::{LeaseInfo, LeaseOwner, OwnerKind, PciAddress};

/// Why a call to the daemon failed: its one-line message (with the error name) is kept.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot reach passthroughd on the {bus} bus: {source}")]
    Connect {
        bus: String,
        #[source]
        source: zbus::Error,
    },
    #[error("passthroughd: {0}")]
    Call(#[from] passthroughd_proto::dbus::Error),
    #[error("passthroughd answered something unreadable: {0}")]
    Wire(#[from] passthroughd_proto::wire::WireError),
}

/// A connection to the daemon.
#[derive(Debug, Clone)]
pub struct Daemon {
    proxy: ManagerProxy<'static>,
}

/// The lease owner of a claim.
pub fn owner_of(claim_uid: &str) -> LeaseOwner {
    LeaseOwner {
        kind: OwnerKind::K8s,
        name: claim_uid.to_owned(),
    }
}

impl Daemon {
    pub async fn connect(bus: &Bus) -> Result<Self, DaemonError> {
        let connect = async {
            let connection = bus.builder()?.build().await?;
            ManagerProxy::new(&connection).await
        };
        let proxy = connect.await.map_err(|source| DaemonError::Connect {
            bus: bus.to_string(),
            source,
        })?;
        Ok(Self { proxy })
    }

    pub fn proxy(&self) -> &ManagerProxy<'static> {
        &self.proxy
    }

    /// Every PCI function of the host.
    pub async fn functions(&self) -> Result<Vec<FunctionRow>, DaemonError> {
        Ok(self.proxy.list_functions().await?)
    }

    pub async fn leases(&self) -> Result<Vec<LeaseInfo>, DaemonError> {
        Ok(from_dicts("leases", self.proxy.list_leases().await?)?)
    }

    /// Takes (or takes again: that changes nothing) the claim's lease on `addresses`.
    pub async fn lease_start(
        &self,
        claim_uid: &str,
        addresses: &[PciAddress],
    ) -> Result<(), DaemonError> {
        let owner = owner_of(claim_uid).to_string();
        let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
        self.proxy.lease_start(&owner, &refs).await?;
        Ok(())
    }

    /// Ends the claim's lease; `false` when it held none.
    pub async fn lease_end(&self, claim_uid: &str) -> Result<bool, DaemonError> {
        match self.proxy.lease_end(&owner_of(claim_uid).to_string()).await {
            Ok(_) => Ok(true),
            Err(passthroughd_proto::dbus::Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
