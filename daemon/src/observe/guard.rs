//! Blast-radius checks: what would break on the host if a function lost its driver.
//!
//! Each rule lives in one function here and yields a [`Finding`] with a severity:
//! - [`Severity::Hard`]: bridges (everything behind them goes), and storage holding a mounted
//!   filesystem or active swap (through partitions and dm/md/LVM holders). `--force` never
//!   overrides these: the host would lose its disks.
//! - [`Severity::Soft`]: a NIC with an address or a route, the boot display while a console or
//!   a DRM client uses it. `--force` overrides these (the admin may have another way in).
//! - [`Severity::Busy`]: a VMM has the function's VFIO group or device open. The unbind would
//!   block for as long as the VM runs, so this is never overridable either.
//!
//! All state is read once per request under the sysfs root ([`HostSnapshot::gather`]), so the
//! rules themselves are pure functions over it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use passthroughd_proto::device::driver_is_vfio;
use passthroughd_proto::{PciAddress, PciFunction};

use crate::error::Error;
use crate::kernel::sysfs::{SysfsRoot, pci_path_components, read_attr, read_link_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Overridable with `--force`.
    Soft,
    /// Never overridable.
    Hard,
    /// In use by a VMM: never overridable, reported as Busy.
    Busy,
}

/// One reason not to unbind a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Completes "ADDR refused: ...", with a hint when there is an obvious fix.
    pub reason: String,
}

/// Where the IPv4 addresses of interfaces come from: not in /proc in a simple form, so the
/// real provider asks the kernel (getifaddrs) and tests inject their own.
pub trait AddressProvider: Send + Sync + fmt::Debug {
    /// The addresses configured on `ifname` (link-local ones may be included; they are ignored).
    fn addresses(&self, ifname: &str) -> Vec<IpAddr>;
}

/// The host's own interfaces, via getifaddrs(3). Only meaningful when the sysfs root is `/`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemAddresses;

impl AddressProvider for SystemAddresses {
    fn addresses(&self, ifname: &str) -> Vec<IpAddr> {
        let Ok(all) = nix::ifaddrs::getifaddrs() else {
            return Vec::new();
        };
        all.filter(|a| a.interface_name == ifname)
            .filter_map(|a| a.address)
            .filter_map(|s| {
                if let Some(v4) = s.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect()
    }
}

/// A fixed table, for tests and for fake roots (where the host's interfaces mean nothing).
#[derive(Debug, Default, Clone)]
pub struct StaticAddresses(pub HashMap<String, Vec<IpAddr>>);

impl AddressProvider for StaticAddresses {
    fn addresses(&self, ifname: &str) -> Vec<IpAddr> {
        self.0.get(ifname).cloned().unwrap_or_default()
    }
}

/// A process holding a file we care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    pub pid: u32,
    pub comm: String,
    pub target: String,
    /// For a VFIO device fd (`anon_inode:[vfio-device]`, got through a group that may be closed
    /// since): the function it opens, from the fd's `vfio-device-syspath` (kernels since 6.9);
    /// `None` when the kernel does not say.
    pub device: Option<PciAddress>,
    /// The VM's name, when the process is a QEMU started with `-name`.
    pub vm: Option<String>,
}

impl OpenFile {
    /// "qemu-system-x86 (pid 4242, VM win11)" or "sleep (pid 7)".
    pub fn who(&self) -> String {
        match &self.vm {
            Some(vm) => format!("{} (pid {}, VM {vm})", self.comm, self.pid),
            None => format!("{} (pid {})", self.comm, self.pid),
        }
    }
}

/// The VM name a QEMU command line gives (`-name guest=NAME,...` or `-name NAME`), if any.
pub fn vm_name(cmdline: &[u8]) -> Option<String> {
    let mut args = cmdline.split(|&b| b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-name" || arg == b"--name" {
            let value = String::from_utf8_lossy(args.next()?).into_owned();
            let value = value.strip_prefix("guest=").unwrap_or(&value);
            // QEMU's option syntax: the value ends at a lone ',', and ",," is a comma in it
            // (libvirt writes a domain "a,b" as guest=a,,b).
            let mut name = String::new();
            let mut chars = value.chars().peekable();
            while let Some(c) = chars.next() {
                if c == ',' {
                    if chars.peek() != Some(&',') {
                        break;
                    }
                    chars.next();
                }
                name.push(c);
            }
            return (!name.is_empty()).then_some(name);
        }
    }
    None
}

