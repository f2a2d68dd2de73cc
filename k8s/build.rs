//! Compiles kubelet's gRPC interfaces (proto/) with protox, in Rust: no `protoc` is needed to
//! build. The descriptor set is kept too, for the contract test that pins every method path and
//! field number.
//!
//! kubelet publishes the DRA service twice, as `dra/v1` and `dra/v1beta1`, with the same
//! messages and field numbers: v1beta1 is made here from dra_v1.proto by its package line, so
//! the two cannot drift apart.

use std::path::PathBuf;

const V1: &str = "package k8s.io.kubelet.pkg.apis.dra.v1;";
const V1BETA1: &str = "package k8s.io.kubelet.pkg.apis.dra.v1beta1;";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let v1 = std::fs::read_to_string("proto/dra_v1.proto")?;
    if !v1.contains(V1) {
        return Err(format!("proto/dra_v1.proto has no line {V1:?}").into());
    }
    let generated = out.join("proto");
    std::fs::create_dir_all(&generated)?;
    std::fs::write(generated.join("dra_v1beta1.proto"), v1.replace(V1, V1BETA1))?;
    let descriptors = protox::compile(
        [
            "dra_v1.proto",
            "dra_v1beta1.proto",
            "pluginregistration.proto",
        ],
        [PathBuf::from("proto"), generated],
    )?;
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
