//! A simulated kernel over a fake sysfs tree, so the engine runs end to end without root.
//!
//! The tree has the layout a real kernel shows (and `synthetic.rs` writes):
//! `sys/bus/pci/devices/ADDR` → `../../../devices/pci0000:00/ADDR`, a `driver` link and a
//! `DRIVER=` line in `uevent` that are kept consistent, `driver_override` reading `(null)` when
//! unset, `sys/bus/pci/drivers/NAME/{bind,unbind}` and `sys/bus/pci/drivers_probe`.
//!
//! Writes get the answers docs/kernel.md records for a 6.12 kernel; tests can inject
//! faults (an errno for one write, a device that vanishes after a write, a probe that binds
//! nothing, a write that blocks for a while) and read back every write the engine made.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use passthroughd_proto::PciAddress;

use passthroughd::kernel::sysfs::{SysfsRoot, parse_hex, read_attr, read_link_name};
use passthroughd::kernel::{Kernel, check_module};

/// The kinds of write the simulated kernel understands, for fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// A write to `devices/ADDR/driver_override`.
    Override,
    /// A write of ADDR to some driver's `unbind` (directly or through `devices/ADDR/driver`).
    Unbind,
    /// A write of ADDR to some driver's `bind`.
    Bind,
    /// A write of ADDR to `drivers_probe`.
    Probe,
    /// A write to `devices/PF/sriov_numvfs`.
    NumVfs,
}

/// How a simulated SR-IOV PF makes its VFs (see [`SimKernel::configure_sriov`]).
#[derive(Debug, Clone)]
pub struct SimSriov {
    /// The PF driver that supports SR-IOV (`sriov_numvfs` answers ENOENT on any other).
    pub pf_driver: String,
    /// The host VF driver (`igbvf`); it binds new VFs only while autoprobe is 1.
    pub vf_driver: String,
    pub vf_device_id: u16,
    /// Routing-id offset of VF 0 from the PF, and between VFs.
    pub offset: u16,
    pub stride: u16,
    /// IOMMU group of VF 0; VF n gets `first_group + n`.
    pub first_group: u32,
    /// The driver enables at most this many VFs (fewer than asked).
    pub limit: Option<u32>,
    /// VFs do not appear (no `virtfnN`, no device) until [`SimKernel::show_vfs`].
    pub hold: bool,
}

impl SimSriov {
    /// igb-like: 82576 VFs (10ca) at offset 0x80, stride 2, bound by igbvf.
    pub fn igb(first_group: u32) -> Self {
        Self {
            pf_driver: "igb".into(),
            vf_driver: "igbvf".into(),
            vf_device_id: 0x10ca,
            offset: 0x80,
            stride: 2,
            first_group,
            limit: None,
            hold: false,
        }
    }
}

/// A device lock held by someone else (see [`SimKernel::hold_device_lock`]); dropping it lets
/// blocked readers go on.
#[derive(Debug)]
pub struct HeldDeviceLock(Vec<(PathBuf, Vec<u8>)>);

impl Drop for HeldDeviceLock {
    fn drop(&mut self) {
        SimKernel::unlock_attrs(std::mem::take(&mut self.0));
    }
}

/// One write the engine made, path relative to the root, value as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimWrite {
    pub path: String,
    pub value: String,
}

/// A PCI function to create in the fake tree.
#[derive(Debug, Clone)]
pub struct SimDevice {
    pub address: PciAddress,
    pub class: u32,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
    /// Bound now; also the driver the match table gives it (see [`SimKernel::set_native`]).
    pub driver: Option<String>,
    pub group: Option<u32>,
    pub boot_vga: bool,
    pub sriov_numvfs: u32,
    /// `sriov_totalvfs`; 0 with `sriov_numvfs` > 0 means 7.
    pub sriov_totalvfs: u32,
    /// The function whose directory this one sits under (the bridge in front of it).
    pub parent: Option<PciAddress>,
}

impl SimDevice {
    /// An endpoint of class `class`, bound to `driver`, alone in group `group`.
    pub fn new(address: PciAddress, class: u32, driver: Option<&str>, group: u32) -> Self {
        Self {
            address,
            class,
            vendor_id: 0x8086,
            device_id: 0x10d3,
            subsystem_vendor_id: 0x8086,
            subsystem_device_id: 0xa01f,
            driver: driver.map(str::to_owned),
            group: Some(group),
            boot_vga: false,
            sriov_numvfs: 0,
            sriov_totalvfs: 0,
            parent: None,
        }
    }
}

#[derive(Debug, Default)]
struct SimState {
    /// The driver each function's id table matches (what a probe binds without an override).
    native: HashMap<PciAddress, String>,
    faults: Vec<(SimOp, PciAddress, Errno)>,
    vanish: Vec<(SimOp, PciAddress)>,
    delays: Vec<(SimOp, PciAddress, Duration)>,
    probe_nothing: HashSet<PciAddress>,
    /// Devices whose lock-taking attributes block readers during a delayed write.
    device_locks: HashSet<PciAddress>,
    /// The write that fails (counted from 1 by [`SimKernel::fail_nth_write`]) and how.
    fail_nth: Option<(usize, Errno)>,
    writes: Vec<SimWrite>,
    modules: Vec<String>,
    sriov: HashMap<PciAddress, SimSriov>,
    /// Every (function, driver) bind, in order: what ever bound what.
    binds: Vec<(PciAddress, String)>,
}

