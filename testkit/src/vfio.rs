//! A scripted [`Vfio`]: each (group, device) answers what its script says, and every call is
//! recorded, so engine, service and CLI tests can run `verify` and reset paths without a kernel.
//!
//! A device nobody scripted answers as the kernel would: [`VfioError::NoGroup`] when its group
//! has no scripted device at all (no node under /dev/vfio), else [`VfioError::NoDevice`].

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use passthroughd::kernel::vfio::{
    DeviceFlags, DeviceInfo, IommuBackend, IrqInfo, RegionInfo, Vfio, VfioError, irq_flags,
    irq_name, region_flags, region_name,
};
use passthroughd_proto::PciAddress;

/// What one (group, device) answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// Opens: probe returns this info; reset succeeds when `info.flags.reset`, else
    /// [`VfioError::ResetUnsupported`].
    Ready(DeviceInfo),
    /// The kernel refuses the group: no interrupt remapping (EPERM at `VFIO_SET_IOMMU`).
    InterruptRemapping,
    /// Another process has the group open (EBUSY opening `/dev/vfio/N`).
    BusyGroup,
    /// Another process has the device open (EBUSY from `VFIO_GROUP_GET_DEVICE_FD`).
    BusyDevice,
    /// A member of the group is on a host driver.
    NotViable,
    /// `/dev/vfio/vfio` is missing.
    Unsupported,
    /// A step failed with an errno the seam gives no meaning to.
    Io { what: &'static str, errno: i32 },
}

/// One call made to the fake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Probe { group: u32, device: PciAddress },
    Reset { group: u32, device: PciAddress },
}

