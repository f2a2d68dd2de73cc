//! kubelet's gRPC interfaces, generated at build time from proto/.

#![allow(missing_debug_implementations, clippy::all)]

/// `k8s.io.kubelet.pkg.apis.dra.v1`: the DRA plugin service.
pub mod dra_v1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
}

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1`: the same messages under the older package.
pub mod dra_v1beta1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
}

/// `pluginregistration`: how kubelet finds plugins.
pub mod registration {
    tonic::include_proto!("pluginregistration");
}

/// The encoded `FileDescriptorSet` of proto/, for the contract test.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
