//! Ready-to-paste VMM arguments for a function (`show ADDR --qemu|--libvirt|--cloud-hypervisor`):
//! the function and, when its IOMMU group has other endpoints, those too (a VM gets the whole
//! group or none of it).

use std::fmt::Write;

use passthroughd_proto::{PciAddress, PciFunction};

/// Which VMM's syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Qemu,
    Libvirt,
    CloudHypervisor,
}

/// `function` and its group's other endpoints (bridges are not passed through), in address order.
pub fn passed_together(function: &PciFunction, all: &[PciFunction]) -> Vec<PciAddress> {
    let mut together: Vec<PciAddress> = match function.iommu_group {
        Some(group) => all
            .iter()
            .filter(|f| f.iommu_group == Some(group))
            .filter(|f| f.address == function.address || !f.is_bridge())
            .map(|f| f.address)
            .collect(),
        None => vec![function.address],
    };
    if !together.contains(&function.address) {
        together.push(function.address);
    }
    together.sort();
    together
}

/// The snippet for `addresses` in the syntax of `vmm`.
pub fn render(vmm: Vmm, addresses: &[PciAddress]) -> String {
    let mut out = String::new();
    match vmm {
        Vmm::Qemu => {
            for a in addresses {
                let _ = writeln!(out, "-device vfio-pci,host={a}");
            }
        }
        Vmm::Libvirt => {
            // managed='no': passthroughd binds the function (the hook takes a lease), libvirt
            // only opens it.
            for a in addresses {
                let _ = writeln!(
                    out,
                    "<hostdev mode='subsystem' type='pci' managed='no'>\n  <source>\n    \
                     <address domain='{:#06x}' bus='{:#04x}' slot='{:#04x}' function='{:#x}'/>\n  \
                     </source>\n</hostdev>",
                    a.domain(),
                    a.bus(),
                    a.device(),
                    a.function()
                );
            }
        }
        Vmm::CloudHypervisor => {
            let paths: Vec<String> = addresses
                .iter()
                .map(|a| format!("path=/sys/bus/pci/devices/{a}/"))
                .collect();
            let _ = writeln!(out, "--device {}", paths.join(" "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn a(text: &str) -> PciAddress {
        text.parse().unwrap()
    }

    #[test]
    fn each_vmm_gets_its_own_syntax() {
        let both = [a("0000:03:00.0"), a("0000:03:00.1")];
        assert_eq!(
            render(Vmm::Qemu, &both),
            "-device vfio-pci,host=0000:03:00.0\n-device vfio-pci,host=0000:03:00.1\n"
        );
        assert_eq!(
            render(Vmm::CloudHypervisor, &both),
            "--device path=/sys/bus/pci/devices/0000:03:00.0/ \
             path=/sys/bus/pci/devices/0000:03:00.1/\n"
        );
        assert_eq!(
            render(Vmm::Libvirt, &[a("0001:1a:1f.7")]),
            "<hostdev mode='subsystem' type='pci' managed='no'>\n  <source>\n    \
             <address domain='0x0001' bus='0x1a' slot='0x1f' function='0x7'/>\n  </source>\n\
             </hostdev>\n"
        );
    }

    #[test]
    fn the_libvirt_snippet_reads_back_as_the_same_lease() {
        let addresses = [a("0000:05:10.2"), a("0000:00:1f.0")];
        let xml = format!(
            "<domain><name>d</name><devices>{}</devices></domain>",
            render(Vmm::Libvirt, &addresses)
        );
        let devices = passthroughd_proto::domain_xml::domain_devices(&xml).unwrap();
        assert_eq!(devices.functions, addresses);
    }
}
