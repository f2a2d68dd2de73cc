//! kubelet's part in the VM test: `register REGISTRY_DIR`, `prepare ENDPOINT NS NAME UID`,
//! `unprepare ENDPOINT NS NAME UID`. Prints what kubelet got as one JSON line; exits 1 when
//! kubelet would have failed the call (a per-claim error is an answer, printed, exit 0).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use passthroughd_dra_testkit::kubelet::{self, Version};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// Call the v1beta1 service instead of v1
    #[arg(long, global = true)]
    v1beta1: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Find the plugin's registration socket, GetInfo, notify
    Register { registry_dir: PathBuf },
    /// NodePrepareResources of one claim
    Prepare(ClaimArgs),
    /// NodeUnprepareResources of one claim
    Unprepare(ClaimArgs),
}

#[derive(Debug, clap::Args)]
struct ClaimArgs {
    /// The plugin's DRA socket (GetInfo's endpoint)
    endpoint: PathBuf,
    namespace: String,
    name: String,
    uid: String,
}

impl ClaimArgs {
    fn claims(&self) -> Vec<passthroughd_dra::grpc::dra_v1::Claim> {
        vec![kubelet::claim(&self.namespace, &self.name, &self.uid)]
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let version = if args.v1beta1 {
        Version::V1beta1
    } else {
        Version::V1
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dra-kubelet-standin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<Value, String> = runtime.block_on(async {
        match args.command {
            Command::Register { registry_dir } => {
                let sockets = kubelet::registration_sockets(&registry_dir);
                let [socket] = sockets.as_slice() else {
                    return Err(format!(
                        "{} registration sockets in {}",
                        sockets.len(),
                        registry_dir.display()
                    ));
                };
                let registered = kubelet::register(socket).await?;
                Ok(json!({
                    "socket": socket.display().to_string(),
                    "type": registered.info.r#type,
                    "name": registered.info.name,
                    "endpoint": registered.info.endpoint,
                    "versions": registered.info.supported_versions,
                }))
            }
            Command::Prepare(args) => {
                let answer = kubelet::prepare(&args.endpoint, version, args.claims()).await?;
                Ok(Value::Object(
                    answer
                        .claims
                        .into_iter()
                        .map(|(uid, r)| {
                            let devices: Vec<Value> = r
                                .devices
                                .into_iter()
                                .map(|d| {
                                    json!({
                                        "requestNames": d.request_names,
                                        "poolName": d.pool_name,
                                        "deviceName": d.device_name,
                                        "cdiDeviceIds": d.cdi_device_ids,
                                    })
                                })
                                .collect();
                            (uid, json!({"devices": devices, "error": r.error}))
                        })
                        .collect(),
                ))
            }
            Command::Unprepare(args) => {
                let answer = kubelet::unprepare(&args.endpoint, version, args.claims()).await?;
                Ok(Value::Object(
                    answer
                        .claims
                        .into_iter()
                        .map(|(uid, r)| (uid, json!({"error": r.error})))
                        .collect(),
                ))
            }
        }
    });
    match result {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dra-kubelet-standin: {e}");
            ExitCode::FAILURE
        }
    }
}
