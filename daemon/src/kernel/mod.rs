//! The one seam for kernel-facing writes. `SysfsKernel` writes the live sysfs under a root; the
//! simulated kernel (`sim.rs`) stands in for tests and reacts to writes as the real one does.
//! VFIO access (opening a device as a VMM does, resetting it) is its own seam, [`vfio::Vfio`].

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::process::Command;

pub mod driver;
pub mod events;
pub mod sriov;
pub mod sysfs;
pub mod vfio;

/// Modules the daemon may load. A caller never chooses what gets modprobed: the engine asks
/// for one of these constants, and anything else is refused here as well.
pub const MODULE_ALLOWLIST: &[&str] = &["vfio-pci", "pci-stub"];

/// Kernel-facing side effects. Reads go straight to the filesystem under the sysfs root; only
/// writes (and module loading) pass through here.
pub trait Kernel: Send + Sync + std::fmt::Debug {
    /// Writes `value` to an existing sysfs attribute in one write(2), as `echo` would.
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()>;
    /// Loads a module from the allowlist (`vfio-pci` and friends); a caller never names one.
    fn load_module(&self, module: &str) -> io::Result<()>;
}

/// The real kernel: sysfs writes and `modprobe`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysfsKernel;

impl Kernel for SysfsKernel {
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        // No create, no truncate: a missing attribute must fail (ENOENT), never become a
        // regular file, and sysfs stores take the whole value from one write(2).
        let mut file = OpenOptions::new().write(true).open(path)?;
        let written = file.write(value)?;
        if written != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes", value.len()),
            ));
        }
        Ok(())
    }

    fn load_module(&self, module: &str) -> io::Result<()> {
        check_module(module)?;
        let output = Command::new("modprobe").arg(module).output()?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(io::Error::other(format!(
                "modprobe {module} failed ({}): {}",
                output.status,
                stderr.lines().next().unwrap_or("no message")
            )))
        }
    }
}

/// Refuses any module name outside [`MODULE_ALLOWLIST`].
pub fn check_module(module: &str) -> io::Result<()> {
    if MODULE_ALLOWLIST.contains(&module) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("module {module:?} is not on the allowlist"),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn writes_existing_attributes_only_and_in_one_piece() {
        let dir = tempfile::tempdir().unwrap();
        let attr = dir.path().join("driver_override");
        std::fs::write(&attr, "0123456789\n").unwrap();
        SysfsKernel.write(&attr, b"vfio-pci").unwrap();
        // Not truncated first: on a regular file the old tail stays, proving no O_TRUNC.
        assert_eq!(std::fs::read_to_string(&attr).unwrap(), "vfio-pci89\n");
        let missing = dir.path().join("absent");
        let err = SysfsKernel.write(&missing, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!missing.exists(), "a write must never create an attribute");
    }

    #[test]
    fn refuses_modules_off_the_allowlist() {
        let err = SysfsKernel.load_module("evil; rm -rf /").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(check_module("vfio-pci").is_ok());
    }
}
