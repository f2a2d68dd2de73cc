//! Sockets, cores and threads from `sys/devices/system/cpu/cpuN/topology`, and the isolated CPUs.

use std::collections::BTreeSet;

use passthroughd_proto::host::Topology;

use super::{Probe, dir_names, read_text};

pub fn facts(probe: &Probe) -> Topology {
    let cpu_dir = probe.root.sys_path("devices/system/cpu");
    let mut packages = BTreeSet::new();
    let mut cores = BTreeSet::new();
    let mut logical = 0u32;
    for name in dir_names(&cpu_dir) {
        let Some(n) = name.strip_prefix("cpu") else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Offline CPUs have no topology directory.
        let topo = cpu_dir.join(&name).join("topology");
        let read =
            |attr: &str| read_text(&topo.join(attr)).and_then(|v| v.trim().parse::<i64>().ok());
        let Some(package) = read("physical_package_id") else {
            continue;
        };
        let die = read("die_id").unwrap_or(0);
        let core = read("core_id").unwrap_or(i64::from(logical));
        logical += 1;
        packages.insert(package);
        cores.insert((package, die, core));
    }
    if logical == 0 {
        // No sysfs topology: at least count the CPUs.
        logical = probe.cpuinfo_cpus;
        packages.insert(0);
        for i in 0..logical {
            cores.insert((0, 0, i64::from(i)));
        }
    }
    let sockets = u32::try_from(packages.len()).unwrap_or(u32::MAX).max(1);
    let core_count = u32::try_from(cores.len()).unwrap_or(u32::MAX).max(1);
    let list = |rel: &'static str| {
        read_text(&probe.root.sys_path(rel))
            .map(|v| v.trim().to_owned())
            // Kernels without nohz_full support print "(null)".
            .filter(|v| v != "(null)")
            .unwrap_or_default()
    };
    Topology {
        sockets,
        cores_per_socket: core_count / sockets,
        threads_per_core: logical.div_ceil(core_count),
        logical_cpus: logical,
        isolated_cpus: list("devices/system/cpu/isolated"),
        nohz_full_cpus: list("devices/system/cpu/nohz_full"),
    }
}