#[derive(Debug, Default)]
pub struct FakeVfio {
    scripts: Mutex<HashMap<(u32, PciAddress), Script>>,
    calls: Mutex<Vec<Call>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeVfio {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scripts `device` of `group` (replacing an earlier script).
    pub fn with(self, group: u32, device: PciAddress, script: Script) -> Self {
        self.set(group, device, script);
        self
    }

    /// Scripts `device` of `group` after construction (a device that becomes busy mid-test).
    pub fn set(&self, group: u32, device: PciAddress, script: Script) {
        lock(&self.scripts).insert((group, device), script);
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// How many resets reached `device` (successful or not).
    pub fn resets(&self, device: PciAddress) -> usize {
        lock(&self.calls)
            .iter()
            .filter(|c| matches!(c, Call::Reset { device: d, .. } if *d == device))
            .count()
    }

    fn answer(&self, group: u32, device: PciAddress) -> Result<DeviceInfo, VfioError> {
        let scripts = lock(&self.scripts);
        let os = io::Error::from_raw_os_error;
        let Some(script) = scripts.get(&(group, device)) else {
            return Err(if scripts.keys().any(|(g, _)| *g == group) {
                VfioError::NoDevice {
                    group,
                    device,
                    source: os(nix::libc::ENODEV),
                }
            } else {
                VfioError::NoGroup {
                    group,
                    source: os(nix::libc::ENOENT),
                }
            });
        };
        Err(match script {
            Script::Ready(info) => return Ok(info.clone()),
            Script::InterruptRemapping => VfioError::InterruptRemapping {
                group,
                source: os(nix::libc::EPERM),
            },
            Script::BusyGroup => VfioError::Busy {
                group,
                device: None,
                source: os(nix::libc::EBUSY),
            },
            Script::BusyDevice => VfioError::Busy {
                group,
                device: Some(device),
                source: os(nix::libc::EBUSY),
            },
            Script::NotViable => VfioError::NotViable { group },
            Script::Unsupported => VfioError::Unsupported {
                source: os(nix::libc::ENOENT),
            },
            Script::Io { what, errno } => VfioError::Io {
                what,
                source: os(*errno),
            },
        })
    }
}

impl Vfio for FakeVfio {
    fn probe(&self, group: u32, device: PciAddress) -> Result<DeviceInfo, VfioError> {
        lock(&self.calls).push(Call::Probe { group, device });
        self.answer(group, device)
    }

    fn reset(&self, group: u32, device: PciAddress) -> Result<(), VfioError> {
        lock(&self.calls).push(Call::Reset { group, device });
        let info = self.answer(group, device)?;
        if info.flags.reset {
            Ok(())
        } else {
            Err(VfioError::ResetUnsupported { device })
        }
    }
}

fn region(index: u32, size: u64, flags: u32) -> RegionInfo {
    RegionInfo {
        index,
        name: region_name(true, index),
        size,
        flags: region_flags(flags),
    }
}

fn irq(index: u32, count: u32, flags: u32) -> IrqInfo {
    IrqInfo {
        index,
        name: irq_name(true, index),
        count,
        flags: irq_flags(flags),
    }
}

/// What the kernel (6.12) reported for an igb VF (82576, QEMU's igb) on vfio-pci in the VM test
/// bed (tests/vm/scenarios/vfio-probe.sh): BAR0 and BAR3 of 16 KiB (mmap-able), 4 KiB of config
/// space, MSI-X with 3 vectors and no INTx or MSI, reset supported, type1v2.
pub fn igb_vf() -> DeviceInfo {
    const RW: u32 = 0b011;
    const RWM: u32 = 0b111;
    let regions = vec![
        region(0, 16384, RWM),
        region(1, 0, 0),
        region(2, 0, 0),
        region(3, 16384, RWM),
        region(4, 0, 0),
        region(5, 0, 0),
        region(6, 0, 0),
        region(7, 4096, RW),
    ];
    DeviceInfo {
        flags: DeviceFlags {
            pci: true,
            reset: true,
        },
        regions,
        irqs: vec![
            irq(0, 0, 0b0111),
            irq(1, 0, 0b1001),
            // Not noresize: 6.12 adds MSI-X vectors while enabled (dynamic MSI-X).
            irq(2, 3, 0b0001),
            irq(3, 1, 0b1001),
            irq(4, 1, 0b1001),
        ],
        iommu_backend: IommuBackend::Type1v2,
    }
}

/// [`igb_vf`] on a device the kernel found no reset method for.
pub fn without_reset(mut info: DeviceInfo) -> DeviceInfo {
    info.flags.reset = false;
    info
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn answers_per_group_and_device_and_records_calls() {
        let (vf0, vf1, e1000) = (addr("01:10.0"), addr("01:10.2"), addr("04:01.0"));
        let fake = FakeVfio::new()
            .with(18, vf0, Script::Ready(igb_vf()))
            .with(19, vf1, Script::Ready(without_reset(igb_vf())))
            .with(17, e1000, Script::NotViable);
        assert_eq!(fake.probe(18, vf0).unwrap(), igb_vf());
        assert!(fake.reset(18, vf0).is_ok());
        assert!(matches!(
            fake.reset(19, vf1),
            Err(VfioError::ResetUnsupported { device }) if device == vf1
        ));
        assert!(matches!(
            fake.probe(17, e1000),
            Err(VfioError::NotViable { group: 17 })
        ));
        // Unscripted: a known group without that device, and an unknown group.
        assert!(matches!(
            fake.probe(17, vf0),
            Err(VfioError::NoDevice { group: 17, .. })
        ));
        assert!(matches!(
            fake.probe(40, vf0),
            Err(VfioError::NoGroup { group: 40, .. })
        ));
        assert_eq!(fake.resets(vf0), 1);
        assert_eq!(fake.resets(vf1), 1);
        assert_eq!(fake.calls().len(), 6);
        assert_eq!(
            fake.calls()[0],
            Call::Probe {
                group: 18,
                device: vf0
            }
        );
    }

    #[test]
    fn scripted_failures_are_the_seams_errors() {
        let vf0 = addr("01:10.0");
        let fake = FakeVfio::new().with(18, vf0, Script::InterruptRemapping);
        let err = fake.probe(18, vf0).unwrap_err();
        assert!(matches!(
            err,
            VfioError::InterruptRemapping { group: 18, .. }
        ));
        assert!(err.to_string().contains("allow_unsafe_interrupts=1"));
        fake.set(18, vf0, Script::BusyGroup);
        assert!(matches!(
            fake.reset(18, vf0),
            Err(VfioError::Busy { device: None, .. })
        ));
        fake.set(18, vf0, Script::BusyDevice);
        assert!(matches!(
            fake.probe(18, vf0),
            Err(VfioError::Busy { device: Some(d), .. }) if d == vf0
        ));
        fake.set(
            18,
            vf0,
            Script::Io {
                what: "VFIO_DEVICE_GET_INFO",
                errno: nix::libc::EIO,
            },
        );
        let err = fake.probe(18, vf0).unwrap_err();
        assert_eq!(err.to_string(), "VFIO_DEVICE_GET_INFO failed");
    }

    #[test]
    fn the_igb_vf_sample_is_what_the_kernel_said() {
        // daemon/examples/vfio_probe.rs on an igb VF in the VM test bed (kernel 6.12).
        let kernel = r#"{"flags":{"pci":true,"reset":true},"regions":[
            {"index":0,"name":"BAR0","size":16384,"flags":{"read":true,"write":true,"mmap":true}},
            {"index":1,"name":"BAR1","size":0,"flags":{"read":false,"write":false,"mmap":false}},
            {"index":2,"name":"BAR2","size":0,"flags":{"read":false,"write":false,"mmap":false}},
            {"index":3,"name":"BAR3","size":16384,"flags":{"read":true,"write":true,"mmap":true}},
            {"index":4,"name":"BAR4","size":0,"flags":{"read":false,"write":false,"mmap":false}},
            {"index":5,"name":"BAR5","size":0,"flags":{"read":false,"write":false,"mmap":false}},
            {"index":6,"name":"ROM","size":0,"flags":{"read":false,"write":false,"mmap":false}},
            {"index":7,"name":"CONFIG","size":4096,"flags":{"read":true,"write":true,"mmap":false}}
        ],"irqs":[
            {"index":0,"name":"INTx","count":0,"flags":{"eventfd":true,"maskable":true,"automasked":true,"noresize":false}},
            {"index":1,"name":"MSI","count":0,"flags":{"eventfd":true,"maskable":false,"automasked":false,"noresize":true}},
            {"index":2,"name":"MSI-X","count":3,"flags":{"eventfd":true,"maskable":false,"automasked":false,"noresize":false}},
            {"index":3,"name":"ERR","count":1,"flags":{"eventfd":true,"maskable":false,"automasked":false,"noresize":true}},
            {"index":4,"name":"REQ","count":1,"flags":{"eventfd":true,"maskable":false,"automasked":false,"noresize":true}}
        ],"iommu_backend":"type1v2"}"#;
        assert_eq!(
            serde_json::from_str::<DeviceInfo>(kernel).unwrap(),
            igb_vf()
        );
    }

    #[test]
    fn the_igb_vf_sample_is_named_as_the_kernel_names_it() {
        let info = igb_vf();
        let bars: Vec<(&str, u64)> = info
            .regions
            .iter()
            .filter(|r| r.size > 0)
            .map(|r| (r.name.as_str(), r.size))
            .collect();
        assert_eq!(bars, [("BAR0", 16384), ("BAR3", 16384), ("CONFIG", 4096)]);
        let msix = info.irqs.iter().find(|i| i.name == "MSI-X").unwrap();
        assert_eq!(msix.count, 3);
    }
}
