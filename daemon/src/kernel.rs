//! The one seam for kernel-facing writes. `SysfsKernel` writes the live sysfs under a root; the
//! simulated kernel (`sim.rs`) stands in for tests and reacts to writes as the real one does.

use std::io;
use std::path::Path;

/// Kernel-facing side effects. Reads go straight to the filesystem under the sysfs root; only
/// writes (and module loading) pass through here.
pub trait Kernel: Send + Sync + std::fmt::Debug {
    /// Writes `value` to an existing sysfs attribute in one write(2), as `echo` would.
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()>;
    /// Loads a module from the allowlist (`vfio-pci` and friends); a caller never names one.
    fn load_module(&self, module: &str) -> io::Result<()>;
}
