//! The daemon's error type. Each variant is one kind of failure a caller can act on; the D-Bus
//! boundary maps each kind to one `org.passthroughd.Passthrough1.Error.*` name (see
//! [`ErrorKind::dbus_name`]) and the CLI maps those to exit codes.

use passthroughd_proto::PciAddress;

/// What a caller can do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed or contradictory input (exit 2).
    InvalidArgument,
    /// Caller lacks root or polkit authorization (exit 3).
    PermissionDenied,
    /// No such device (exit 4).
    NotFound,
    /// A safety rule said no (exit 5).
    Refused,
    /// Another operation holds the device or group, or a VM has it open (exit 5).
    Busy,
    /// The kernel or the filesystem failed us (exit 1).
    Failed,
}

impl ErrorKind {
    /// The D-Bus error name suffix after `org.passthroughd.Passthrough1.Error.`.
    pub fn dbus_name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "InvalidArgument",
            Self::PermissionDenied => "PermissionDenied",
            Self::NotFound => "NotFound",
            Self::Refused => "Refused",
            Self::Busy => "Busy",
            Self::Failed => "Failed",
        }
    }
}

/// A failed daemon operation. Messages are one line: what failed and why, plus a hint when there
/// is an obvious fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no PCI function {0}")]
    NoSuchDevice(PciAddress),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{address} refused: {reason}")]
    Refused { address: PciAddress, reason: String },
    #[error("{0}")]
    Busy(String),
    #[error("not authorized: {0}")]
    PermissionDenied(String),
    #[error(transparent)]
    Inventory(#[from] crate::InventoryError),
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

/// A failed sysfs read during an operation: the path and the errno, on one line.
impl From<crate::kernel::sysfs::ReadError> for Error {
    fn from(e: crate::kernel::sysfs::ReadError) -> Self {
        Self::Failed(format!("{e}: {}", e.source))
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoSuchDevice(_) => ErrorKind::NotFound,
            Self::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Self::Refused { .. } => ErrorKind::Refused,
            Self::Busy(_) => ErrorKind::Busy,
            Self::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Self::Inventory(_) | Self::Kernel { .. } | Self::Failed(_) => ErrorKind::Failed,
        }
    }
}
