//! VFIO checks: the modules (loaded, or at least buildable as modules) and /dev/vfio/vfio.

use passthroughd_proto::host::{Check, Verdict};

use super::{ModuleState, Probe, check};

const MODULES: &[(&str, &str)] = &[
    ("vfio", "VFIO"),
    ("vfio_pci", "VFIO_PCI"),
    ("vfio_iommu_type1", "VFIO_IOMMU_TYPE1"),
];

pub fn checks(probe: &Probe, out: &mut Vec<Check>) {
    let states: Vec<(&str, &str, ModuleState)> = MODULES
        .iter()
        .map(|&(m, c)| (m, c, probe.module(m, c)))
        .collect();
    let evidence = format!(
        "{}: {}",
        probe.show(&probe.root.proc_file("modules")),
        states
            .iter()
            .map(|(m, _, s)| format!("{m} {}", s.word()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let missing: Vec<&(&str, &str, ModuleState)> =
        states.iter().filter(|(_, _, s)| !s.present()).collect();
    // Not loaded but buildable: `m` in the kernel config (or no config to tell).
    let unbuildable: Vec<&str> = missing
        .iter()
        .filter(|(_, c, _)| {
            probe
                .kconfig
                .as_ref()
                .is_some_and(|k| !matches!(k.get(c), Some("y" | "m")))
        })
        .map(|(m, _, _)| *m)
        .collect();
    out.push(if missing.is_empty() {
        check(
            "vfio.modules",
            Verdict::Pass,
            "vfio, vfio_pci and vfio_iommu_type1 available",
            evidence,
            None,
        )
    } else if !unbuildable.is_empty() {
        check(
            "vfio.modules",
            Verdict::Fail,
            format!("this kernel has no {}", unbuildable.join(", ")),
            evidence,
            Some(
                "use a kernel built with CONFIG_VFIO and CONFIG_VFIO_PCI (any distribution kernel)"
                    .to_owned(),
            ),
        )
    } else {
        let names: Vec<&str> = missing.iter().map(|(m, _, _)| *m).collect();
        check(
            "vfio.modules",
            Verdict::Warn,
            format!(
                "{} not loaded (passthroughd loads vfio-pci when it first binds a device)",
                names.join(", ")
            ),
            evidence,
            Some(
                "modprobe vfio-pci; at boot: echo vfio-pci > /etc/modules-load.d/vfio.conf"
                    .to_owned(),
            ),
        )
    });

    let dev = probe.root.dev_path("vfio/vfio");
    let dev_shown = probe.show(&dev);
    let vfio = states[0].2;
    let no_vfio_kernel = probe
        .kconfig
        .as_ref()
        .is_some_and(|k| !matches!(k.get("VFIO"), Some("y" | "m")));
    out.push(if dev.exists() {
        check(
            "vfio.dev_vfio",
            Verdict::Pass,
            format!("{dev_shown} present"),
            format!("{dev_shown} exists"),
            None,
        )
    } else if !vfio.present() && no_vfio_kernel {
        check(
            "vfio.dev_vfio",
            Verdict::NotApplicable,
            "this kernel has no VFIO (see vfio.modules)",
            format!("{dev_shown} absent"),
            None,
        )
    } else if vfio.present() {
        check(
            "vfio.dev_vfio",
            Verdict::Fail,
            format!("vfio is {} but {dev_shown} is missing", vfio.word()),
            format!("{dev_shown} absent"),
            Some(
                "udevadm trigger; a kernel without CONFIG_VFIO_CONTAINER needs iommufd instead"
                    .to_owned(),
            ),
        )
    } else {
        check(
            "vfio.dev_vfio",
            Verdict::Warn,
            format!("{dev_shown} appears when vfio is loaded"),
            format!("{dev_shown} absent; vfio not loaded"),
            Some("modprobe vfio-pci".to_owned()),
        )
    });
}
