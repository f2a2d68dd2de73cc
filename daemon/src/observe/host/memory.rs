//! Memory: hugepage pools (system-wide and per NUMA node), hugetlbfs mounts, KSM, NUMA nodes.

use std::path::Path;

use passthroughd_proto::host::{
    Check, HugepagePool, HugetlbfsMount, Ksm, MemoryFacts, NumaNode, Verdict,
};

use super::{Probe, check, dir_names, read_text};

/// Pools under a `hugepages` directory: `hugepages-2048kB/{nr,free}_hugepages`.
fn pools(dir: &Path) -> Vec<HugepagePool> {
    let mut pools: Vec<HugepagePool> = dir_names(dir)
        .iter()
        .filter_map(|name| {
            let size_kb = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let num = |attr: &str| {
                read_text(&dir.join(name).join(attr)).and_then(|v| v.trim().parse().ok())
            };
            Some(HugepagePool {
                size_kb,
                total: num("nr_hugepages").unwrap_or(0),
                free: num("free_hugepages").unwrap_or(0),
            })
        })
        .collect();
    pools.sort_by_key(|p| p.size_kb);
    pools
}

/// `Key: value kB` of a meminfo file (the per-node one has a `Node N ` prefix).
fn meminfo_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        let k = k.trim();
        let k = k.rsplit(' ').next().unwrap_or(k);
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

pub fn numa_nodes(probe: &Probe) -> Vec<NumaNode> {
    let dir = probe.root.sys_path("devices/system/node");
    let mut nodes: Vec<NumaNode> = dir_names(&dir)
        .iter()
        .filter_map(|name| {
            let id: u32 = name.strip_prefix("node")?.parse().ok()?;
            let node = dir.join(name);
            let meminfo = read_text(&node.join("meminfo")).unwrap_or_default();
            Some(NumaNode {
                id,
                cpus: read_text(&node.join("cpulist"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default(),
                memory_total_kb: meminfo_kb(&meminfo, "MemTotal"),
                memory_free_kb: meminfo_kb(&meminfo, "MemFree"),
                distances: read_text(&node.join("distance"))
                    .map(|d| {
                        d.split_whitespace()
                            .filter_map(|n| n.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default(),
                hugepages: pools(&node.join("hugepages")),
            })
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

pub fn facts(probe: &Probe) -> MemoryFacts {
    let meminfo = read_text(&probe.root.proc_file("meminfo")).unwrap_or_default();
    let mounts = read_text(&probe.root.proc_file("mounts")).unwrap_or_default();
    let hugetlbfs_mounts = mounts
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (_, mount_point, fstype, options) =
                (words.next()?, words.next()?, words.next()?, words.next()?);
            (fstype == "hugetlbfs").then(|| HugetlbfsMount {
                mount_point: mount_point.to_owned(),
                page_size: options
                    .split(',')
                    .find_map(|o| o.strip_prefix("pagesize="))
                    .map(str::to_owned),
            })
        })
        .collect();
    let ksm = |attr: &str| {
        read_text(&probe.root.sys_path("kernel/mm/ksm").join(attr))
            .and_then(|v| v.trim().parse().ok())
    };
    MemoryFacts {
        total_kb: meminfo_kb(&meminfo, "MemTotal"),
        default_hugepage_kb: meminfo_kb(&meminfo, "Hugepagesize"),
        hugepages: pools(&probe.root.sys_path("kernel/mm/hugepages")),
        hugetlbfs_mounts,
        ksm: Ksm {
            run: ksm("run").and_then(|r: u64| u32::try_from(r).ok()),
            pages_sharing: ksm("pages_sharing"),
        },
    }
}

pub fn checks(probe: &Probe, memory: &MemoryFacts, out: &mut Vec<Check>) {
    let hp_shown = probe.show(&probe.root.sys_path("kernel/mm/hugepages"));
    let reserved: Vec<&HugepagePool> = memory.hugepages.iter().filter(|p| p.total > 0).collect();
    let describe = |p: &HugepagePool| format!("{} x {} kB ({} free)", p.total, p.size_kb, p.free);
    out.push(if memory.hugepages.is_empty() {
        check(
            "memory.hugepages",
            Verdict::NotApplicable,
            "no hugepage support",
            format!("{hp_shown} absent"),
            None,
        )
    } else if reserved.is_empty() {
        check(
            "memory.hugepages",
            Verdict::Pass,
            "no hugepages reserved (optional: VM memory backed by hugepages pins faster and \
             uses fewer IOMMU page-table entries)",
            format!(
                "{hp_shown}: sizes {} kB, nr_hugepages 0",
                memory
                    .hugepages
                    .iter()
                    .map(|p| p.size_kb.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None,
        )
    } else {
        check(
            "memory.hugepages",
            Verdict::Pass,
            format!(
                "reserved: {}",
                reserved
                    .iter()
                    .map(|p| describe(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("{hp_shown}/hugepages-*/nr_hugepages, free_hugepages"),
            None,
        )
    });

    let mounts_shown = probe.show(&probe.root.proc_file("mounts"));
    out.push(if !memory.hugetlbfs_mounts.is_empty() {
        check(
            "memory.hugetlbfs",
            Verdict::Pass,
            format!(
                "hugetlbfs mounted at {}",
                memory
                    .hugetlbfs_mounts
                    .iter()
                    .map(|m| m.mount_point.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("{mounts_shown}: hugetlbfs"),
            None,
        )
    } else if reserved.is_empty() {
        check(
            "memory.hugetlbfs",
            Verdict::NotApplicable,
            "hugetlbfs not mounted (no hugepages reserved either)",
            format!("{mounts_shown}: no hugetlbfs"),
            None,
        )
    } else {
        check(
            "memory.hugetlbfs",
            Verdict::Warn,
            "hugepages are reserved but hugetlbfs is not mounted: VMs cannot use them",
            format!("{mounts_shown}: no hugetlbfs"),
            Some(
                "mount -t hugetlbfs hugetlbfs /dev/hugepages (systemd: dev-hugepages.mount)"
                    .to_owned(),
            ),
        )
    });

    let ksm_shown = probe.show(&probe.root.sys_path("kernel/mm/ksm/run"));
    out.push(match memory.ksm.run {
        None => check(
            "memory.ksm",
            Verdict::NotApplicable,
            "KSM not built into this kernel",
            format!("{ksm_shown} absent"),
            None,
        ),
        Some(0) => check(
            "memory.ksm",
            Verdict::Pass,
            "KSM stopped",
            format!("{ksm_shown}: 0"),
            None,
        ),
        Some(run) => check(
            "memory.ksm",
            Verdict::Pass,
            format!(
                "KSM {} ({} pages sharing); memory of VMs with VFIO devices is pinned and never merged",
                if run == 1 { "running" } else { "unmerging" },
                memory.ksm.pages_sharing.unwrap_or(0)
            ),
            format!("{ksm_shown}: {run}"),
            None,
        ),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_with_and_without_the_node_prefix() {
        assert_eq!(
            meminfo_kb(
                "MemTotal:  990508 kB\nHugepagesize: 2048 kB\n",
                "Hugepagesize"
            ),
            Some(2048)
        );
        assert_eq!(
            meminfo_kb(
                "Node 1 MemTotal:  4096 kB\nNode 1 MemFree: 1 kB\n",
                "MemFree"
            ),
            Some(1)
        );
        assert_eq!(meminfo_kb("", "MemTotal"), None);
    }
}