/// The names of the VMs running now: processes whose command line has `-name`.
pub fn running_vms(proc: &Path) -> HashSet<String> {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter_map(|cmdline| vm_name(&cmdline))
        .collect()
}

/// What a VFIO device fd obtained through its group looks like in `/proc/PID/fd`.
const VFIO_DEVICE_FD: &str = "anon_inode:[vfio-device]";

#[derive(Debug, Clone, Default)]
struct BlockDev {
    /// The function it hangs off, if any (dm/md devices have none).
    function: Option<PciAddress>,
    dev: Option<String>,
    dm_name: Option<String>,
    holders: Vec<String>,
}

#[derive(Debug, Clone)]
struct Mount {
    dev: Option<String>,
    source: String,
    mountpoint: String,
}

/// Everything the rules look at, read once.
#[derive(Debug, Default)]
pub struct HostSnapshot {
    blocks: HashMap<String, BlockDev>,
    mounts: Vec<Mount>,
    /// Block device names that are active swap.
    swaps: Vec<String>,
    /// Source names (`nvme0n1p2`) of mounts that name a device through a symlink, resolved.
    netdevs: Vec<(String, PciAddress)>,
    routes4: Vec<(String, String)>,
    routes6: Vec<(String, String)>,
    inet6: Vec<(String, String)>,
    addresses: HashMap<String, Vec<IpAddr>>,
    fb_console: Option<String>,
    drm_nodes: Vec<(String, PciAddress)>,
    open_files: Vec<OpenFile>,
    vfio_devs: HashMap<PciAddress, Vec<String>>,
    /// IOMMU groups of the functions whose VFIO group node could be opened just now: nobody
    /// holds them (only probed when a VFIO device fd of unknown device exists, see `gather`).
    free_groups: HashSet<u32>,
}

impl HostSnapshot {
    /// Reads block devices, mounts, swaps, interfaces, routes, consoles and open VFIO/DRM files
    /// under `root`, as far as the rules for `functions` need them (the snapshot answers for
    /// those functions only). Unreadable parts are treated as empty: each rule says what it
    /// could see.
    pub fn gather(
        root: &SysfsRoot,
        functions: &[&PciFunction],
        provider: &dyn AddressProvider,
    ) -> Self {
        let mut snap = Self {
            blocks: read_blocks(root),
            ..Self::default()
        };
        // Mounts and swaps only matter when one of the functions carries a disk.
        if functions
            .iter()
            .any(|f| !snap.block_tree(f.address).is_empty())
        {
            snap.read_mounts(root);
            snap.read_swaps(root);
        }
        snap.netdevs = links_to_functions(&root.class_net_dir());
        // Addresses and routes only for the functions' own interfaces (each address lookup is
        // a netlink dump).
        let mut own_interfaces = false;
        for (ifname, function) in &snap.netdevs {
            if functions.iter().any(|f| f.address == *function) {
                own_interfaces = true;
                snap.addresses
                    .insert(ifname.clone(), provider.addresses(ifname));
            }
        }
        if own_interfaces {
            snap.routes4 = read_routes4(&root.proc_dir().join("net/route"));
            snap.routes6 = read_routes6(&root.proc_dir().join("net/ipv6_route"));
            snap.inet6 = read_inet6(&root.proc_dir().join("net/if_inet6"));
        }
        // Consoles and DRM clients only matter for the boot display.
        if functions.iter().any(|f| f.boot_vga) {
            snap.fb_console = read_fb_console(root);
            snap.drm_nodes = links_to_functions(&root.class_drm_dir());
        }
        snap.read_vfio_devs(root, functions);
        // Walking every process's fds is the costliest read here; skip it when none of the
        // nodes the rules look for can exist.
        if snap.may_have_open_nodes(root, functions) {
            snap.open_files = scan_open_files(&root.proc_dir());
        }
        // A VFIO device fd whose fdinfo does not name its device (kernels before the
        // `vfio-device-syspath` line) may hold any function on vfio-pci. The kernel can say
        // which: the group node of a held device cannot be opened (EBUSY). Probed only when
        // such an fd exists, so a release never opens a group node without cause (an open
        // lasts microseconds, but a VMM opening the group in that instant would fail).
        if snap
            .open_files
            .iter()
            .any(|f| f.target == VFIO_DEVICE_FD && f.device.is_none())
        {
            for group in functions
                .iter()
                .filter(|f| driver_is_vfio(f.driver.as_deref()))
                .filter_map(|f| f.iommu_group)
            {
                if group_node_opens(root, group) {
                    snap.free_groups.insert(group);
                }
            }
        }
        snap
    }

