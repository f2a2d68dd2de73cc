//! A kubelet stand-in: it follows kubelet's sequence with a DRA plugin (find the registration
//! socket, dial it, GetInfo within 1 s, check the answer, notify; then prepare and unprepare on
//! the DRA socket GetInfo named, each within kubelet's 45 s) and checks what kubelet checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use passthroughd_dra::grpc::dra_v1::dra_plugin_client::DraPluginClient;
use passthroughd_dra::grpc::dra_v1::{
    Claim, NodePrepareResourcesRequest, NodePrepareResourcesResponse,
    NodeUnprepareResourcesRequest, NodeUnprepareResourcesResponse,
};
use passthroughd_dra::grpc::dra_v1beta1;
use passthroughd_dra::grpc::registration::registration_client::RegistrationClient;
use passthroughd_dra::grpc::registration::{InfoRequest, PluginInfo, RegistrationStatus};
use tonic::transport::{Channel, Endpoint};

/// kubelet's limit for GetInfo.
pub const GET_INFO_TIMEOUT: Duration = Duration::from_secs(1);
/// kubelet's limit for NodePrepareResources and NodeUnprepareResources.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(45);

/// Which DRA service version to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V1beta1,
}

/// A plugin kubelet accepted.
#[derive(Debug, Clone)]
pub struct Registered {
    pub info: PluginInfo,
    pub registration_socket: PathBuf,
}

/// Dials a unix socket as kubelet does (gRPC over HTTP/2, no TLS).
pub async fn dial(path: &Path) -> Result<Channel, String> {
    let path = path.to_owned();
    // The URI is required by tonic and unused: the connector below decides where to go.
    Endpoint::from_static("http://[::1]:0")
        .connect_timeout(Duration::from_secs(1))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| format!("dialing {}: {e}", path_text(&e)))
}

fn path_text(e: &tonic::transport::Error) -> String {
    std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_else(|| e.to_string())
}

/// The registration sockets in kubelet's plugin registry directory, as its watcher finds them.
pub fn registration_sockets(registry_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(registry_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        })
        .collect();
    found.sort();
    found
}

/// Registers the plugin behind `socket` the way kubelet does: GetInfo within 1 s, then the
/// checks kubelet makes (a DRA plugin, a version it speaks, an absolute endpoint that fits a
/// socket path), then NotifyRegistrationStatus with the outcome.
pub async fn register(socket: &Path) -> Result<Registered, String> {
    let mut client = RegistrationClient::new(dial(socket).await?);
    let info = tokio::time::timeout(GET_INFO_TIMEOUT, client.get_info(InfoRequest {}))
        .await
        .map_err(|_| "GetInfo took more than kubelet's 1 s".to_owned())?
        .map_err(|e| format!("GetInfo: {e}"))?
        .into_inner();
    let problem = if info.r#type != "DRAPlugin" {
        Some(format!("type {:?} is not DRAPlugin", info.r#type))
    } else if !info
        .supported_versions
        .iter()
        .any(|v| v == "v1.DRAPlugin" || v == "v1beta1.DRAPlugin")
    {
        Some(format!(
            "no supported version in {:?}",
            info.supported_versions
        ))
    } else if !info.endpoint.starts_with('/') || info.endpoint.len() >= 108 {
        Some(format!(
            "endpoint {:?} is not an absolute socket path",
            info.endpoint
        ))
    } else if info.name.is_empty() {
        Some("no driver name".to_owned())
    } else {
        None
    };
    client
        .notify_registration_status(RegistrationStatus {
            plugin_registered: problem.is_none(),
            error: problem.clone().unwrap_or_default(),
        })
        .await
        .map_err(|e| format!("NotifyRegistrationStatus: {e}"))?;
    match problem {
        Some(p) => Err(format!("registration refused: {p}")),
        None => Ok(Registered {
            info,
            registration_socket: socket.to_owned(),
        }),
    }
}

/// A claim as kubelet names it.
pub fn claim(namespace: &str, name: &str, uid: &str) -> Claim {
    Claim {
        namespace: namespace.into(),
        uid: uid.into(),
        name: name.into(),
    }
}

fn reencode<T: prost::Message + Default>(message: &impl prost::Message) -> T {
    // Same fields, same numbers: what kubelet's v1beta1 client sends.
    T::decode(message.encode_to_vec().as_slice()).unwrap_or_default()
}

/// NodePrepareResources within 45 s; kubelet fails a call whose answer misses a claim.
pub async fn prepare(
    endpoint: &Path,
    version: Version,
    claims: Vec<Claim>,
) -> Result<NodePrepareResourcesResponse, String> {
    let uids = uids(&claims);
    let channel = dial(endpoint).await?;
    let request = NodePrepareResourcesRequest { claims };
    let call = async {
        match version {
            Version::V1 => DraPluginClient::new(channel)
                .node_prepare_resources(request)
                .await
                .map(tonic::Response::into_inner),
            Version::V1beta1 => dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel)
                .node_prepare_resources(reencode::<dra_v1beta1::NodePrepareResourcesRequest>(
                    &request,
                ))
                .await
                .map(|r| reencode(&r.into_inner())),
        }
    };
    let response = within_kubelets_limit("NodePrepareResources", call).await?;
    every_claim_answered(&uids, |uid| response.claims.contains_key(uid))?;
    Ok(response)
}

/// NodeUnprepareResources within 45 s, with the same check.
pub async fn unprepare(
    endpoint: &Path,
    version: Version,
    claims: Vec<Claim>,
) -> Result<NodeUnprepareResourcesResponse, String> {
    let uids = uids(&claims);
    let channel = dial(endpoint).await?;
    let request = NodeUnprepareResourcesRequest { claims };
    let call = async {
        match version {
            Version::V1 => DraPluginClient::new(channel)
                .node_unprepare_resources(request)
                .await
                .map(tonic::Response::into_inner),
            Version::V1beta1 => dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel)
                .node_unprepare_resources(reencode::<dra_v1beta1::NodeUnprepareResourcesRequest>(
                    &request,
                ))
                .await
                .map(|r| reencode(&r.into_inner())),
        }
    };
    let response = within_kubelets_limit("NodeUnprepareResources", call).await?;
    every_claim_answered(&uids, |uid| response.claims.contains_key(uid))?;
    Ok(response)
}

fn uids(claims: &[Claim]) -> Vec<String> {
    claims.iter().map(|c| c.uid.clone()).collect()
}

async fn within_kubelets_limit<R>(
    what: &str,
    call: impl std::future::Future<Output = Result<R, tonic::Status>>,
) -> Result<R, String> {
    tokio::time::timeout(PREPARE_TIMEOUT, call)
        .await
        .map_err(|_| format!("{what} took more than kubelet's 45 s"))?
        .map_err(|e| format!("{what}: {e}"))
}

fn every_claim_answered(uids: &[String], answered: impl Fn(&str) -> bool) -> Result<(), String> {
    match uids.iter().find(|uid| !answered(uid)) {
        Some(uid) => Err(format!("the answer has no entry for claim {uid}")),
        None => Ok(()),
    }
}