/// The simulated kernel. Reads go to the tree directly; writes come through [`Kernel`].
#[derive(Debug)]
pub struct SimKernel {
    root: PathBuf,
    sysfs: SysfsRoot,
    state: Mutex<SimState>,
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `../` repeated `n` times.
fn ups(n: usize) -> String {
    "../".repeat(n)
}

impl SimKernel {
    /// An empty host under `root`: the PCI bus, no devices, no drivers loaded.
    pub fn new(root: &Path) -> io::Result<Self> {
        for dir in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/devices/pci0000:00",
            "sys/kernel/iommu_groups",
            "sys/module",
            "sys/class/block",
            "sys/class/net",
            "sys/block",
            "proc/self",
            "proc/net",
        ] {
            fs::create_dir_all(root.join(dir))?;
        }
        fs::write(root.join("sys/bus/pci/drivers_probe"), "")?;
        for file in ["proc/self/mounts", "proc/swaps", "proc/net/route"] {
            fs::write(root.join(file), "")?;
        }
        fs::write(
            root.join("proc/swaps"),
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n",
        )?;
        fs::write(
            root.join("proc/net/route"),
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n",
        )?;
        Ok(Self {
            root: root.to_owned(),
            sysfs: SysfsRoot::new(root),
            state: Mutex::new(SimState::default()),
        })
    }

