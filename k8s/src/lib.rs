//! passthroughd-dra: a Kubernetes DRA node plugin over passthroughd's leases. Its layers:
//! kubelet's gRPC side (`kubelet`, `grpc`), the claim logic (`plugin`, `claims`, `cdi`), the
//! daemon (`daemon`, over D-Bus) and the API server (`cluster`, `slices`).

pub mod cdi;
pub mod claims;
pub mod cluster;
pub mod daemon;
pub mod grpc;
pub mod kubelet;
pub mod plugin;
pub mod slices;
pub mod watch;
