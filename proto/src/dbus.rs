//! The D-Bus contract between `passthroughd` and its clients: names, the `Manager` proxy, the
//! error names clients can match, which bus to talk on, and the CLI exit code of each failure.
//!
//! Wire form: addresses travel as strings (the daemon parses each with [`crate::PciAddress`]
//! before use); options are plain booleans; results are `a{sv}` dictionaries of the model types
//! (see [`crate::wire`]) in which an absent value is an absent key, so new keys can be added
//! without changing a method's signature.

use std::fmt;
use std::str::FromStr;

use zbus::DBusError;

use crate::wire::{Dict, FunctionRow};

/// The daemon's well-known bus name.
pub const SERVICE: &str = "org.passthroughd.Passthrough1";
/// Object path of the manager.
pub const PATH: &str = "/org/passthroughd/Passthrough1";
/// The manager interface.
pub const INTERFACE: &str = "org.passthroughd.Passthrough1.Manager";
/// Prefix of every error name the daemon returns.
pub const ERROR_PREFIX: &str = "org.passthroughd.Passthrough1.Error";
/// The polkit action that guards every mutating method.
pub const ACTION_MANAGE_DEVICES: &str = "org.passthroughd.manage-devices";

/// The manager interface, as a client sees it.
#[zbus::proxy(
    interface = "org.passthroughd.Passthrough1.Manager",
    default_service = "org.passthroughd.Passthrough1",
    default_path = "/org/passthroughd/Passthrough1",
    gen_blocking = false
)]
pub trait Manager {
    /// Every PCI function, sorted by address, one struct row each (see [`FunctionRow`]).
    fn list_functions(&self) -> Result<Vec<FunctionRow>, Error>;

    /// Every IOMMU group, sorted by number ([`crate::IommuGroup`] each).
    fn list_groups(&self) -> Result<Vec<Dict>, Error>;

    /// One function in full, with its passthrough readiness ([`crate::vfio::FunctionDetail`]).
    fn show(&self, address: &str) -> Result<Dict, Error>;

    /// The function opened through VFIO as a VMM would ([`crate::vfio::VerifyReport`]).
    fn verify(&self, address: &str) -> Result<Dict, Error>;

    /// Binds each function (with `group`, its whole IOMMU group) to vfio-pci, all or nothing.
    /// Returns the functions whose driver changed ([`crate::Change`] each).
    fn assign(
        &self,
        addresses: &[&str],
        runtime: bool,
        group: bool,
        force: bool,
    ) -> Result<Vec<Dict>, Error>;

    /// Returns each function to the driver it had before assignment; with `reset`, resets it
    /// through VFIO first (a function that cannot be reset stays on vfio-pci: Refused).
    fn release(&self, addresses: &[&str], runtime: bool, reset: bool) -> Result<Vec<Dict>, Error>;

    /// Daemon version, uptime, assignments and where they come from, the config, operations
    /// in flight and recent errors ([`crate::Status`]).
    fn status(&self) -> Result<Dict, Error>;

    /// The host capability report of the root the daemon reads (no authorization needed;
    /// [`crate::HostReport`]).
    fn host(&self) -> Result<Dict, Error>;

    /// Creates `count` VFs on `pf` (through 0 when it has another count); with `assign` they go
    /// straight to vfio-pci without a host VF driver ever probing them. A resize that would take
    /// an assigned VF off vfio-pci needs `force`. Returns the VFs ([`crate::VfInfo`] each).
    fn vf_create(
        &self,
        pf: &str,
        count: u32,
        assign: bool,
        runtime: bool,
        force: bool,
    ) -> Result<Vec<Dict>, Error>;

    /// Removes every VF of `pf` (`force`: even assigned ones; never in-use ones).
    fn vf_destroy(&self, pf: &str, force: bool) -> Result<Vec<Dict>, Error>;

    /// Every VF of `pf`: index, address, driver, group, assignment, in-use holder.
    fn vf_list(&self, pf: &str) -> Result<Vec<Dict>, Error>;

    /// Reconciles the host with the declarative config and the stored requests; with
    /// `dry_run`, only says what it would do ([`crate::ApplyReport`]).
    fn apply(&self, dry_run: bool) -> Result<Dict, Error>;

