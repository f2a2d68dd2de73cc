//! Full inventory scan of a synthetic 4,096-function host (512 VFs, 300 IOMMU groups).
//!
//! Prints the median and spread of `Inventory::scan`; in the same run, the floor of any scan on
//! this machine (one file per function, `uevent` only, on the same threads) and the same tree
//! listed by `lspci -nnk` (what users run today) when pciutils is installed. Run with
//! `cargo bench -p passthroughd --bench inventory`. With `PT_BENCH_SCAN_ONLY=1` it scans 300 more
//! times instead of running lspci: a load for `perf record` of the scan alone.

use std::io::Read;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use passthroughd::observe::inventory::list_functions;
use passthroughd::{Inventory, PciIds, SysfsRoot};
use passthroughd_testkit::synthetic::{self, HostShape};

const RUNS: usize = 31;

fn main() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let started = Instant::now();
    synthetic::generate(dir.path(), HostShape::LARGE).expect("generating the synthetic host");
    println!(
        "synthetic host: {} functions, {} VFs, {} groups (generated in {:.0?})",
        HostShape::LARGE.functions,
        HostShape::LARGE.vfs,
        HostShape::LARGE.groups,
        started.elapsed()
    );
    let root = SysfsRoot::new(dir.path());

    let started = Instant::now();
    let ids = PciIds::load_system();
    println!(
        "pci.ids load (once per daemon start): {:.1?}",
        started.elapsed()
    );

    let scan = measure(|| {
        let inventory = Inventory::scan(&root, &ids).expect("scan");
        assert_eq!(inventory.functions.len(), 4096);
        assert_eq!(inventory.groups.len(), 300);
    });
    report("passthroughd inventory scan", &scan);
    let floor = measure(|| read_one_file_each(&root));
    report("floor: one file (uevent) per function", &floor);
    println!(
        "scan / floor: {:.1}x (the scan reads 3 files a function, 4 for SR-IOV PFs)",
        median(&scan).as_secs_f64() / median(&floor).as_secs_f64()
    );
    if std::env::var_os("PT_BENCH_SCAN_ONLY").is_some() {
        for _ in 0..300 {
            Inventory::scan(&root, &ids).expect("scan");
        }
        return;
    }

    // lspci appends "/devices" to sysfs.path.
    let sys = dir.path().join("sys/bus/pci");
    let lspci = |args: &[&str]| {
        Command::new("lspci")
            .args(["-A", "linux-sysfs", "-O"])
            .arg(format!("sysfs.path={}", sys.display()))
            .args(args)
            .output()
    };
    match lspci(&["-nnk"]) {
        Ok(out) if out.status.success() && out.stdout.split(|&b| b == b'\n').count() > 4096 => {
            let lspci_times = measure(|| {
                let out = lspci(&["-nnk"]).expect("lspci");
                assert!(out.status.success());
            });
            report("lspci -nnk (same tree)", &lspci_times);
            println!(
                "ratio lspci / passthroughd: {:.1}x",
                median(&lspci_times).as_secs_f64() / median(&scan).as_secs_f64()
            );
        }
        Ok(out) => println!(
            "lspci could not read the synthetic tree ({}); no comparison",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => println!("lspci not available ({e}); no comparison"),
    }
    println!("target: median under 20 ms on a 2-core machine");
}

/// The least any scan must do: list the functions and read one file of each, spread over the
/// cores as the scan spreads its reads.
fn read_one_file_each(root: &SysfsRoot) {
    let addresses = list_functions(root).expect("listing the functions");
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let devices = root.pci_devices_dir();
    let read = |part: &[_]| {
        // open, one read, close: what the scan does per attribute, nothing more.
        let mut buf = [0u8; 512];
        for address in part {
            let path = devices.join(format!("{address}/uevent"));
            let n = std::fs::File::open(&path)
                .and_then(|mut f| f.read(&mut buf))
                .expect("reading uevent");
            assert!(n > 0, "{} is empty", path.display());
        }
    };
    thread::scope(|scope| {
        for part in addresses.chunks(addresses.len().div_ceil(workers)) {
            scope.spawn(move || read(part));
        }
    });
}

fn measure(mut f: impl FnMut()) -> Vec<Duration> {
    f(); // warm the page and dentry caches
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

fn report(what: &str, sorted: &[Duration]) {
    println!(
        "{what}: median {:.2?}  min {:.2?}  p90 {:.2?}  ({} runs)",
        median(sorted),
        sorted[0],
        sorted[sorted.len() * 9 / 10],
        sorted.len()
    );
}