    pub fn sysfs(&self) -> &SysfsRoot {
        &self.sysfs
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A test that panicked while holding the lock already failed; keep serving the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a driver: `sys/bus/pci/drivers/NAME` with its `bind` and `unbind` files.
    pub fn add_driver(&self, name: &str) -> io::Result<()> {
        let dir = self.sysfs.pci_drivers_dir().join(name);
        fs::create_dir_all(&dir)?;
        for file in ["bind", "unbind", "new_id", "remove_id"] {
            if !dir.join(file).exists() {
                fs::write(dir.join(file), "")?;
            }
        }
        Ok(())
    }

    /// Sets the driver a probe picks for `address` when no override is set.
    pub fn set_native(&self, address: PciAddress, driver: &str) {
        self.state().native.insert(address, driver.to_owned());
    }

    /// The next write of kind `op` for `address` fails with `errno` and changes nothing.
    pub fn fail_next(&self, op: SimOp, address: PciAddress, errno: Errno) {
        self.state().faults.push((op, address, errno));
    }

    /// After the next successful write of kind `op` for `address`, the device is removed
    /// (hot-unplug mid-operation).
    pub fn vanish_after(&self, op: SimOp, address: PciAddress) {
        self.state().vanish.push((op, address));
    }

    /// Writes of kind `op` for `address` take `delay` (an unbind held up by an open VFIO fd).
    /// The `n`-th write from now on (1: the next one) fails with `errno`, whatever it writes:
    /// for failing every step of an operation in turn.
    pub fn fail_nth_write(&self, n: usize, errno: Errno) {
        self.state().fail_nth = Some((n, errno));
    }

    /// Writes are no longer delayed (every [`Self::delay`] is forgotten).
    pub fn clear_delays(&self) {
        self.state().delays.clear();
    }

    pub fn delay(&self, op: SimOp, address: PciAddress, delay: Duration) {
        self.state().delays.push((op, address, delay));
    }

    /// The next probe of `address` succeeds and binds nothing, as when the override names a
    /// driver that cannot take the device.
    pub fn probe_binds_nothing(&self, address: PciAddress) {
        self.state().probe_nothing.insert(address);
    }

    /// An igb-like SR-IOV PF (82576: 7 VFs at most, on igb) at `pf` in `group`, with no VFs
    /// enabled; VF n will be in group `first_vf_group + n`.
    pub fn add_igb_pf(&self, pf: PciAddress, group: u32, first_vf_group: u32) -> io::Result<()> {
        let mut device = SimDevice::new(pf, 0x020000, Some("igb"), group);
        device.device_id = 0x10c9;
        device.sriov_totalvfs = 7;
        self.add_device(&device)?;
        std::fs::write(self.sysfs().pci_device_attr(pf, "sriov_numvfs"), "0\n")?;
        self.configure_sriov(pf, SimSriov::igb(first_vf_group));
        Ok(())
    }

    /// Makes `pf` an SR-IOV PF whose driver can enable VFs as `sriov` says.
    pub fn configure_sriov(&self, pf: PciAddress, sriov: SimSriov) {
        self.state().sriov.insert(pf, sriov);
    }

    /// Lets held VFs of `pf` appear (see [`SimSriov::hold`]).
    pub fn show_vfs(&self, pf: PciAddress) -> io::Result<()> {
        let config = {
            let mut state = self.state();
            let Some(c) = state.sriov.get_mut(&pf) else {
                return Ok(());
            };
            c.hold = false;
            c.clone()
        };
        let n = self.num_vfs(pf);
        self.create_vfs(pf, &config, n)
    }

    /// Every driver bound to `address` so far, in order (the device's driver history).
    pub fn bind_history(&self, address: PciAddress) -> Vec<String> {
        self.state()
            .binds
            .iter()
            .filter(|(a, _)| *a == address)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// The address of VF `index` of `pf` as the PF's offset and stride place it.
    pub fn vf_address(&self, pf: PciAddress, index: u32) -> Option<PciAddress> {
        let config = self.state().sriov.get(&pf)?.clone();
        vf_address(pf, &config, index)
    }

    /// Every write so far, in order (failed ones included).
    pub fn writes(&self) -> Vec<SimWrite> {
        self.state().writes.clone()
    }

    /// Modules loaded so far.
    pub fn modules(&self) -> Vec<String> {
        self.state().modules.clone()
    }

    /// The driver bound to `address` now, from its `driver` link.
    pub fn driver_of(&self, address: PciAddress) -> Option<String> {
        read_link_name(&self.sysfs.pci_device_attr(address, "driver"))
            .ok()
            .flatten()
    }

    /// The stored `driver_override`, `None` when unset.
    pub fn override_of(&self, address: PciAddress) -> Option<String> {
        read_attr(&self.sysfs.pci_device_attr(address, "driver_override"))
            .ok()
            .flatten()
            .filter(|o| o != "(null)")
    }

    /// The device's directory relative to `sys/` (`devices/pci0000:00/ADDR`).
    fn device_rel(&self, address: PciAddress) -> io::Result<PathBuf> {
        let link = fs::read_link(self.sysfs.pci_device_dir(address))?;
        // `../../../devices/...` relative to sys/bus/pci/devices.
        Ok(link.components().skip(3).collect())
    }

    /// Creates a function with its attributes, links, group and (if bound) driver.
    pub fn add_device(&self, spec: &SimDevice) -> io::Result<()> {
        let name = spec.address.to_string();
        let rel = match spec.parent {
            Some(parent) => self.device_rel(parent)?.join(&name),
            None => PathBuf::from("devices/pci0000:00").join(&name),
        };
        let dir = self.root.join("sys").join(&rel);
        fs::create_dir_all(&dir)?;
        let write = |attr: &str, value: String| fs::write(dir.join(attr), value + "\n");
        let (v, d, sv, sd) = (
            spec.vendor_id,
            spec.device_id,
            spec.subsystem_vendor_id,
            spec.subsystem_device_id,
        );
        write(
            "uevent",
            format!(
                "PCI_CLASS={:X}\nPCI_ID={v:04X}:{d:04X}\nPCI_SUBSYS_ID={sv:04X}:{sd:04X}\n\
                 PCI_SLOT_NAME={name}",
                spec.class
            ),
        )?;
        write("vendor", format!("{v:#06x}"))?;
        write("device", format!("{d:#06x}"))?;
        write("subsystem_vendor", format!("{sv:#06x}"))?;
        write("subsystem_device", format!("{sd:#06x}"))?;
        write("class", format!("{:#08x}", spec.class))?;
        write("numa_node", "-1".into())?;
        write("driver_override", "(null)".into())?;
        write("enable", "1".into())?;
        if spec.class >> 16 == 0x03 {
            write("boot_vga", if spec.boot_vga { "1" } else { "0" }.into())?;
        }
        if spec.sriov_numvfs > 0 || spec.sriov_totalvfs > 0 {
            let total = if spec.sriov_totalvfs > 0 {
                spec.sriov_totalvfs
            } else {
                7
            };
            write("sriov_totalvfs", total.to_string())?;
            write("sriov_numvfs", spec.sriov_numvfs.to_string())?;
            write("sriov_drivers_autoprobe", "1".into())?;
        }
        let depth = rel.components().count();
        symlink(
            format!("../../../{}", rel.display()),
            self.sysfs.pci_device_dir(spec.address),
        )?;
        if let Some(group) = spec.group {
            let group_dir = self.sysfs.iommu_groups_dir().join(group.to_string());
            if !group_dir.exists() {
                fs::create_dir_all(group_dir.join("devices"))?;
                fs::write(group_dir.join("type"), "DMA-FQ\n")?;
            }
            symlink(
                format!("../../../../{}", rel.display()),
                group_dir.join("devices").join(&name),
            )?;
            symlink(
                format!("{}kernel/iommu_groups/{group}", ups(depth)),
                dir.join("iommu_group"),
            )?;
        }
        if let Some(driver) = &spec.driver {
            self.add_driver(driver)?;
            self.set_native(spec.address, driver);
            self.link_driver(spec.address, driver)?;
        }
        Ok(())
    }

    /// Makes `address` bound to `driver`: both links and the uevent line.
    fn link_driver(&self, address: PciAddress, driver: &str) -> io::Result<()> {
        self.state().binds.push((address, driver.to_owned()));
        let rel = self.device_rel(address)?;
        let dir = self.root.join("sys").join(&rel);
        let depth = rel.components().count();
        symlink(
            format!("{}bus/pci/drivers/{driver}", ups(depth)),
            dir.join("driver"),
        )?;
        symlink(
            format!("../../../../{}", rel.display()),
            self.sysfs
                .pci_drivers_dir()
                .join(driver)
                .join(address.to_string()),
        )?;
        self.set_uevent_driver(&dir, Some(driver))
    }

    fn unlink_driver(&self, address: PciAddress, driver: &str) -> io::Result<()> {
        let dir = self.sysfs.pci_device_dir(address);
        fs::remove_file(dir.join("driver"))?;
        let _ = fs::remove_file(
            self.sysfs
                .pci_drivers_dir()
                .join(driver)
                .join(address.to_string()),
        );
        self.set_uevent_driver(&dir, None)
    }

    fn set_uevent_driver(&self, dir: &Path, driver: Option<&str>) -> io::Result<()> {
        let uevent = dir.join("uevent");
        let text = fs::read_to_string(&uevent)?;
        let mut lines: Vec<String> = driver.map(|d| format!("DRIVER={d}")).into_iter().collect();
        lines.extend(
            text.lines()
                .filter(|l| !l.starts_with("DRIVER="))
                .map(str::to_owned),
        );
        // Replaced whole: the kernel builds `uevent` at each read, so a reader never sees it
        // empty (the inventory takes an empty one for a vanished device).
        let temp = dir.join(".uevent.new");
        fs::write(&temp, lines.join("\n") + "\n")?;
        fs::rename(temp, uevent)
    }

    /// Removes a function as a hot-unplug would: every link to it and its directory.
    pub fn remove_device(&self, address: PciAddress) -> io::Result<()> {
        let name = address.to_string();
        let rel = self.device_rel(address)?;
        if let Some(driver) = self.driver_of(address) {
            let _ = fs::remove_file(self.sysfs.pci_drivers_dir().join(driver).join(&name));
        }
        if let Ok(Some(group)) = read_link_name(&self.sysfs.pci_device_attr(address, "iommu_group"))
        {
            let _ = fs::remove_file(
                self.sysfs
                    .iommu_groups_dir()
                    .join(group)
                    .join("devices")
                    .join(&name),
            );
        }
        fs::remove_file(self.sysfs.pci_device_dir(address))?;
        fs::remove_dir_all(self.root.join("sys").join(rel))
    }

    /// A network interface of `address` (`sys/class/net/IF` into the device's `net/`).
    pub fn add_netdev(&self, address: PciAddress, ifname: &str) -> io::Result<()> {
        let rel = self.device_rel(address)?;
        fs::create_dir_all(self.root.join("sys").join(&rel).join("net").join(ifname))?;
        symlink(
            format!("../../{}/net/{ifname}", rel.display()),
            self.sysfs.class_net_dir().join(ifname),
        )
    }

    /// A disk (`parent` `None`) or partition of `address`, with its `dev` number.
    pub fn add_block(
        &self,
        address: PciAddress,
        name: &str,
        dev: &str,
        parent: Option<&str>,
    ) -> io::Result<()> {
        let rel = match parent {
            Some(disk) => {
                let link = fs::read_link(self.sysfs.class_block_dir().join(disk))?;
                link.components().skip(2).collect::<PathBuf>().join(name)
            }
            None => self.device_rel(address)?.join("nvme/nvme0").join(name),
        };
        self.add_block_at(&rel, name, dev)?;
        if parent.is_none() {
            symlink(
                format!("../{}", rel.display()),
                self.sysfs.block_dir().join(name),
            )?;
        }
        Ok(())
    }

    fn add_block_at(&self, rel: &Path, name: &str, dev: &str) -> io::Result<()> {
        let dir = self.root.join("sys").join(rel);
        fs::create_dir_all(dir.join("holders"))?;
        fs::write(dir.join("dev"), format!("{dev}\n"))?;
        symlink(
            format!("../../{}", rel.display()),
            self.sysfs.class_block_dir().join(name),
        )
    }

    /// A device-mapper device (`dm-N`, named `dm_name`) stacked on `slaves`.
    pub fn add_dm(&self, name: &str, dev: &str, dm_name: &str, slaves: &[&str]) -> io::Result<()> {
        let rel = PathBuf::from("devices/virtual/block").join(name);
        self.add_block_at(&rel, name, dev)?;
        let dir = self.root.join("sys").join(&rel);
        fs::create_dir_all(dir.join("dm"))?;
        fs::write(dir.join("dm/name"), format!("{dm_name}\n"))?;
        for slave in slaves {
            symlink(
                &dir,
                self.sysfs
                    .class_block_dir()
                    .join(slave)
                    .join("holders")
                    .join(name),
            )?;
        }
        Ok(())
    }

    /// Writes a file under the root (`proc/self/mounts`, `proc/net/route`, ...).
    pub fn write_file(&self, rel: &str, content: &str) -> io::Result<()> {
        let path = self.root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(path, content)
    }

    /// A process `pid` named `comm` with open files: `(fd, target)` as `/proc/PID/fd/N` links.
    /// While a delayed write about `address` runs, reading its `driver_override` or
    /// `sriov_numvfs` blocks (both are FIFOs meanwhile), as the kernel's device lock makes such
    /// reads wait behind a blocked unbind; blocked readers get an empty value at the end.
    pub fn lock_device_during_writes(&self, address: PciAddress) {
        self.state().device_locks.insert(address);
    }

    /// Holds the device lock of `address` as another process's write does (`echo N >
    /// sriov_numvfs` by hand holds its PF's lock until the last VF is made): reading its
    /// `driver_override` or `sriov_numvfs` blocks until the guard is dropped.
    pub fn hold_device_lock(&self, address: PciAddress) -> HeldDeviceLock {
        HeldDeviceLock(self.lock_attrs(address))
    }

    /// A process holding a VFIO device fd without its group fd (`anon_inode:[vfio-device]`).
    /// With `device`, the fd's fdinfo names the function's sysfs path, as kernels since 6.9 do.
    pub fn add_vfio_device_holder(
        &self,
        pid: u32,
        comm: &str,
        fd: u32,
        device: Option<PciAddress>,
    ) -> io::Result<()> {
        self.add_process(pid, comm, &[(fd, "anon_inode:[vfio-device]")])?;
        let fdinfo = self.sysfs.proc_dir().join(pid.to_string()).join("fdinfo");
        fs::create_dir_all(&fdinfo)?;
        let mut text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n".to_owned();
        if let Some(device) = device {
            text.push_str(&format!(
                "vfio-device-syspath: /sys/devices/pci0000:00/0000:00:10.0/{device}\n"
            ));
        }
        fs::write(fdinfo.join(fd.to_string()), text)
    }

    /// Turns the lock-taking attributes of `address` into FIFOs (see
    /// [`Self::lock_device_during_writes`]); returns what to put back.
    fn lock_attrs(&self, address: PciAddress) -> Vec<(PathBuf, Vec<u8>)> {
        let mut held = Vec::new();
        for attr in ["driver_override", "sriov_numvfs"] {
            let path = self.sysfs.pci_device_attr(address, attr);
            if let Ok(content) = fs::read(&path)
                && fs::remove_file(&path).is_ok()
                && nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o644))
                    .is_ok()
            {
                held.push((path, content));
            }
        }
        held
    }