    /// Who holds each of `functions` open through VFIO, as `list`, `show` and `vf list` show
    /// it: "qemu-system-x86 (pid 4242, VM win11)". A read: it never opens a group node, so a
    /// VFIO device fd whose kernel does not say which device it opens is not attributed here
    /// (the guard of a release or verify does attribute it, see [`Self::gather`]).
    pub fn holders(root: &SysfsRoot, functions: &[&PciFunction]) -> HashMap<PciAddress, String> {
        let mut snap = Self::default();
        snap.read_vfio_devs(root, functions);
        if snap.may_have_open_nodes(root, functions) {
            snap.open_files = scan_open_files(&root.proc_dir())
                .into_iter()
                .filter(|f| !(f.target == VFIO_DEVICE_FD && f.device.is_none()))
                .collect();
        }
        functions
            .iter()
            .filter_map(|f| Some((f.address, snap.holder(f)?.who())))
            .collect()
    }

    /// The VFIO device nodes (`/dev/vfio/devices/vfioN`, iommufd) of each function.
    fn read_vfio_devs(&mut self, root: &SysfsRoot, functions: &[&PciFunction]) {
        for f in functions {
            let dir = root.pci_device_attr(f.address, "vfio-dev");
            if let Ok(entries) = std::fs::read_dir(dir) {
                let names = entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                self.vfio_devs.insert(f.address, names);
            }
        }
    }

    /// Whether any process could hold a node the rules look for: a VFIO group node exists only
    /// while some member of the group is on vfio-pci or a variant driver, a VFIO device node
    /// only for a function on one, a DRM node only for a function with one. Each group is read
    /// once; an unreadable group counts as "maybe".
    fn may_have_open_nodes(&self, root: &SysfsRoot, functions: &[&PciFunction]) -> bool {
        let vfio_member = |group: u32| {
            let members = root
                .iommu_groups_dir()
                .join(group.to_string())
                .join("devices");
            std::fs::read_dir(members).map_or(true, |entries| {
                entries.flatten().any(|m| {
                    let driver = read_link_name(&m.path().join("driver")).ok().flatten();
                    driver_is_vfio(driver.as_deref())
                })
            })
        };
        let groups: BTreeSet<u32> = functions.iter().filter_map(|f| f.iommu_group).collect();
        functions.iter().any(|f| {
            driver_is_vfio(f.driver.as_deref())
                || self.vfio_devs.contains_key(&f.address)
                || self.drm_nodes.iter().any(|(_, a)| *a == f.address)
        }) || groups.into_iter().any(vfio_member)
    }

