//! `passthroughctl --json list` round trip on the synthetic 4,096-function host, and the idle
//! resident memory of the serving process. Targets: median < 40 ms, VmRSS < 15 MiB.
//!
//! The service (the real engine over the synthetic tree) runs in a child process (this binary
//! re-executed) so its memory is measured alone; once with every read scanning (cold) and once
//! with the readers' cache on (warm), as on a live host with the uevent listener running.
//! `PT_BENCH_ONLY=warm` (or `cold`) runs one of the two, e.g. under `perf record`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/integration/common.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use passthroughd::kernel::SysfsKernel;
use passthroughd::service::{self, Backend, ServiceConfig};
use passthroughd::{Engine, EngineConfig};
use passthroughd_proto::dbus::Bus;
use passthroughd_testkit::synthetic::{self, HostShape};

const RUNS: usize = 20;
const CHILD: &str = "PASSTHROUGHD_BENCH_SERVE";

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        let mut parts = spec.splitn(3, '|');
        let (mode, address, tree) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        serve(mode == "warm", address, Path::new(tree));
        return;
    }
    let bus = common::TestBus::start();
    let tree = tempfile::tempdir().unwrap();
    synthetic::generate(tree.path(), HostShape::LARGE).unwrap();
    println!(
        "passthroughctl --json list on the synthetic host ({} functions), {RUNS} runs each; target median < 40 ms, daemon VmRSS < 15 MiB",
        HostShape::LARGE.functions
    );
    // Cold: every request scans sysfs (a daemon without the uevent listener, or the first read
    // after a change). Warm: the daemon's readers' cache, as on a live host where the uevent
    // listener is running and nothing changed since the last read.
    for mode in ["cold", "warm"]
        .into_iter()
        .filter(|m| std::env::var("PT_BENCH_ONLY").map_or(true, |o| o == *m))
    {
        measure(mode, &bus, tree.path());
    }
    let ids = passthroughd::PciIds::empty();
    let root = passthroughd::SysfsRoot::new(tree.path());
    let started = Instant::now();
    for _ in 0..5 {
        passthroughd::Inventory::scan(&root, &ids).unwrap();
    }
    println!(
        "for reference: one inventory scan {:.1} ms",
        (started.elapsed() / 5).as_secs_f64() * 1000.0
    );
}

fn measure(mode: &str, bus: &common::TestBus, tree: &Path) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, format!("{mode}|{}|{}", bus.address, tree.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
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
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = vm_rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{mode}: median {:.1} ms (min {:.1}, max {:.1}), {} KiB of JSON; daemon VmRSS {:.1} MiB after start, {:.1} MiB after the runs",
        ms(times[RUNS / 2]),
        ms(times[0]),
        ms(times[RUNS - 1]),
        bytes / 1024,
        rss_start as f64 / 1024.0,
        rss_idle as f64 / 1024.0
    );
}

/// The service as `passthroughd` runs it: the real engine, two worker threads, default limits.
fn serve(warm: bool, address: &str, tree: &Path) {
    let (manager, _) = Engine::open(EngineConfig {
        root: passthroughd::SysfsRoot::new(tree),
        state_dir: tree.join("state"),
        kernel: Arc::new(SysfsKernel),
        ids: Arc::new(passthroughd::PciIds::empty()),
        config: None,
    })
    .unwrap();
    if warm {
        manager.enable_inventory_cache();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine: Arc<dyn Backend> = Arc::new(manager);
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