    /// Re-reads the config file; a broken file keeps the last good config in force
    /// ([`crate::ConfigState`], with the error).
    fn reload(&self) -> Result<Dict, Error>;

    /// Takes a lease for `owner` (`libvirt:DOMAIN`, `k8s:CLAIM-UID`, `vmm:NAME`) on every
    /// function of `addresses`, all or nothing. Returns the functions whose driver changed.
    fn lease_start(&self, owner: &str, addresses: &[&str]) -> Result<Vec<Dict>, Error>;

    /// Ends the lease of `owner` (`NotFound` when it holds none). Returns the changes.
    fn lease_end(&self, owner: &str) -> Result<Vec<Dict>, Error>;

    /// Every lease ([`crate::LeaseInfo`] each).
    fn list_leases(&self) -> Result<Vec<Dict>, Error>;

    /// The VFs of `pf` changed; `count` is how many it has now.
    #[zbus(signal)]
    fn vfs_changed(&self, pf: &str, count: u32) -> zbus::Result<()>;

    /// A function's driver changed; an empty string means "no driver".
    #[zbus(signal)]
    fn driver_changed(&self, address: &str, old: &str, new: &str) -> zbus::Result<()>;

    /// A function was assigned (`true`) or released (`false`).
    #[zbus(signal)]
    fn assignment_changed(&self, address: &str, assigned: bool) -> zbus::Result<()>;
}

/// The errors the daemon returns, by name (`org.passthroughd.Passthrough1.Error.NotFound`, ...).
/// Each carries the one-line message the daemon wrote.
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.passthroughd.Passthrough1.Error", impl_display = false)]
pub enum Error {
    /// Transport failures and error names outside our prefix.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No such device.
    NotFound(String),
    /// Malformed or contradictory input.
    InvalidArgument(String),
    /// Neither root nor authorized by polkit.
    PermissionDenied(String),
    /// Another operation (or a VM) holds the device, or the operation timed out.
    Busy(String),
    /// A safety rule said no.
    Refused(String),
    /// The kernel or the filesystem failed.
    Failed(String),
}

impl Error {
    /// The error for a name suffix as returned by the daemon's `ErrorKind::dbus_name`
    /// (`"NotFound"`, ...); unknown suffixes become `Failed`.
    pub fn from_kind_name(name: &str, message: String) -> Self {
        match name {
            "NotFound" => Self::NotFound(message),
            "InvalidArgument" => Self::InvalidArgument(message),
            "PermissionDenied" => Self::PermissionDenied(message),
            "Busy" => Self::Busy(message),
            "Refused" => Self::Refused(message),
            _ => Self::Failed(message),
        }
    }

    /// The CLI exit code for this failure (docs/cli.md, "Errors and exit status").
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotFound(_) => exit::NOT_FOUND,
            Self::InvalidArgument(_) => exit::INVALID,
            Self::PermissionDenied(_) => exit::PERMISSION,
            Self::Busy(_) | Self::Refused(_) => exit::REFUSED,
            Self::Failed(_) => exit::FAILED,
            Self::ZBus(e) => exit::for_transport(e),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZBus(zbus::Error::MethodError(name, Some(message), _)) => {
                write!(f, "{message} ({name})")
            }
            Self::ZBus(e) => write!(f, "{e}"),
            Self::NotFound(m)
            | Self::InvalidArgument(m)
            | Self::PermissionDenied(m)
            | Self::Busy(m)
            | Self::Refused(m)
            | Self::Failed(m) => f.write_str(m),
        }
    }
}