    fn read_mounts(&mut self, root: &SysfsRoot) {
        let proc = root.proc_dir();
        // mountinfo gives the device number, which catches mounts whose source is a symlink
        // or a label; mounts (or /proc/mounts) is the fallback the brief names. PID 1's table
        // first: under systemd's hardening (ProtectHome, PrivateTmp) the daemon has a mount
        // namespace of its own, and what must not be unplugged is what the host has mounted.
        let mountinfo = std::fs::read_to_string(proc.join("1/mountinfo"))
            .or_else(|_| std::fs::read_to_string(proc.join("self/mountinfo")));
        if let Ok(text) = mountinfo {
            for line in text.lines() {
                let fields: Vec<&str> = line.split(' ').collect();
                let Some(dash) = fields.iter().position(|f| *f == "-") else {
                    continue;
                };
                if fields.len() < 5 || fields.len() < dash + 3 {
                    continue;
                }
                self.mounts.push(Mount {
                    dev: Some(fields[2].to_owned()),
                    source: fields[dash + 2].to_owned(),
                    mountpoint: unescape(fields[4]),
                });
            }
        }
        let text = std::fs::read_to_string(proc.join("self/mounts"))
            .or_else(|_| std::fs::read_to_string(proc.join("mounts")))
            .unwrap_or_default();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(source), Some(mountpoint)) = (fields.next(), fields.next()) {
                self.mounts.push(Mount {
                    dev: None,
                    source: source.to_owned(),
                    mountpoint: unescape(mountpoint),
                });
            }
        }
        // Resolve `/dev/disk/by-uuid/...`-style sources through the root's /dev.
        for mount in &mut self.mounts {
            if let Some(rest) = mount.source.strip_prefix('/')
                && let Ok(real) = std::fs::canonicalize(root.root().join(rest))
                && let Some(name) = real.file_name()
            {
                let name = name.to_string_lossy();
                if self.blocks.contains_key(name.as_ref()) {
                    mount.source = format!("/dev/{name}");
                }
            }
        }
    }

    fn read_swaps(&mut self, root: &SysfsRoot) {
        let text = std::fs::read_to_string(root.proc_dir().join("swaps")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            if let (Some(name), Some("partition")) = (fields.next(), fields.next()) {
                self.swaps.push(name.to_owned());
            }
        }
    }

    /// The block device a `/dev/...` source names, if it is one we know.
    fn block_of_source(&self, source: &str) -> Option<&str> {
        let rest = source.strip_prefix("/dev/")?;
        if let Some(dm) = rest.strip_prefix("mapper/") {
            return self
                .blocks
                .iter()
                .find(|(_, b)| b.dm_name.as_deref() == Some(dm))
                .map(|(n, _)| n.as_str());
        }
        let name = rest.rsplit('/').next()?;
        self.blocks.get_key_value(name).map(|(n, _)| n.as_str())
    }

    /// The block devices of `address` and everything stacked on them (partitions are found
    /// directly; dm/md/LVM through `holders`).
    fn block_tree(&self, address: PciAddress) -> BTreeSet<String> {
        let mut seen: BTreeSet<String> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.function == Some(address))
            .map(|(n, _)| n.clone())
            .collect();
        let mut queue: Vec<String> = seen.iter().cloned().collect();
        while let Some(name) = queue.pop() {
            for holder in self
                .blocks
                .get(&name)
                .map(|b| &b.holders)
                .into_iter()
                .flatten()
            {
                if seen.insert(holder.clone()) {
                    queue.push(holder.clone());
                }
            }
        }
        seen
    }

    /// Every finding for `function`, most severe first.
    pub fn check(&self, function: &PciFunction) -> Vec<Finding> {
        let mut findings: Vec<Finding> = [
            rule_bridge(function),
            self.rule_in_use(function),
            self.rule_storage(function),
            self.rule_network(function),
            self.rule_boot_display(function),
        ]
        .into_iter()
        .flatten()
        .collect();
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        findings
    }

    /// Only the in-use rule: what release checks (the device is on vfio-pci already).
    pub fn check_in_use(&self, function: &PciFunction) -> Option<Finding> {
        self.rule_in_use(function)
    }

    /// Storage: a mounted filesystem or active swap on the function's disks or on anything
    /// stacked on them.
    fn rule_storage(&self, function: &PciFunction) -> Option<Finding> {
        let tree = self.block_tree(function.address);
        if tree.is_empty() {
            return None;
        }
        let devs: HashSet<&str> = tree
            .iter()
            .filter_map(|n| self.blocks.get(n)?.dev.as_deref())
            .collect();
        for mount in &self.mounts {
            let by_dev = mount.dev.as_deref().is_some_and(|d| devs.contains(d));
            let by_name = self
                .block_of_source(&mount.source)
                .filter(|n| tree.contains(*n));
            if by_dev || by_name.is_some() {
                let what = by_name.unwrap_or(&mount.source);
                return Some(Finding {
                    severity: Severity::Hard,
                    reason: format!(
                        "it holds the filesystem mounted at {} ({what}); unmount it first \
                         (--force does not override this)",
                        mount.mountpoint
                    ),
                });
            }
        }
        for swap in &self.swaps {
            if let Some(name) = self.block_of_source(swap).filter(|n| tree.contains(*n)) {
                return Some(Finding {
                    severity: Severity::Hard,
                    reason: format!(
                        "it holds active swap on {name}; run swapoff {swap} first \
                         (--force does not override this)"
                    ),
                });
            }
        }
        None
    }

    /// Network: an interface of the function with an address or a route.
    fn rule_network(&self, function: &PciFunction) -> Option<Finding> {
        let hint = "use --force to assign it anyway";
        for (ifname, _) in self.netdevs.iter().filter(|(_, a)| *a == function.address) {
            let soft = |reason: String| Finding {
                severity: Severity::Soft,
                reason: format!("{reason}; {hint}"),
            };
            let v4 = self.routes4.iter().filter(|(i, _)| i == ifname);
            let v6 = self.routes6.iter().filter(|(i, _)| i == ifname);
            let routes: Vec<&String> = v4.chain(v6).map(|(_, d)| d).collect();
            if routes.iter().any(|d| d.as_str() == "default") {
                return Some(soft(format!("it carries the default route via {ifname}")));
            }
            if let Some(dest) = routes.first() {
                return Some(soft(format!("it has a route to {dest} via {ifname}")));
            }
            let mut addrs: Vec<String> = self
                .addresses
                .get(ifname)
                .into_iter()
                .flatten()
                .filter(|a| !is_link_local(a))
                .map(IpAddr::to_string)
                .collect();
            addrs.extend(
                self.inet6
                    .iter()
                    .filter(|(i, _)| i == ifname)
                    .map(|(_, a)| a.clone()),
            );
            if let Some(addr) = addrs.first() {
                return Some(soft(format!("{ifname} has address {addr}")));
            }
        }
        None
    }

    /// Boot display: the console's frame buffer or a DRM client is on it.
    fn rule_boot_display(&self, function: &PciFunction) -> Option<Finding> {
        if !function.boot_vga {
            return None;
        }
        let hint = "use --force to assign it anyway (the local console will go dark)";
        if let Some(console) = &self.fb_console {
            return Some(Finding {
                severity: Severity::Soft,
                reason: format!(
                    "it is the boot display and the console is bound to it ({console}); {hint}"
                ),
            });
        }
        let nodes: Vec<String> = self
            .drm_nodes
            .iter()
            .filter(|(_, a)| *a == function.address)
            .map(|(n, _)| format!("/dev/dri/{n}"))
            .collect();
        self.open_files
            .iter()
            .find(|f| nodes.contains(&f.target))
            .map(|f| Finding {
                severity: Severity::Soft,
                reason: format!(
                    "it is the boot display and {} (pid {}) has {} open; {hint}",
                    f.comm, f.pid, f.target
                ),
            })
    }

    /// The process holding the function's VFIO group or device open, as "comm (pid N)" or
    /// "comm (pid N, VM name)".
    pub fn in_use_by(&self, function: &PciFunction) -> Option<String> {
        self.holder(function).map(OpenFile::who)
    }

    /// In use by a VMM: its group node or its VFIO device node is open somewhere.
    fn rule_in_use(&self, function: &PciFunction) -> Option<Finding> {
        self.holder(function).map(|f| Finding {
            severity: Severity::Busy,
            reason: format!(
                "it is in use by {} through {}; stop that VM or process first",
                f.who(),
                f.target
            ),
        })
    }

    fn holder(&self, function: &PciFunction) -> Option<&OpenFile> {
        let mut nodes = Vec::new();
        if let Some(group) = function.iommu_group {
            nodes.push(format!("/dev/vfio/{group}"));
        }
        for dev in self.vfio_devs.get(&function.address).into_iter().flatten() {
            nodes.push(format!("/dev/vfio/devices/{dev}"));
        }
        let on_vfio = driver_is_vfio(function.driver.as_deref());
        self.open_files.iter().find(|f| {
            nodes.contains(&f.target)
                || (f.target == VFIO_DEVICE_FD
                    && match f.device {
                        Some(device) => device == function.address,
                        // An older kernel does not say which device: it is this one unless
                        // the group node opened (nobody holds the group).
                        None => {
                            on_vfio
                                && !function
                                    .iommu_group
                                    .is_some_and(|g| self.free_groups.contains(&g))
                        }
                    })
        })
    }
}

