//! kubelet's side: the registration socket kubelet's plugin watcher finds, and the DRA service
//! it then calls (v1, and v1beta1 with the same messages), both gRPC over unix sockets.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::grpc::dra_v1::dra_plugin_server::{DraPlugin, DraPluginServer};
use crate::grpc::dra_v1::{
    Claim, Device, NodePrepareResourceResponse, NodePrepareResourcesRequest,
    NodePrepareResourcesResponse, NodeUnprepareResourceResponse, NodeUnprepareResourcesRequest,
    NodeUnprepareResourcesResponse,
};
use crate::grpc::dra_v1beta1;
use crate::grpc::registration::registration_server::{Registration, RegistrationServer};
use crate::grpc::registration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use crate::plugin::{ClaimRef, Plugin};

/// The DRA service versions offered to kubelet (GetInfo's `supported_versions`).
pub const SUPPORTED_VERSIONS: [&str; 2] = ["v1.DRAPlugin", "v1beta1.DRAPlugin"];
/// A unix socket path must fit `sun_path` (108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// At most this many claims in one call: kubelet sends a pod's claims, a handful.
pub const MAX_CLAIMS_PER_CALL: usize = 256;

/// Why a socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "{path}: a unix socket path must be shorter than 108 bytes (this one is {len}); choose a shorter directory"
    )]
    TooLong { path: PathBuf, len: usize },
    #[error("{0}: something that is not a socket is there; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Refuses a socket path kubelet could never dial (108 bytes or more).
pub fn check_socket_path(path: &Path) -> Result<(), SocketError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(SocketError::TooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

/// Binds a unix socket at `path`, replacing a stale socket a killed plugin left behind.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    check_socket_path(path)?;
    let io = |source| SocketError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    UnixListener::bind(path).map_err(io)
}

/// What kubelet said about the registration, last.
pub type RegistrationState = Arc<Mutex<Option<RegistrationStatus>>>;

/// Answers kubelet's plugin watcher.
#[derive(Debug)]
pub struct Registrar {
    pub driver: String,
    pub dra_socket: PathBuf,
    pub status: RegistrationState,
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: "DRAPlugin".into(),
            name: self.driver.clone(),
            endpoint: self.dra_socket.display().to_string(),
            supported_versions: SUPPORTED_VERSIONS.map(String::from).to_vec(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!("kubelet registered the plugin");
        } else {
            tracing::error!("kubelet refused the registration: {}", status.error);
        }
        if let Ok(mut last) = self.status.lock() {
            *last = Some(status);
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// The DRA service: each claim of a call gets its own answer, keyed by its UID.
#[derive(Debug, Clone)]
pub struct DraService {
    pub plugin: Arc<Plugin>,
}

fn claim_ref(claim: Claim) -> ClaimRef {
    ClaimRef {
        namespace: claim.namespace,
        uid: claim.uid,
        name: claim.name,
    }
}

fn check_size(claims: &[Claim]) -> Result<(), Status> {
    if claims.len() > MAX_CLAIMS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{} claims in one call; at most {MAX_CLAIMS_PER_CALL}",
            claims.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<NodePrepareResourcesRequest>,
    ) -> Result<Response<NodePrepareResourcesResponse>, Status> {
        let claims = request.into_inner().claims;
        check_size(&claims)?;
        let mut answer = NodePrepareResourcesResponse::default();
        for claim in claims {
            let uid = claim.uid.clone();
            let entry = match self.plugin.prepare(&claim_ref(claim)).await {
                Ok(devices) => NodePrepareResourceResponse {
                    devices: devices
                        .into_iter()
                        .map(|d| Device {
                            request_names: d.request_names,
                            pool_name: d.pool_name,
                            device_name: d.device_name,
                            cdi_device_ids: d.cdi_device_ids,
                        })
                        .collect(),
                    error: String::new(),
                },
                Err(error) => NodePrepareResourceResponse {
                    devices: Vec::new(),
                    error,
                },
            };
            answer.claims.insert(uid, entry);
        }
        Ok(Response::new(answer))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<NodeUnprepareResourcesRequest>,
    ) -> Result<Response<NodeUnprepareResourcesResponse>, Status> {
        let claims = request.into_inner().claims;
        check_size(&claims)?;
        let mut answer = NodeUnprepareResourcesResponse::default();
        for claim in claims {
            let uid = claim.uid.clone();
            let error = self
                .plugin
                .unprepare(&claim_ref(claim))
                .await
                .err()
                .unwrap_or_default();
            answer
                .claims
                .insert(uid, NodeUnprepareResourceResponse { error });
        }
        Ok(Response::new(answer))
    }
}

/// v1beta1 carries the same messages with the same field numbers: each call is re-read as v1
/// and its answer written back as v1beta1, so there is one implementation.
fn convert<From: prost::Message, To: prost::Message + Default>(
    message: &From,
) -> Result<To, Status> {
    To::decode(message.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("v1beta1 and v1 messages differ: {e}")))
}

#[tonic::async_trait]
impl dra_v1beta1::dra_plugin_server::DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<dra_v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<dra_v1beta1::NodePrepareResourcesResponse>, Status> {
        let request: NodePrepareResourcesRequest = convert(request.get_ref())?;
        let answer = DraPlugin::node_prepare_resources(self, Request::new(request)).await?;
        Ok(Response::new(convert(answer.get_ref())?))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<dra_v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<dra_v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let request: NodeUnprepareResourcesRequest = convert(request.get_ref())?;
        let answer = DraPlugin::node_unprepare_resources(self, Request::new(request)).await?;
        Ok(Response::new(convert(answer.get_ref())?))
    }
}

/// Where the two sockets go.
#[derive(Debug, Clone)]
pub struct Sockets {
    /// `<registry-dir>/<driver>-reg.sock`, watched by kubelet.
    pub registration: PathBuf,
    /// `<plugin-dir>/dra.sock`, which GetInfo names.
    pub dra: PathBuf,
}

/// Serves the DRA service, then the registration (kubelet dials the DRA socket as soon as it
/// sees the registration one), until `shutdown`; then removes both sockets so kubelet
/// deregisters the plugin.
pub async fn serve(
    plugin: Arc<Plugin>,
    sockets: Sockets,
    status: RegistrationState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SocketError> {
    let dra_listener = bind(&sockets.dra)?;
    let registration_listener = bind(&sockets.registration)?;
    let service = DraService {
        plugin: Arc::clone(&plugin),
    };
    let registrar = Registrar {
        driver: plugin.driver.clone(),
        dra_socket: sockets.dra.clone(),
        status,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let dra = tonic::transport::Server::builder()
        .add_service(DraPluginServer::new(service.clone()))
        .add_service(dra_v1beta1::dra_plugin_server::DraPluginServer::new(
            service,
        ))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(dra_listener),
            stopped(stop_rx.clone()),
        );
    let registration = tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(registrar))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(registration_listener),
            stopped(stop_rx),
        );
    let dra = tokio::spawn(dra);
    let registration = tokio::spawn(registration);
    shutdown.await;
    // The registration socket goes first: kubelet stops calling a plugin it cannot see.
    let _ = std::fs::remove_file(&sockets.registration);
    let _ = stop_tx.send(true);
    let results = (registration.await, dra.await);
    let _ = std::fs::remove_file(&sockets.dra);
    for result in [results.0, results.1] {
        if let Ok(Err(e)) = result {
            return Err(e.into());
        }
    }
    Ok(())
}
