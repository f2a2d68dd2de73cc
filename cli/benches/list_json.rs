//! `passthroughctl --json list` round trip on the synthetic 4,096-function host, and the idle
//! resident memory of the serving process. Targets: median < 40 ms, VmRSS < 15 MiB.
//!
//! The service runs in a child process (this binary re-executed) so its memory is measured
//! alone. Until the engine lands it serves through the scripted engine of the tests, whose
//! reads are the real `Inventory::scan` (what `Manager::inventory` does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use passthroughd::service::{self, Engine, ServiceConfig};
use passthroughd::synthetic::{self, HostShape};
use passthroughd_proto::dbus::Bus;

const RUNS: usize = 20;
const CHILD: &str = "PASSTHROUGHD_BENCH_SERVE";

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        let (address, tree) = spec.split_once('|').unwrap();
        serve(address, Path::new(tree));
        return;
    }
    let bus = common::TestBus::start();
    let tree = tempfile::tempdir().unwrap();
    synthetic::generate(tree.path(), HostShape::LARGE).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, format!("{}|{}", bus.address, tree.path().display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    // Wait until the name is served.
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::ctl(&bus.address, &["--json", "status"], false)
        .status
        .code()
        != Some(0)
    {
        assert!(Instant::now() < deadline, "the service did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_start = vm_rss_kib(child.id());

    let mut times = Vec::with_capacity(RUNS);
    let mut bytes = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let out = common::ctl(&bus.address, &["--json", "list"], false);
        times.push(started.elapsed());
        assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
        bytes = out.stdout.len();
    }
    times.sort();
    // Where the time goes: the scan alone, and the D-Bus call without the CLI process.
    let started = Instant::now();
    let ids = passthroughd::PciIds::empty();
    let root = passthroughd::SysfsRoot::new(tree.path());
    for _ in 0..5 {
        passthroughd::Inventory::scan(&root, &ids).unwrap();
    }
    let scan = started.elapsed() / 5;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let call = runtime.block_on(async {
        let conn = bus.bus().builder().unwrap().build().await.unwrap();
        let proxy = passthroughd_proto::dbus::ManagerProxy::new(&conn)
            .await
            .unwrap();
        let started = Instant::now();
        for _ in 0..5 {
            proxy.list_functions().await.unwrap();
        }
        started.elapsed() / 5
    });
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = vm_rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "passthroughctl --json list, {} functions, {RUNS} runs, {} KiB of JSON: median {:.1} ms (min {:.1}, max {:.1}); target < 40 ms",
        HostShape::LARGE.functions,
        bytes / 1024,
        ms(times[RUNS / 2]),
        ms(times[0]),
        ms(times[RUNS - 1]),
    );
    println!(
        "of which: inventory scan {:.1} ms, ListFunctions call (scan + wire) {:.1} ms",
        ms(scan),
        ms(call)
    );
    println!(
        "daemon VmRSS: {:.1} MiB after start, {:.1} MiB idle after the runs; target < 15 MiB",
        rss_start as f64 / 1024.0,
        rss_idle as f64 / 1024.0
    );
}

/// The service as `passthroughd` runs it: two worker threads, default limits.
fn serve(address: &str, tree: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine: Arc<dyn Engine> = common::ScriptedEngine::new(tree);
    runtime.block_on(async {
        let _conn = service::serve(
            &Bus::Address(address.to_owned()),
            engine,
            ServiceConfig::default(),
        )
        .await
        .unwrap();
        std::future::pending::<()>().await;
    });
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