/// Bridges: vfio-pci refuses them only after their driver is gone, and everything behind one
/// is cut off; refused before anything is touched.
fn rule_bridge(function: &PciFunction) -> Option<Finding> {
    function.is_bridge().then(|| Finding {
        severity: Severity::Hard,
        reason: "it is a PCI bridge (class 0x06); bridges cannot be assigned, assign the \
                 devices behind it instead"
            .into(),
    })
}

/// Turns findings into the request's answer: the most severe finding that applies wins.
pub fn decide(address: PciAddress, findings: &[Finding], force: bool) -> Result<(), Error> {
    for f in findings {
        match f.severity {
            Severity::Busy => return Err(Error::Busy(format!("{address} refused: {}", f.reason))),
            Severity::Hard => {
                return Err(Error::Refused {
                    address,
                    reason: f.reason.clone(),
                });
            }
            Severity::Soft if !force => {
                return Err(Error::Refused {
                    address,
                    reason: f.reason.clone(),
                });
            }
            Severity::Soft => {}
        }
    }
    Ok(())
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_loopback(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_loopback(),
    }
}

/// `\040` → space, as the kernel escapes mount points.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Entries of a class directory (`sys/class/net`, `sys/class/drm`) whose device path runs
/// through a PCI function, with that function (the innermost address in the resolved path).
fn links_to_functions(dir: &Path) -> Vec<(String, PciAddress)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let real = std::fs::canonicalize(e.path()).ok()?;
            let function = *pci_path_components(&real).last()?;
            Some((e.file_name().to_string_lossy().into_owned(), function))
        })
        .collect()
}

