//! The libvirt hook (`/etc/libvirt/hooks/qemu.d/passthroughd`): libvirt runs it as
//! `HOOK DOMAIN OPERATION SUB-OPERATION EXTRA` with the domain XML on stdin.
//!
//! `prepare begin` turns every `<hostdev mode='subsystem' type='pci' managed='no'>` (and every
//! `<interface type='hostdev' managed='no'>`) source address into one lease for the domain;
//! `release end` ends the domain's lease. Everything else exits 0 at once without reading stdin
//! (libvirt ignores a hook that closes stdin early). `managed='yes'` devices are libvirt's own
//! business and left alone. A domain with no unmanaged PCI device never contacts the daemon, so a
//! stopped daemon cannot stop VMs it has nothing to do with.

use std::io::Read;
use std::time::Duration;

use passthroughd_proto::Change;
use passthroughd_proto::dbus::{self, ManagerProxy, exit};
use passthroughd_proto::domain_xml::{domain_devices, read_xml};
use passthroughd_proto::lease::LeaseOwner;

use crate::Failure;

/// How long an end asked for after a start was given up on may take to be answered; the
/// daemon carries it out even when the hook stops waiting.
const END_AFTER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a hook call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    /// `prepare begin`: take the lease before QEMU starts.
    Start,
    /// `release end`: the domain is gone; end its lease.
    End,
    /// Anything else: nothing to do.
    Nothing,
}

impl HookAction {
    pub fn of(operation: &str, sub_operation: &str) -> Self {
        match (operation, sub_operation) {
            ("prepare", "begin") => Self::Start,
            ("release", "end") => Self::End,
            _ => Self::Nothing,
        }
    }
}

/// One hook call: what it did, as a line for libvirt's log, or why the VM must not start.
pub async fn hook(
    connect: impl AsyncFnOnce() -> Result<ManagerProxy<'static>, Failure>,
    domain: &str,
    action: HookAction,
    input: impl Read,
    timeout: Duration,
) -> Result<String, Failure> {
    if action == HookAction::Nothing {
        return Ok(String::new());
    }
    let owner: LeaseOwner = format!("libvirt:{domain}")
        .parse()
        .map_err(|e| Failure::invalid(format!("domain {domain:?}"), format!("{e}")))?;
    let what = format!("passthroughd hook for domain {domain}");
    let devices = read_xml(input).and_then(|xml| domain_devices(&xml));
    let devices = match (action, devices) {
        (_, Ok(devices)) if devices.domain != domain => {
            return Err(Failure::invalid(
                what,
                format!("the XML on stdin is for domain {:?}", devices.domain),
            ));
        }
        (_, Ok(devices)) => Some(devices),
        (HookAction::Start, Err(e)) => return Err(Failure::invalid(what, e.to_string())),
        // The end of a domain whose XML we cannot read: end whatever it holds.
        (_, Err(_)) => None,
    };
    if devices.as_ref().is_some_and(|d| d.functions.is_empty()) {
        return Ok(String::new());
    }
    let proxy = connect().await?;
    match action {
        HookAction::Start => {
            let functions = devices.map(|d| d.functions).unwrap_or_default();
            let addresses: Vec<String> = functions.iter().map(ToString::to_string).collect();
            let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
            let owner_text = owner.to_string();
            match tokio::time::timeout(timeout, proxy.lease_start(&owner_text, &refs)).await {
                Ok(Ok(dicts)) => {
                    let changes: Vec<Change> = passthroughd_proto::wire::from_dicts("reply", dicts)
                        .map_err(|e| crate::malformed(&what, &e))?;
                    Ok(format!(
                        "leased {} to {owner} ({} rebound)\n",
                        addresses.join(" "),
                        changes.len()
                    ))
                }
                Ok(Err(e)) => Err(Failure::from_dbus(&what, &e)),
                Err(_) => {
                    // Nothing may stay claimed for a VM that never starts: the daemon ends the
                    // lease once the start it is still busy with is done.
                    let ended =
                        tokio::time::timeout(END_AFTER_TIMEOUT, proxy.lease_end(&owner_text)).await;
                    let after = match ended {
                        Ok(Ok(_) | Err(dbus::Error::NotFound(_))) => "the lease was ended",
                        _ => "the daemon ends the lease once its start is done",
                    };
                    Err(Failure {
                        what,
                        why: format!(
                            "passthroughd did not answer within {} s; {after}",
                            timeout.as_secs()
                        ),
                        name: "Busy".into(),
                        code: exit::REFUSED,
                        output: None,
                    })
                }
            }
        }
        HookAction::End => {
            match tokio::time::timeout(timeout, proxy.lease_end(&owner.to_string())).await {
                Ok(Ok(dicts)) => Ok(format!(
                    "ended the lease of {owner} ({} rebound)\n",
                    dicts.len()
                )),
                Ok(Err(dbus::Error::NotFound(_))) => Ok(String::new()),
                Ok(Err(e)) => Err(Failure::from_dbus(&what, &e)),
                Err(_) => Err(Failure {
                    what,
                    why: format!(
                        "passthroughd did not answer within {} s; it ends the lease when it can \
                         (passthroughctl lease list)",
                        timeout.as_secs()
                    ),
                    name: "Busy".into(),
                    code: exit::REFUSED,
                    output: None,
                }),
            }
        }
        HookAction::Nothing => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_prepare_begin_and_release_end_act() {
        assert_eq!(HookAction::of("prepare", "begin"), HookAction::Start);
        assert_eq!(HookAction::of("release", "end"), HookAction::End);
        for (op, sub) in [
            ("start", "begin"),
            ("started", "begin"),
            ("stopped", "end"),
            ("reconnect", "begin"),
            ("migrate", "begin"),
            ("restore", "begin"),
            ("attach", "begin"),
            ("prepare", "end"),
        ] {
            assert_eq!(HookAction::of(op, sub), HookAction::Nothing, "{op} {sub}");
        }
    }
}
