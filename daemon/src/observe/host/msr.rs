//! Model-specific registers, read the way `rdmsr` does: 8 bytes at offset MSR of
//! `/dev/cpu/N/msr` (the `msr` module's device, root only), with `pread` (`FileExt::read_at`).
//!
//! Fixtures cannot hold AMD's VM_CR (offset 0xc001_0114, a 3 GiB sparse file git would store
//! whole), so the read is behind [`MsrSource`]; fixture trees give their values in `msr.toml`
//! ([`FixedMsrs`]) and the live host uses [`DevCpuMsr`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::kernel::sysfs::SysfsRoot;

/// IA32_FEATURE_CONTROL (Intel): bit 0 lock, bit 1 VMX inside SMX (TXT measured launch), bit 2
/// VMX outside SMX.
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
pub const FEATURE_CONTROL_VMX_INSIDE_SMX: u64 = 1 << 1;
pub const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// VMX capability MSRs (Intel SDM vol. 3, appendix A.3): the high 32 bits are the allowed-1
/// settings, the controls the CPU can turn on. The kernel builds cpuinfo's `vmx flags` from them.
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
/// Allowed-1 bits (already shifted into the high half) of those MSRs.
pub const PIN_POSTED_INTERRUPTS: u64 = 1 << (32 + 7);
pub const PROC_TPR_SHADOW: u64 = 1 << (32 + 21);
pub const PROC_SECONDARY_CONTROLS: u64 = 1 << (32 + 31);
pub const PROC2_APIC_REGISTER_VIRT: u64 = 1 << (32 + 8);
pub const PROC2_VIRTUAL_INTR_DELIVERY: u64 = 1 << (32 + 9);
pub const PROC2_VMCS_SHADOWING: u64 = 1 << (32 + 14);
/// VM_CR (AMD): bit 4 SVMDIS, set by firmware that disabled SVM.
pub const VM_CR: u32 = 0xc001_0114;
pub const VM_CR_SVMDIS: u64 = 1 << 4;

/// Reads MSRs of CPU 0.
pub trait MsrSource: std::fmt::Debug + Sync {
    /// The value of MSR `index`, or why it could not be read (one line, for evidence).
    fn read(&self, index: u32) -> Result<u64, String>;
    /// Where the values come from, for evidence (`/dev/cpu/0/msr`).
    fn describe(&self) -> String;
}

/// `ROOT/dev/cpu/0/msr`, read with pread. Any regular file works too (a test's sparse file).
#[derive(Debug, Clone)]
pub struct DevCpuMsr {
    path: PathBuf,
    shown: String,
}

impl DevCpuMsr {
    pub fn new(root: &SysfsRoot) -> Self {
        let path = root.dev_path("cpu/0/msr");
        let shown = super::shown(root, &path);
        Self { path, shown }
    }
}

impl MsrSource for DevCpuMsr {
    fn read(&self, index: u32) -> Result<u64, String> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "{} absent (msr module not loaded: modprobe msr)",
                    self.shown
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(format!("{} not readable (needs root)", self.shown));
            }
            Err(e) => return Err(format!("{}: {e}", self.shown)),
        };
        let mut buf = [0u8; 8];
        match file.read_exact_at(&mut buf, u64::from(index)) {
            Ok(()) => Ok(u64::from_le_bytes(buf)),
            // The msr driver answers EIO for an MSR the CPU does not implement.
            Err(e) => Err(format!("{} offset {index:#x}: {e}", self.shown)),
        }
    }

    fn describe(&self) -> String {
        self.shown.clone()
    }
}

/// Fixed values, from a fixture's `msr.toml`:
///
/// ```toml
/// # what `rdmsr` would print on CPU 0
/// [msr]
/// "0x3a" = 0x5
/// ```
#[derive(Debug, Clone, Default)]
pub struct FixedMsrs {
    values: BTreeMap<u32, u64>,
    origin: String,
}

#[derive(Debug, serde::Deserialize)]
struct MsrToml {
    #[serde(default)]
    msr: BTreeMap<String, u64>,
}

impl FixedMsrs {
    pub fn new(origin: impl Into<String>, values: impl IntoIterator<Item = (u32, u64)>) -> Self {
        Self {
            values: values.into_iter().collect(),
            origin: origin.into(),
        }
    }

    /// Parses `msr.toml`; keys are MSR numbers in hex (`"0x3a"`) or decimal.
    pub fn from_toml(origin: impl Into<String>, text: &str) -> Result<Self, String> {
        let doc: MsrToml = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut values = BTreeMap::new();
        for (key, value) in doc.msr {
            let index = match key.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => key.parse(),
            }
            .map_err(|_| format!("bad MSR number {key:?}"))?;
            values.insert(index, value);
        }
        Ok(Self {
            values,
            origin: origin.into(),
        })
    }
}

impl MsrSource for FixedMsrs {
    fn read(&self, index: u32) -> Result<u64, String> {
        self.values
            .get(&index)
            .copied()
            .ok_or_else(|| format!("{}: no MSR {index:#x}", self.origin))
    }

    fn describe(&self) -> String {
        self.origin.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_eight_little_endian_bytes_at_the_msr_offset_with_pread() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("dev/cpu/0")).unwrap();
        let file = File::create(dir.path().join("dev/cpu/0/msr")).unwrap();
        // Sparse: only the 8 bytes at 0x3a are written.
        file.write_all_at(&0x5u64.to_le_bytes(), 0x3a).unwrap();
        let msr = DevCpuMsr::new(&SysfsRoot::new(dir.path()));
        assert_eq!(msr.read(IA32_FEATURE_CONTROL), Ok(0x5));
        assert!(msr.read(0x1000).unwrap_err().contains("offset 0x1000"));
        assert_eq!(msr.describe(), "/dev/cpu/0/msr");
        let none = DevCpuMsr::new(&SysfsRoot::new(dir.path().join("nowhere")));
        assert!(none.read(0x3a).unwrap_err().contains("modprobe msr"));
    }

    #[test]
    fn parses_msr_toml() {
        let m = FixedMsrs::from_toml("msr.toml", "[msr]\n\"0x3a\" = 0x5\n\"3221291284\" = 16\n")
            .unwrap();
        assert_eq!(m.read(0x3a), Ok(5));
        assert_eq!(m.read(VM_CR), Ok(16));
        assert!(m.read(0x10).is_err());
        assert!(FixedMsrs::from_toml("x", "[msr]\n\"zz\" = 1\n").is_err());
    }
}
