//! The running kernel's build configuration: `boot/config-RELEASE` (RELEASE from
//! `proc/sys/kernel/osrelease`), else `proc/config.gz`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use flate2::read::GzDecoder;
use passthroughd_proto::host::{Check, Verdict};

use super::iommu::{Table, tables};
use super::{Probe, Vendor, check};
use crate::kernel::sysfs::SysfsRoot;

/// `CONFIG_X=value` pairs, keyed without the `CONFIG_` prefix.
#[derive(Debug, Clone, Default)]
pub struct KernelConfig {
    pub source: PathBuf,
    values: BTreeMap<String, String>,
}

impl KernelConfig {
    pub fn parse(source: PathBuf, text: &str) -> Self {
        let values = text
            .lines()
            .filter_map(|l| l.strip_prefix("CONFIG_"))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        Self { source, values }
    }

    /// Finds and reads the config of `release`; `None` when neither file is there.
    pub fn find(root: &SysfsRoot, release: Option<&str>) -> Option<Self> {
        if let Some(release) = release
            // A release is one path component; anything else is not a kernel release.
            && !release.contains('/')
            && release != ".."
        {
            let path = root.boot_dir().join(format!("config-{release}"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                return Some(Self::parse(path, &text));
            }
        }
        let path = root.proc_file("config.gz");
        let mut text = String::new();
        GzDecoder::new(File::open(&path).ok()?)
            .read_to_string(&mut text)
            .ok()?;
        Some(Self::parse(path, &text))
    }

    /// `y`, `m`, a number or string; `None` when not set.
    pub fn get(&self, symbol: &str) -> Option<&str> {
        self.values.get(symbol).map(String::as_str)
    }
}

pub fn checks(probe: &Probe, out: &mut Vec<Check>) {
    let Some(config) = &probe.kconfig else {
        let release = probe.kernel_release.as_deref().unwrap_or("RELEASE");
        out.push(check(
            "kconfig.source",
            Verdict::Warn,
            "kernel configuration not found: the kconfig checks are skipped",
            format!(
                "no {}, no {}",
                probe.show(&probe.root.boot_dir().join(format!("config-{release}"))),
                probe.show(&probe.root.proc_file("config.gz"))
            ),
            Some("install the kernel's config file in /boot, or modprobe configs".to_owned()),
        ));
        return;
    };
    let source = probe.show(&config.source);
    out.push(check(
        "kconfig.source",
        Verdict::Pass,
        format!("read {source}"),
        source.clone(),
        None,
    ));
    let tables = tables(probe);
    let intel = tables.contains(&Table::Dmar) || (tables.is_empty() && probe.vendor != Vendor::Amd);
    let amd = tables.contains(&Table::Ivrs) || (tables.is_empty() && probe.vendor != Vendor::Intel);
    let kvm_intel = probe.virt_extension() == Some("vmx")
        || (probe.virt_extension().is_none() && probe.vendor != Vendor::Amd);
    let kvm_amd = probe.virt_extension() == Some("svm")
        || (probe.virt_extension().is_none() && probe.vendor != Vendor::Intel);
    // (symbol, wanted here, verdict when missing)
    let wanted: [(&str, bool, Verdict); 10] = [
        ("KVM", true, Verdict::Fail),
        ("KVM_INTEL", kvm_intel, Verdict::Fail),
        ("KVM_AMD", kvm_amd, Verdict::Fail),
        ("VFIO", true, Verdict::Fail),
        ("VFIO_PCI", true, Verdict::Fail),
        ("INTEL_IOMMU", intel, Verdict::Fail),
        ("AMD_IOMMU", amd, Verdict::Fail),
        ("IRQ_REMAP", true, Verdict::Fail),
        ("PCI_IOV", true, Verdict::Warn),
        ("HUGETLBFS", true, Verdict::Warn),
    ];
    for (symbol, here, missing) in wanted {
        if !here {
            continue;
        }
        let id = format!("kconfig.{}", symbol.to_lowercase());
        out.push(match config.get(symbol) {
            Some(v @ ("y" | "m")) => check(
                &id,
                Verdict::Pass,
                format!("CONFIG_{symbol}={v}"),
                format!("{source}: CONFIG_{symbol}={v}"),
                None,
            ),
            other => check(
                &id,
                missing,
                format!("CONFIG_{symbol} is not set"),
                format!("{source}: CONFIG_{symbol} {}", other.unwrap_or("not set")),
                Some(format!(
                    "use a kernel built with CONFIG_{symbol}=y or m (distribution kernels have it)"
                )),
            ),
        });
    }
}