fn read_blocks(root: &SysfsRoot) -> HashMap<String, BlockDev> {
    let mut blocks = HashMap::new();
    let dir = root.class_block_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return blocks;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let real: PathBuf = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let holders = std::fs::read_dir(path.join("holders"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|h| h.file_name().to_string_lossy().into_owned())
            .collect();
        blocks.insert(
            name,
            BlockDev {
                function: pci_path_components(&real).last().copied(),
                dev: read_attr(&path.join("dev")).ok().flatten(),
                dm_name: read_attr(&path.join("dm/name")).ok().flatten(),
                holders,
            },
        );
    }
    // Whole disks list holders under sys/block too (the same directory on a real kernel;
    // captured trees may only have one of them).
    if let Ok(entries) = std::fs::read_dir(root.block_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let extra: Vec<String> = std::fs::read_dir(entry.path().join("holders"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|h| h.file_name().to_string_lossy().into_owned())
                .collect();
            let block = blocks.entry(name).or_default();
            for h in extra {
                if !block.holders.contains(&h) {
                    block.holders.push(h);
                }
            }
        }
    }
    blocks
}

/// `/proc/net/route`: (interface, destination) with "default" for 0.0.0.0/0.
fn read_routes4(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask) = (*f.first()?, *f.get(1)?, *f.get(7)?);
            if dest == "00000000" && mask == "00000000" {
                return Some((iface.to_owned(), "default".to_owned()));
            }
            // Little-endian hex, as the kernel prints it on x86 and arm64.
            let ip = u32::from_str_radix(dest, 16).ok()?.swap_bytes();
            let prefix = u32::from_str_radix(mask, 16).ok()?.count_ones();
            Some((
                iface.to_owned(),
                format!("{}/{prefix}", std::net::Ipv4Addr::from(ip)),
            ))
        })
        .collect()
}

/// `/proc/net/ipv6_route`: (interface, destination), skipping link-local and multicast routes
/// every up interface has.
fn read_routes6(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, len, iface) = (*f.first()?, *f.get(1)?, *f.get(9)?);
            let ip = std::net::Ipv6Addr::from(u128::from_str_radix(dest, 16).ok()?);
            let len = u8::from_str_radix(len, 16).ok()?;
            if iface == "lo" || (ip.segments()[0] & 0xffc0) == 0xfe80 || ip.is_multicast() {
                return None;
            }
            let dest = if ip.is_unspecified() && len == 0 {
                "default".to_owned()
            } else {
                format!("{ip}/{len}")
            };
            Some((iface.to_owned(), dest))
        })
        .collect()
}

/// `/proc/net/if_inet6`: (interface, address) for global and site scope addresses.
fn read_inet6(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, scope, iface) = (*f.first()?, *f.get(3)?, *f.get(5)?);
            // 0x20 link, 0x10 host (loopback): not "in use" on the network.
            if scope == "20" || scope == "10" {
                return None;
            }
            let ip = std::net::Ipv6Addr::from(u128::from_str_radix(addr, 16).ok()?);
            Some((iface.to_owned(), ip.to_string()))
        })
        .collect()
}

/// The bound frame-buffer console (`vtconN` with `bind` 1 and a frame-buffer name), if any.
fn read_fb_console(root: &SysfsRoot) -> Option<String> {
    let entries = std::fs::read_dir(root.vtconsole_dir()).ok()?;
    entries.flatten().find_map(|e| {
        let bound = read_attr(&e.path().join("bind")).ok().flatten()? == "1";
        let name = read_attr(&e.path().join("name")).ok().flatten()?;
        (bound && name.contains("frame buffer"))
            .then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// Whether `/dev/vfio/GROUP` opens now, i.e. no process holds the group or one of its devices
/// (the kernel answers EBUSY then). Closed at once. Anything but a successful open (busy, no
/// node, no permission) counts as "maybe held".
fn group_node_opens(root: &SysfsRoot, group: u32) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.vfio_group_node(group))
        .is_ok()
}

/// The function a VFIO device fd opens, from its fdinfo's `vfio-device-syspath: /sys/devices/...`
/// line (the last PCI address in that path).
fn vfio_device_of(fdinfo: &str) -> Option<PciAddress> {
    let path = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("vfio-device-syspath:"))?
        .trim();
    pci_path_components(Path::new(path)).last().copied()
}

