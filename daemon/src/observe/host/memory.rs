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

/// A hugetlbfs `pagesize=` value in kB: `2M`, `1024M`, `1G`, `2048K`, or bytes without a suffix
/// (how the mount option is parsed); `None` when it is not a size.
fn page_size_kb(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        _ => (text, 0),
    };
    let bytes = digits.parse::<u64>().ok()?.checked_mul(1 << shift)?;
    Some(bytes / 1024).filter(|&kb| kb > 0)
}

/// `2M`, `1G`: a page size as mount options and people write it.
fn size_name(kb: u64) -> String {
    if kb >= 1 << 20 && kb.is_multiple_of(1 << 20) {
        format!("{}G", kb >> 20)
    } else if kb >= 1 << 10 && kb.is_multiple_of(1 << 10) {
        format!("{}M", kb >> 10)
    } else {
        format!("{kb}K")
    }
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
    // A mount serves one page size: its pagesize= (the kernel always shows it, in K or M),
    // else the default size (hugetlbfs without pagesize= uses default_hugepagesz).
    let mount_sizes: Vec<(&str, Option<u64>)> = memory
        .hugetlbfs_mounts
        .iter()
        .map(|m| {
            let size = match &m.page_size {
                Some(text) => page_size_kb(text),
                None => memory.default_hugepage_kb,
            };
            (m.mount_point.as_str(), size)
        })
        .collect();
    let mounts_evidence = format!(
        "{mounts_shown}: {}; {hp_shown}: {}",
        if mount_sizes.is_empty() {
            "no hugetlbfs".to_owned()
        } else {
            mount_sizes
                .iter()
                .map(|(at, size)| {
                    format!(
                        "hugetlbfs at {at} pagesize {}",
                        size.map_or_else(|| "unknown".to_owned(), size_name)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
        if reserved.is_empty() {
            "none reserved".to_owned()
        } else {
            reserved
                .iter()
                .map(|p| format!("{} x {} reserved", p.total, size_name(p.size_kb)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    // Reserved pools no mount serves: QEMU (-mem-path) and libvirt (<hugepages><page size>)
    // reach a pool only through a mount of its page size.
    let unserved: Vec<&&HugepagePool> = reserved
        .iter()
        .filter(|p| !mount_sizes.iter().any(|(_, size)| *size == Some(p.size_kb)))
        .collect();
    let unknown_size = mount_sizes.iter().any(|(_, size)| size.is_none());
    out.push(if memory.hugetlbfs_mounts.is_empty() {
        if reserved.is_empty() {
            check(
                "memory.hugetlbfs",
                Verdict::NotApplicable,
                "hugetlbfs not mounted (no hugepages reserved either)",
                mounts_evidence,
                None,
            )
        } else {
            check(
                "memory.hugetlbfs",
                Verdict::Warn,
                "hugepages are reserved but hugetlbfs is not mounted: VMs cannot use them",
                mounts_evidence,
                Some(
                    "mount -t hugetlbfs hugetlbfs /dev/hugepages (systemd: dev-hugepages.mount)"
                        .to_owned(),
                ),
            )
        }
    } else if let Some(pool) = unserved.first() {
        let size = size_name(pool.size_kb);
        if unknown_size {
            check(
                "memory.hugetlbfs",
                Verdict::Warn,
                format!(
                    "cannot tell whether a hugetlbfs mount serves the reserved {size} hugepages: \
                     a mount's page size is unknown"
                ),
                mounts_evidence,
                Some(format!(
                    "mount one with -o pagesize={size} if none has it (see memory.hugetlbfs evidence)"
                )),
            )
        } else {
            let dir = format!("/dev/hugepages{size}");
            check(
                "memory.hugetlbfs",
                Verdict::Warn,
                format!(
                    "{size} hugepages are reserved ({}) but no hugetlbfs mount has pagesize={size}: \
                     QEMU and libvirt cannot use them",
                    pool.total
                ),
                mounts_evidence,
                Some(format!(
                    "mkdir -p {dir}; mount -t hugetlbfs -o pagesize={size} hugetlbfs {dir}; to keep \
                     it, add 'hugetlbfs {dir} hugetlbfs pagesize={size} 0 0' to /etc/fstab or write \
                     a systemd mount unit"
                )),
            )
        }
    } else {
        check(
            "memory.hugetlbfs",
            Verdict::Pass,
            format!(
                "hugetlbfs mounted at {}",
                mount_sizes
                    .iter()
                    .map(|(at, size)| match size {
                        Some(kb) => format!("{at} ({})", size_name(*kb)),
                        None => (*at).to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            mounts_evidence,
            None,
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

    #[test]
    fn page_sizes_as_the_kernel_shows_them_and_as_users_write_them() {
        assert_eq!(page_size_kb("2M"), Some(2048));
        assert_eq!(page_size_kb("1024M"), Some(1_048_576));
        assert_eq!(page_size_kb("1G"), Some(1_048_576));
        assert_eq!(page_size_kb("2048K"), Some(2048));
        assert_eq!(page_size_kb("2097152"), Some(2048));
        assert_eq!(page_size_kb("huge"), None);
        assert_eq!(page_size_kb(""), None);
        assert_eq!(size_name(1_048_576), "1G");
        assert_eq!(size_name(2048), "2M");
    }
}