    /// Wakes readers blocked on the FIFOs and puts the attributes back.
    fn unlock_attrs(held: Vec<(PathBuf, Vec<u8>)>) {
        use std::os::unix::fs::OpenOptionsExt;
        for (path, content) in held {
            // A reader blocked in open() counts as one: this open wakes it, the close gives it
            // end-of-file. No reader: ENXIO, nothing to wake.
            let _ = fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&path);
            let _ = fs::remove_file(&path);
            let _ = fs::write(&path, content);
        }
    }

    pub fn add_process(&self, pid: u32, comm: &str, fds: &[(u32, &str)]) -> io::Result<()> {
        let dir = self.sysfs.proc_dir().join(pid.to_string());
        fs::create_dir_all(dir.join("fd"))?;
        fs::write(dir.join("comm"), format!("{comm}\n"))?;
        for (fd, target) in fds {
            symlink(target, dir.join("fd").join(fd.to_string()))?;
        }
        Ok(())
    }

    // --- the kernel's side of writes ---

    /// `sriov_numvfs`: kstrtou16 base 0, ERANGE above total, same value a no-op, ENOENT without
    /// an SR-IOV-capable driver bound, EBUSY from one non-zero count to another.
    fn store_numvfs(&self, pf: PciAddress, value: &[u8]) -> io::Result<()> {
        let text = std::str::from_utf8(value).map_err(|_| errno(Errno::EINVAL))?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let n = parse_kstrtou16(text).ok_or_else(|| errno(Errno::EINVAL))?;
        let total = read_attr(&self.sysfs.pci_device_attr(pf, "sriov_totalvfs"))
            .ok()
            .flatten()
            .and_then(|t| t.parse::<u32>().ok())
            .ok_or_else(|| errno(Errno::ENOENT))?;
        if n > total {
            return Err(errno(Errno::ERANGE));
        }
        let current = self.num_vfs(pf);
        if n == current {
            return Ok(());
        }
        let config = self.state().sriov.get(&pf).cloned();
        let driver = self.bound_to(pf);
        let Some(config) = config.filter(|c| driver.as_deref() == Some(c.pf_driver.as_str()))
        else {
            return Err(errno(Errno::ENOENT));
        };
        if n == 0 {
            for index in 0..current {
                let link = self.sysfs.pci_device_dir(pf).join(format!("virtfn{index}"));
                if let Ok(Some(vf)) = read_link_name(&link)
                    && let Ok(vf) = vf.parse::<PciAddress>()
                {
                    let _ = self.remove_device(vf);
                }
                let _ = fs::remove_file(link);
            }
            return fs::write(self.sysfs.pci_device_attr(pf, "sriov_numvfs"), "0\n");
        }
        if current != 0 {
            return Err(errno(Errno::EBUSY));
        }
        let n = config.limit.map_or(n, |l| n.min(l));
        fs::write(
            self.sysfs.pci_device_attr(pf, "sriov_numvfs"),
            format!("{n}\n"),
        )?;
        if config.hold {
            return Ok(());
        }
        self.create_vfs(pf, &config, n)
    }

    fn create_vfs(&self, pf: PciAddress, config: &SimSriov, n: u32) -> io::Result<()> {
        let autoprobe = read_attr(&self.sysfs.pci_device_attr(pf, "sriov_drivers_autoprobe"))
            .ok()
            .flatten()
            .as_deref()
            != Some("0");
        let parent = self
            .device_rel(pf)?
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<PciAddress>().ok());
        let class = self.class_of(pf);
        for index in 0..n {
            let address = vf_address(pf, config, index).ok_or_else(|| errno(Errno::ERANGE))?;
            if self.exists(address) {
                continue;
            }
            let mut spec = SimDevice::new(address, class, None, config.first_group + index);
            spec.device_id = config.vf_device_id;
            spec.parent = parent;
            self.add_device(&spec)?;
            self.set_native(address, &config.vf_driver);
            let pf_dir = self.sysfs.pci_device_dir(pf);
            symlink(
                format!("../{address}"),
                pf_dir.join(format!("virtfn{index}")),
            )?;
            symlink(
                format!("../{pf}"),
                self.sysfs.pci_device_dir(address).join("physfn"),
            )?;
            // udev loads the VF driver on the add event either way; it binds only with autoprobe.
            self.add_driver(&config.vf_driver)?;
            if autoprobe {
                self.link_driver(address, &config.vf_driver)?;
            }
        }
        Ok(())
    }

    fn bound_to(&self, address: PciAddress) -> Option<String> {
        self.driver_of(address)
    }

    fn exists(&self, address: PciAddress) -> bool {
        self.sysfs.pci_device_dir(address).join("uevent").exists()
    }

    fn class_of(&self, address: PciAddress) -> u32 {
        read_attr(&self.sysfs.pci_device_attr(address, "class"))
            .ok()
            .flatten()
            .and_then(|c| parse_hex(&c))
            .unwrap_or(0)
    }

    fn num_vfs(&self, address: PciAddress) -> u32 {
        read_attr(&self.sysfs.pci_device_attr(address, "sriov_numvfs"))
            .ok()
            .flatten()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    fn driver_loaded(&self, driver: &str) -> bool {
        self.sysfs.pci_drivers_dir().join(driver).is_dir()
    }

    /// What the kernel does when `driver` probes `address`: the probe's own refusals.
    fn probe_with(&self, address: PciAddress, driver: &str) -> io::Result<()> {
        if driver == "vfio-pci" {
            if self.class_of(address) >> 16 == 0x06 {
                return Err(errno(Errno::EINVAL));
            }
            if self.num_vfs(address) > 0 {
                return Err(errno(Errno::EBUSY));
            }
        }
        if self.state().probe_nothing.remove(&address) {
            return Ok(());
        }
        self.link_driver(address, driver)
    }

    /// Whether `driver`'s id table (or the override) matches `address`.
    fn matches(&self, address: PciAddress, driver: &str) -> bool {
        match self.override_of(address) {
            Some(o) => o == driver,
            None => self
                .state()
                .native
                .get(&address)
                .is_some_and(|n| n == driver),
        }
    }

    fn store_override(&self, address: PciAddress, value: &[u8]) -> io::Result<()> {
        if value.len() >= 4096 {
            return Err(errno(Errno::EINVAL));
        }
        // The kernel keeps what precedes the first newline; empty clears the override.
        let text = String::from_utf8_lossy(value);
        let kept = text.split('\n').next().unwrap_or("");
        let stored = if kept.is_empty() { "(null)" } else { kept };
        fs::write(
            self.sysfs.pci_device_attr(address, "driver_override"),
            format!("{stored}\n"),
        )
    }

    fn unbind(&self, driver: &str, value: &[u8]) -> io::Result<PciAddress> {
        let address = parse_value(value).ok_or_else(|| errno(Errno::ENODEV))?;
        if self.bound_to(address).as_deref() != Some(driver) {
            return Err(errno(Errno::ENODEV));
        }
        self.unlink_driver(address, driver)?;
        Ok(address)
    }

    fn bind(&self, driver: &str, value: &[u8]) -> io::Result<PciAddress> {
        let address = parse_value(value)
            .filter(|a| self.exists(*a))
            .ok_or_else(|| errno(Errno::ENODEV))?;
        if self.bound_to(address).is_some() {
            return Err(errno(Errno::EBUSY));
        }
        if !self.matches(address, driver) {
            return Err(errno(Errno::ENODEV));
        }
        self.probe_with(address, driver)?;
        Ok(address)
    }

    fn drivers_probe(&self, value: &[u8]) -> io::Result<PciAddress> {
        let address = parse_value(value)
            .filter(|a| self.exists(*a))
            .ok_or_else(|| errno(Errno::ENODEV))?;
        if self.bound_to(address).is_some() {
            return Ok(address);
        }
        let candidate = self
            .override_of(address)
            .or_else(|| self.state().native.get(&address).cloned());
        match candidate {
            // An override naming a driver that is not loaded: success, nothing bound.
            Some(driver) if self.driver_loaded(&driver) => self.probe_with(address, &driver)?,
            _ => {}
        }
        Ok(address)
    }

    /// Which operation a write is, and on which function; `None` for a plain attribute.
    fn classify(&self, rel: &Path, value: &[u8]) -> io::Result<Option<(SimOp, PciAddress)>> {
        let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
        let addr = parse_value(value);
        Ok(match parts.as_slice() {
            ["sys", "bus", "pci", "drivers_probe"] => addr.map(|a| (SimOp::Probe, a)),
            ["sys", "bus", "pci", "drivers", _, "bind"] => addr.map(|a| (SimOp::Bind, a)),
            ["sys", "bus", "pci", "drivers", _, "unbind"]
            | ["sys", "bus", "pci", "devices", _, "driver", "unbind"] => {
                addr.map(|a| (SimOp::Unbind, a))
            }
            ["sys", "bus", "pci", "devices", dev, "driver_override"] => {
                dev.parse().ok().map(|a| (SimOp::Override, a))
            }
            ["sys", "bus", "pci", "devices", dev, "sriov_numvfs"] => {
                dev.parse().ok().map(|a| (SimOp::NumVfs, a))
            }
            _ => None,
        })
    }

    fn apply(&self, rel: &Path, value: &[u8]) -> io::Result<()> {
        let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
        match parts.as_slice() {
            ["sys", "bus", "pci", "drivers_probe"] => self.drivers_probe(value).map(drop),
            [
                "sys",
                "bus",
                "pci",
                "drivers",
                driver,
                op @ ("bind" | "unbind"),
            ] => {
                if !self.driver_loaded(driver) {
                    return Err(errno(Errno::ENOENT));
                }
                if *op == "bind" {
                    self.bind(driver, value).map(drop)
                } else {
                    self.unbind(driver, value).map(drop)
                }
            }
            ["sys", "bus", "pci", "devices", dev, "driver", "unbind"] => {
                let address: PciAddress = dev.parse().map_err(|_| errno(Errno::ENOENT))?;
                // `driver` is a link: absent when unbound, so the file does not exist.
                let driver = self.bound_to(address).ok_or_else(|| errno(Errno::ENOENT))?;
                self.unbind(&driver, value).map(drop)
            }
            ["sys", "bus", "pci", "devices", dev, "driver_override"] => {
                let address: PciAddress = dev.parse().map_err(|_| errno(Errno::ENOENT))?;
                if !self.exists(address) {
                    return Err(errno(Errno::ENOENT));
                }
                self.store_override(address, value)
            }
            ["sys", "bus", "pci", "devices", dev, "sriov_numvfs"] => {
                let address: PciAddress = dev.parse().map_err(|_| errno(Errno::ENOENT))?;
                if !self
                    .sysfs
                    .pci_device_attr(address, "sriov_numvfs")
                    .is_file()
                {
                    return Err(errno(Errno::ENOENT));
                }
                self.store_numvfs(address, value)
            }
            [
                "sys",
                "bus",
                "pci",
                "devices",
                dev,
                "sriov_drivers_autoprobe",
            ] => {
                let address: PciAddress = dev.parse().map_err(|_| errno(Errno::ENOENT))?;
                let path = self
                    .sysfs
                    .pci_device_attr(address, "sriov_drivers_autoprobe");
                if !path.is_file() {
                    return Err(errno(Errno::ENOENT));
                }
                let text = String::from_utf8_lossy(value);
                let on = match text.trim_end_matches('\n') {
                    "1" | "y" | "Y" | "on" => "1",
                    "0" | "n" | "N" | "off" => "0",
                    _ => return Err(errno(Errno::EINVAL)),
                };
                fs::write(path, format!("{on}\n"))
            }
            _ => {
                let path = self.root.join(rel);
                if !path.is_file() {
                    return Err(errno(Errno::ENOENT));
                }
                fs::write(path, value)
            }
        }
    }
}