/// Open VFIO and DRM nodes of every process (`/proc/PID/fd/N` links), never by opening them,
/// and VFIO device fds held without their group (`anon_inode:[vfio-device]`).
/// Processes we cannot read (gone, or not ours without root) are skipped.
pub fn scan_open_files(proc: &Path) -> Vec<OpenFile> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(proc) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let vfio_device = target == VFIO_DEVICE_FD;
            if vfio_device || target.starts_with("/dev/vfio/") || target.starts_with("/dev/dri/") {
                let comm = comm
                    .get_or_insert_with(|| {
                        read_attr(&entry.path().join("comm"))
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| "?".into())
                    })
                    .clone();
                let device = if vfio_device {
                    let fdinfo = entry.path().join("fdinfo").join(fd.file_name());
                    vfio_device_of(&std::fs::read_to_string(fdinfo).unwrap_or_default())
                } else {
                    None
                };
                let vm = std::fs::read(entry.path().join("cmdline"))
                    .ok()
                    .and_then(|c| vm_name(&c));
                found.push(OpenFile {
                    pid,
                    comm,
                    target: target.into_owned(),
                    device,
                    vm,
                });
            }
        }
    }
    found.sort_by_key(|f| f.pid);
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_kernel_route_and_address_tables() {
        let dir = tempfile::tempdir().unwrap();
        let route = dir.path().join("route");
        std::fs::write(
            &route,
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             enp0s3\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             enp0s3\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
        )
        .unwrap();
        assert_eq!(
            read_routes4(&route),
            vec![
                ("enp0s3".into(), "default".into()),
                ("enp0s3".into(), "10.0.2.0/24".into())
            ]
        );
        let v6 = dir.path().join("ipv6_route");
        std::fs::write(
            &v6,
            "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 \
             00000000000000000000000000000000 00000100 00000001 00000000 00000001 enp0s3\n\
             00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
             fe800000000000000000000000000001 00000400 00000001 00000000 00000003 enp0s4\n",
        )
        .unwrap();
        assert_eq!(read_routes6(&v6), vec![("enp0s4".into(), "default".into())]);
        let inet6 = dir.path().join("if_inet6");
        std::fs::write(
            &inet6,
            "fe80000000000000505400fffe123456 02 40 20 80 enp0s3\n\
             20010db8000000000000000000000001 03 40 00 80 enp0s5\n",
        )
        .unwrap();
        assert_eq!(
            read_inet6(&inet6),
            vec![("enp0s5".into(), "2001:db8::1".into())]
        );
        assert_eq!(unescape("/mnt/my\\040disk"), "/mnt/my disk");
    }

    #[test]
    fn vm_names_come_from_qemu_command_lines() {
        let qemu = b"qemu-system-x86_64\0-name\0guest=win11,debug-threads=on\0-m\x004096\0";
        assert_eq!(vm_name(qemu).as_deref(), Some("win11"));
        assert_eq!(vm_name(b"qemu\0-name\0plain\0").as_deref(), Some("plain"));
        assert_eq!(vm_name(b"sleep\x00100\0"), None);
        assert_eq!(vm_name(b"qemu\0-name\0"), None);
        assert_eq!(
            vm_name(b"qemu\0-name\0guest=a,,b,debug-threads=on\0").as_deref(),
            Some("a,b")
        );
    }

    #[test]
    fn force_overrides_only_soft_findings() {
        let a: PciAddress = "0000:00:03.0".parse().unwrap();
        let soft = Finding {
            severity: Severity::Soft,
            reason: "x".into(),
        };
        let hard = Finding {
            severity: Severity::Hard,
            reason: "y".into(),
        };
        assert!(decide(a, std::slice::from_ref(&soft), false).is_err());
        assert!(decide(a, std::slice::from_ref(&soft), true).is_ok());
        assert!(decide(a, &[hard], true).is_err());
    }
}
