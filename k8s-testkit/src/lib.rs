//! Test support for passthroughd-dra (never shipped): an API server stand-in that kube's real
//! client talks to through a kubeconfig, strict about what the plugin writes, and a kubelet
//! stand-in that drives the plugin's gRPC services as kubelet does.

pub mod apiserver;
pub mod kubelet;
mod validation;

pub use apiserver::ApiServer;