/// `kstrtou16(text, 0)`: optional `+`, then `0x` hex, `0` octal or decimal, nothing else.
fn parse_kstrtou16(text: &str) -> Option<u32> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let (digits, radix) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (hex, 16)
        } else if text.len() > 1 && text.starts_with('0') {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u16::from_str_radix(digits, radix).ok().map(u32::from)
}

/// VF `index` of `pf`: routing id = PF's + offset + index × stride.
fn vf_address(pf: PciAddress, config: &SimSriov, index: u32) -> Option<PciAddress> {
    let rid = (u32::from(pf.bus()) << 8)
        + (u32::from(pf.device()) << 3)
        + u32::from(pf.function())
        + u32::from(config.offset)
        + index * u32::from(config.stride);
    let bus = u8::try_from(rid >> 8).ok()?;
    PciAddress::new(pf.domain(), bus, ((rid >> 3) & 0x1f) as u8, (rid & 7) as u8)
}

/// The address in a bind/unbind/probe write: the kernel takes the name up to a newline.
fn parse_value(value: &[u8]) -> Option<PciAddress> {
    let text = std::str::from_utf8(value).ok()?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    // Only the canonical form names a device: `drivers_probe` looks the name up verbatim.
    let address: PciAddress = text.parse().ok()?;
    (address.to_string() == text).then_some(address)
}

