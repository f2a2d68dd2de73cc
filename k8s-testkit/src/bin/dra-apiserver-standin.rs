//! The API server stand-in as a process, for tests that run the plugin as a program (the VM
//! test): `dra-apiserver-standin --kubeconfig OUT [--port N]` writes a kubeconfig for it to
//! OUT, prints `ready <url>` on stdout, and serves until killed. Tests create nodes and claims
//! with POSTs (curl) and read the slices with GETs.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use passthroughd_dra_testkit::ApiServer;

/// A Kubernetes API server stand-in on 127.0.0.1 (nodes, resource claims, ResourceSlices).
#[derive(Debug, Parser)]
#[command(name = "dra-apiserver-standin")]
struct Args {
    /// Where to write the kubeconfig that points at the stand-in.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let server = match ApiServer::bind(args.port) {
        Ok(server) => server,
        Err(e) => {
            eprintln!(
                "dra-apiserver-standin: cannot listen on 127.0.0.1:{}: {e}",
                args.port
            );
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&args.kubeconfig, server.kubeconfig()) {
        eprintln!(
            "dra-apiserver-standin: cannot write {}: {e}",
            args.kubeconfig.display()
        );
        return ExitCode::FAILURE;
    }
    let mut stdout = std::io::stdout();
    // The test waits for this line; a failed write means nobody is waiting any more.
    if writeln!(stdout, "ready {}", server.url())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    // The server runs on its own thread; this one only keeps the process alive.
    loop {
        std::thread::park();
    }
}
