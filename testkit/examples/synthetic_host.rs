//! Writes the synthetic 4,096-function host into an empty directory, for trying the daemon and
//! CLI on a large tree: `cargo run -p passthroughd-testkit --example synthetic_host -- DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

use passthroughd_testkit::synthetic::{self, HostShape};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: synthetic_host DIR");
        return ExitCode::from(2);
    };
    match synthetic::generate(&dir, HostShape::LARGE) {
        Ok(planned) => {
            println!("{} functions under {}", planned.len(), dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("synthetic_host: writing {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