impl Kernel for SimKernel {
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| errno(Errno::ENOENT))?
            .to_owned();
        let target = self.classify(&rel, value)?;
        let delay = {
            let mut state = self.state();
            state.writes.push(SimWrite {
                path: rel.display().to_string(),
                value: String::from_utf8_lossy(value).into_owned(),
            });
            if let Some((n, e)) = state.fail_nth {
                if n <= 1 {
                    state.fail_nth = None;
                    return Err(errno(e));
                }
                state.fail_nth = Some((n - 1, e));
            }
            if let Some((op, address)) = target
                && let Some(i) = state
                    .faults
                    .iter()
                    .position(|(o, a, _)| *o == op && *a == address)
            {
                let (_, _, e) = state.faults.remove(i);
                return Err(errno(e));
            }
            target.and_then(|(op, address)| {
                state
                    .delays
                    .iter()
                    .find(|(o, a, _)| *o == op && *a == address)
                    .map(|(_, _, d)| *d)
            })
        };
        if let Some(delay) = delay {
            let locked = target
                .filter(|(_, a)| self.state().device_locks.contains(a))
                .map(|(_, a)| self.lock_attrs(a))
                .unwrap_or_default();
            std::thread::sleep(delay);
            Self::unlock_attrs(locked);
        }
        self.apply(&rel, value)?;
        if let Some((op, address)) = target {
            let vanish = {
                let mut state = self.state();
                state
                    .vanish
                    .iter()
                    .position(|(o, a)| *o == op && *a == address)
                    .map(|i| state.vanish.remove(i))
            };
            if vanish.is_some() {
                self.remove_device(address)?;
            }
        }
        Ok(())
    }

    fn load_module(&self, module: &str) -> io::Result<()> {
        check_module(module)?;
        self.state().modules.push(module.to_owned());
        self.add_driver(module)?;
        fs::create_dir_all(self.sysfs.module_dir().join(module.replace('-', "_")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn host() -> (tempfile::TempDir, SimKernel, PciAddress) {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimKernel::new(dir.path()).unwrap();
        let nic = addr("0000:01:00.0");
        sim.add_device(&SimDevice::new(nic, 0x020000, Some("e1000e"), 5))
            .unwrap();
        (dir, sim, nic)
    }

    fn w(sim: &SimKernel, path: PathBuf, value: &str) -> io::Result<()> {
        sim.write(&path, value.as_bytes())
    }

    #[test]
    fn override_unbind_probe_moves_a_device_and_keeps_uevent_consistent() {
        let (_d, sim, nic) = host();
        let root = sim.sysfs().clone();
        sim.load_module("vfio-pci").unwrap();
        w(
            &sim,
            root.pci_device_attr(nic, "driver_override"),
            "vfio-pci\n",
        )
        .unwrap();
        assert_eq!(sim.override_of(nic).as_deref(), Some("vfio-pci"));
        // Unbinding through the wrong driver is ENODEV.
        let wrong = w(
            &sim,
            root.pci_drivers_dir().join("vfio-pci/unbind"),
            &nic.to_string(),
        );
        assert_eq!(
            wrong.unwrap_err().raw_os_error(),
            Some(Errno::ENODEV as i32)
        );
        w(&sim, root.pci_device_unbind(nic), &nic.to_string()).unwrap();
        assert_eq!(sim.driver_of(nic), None);
        w(&sim, root.pci_drivers_probe(), &nic.to_string()).unwrap();
        assert_eq!(sim.driver_of(nic).as_deref(), Some("vfio-pci"));
        let uevent = fs::read_to_string(root.pci_device_attr(nic, "uevent")).unwrap();
        assert!(uevent.contains("DRIVER=vfio-pci\n"), "{uevent}");
        // Bind on a bound device: EBUSY.
        let busy = w(
            &sim,
            root.pci_drivers_dir().join("e1000e/bind"),
            &nic.to_string(),
        );
        assert_eq!(busy.unwrap_err().raw_os_error(), Some(Errno::EBUSY as i32));
        // "\n" clears the override; unknown names make drivers_probe ENODEV.
        w(&sim, root.pci_device_attr(nic, "driver_override"), "\n").unwrap();
        assert_eq!(sim.override_of(nic), None);
        let unknown = w(&sim, root.pci_drivers_probe(), "../../devices");
        assert_eq!(
            unknown.unwrap_err().raw_os_error(),
            Some(Errno::ENODEV as i32)
        );
    }

    #[test]
    fn probe_with_an_override_for_an_unloaded_driver_binds_nothing() {
        let (_d, sim, nic) = host();
        let root = sim.sysfs().clone();
        w(
            &sim,
            root.pci_device_attr(nic, "driver_override"),
            "vfio-pci",
        )
        .unwrap();
        w(&sim, root.pci_device_unbind(nic), &nic.to_string()).unwrap();
        w(&sim, root.pci_drivers_probe(), &nic.to_string()).unwrap();
        assert_eq!(sim.driver_of(nic), None);
        // Stored verbatim, so it never matches.
        w(
            &sim,
            root.pci_device_attr(nic, "driver_override"),
            "vfio-pci extra",
        )
        .unwrap();
        assert_eq!(sim.override_of(nic).as_deref(), Some("vfio-pci extra"));
    }

    #[test]
    fn vfio_refuses_bridges_after_the_unbind_and_pfs_with_vfs() {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimKernel::new(dir.path()).unwrap();
        let root = sim.sysfs().clone();
        sim.load_module("vfio-pci").unwrap();
        let bridge = addr("0000:00:1c.0");
        sim.add_device(&SimDevice::new(bridge, 0x060400, Some("pcieport"), 1))
            .unwrap();
        let mut pf = SimDevice::new(addr("0000:02:00.0"), 0x020000, Some("igb"), 2);
        pf.sriov_numvfs = 2;
        sim.add_device(&pf).unwrap();
        for a in [bridge, pf.address] {
            w(&sim, root.pci_device_attr(a, "driver_override"), "vfio-pci").unwrap();
            w(&sim, root.pci_device_unbind(a), &a.to_string()).unwrap();
        }
        let e = w(&sim, root.pci_drivers_probe(), &bridge.to_string()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::EINVAL as i32));
        assert_eq!(sim.driver_of(bridge), None, "pcieport was already unbound");
        let e = w(&sim, root.pci_drivers_probe(), &pf.address.to_string()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::EBUSY as i32));
    }

    #[test]
    fn faults_and_vanishing_devices() {
        let (_d, sim, nic) = host();
        let root = sim.sysfs().clone();
        sim.fail_next(SimOp::Unbind, nic, Errno::EIO);
        let e = w(&sim, root.pci_device_unbind(nic), &nic.to_string()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::EIO as i32));
        assert_eq!(sim.driver_of(nic).as_deref(), Some("e1000e"));
        sim.vanish_after(SimOp::Unbind, nic);
        w(&sim, root.pci_device_unbind(nic), &nic.to_string()).unwrap();
        assert!(!root.pci_device_dir(nic).exists());
        assert!(
            fs::read_dir(root.pci_drivers_dir().join("e1000e"))
                .unwrap()
                .all(|e| e.unwrap().file_name() != nic.to_string().as_str())
        );
        let e = w(&sim, root.pci_drivers_probe(), &nic.to_string()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::ENODEV as i32));
        assert_eq!(sim.writes().len(), 3);
    }
}