/// Exit codes of `passthroughctl` (docs/cli.md, "Errors and exit status"), in one place.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The operation failed.
    pub const FAILED: u8 = 1;
    /// Bad usage or invalid input.
    pub const INVALID: u8 = 2;
    /// Permission denied.
    pub const PERMISSION: u8 = 3;
    /// No such device.
    pub const NOT_FOUND: u8 = 4;
    /// Refused: a safety rule, busy, in use.
    pub const REFUSED: u8 = 5;
    /// The daemon (or the bus) cannot be reached (sysexits EX_UNAVAILABLE).
    pub const UNREACHABLE: u8 = 69;

    /// Exit code of a failure below our error names: the bus, the connection, the socket.
    pub fn for_transport(error: &zbus::Error) -> u8 {
        match error {
            zbus::Error::MethodError(name, _, _) => match name.as_str() {
                "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner"
                | "org.freedesktop.DBus.Error.NoServer"
                | "org.freedesktop.DBus.Error.Disconnected"
                | "org.freedesktop.DBus.Error.Spawn.ChildExited"
                | "org.freedesktop.DBus.Error.Spawn.ServiceNotFound" => UNREACHABLE,
                "org.freedesktop.DBus.Error.AccessDenied" => PERMISSION,
                "org.freedesktop.DBus.Error.InvalidArgs" => INVALID,
                _ => FAILED,
            },
            zbus::Error::FDO(e) => match e.as_ref() {
                zbus::fdo::Error::ServiceUnknown(_)
                | zbus::fdo::Error::NameHasNoOwner(_)
                | zbus::fdo::Error::NoServer(_)
                | zbus::fdo::Error::Disconnected(_) => UNREACHABLE,
                zbus::fdo::Error::AccessDenied(_) => PERMISSION,
                zbus::fdo::Error::InvalidArgs(_) => INVALID,
                _ => FAILED,
            },
            zbus::Error::InputOutput(_) | zbus::Error::Handshake(_) | zbus::Error::Address(_) => {
                UNREACHABLE
            }
            _ => FAILED,
        }
    }
}

/// Which bus to use: `system`, `session`, or a D-Bus address (`unix:path=/run/x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    Session,
    Address(String),
}

impl FromStr for Bus {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "system" => Ok(Self::System),
            "session" => Ok(Self::Session),
            // A D-Bus address is `transport:key=value,...`.
            _ if text.contains(':') && text.contains('=') => Ok(Self::Address(text.to_owned())),
            _ => Err(format!(
                "{text:?} is neither \"system\", \"session\" nor a D-Bus address such as unix:path=/run/bus"
            )),
        }
    }
}

impl fmt::Display for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::System => f.write_str("system"),
            Self::Session => f.write_str("session"),
            Self::Address(a) => f.write_str(a),
        }
    }
}

impl Bus {
    /// A connection builder for this bus (a bus connection, never peer-to-peer).
    pub fn builder(&self) -> zbus::Result<zbus::connection::Builder<'static>> {
        match self {
            Self::System => zbus::connection::Builder::system(),
            Self::Session => zbus::connection::Builder::session(),
            Self::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_carry_the_prefix() {
        let e = Error::NotFound("no PCI function 0000:01:00.0".into());
        assert_eq!(
            e.name().as_str(),
            "org.passthroughd.Passthrough1.Error.NotFound"
        );
        assert_eq!(e.to_string(), "no PCI function 0000:01:00.0");
        for (kind, code) in [
            ("NotFound", 4),
            ("InvalidArgument", 2),
            ("PermissionDenied", 3),
            ("Busy", 5),
            ("Refused", 5),
            ("Failed", 1),
            ("SomethingNew", 1),
        ] {
            let e = Error::from_kind_name(kind, String::new());
            assert_eq!(e.exit_code(), code, "{kind}");
            if kind != "SomethingNew" {
                assert_eq!(e.name().as_str(), format!("{ERROR_PREFIX}.{kind}"));
            }
        }
    }

    #[test]
    fn method_errors_map_back_to_variants() {
        let name =
            zbus::names::OwnedErrorName::try_from(format!("{ERROR_PREFIX}.Refused")).unwrap();
        let raw = zbus::Error::MethodError(name, Some("no".into()), dummy_message());
        assert!(matches!(Error::from(raw), Error::Refused(m) if m == "no"));
    }

    fn dummy_message() -> zbus::message::Message {
        zbus::message::Message::method_call("/", "Ping")
            .unwrap()
            .build(&())
            .unwrap()
    }

    #[test]
    fn bus_flag() {
        assert_eq!("system".parse::<Bus>(), Ok(Bus::System));
        assert_eq!("session".parse::<Bus>(), Ok(Bus::Session));
        assert_eq!(
            "unix:path=/tmp/x".parse::<Bus>(),
            Ok(Bus::Address("unix:path=/tmp/x".into()))
        );
        assert!("sytem".parse::<Bus>().is_err());
    }
}
