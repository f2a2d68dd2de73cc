//! The API server: claims, the node, and the driver's ResourceSlices.
//!
//! Everything goes through kube's client, so kubeconfig handling, TLS and authentication are
//! kube's. Errors say what failed; the API server's answer (or kube's) is kept as the source.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::core::Status;
use kube::{Api, Client, Config};

/// Why talking to the API server failed. Messages are one line and do not repeat their source.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The kubeconfig file given with --kubeconfig cannot be read or used.
    #[error("cannot use kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    /// No kubeconfig was given and there is no in-cluster configuration either.
    #[error("cannot find the API server: no --kubeconfig and no in-cluster configuration")]
    Infer {
        #[source]
        source: InferConfigError,
    },
    /// The configuration is there but kube cannot build a client from it (TLS setup, mostly).
    #[error("cannot build an API client for {url}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
    /// The claim kubelet asked about is not in the API server (deleted meanwhile, or a typo).
    #[error("resource claim {namespace}/{name} does not exist")]
    ClaimNotFound { namespace: String, name: String },
    /// The node the plugin runs on is not in the API server.
    #[error("node {name} does not exist")]
    NodeNotFound { name: String },
    /// The node came back without a uid, so no owner reference can point at it.
    #[error("node {name} has no uid; cannot make it the owner of ResourceSlices")]
    NodeWithoutUid { name: String },
    /// The API server answered, and refused (403, 409, 422, ...).
    #[error("{action}: the API server answered {} {}", source.code, source.reason)]
    Refused {
        action: String,
        #[source]
        source: Box<Status>,
    },
    /// No usable answer: connection refused, timeout, an unreadable body.
    #[error("{action}: no usable answer from the API server")]
    Request {
        action: String,
        #[source]
        source: kube::Error,
    },
}

impl ClusterError {
    /// Sorts a failed request into a refusal (the API server's Status) or a failed exchange.
    pub(crate) fn request(action: impl Into<String>, error: kube::Error) -> Self {
        let action = action.into();
        match error {
            kube::Error::Api(source) => Self::Refused { action, source },
            source => Self::Request { action, source },
        }
    }

    /// The message with its causes, on one line, as logs and kubelet show it: "cannot read
    /// resource claim vms/a: no usable answer from the API server: ... connection refused".
    pub fn one_line(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            line.push_str(": ");
            line.push_str(&cause.to_string().replace('\n', " "));
            source = cause.source();
        }
        line
    }

    /// The HTTP status code of a refusal, e.g. 409 for a conflict; None for other errors.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Refused { source, .. } => Some(source.code),
            _ => None,
        }
    }
}

/// How long one request to the API server may take. kube waits forever by default; kubelet
/// gives a prepare 45 s and prepares run one at a time, so one hung request must not use that
/// up for every claim behind it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A client for the cluster in `kubeconfig`, or, without one, for the cluster kube infers
/// ($KUBECONFIG, ~/.kube/config, then the in-cluster service account).
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, ClusterError> {
    connect_within(kubeconfig, REQUEST_TIMEOUT).await
}

/// [`connect`], with every request (connecting, sending, the answer) bounded by `timeout`.
pub async fn connect_within(
    kubeconfig: Option<&Path>,
    timeout: Duration,
) -> Result<Client, ClusterError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let failed = |source| ClusterError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(failed)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(failed)?
        }
        None => Config::infer()
            .await
            .map_err(|source| ClusterError::Infer { source })?,
    };
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    // The read timeout counts from each request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    let url = config.cluster_url.to_string();
    Client::try_from(config).map_err(|source| ClusterError::Client { url, source })
}

/// The claim `namespace/name` (resource.k8s.io/v1), with its allocation in `status`.
pub async fn get_claim(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<ResourceClaim, ClusterError> {
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), namespace);
    claims.get(name).await.map_err(|error| match error {
        kube::Error::Api(status) if status.is_not_found() => ClusterError::ClaimNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        error => ClusterError::request(
            format!("cannot read resource claim {namespace}/{name}"),
            error,
        ),
    })
}

/// An owner reference to `node`, for the node's ResourceSlices: when the node object is deleted,
/// Kubernetes' garbage collector deletes its slices even if the plugin never runs again.
pub async fn node_owner(client: &Client, node: &str) -> Result<OwnerReference, ClusterError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let found = nodes.get(node).await.map_err(|error| match error {
        kube::Error::Api(status) if status.is_not_found() => ClusterError::NodeNotFound {
            name: node.to_owned(),
        },
        error => ClusterError::request(format!("cannot read node {node}"), error),
    })?;
    let uid = found
        .metadata
        .uid
        .ok_or_else(|| ClusterError::NodeWithoutUid {
            name: node.to_owned(),
        })?;
    Ok(OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Node".to_owned(),
        name: node.to_owned(),
        uid,
        controller: Some(true),
        block_owner_deletion: None,
    })
}
