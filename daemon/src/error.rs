//! The daemon's error type. Each variant is one kind of failure; [`Error::kind`] says what a
//! caller can do about it, the D-Bus boundary maps each kind to one
//! `org.passthroughd.Passthrough1.Error.*` name (see [`ErrorKind::dbus_name`]) and the CLI maps
//! those to exit codes.
//!
//! Messages are one line: what failed and why, plus a hint when there is an obvious fix. A
//! failed operation that was rolled back keeps its cause as a typed value next to what the
//! rollback did, so callers (and tests) can still tell why it failed.

use std::path::PathBuf;
use std::time::Duration;

use passthroughd_proto::PciAddress;

use crate::kernel::sysfs::ReadError;
use crate::observe::inventory::InventoryError;

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
    /// Another operation holds the device or group, a VM has it open, or the kernel has not
    /// answered yet (exit 5).
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

/// A failed daemon operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no PCI function {0}")]
    NoSuchDevice(PciAddress),
    #[error("{0}")]
    InvalidArgument(String),
    /// `LeaseEnd` of an owner that holds nothing.
    #[error("{0} holds no lease")]
    NoLease(passthroughd_proto::LeaseOwner),
    #[error("{address} refused: {reason}")]
    Refused { address: PciAddress, reason: String },
    /// Another request holds the group, or a process holds the device.
    #[error("{0}")]
    Busy(String),
    #[error("not authorized: {0}")]
    PermissionDenied(String),
    /// The request waited past its caller's deadline and was dropped before it changed anything.
    #[error("{0} was dropped before it started: its caller had stopped waiting; nothing changed")]
    Cancelled(&'static str),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The kernel refused a sysfs write (or modprobe failed).
    #[error("{what}: {source}")]
    Write {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A sysfs write has not returned within the time limit. The operation is not abandoned:
    /// it keeps its locks and journal and finishes (or is undone) when the kernel returns.
    #[error(
        "{what} did not finish within {}; the kernel is probably waiting for a process (a VM) to \
         close the device. The operation goes on and completes when the kernel returns \
         (passthroughctl status shows it as pending)",
        seconds(*.waited)
    )]
    Stalled { what: String, waited: Duration },
    /// A probe bound another driver than the one asked for, or none.
    #[error("probing {address} with driver_override={wanted} bound {}", match got {
        Some(d) => format!("{d} instead"),
        None => "nothing".to_owned(),
    })]
    WrongDriver {
        address: PciAddress,
        wanted: String,
        got: Option<String>,
    },
    #[error("{address} disappeared during the operation (hot-unplug?): {cause}")]
    Vanished {
        address: PciAddress,
        cause: Box<Error>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A step on a VF failed; `step` names it ("binding VF 2 of 0000:05:00.0").
    #[error("{cause} ({step})")]
    InStep { step: String, cause: Box<Error> },
    /// A step failed and every step done before it was undone; `undone` says what was put
    /// back ("; it is back on igb").
    #[error("{cause}{undone}")]
    RolledBack { cause: Box<Error>, undone: String },
    /// A step failed and putting things back failed too. The plan stays journaled: it is
    /// undone before its groups are used again, or at the next start.
    #[error("{cause}; putting it back also failed: {undo}")]
    RollbackFailed { cause: Box<Error>, undo: Box<Error> },
    /// An operation could not be undone earlier and still cannot; nothing new may use its
    /// devices until it is.
    #[error(
        "an earlier {operation} on {on} could not be undone and still cannot: {cause}; see \
         passthroughctl status"
    )]
    Unfinished {
        operation: String,
        on: String,
        cause: Box<Error>,
    },
    /// A plan journaled by a daemon that died could neither be finished nor undone.
    #[error("{subject}: the interrupted {operation} could neither be finished nor undone: {cause}")]
    Recovery {
        subject: String,
        operation: String,
        cause: Box<Error>,
    },
    /// Opening or resetting a device through VFIO failed.
    #[error(transparent)]
    Vfio(#[from] crate::kernel::vfio::VfioError),
    #[error("starting a thread for the operation")]
    Thread(#[source] std::io::Error),
    #[error("encoding the reply")]
    Encode(#[source] passthroughd_proto::wire::WireError),
    /// A fact about the host that makes the operation impossible.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoSuchDevice(_) | Self::NoLease(_) => ErrorKind::NotFound,
            Self::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Self::Refused { .. } => ErrorKind::Refused,
            Self::Busy(_) | Self::Cancelled(_) | Self::Stalled { .. } => ErrorKind::Busy,
            Self::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Self::RolledBack { cause, .. } | Self::InStep { cause, .. } => cause.kind(),
            Self::Vfio(e) => e.kind(),
            Self::Inventory(_)
            | Self::Read(_)
            | Self::Write { .. }
            | Self::WrongDriver { .. }
            | Self::Vanished { .. }
            | Self::Store(_)
            | Self::RollbackFailed { .. }
            | Self::Unfinished { .. }
            | Self::Recovery { .. }
            | Self::Thread(_)
            | Self::Encode(_)
            | Self::Failed(_) => ErrorKind::Failed,
        }
    }

    /// The error a rolled-back operation failed with (itself for any other error).
    pub fn cause(&self) -> &Error {
        match self {
            Self::RolledBack { cause, .. }
            | Self::RollbackFailed { cause, .. }
            | Self::InStep { cause, .. } => cause.cause(),
            other => other,
        }
    }

    /// Whether the failure says "this device is gone", directly or as the root cause.
    pub fn is_vanished(&self) -> bool {
        matches!(self.cause(), Self::Vanished { .. } | Self::NoSuchDevice(_))
    }
}

/// A failure reading or writing the daemon's own files (state.toml, the journal).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that exists but cannot be used as it is (unknown version, bad syntax).
    #[error("{} is unusable: {why}", path.display())]
    Unusable { path: PathBuf, why: String },
}

/// "what failed: why: root cause" on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Some messages already include their cause; do not say it twice.
        let cause_text = cause.to_string();
        if !line.ends_with(&cause_text) {
            line.push_str(": ");
            line.push_str(&cause_text);
        }
        source = cause.source();
    }
    line
}

/// "30 s", or "300 ms" for limits under a second.
pub fn seconds(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
