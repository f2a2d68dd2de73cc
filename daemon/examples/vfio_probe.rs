//! Opens one PCI function through VFIO the way a VMM would and prints what the kernel says, as
//! JSON; with `--reset`, resets it through VFIO instead. The real-kernel check of
//! `kernel::vfio::SystemVfio` (tests/vm/scenarios/vfio-probe.sh runs it in the VM test bed).
//!
//! ```text
//! vfio_probe [--repeat N] ADDR            prints the DeviceInfo as JSON on stdout
//! vfio_probe [--repeat N] --reset ADDR    prints "reset ADDR" on success
//! ```
//! `--repeat N` runs it N times in this process (every result must be the same) and prints
//! `open fds: before B, after A` on stderr: a group left open would make the next run Busy.
//! On failure: `error: MESSAGE: SOURCE...` and `variant: DEBUG` on stderr, exit 1.

use std::process::ExitCode;

use passthroughd::SysfsRoot;
use passthroughd::kernel::sysfs::read_link_name;
use passthroughd::kernel::vfio::{SystemVfio, Vfio};
use passthroughd_proto::PciAddress;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut reset, mut repeat, mut addr) = (false, 1u32, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reset" => reset = true,
            "--repeat" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => repeat = n,
                _ => addr = None,
            },
            _ if addr.is_none() => addr = Some(arg),
            _ => addr = None,
        }
    }
    let Some(addr) = addr else {
        eprintln!("usage: vfio_probe [--repeat N] [--reset] ADDR");
        return ExitCode::from(2);
    };
    let address: PciAddress = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let root = SysfsRoot::default();
    let group = match read_link_name(&root.pci_device_attr(address, "iommu_group")) {
        Ok(Some(name)) => match name.parse::<u32>() {
            Ok(g) => g,
            Err(_) => {
                eprintln!("error: {address}: iommu_group link names {name:?}, not a number");
                return ExitCode::from(1);
            }
        },
        Ok(None) => {
            eprintln!("error: {address} has no IOMMU group (no such device, or the IOMMU is off)");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    let vfio = SystemVfio::new(root);
    let run = || {
        if reset {
            vfio.reset(group, address)
                .map(|()| format!("reset {address}"))
        } else {
            vfio.probe(group, address)
                .map(|info| serde_json::to_string_pretty(&info).unwrap_or_else(|e| e.to_string()))
        }
    };
    let before = open_fds();
    let result = run();
    for _ in 1..repeat {
        let again = run();
        let same = match (&result, &again) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => format!("{a:?}") == format!("{b:?}"),
            _ => false,
        };
        if !same {
            eprintln!("error: a repeated run differs: first {result:?}, then {again:?}");
            return ExitCode::from(1);
        }
    }
    if repeat > 1 {
        eprintln!("open fds: before {before}, after {}", open_fds());
    }
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            eprintln!("variant: {e:?}");
            ExitCode::from(1)
        }
    }
}

/// How many fds this process has open (`/proc/self/fd`, less the one reading it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

/// The message and every source after it, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
