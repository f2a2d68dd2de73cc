//! Who may change devices: uid 0, or whoever polkit authorizes for
//! `org.passthroughd.manage-devices`. Reads need no authorization.
//!
//! The polkit subject is the caller's unique bus name (`system-bus-name`), whose credentials the
//! bus took when the caller connected; never a pid (racy) and never the daemon's own identity
//! (that would authorize everyone). Every doubt denies: no sender, a failed credential lookup,
//! polkit unreachable, slow or answering with a challenge.

use std::collections::HashMap;
use std::time::Duration;

use passthroughd_proto::dbus::ACTION_MANAGE_DEVICES;
use tracing::{debug, warn};
use zbus::Connection;
use zbus::names::{BusName, UniqueName};
use zbus::proxy::CacheProperties;
use zbus::zvariant::Value;

use crate::engine::Caller;
use crate::error::Error;

/// polkit's authority, reduced to the one call we make.
#[zbus::proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority",
    gen_blocking = false
)]
trait Authority {
    /// `CheckAuthorization(subject (sa{sv}), action_id s, details a{ss}, flags u,
    /// cancellation_id s) -> (is_authorized b, is_challenge b, details a{ss})`.
    fn check_authorization(
        &self,
        subject: &(&str, HashMap<&str, Value<'_>>),
        action_id: &str,
        details: &HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;
}

/// `CheckAuthorizationFlags`: none, so polkit never starts an interactive agent for us.
const NO_INTERACTION: u32 = 0;

/// Decides whether a caller may run a mutating method.
#[derive(Debug, Clone)]
pub struct Authorizer {
    /// How long we wait for the bus and polkit before denying.
    pub timeout: Duration,
}

impl Default for Authorizer {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(25),
        }
    }
}

impl Authorizer {
    /// The caller, if it may change devices; otherwise `PermissionDenied` saying why.
    pub async fn authorize(
        &self,
        conn: &Connection,
        sender: Option<&UniqueName<'_>>,
    ) -> Result<Caller, Error> {
        let deny = |why: String| {
            warn!(sender = ?sender.map(|s| s.as_str()), %why, "denied");
            Error::PermissionDenied(why)
        };
        let Some(sender) = sender else {
            return Err(deny("the call carries no sender".into()));
        };
        if conn.unique_name().is_some_and(|own| own == sender) {
            return Err(deny("the daemon does not authorize itself".into()));
        }
        let uid = match tokio::time::timeout(self.timeout, caller_uid(conn, sender)).await {
            Ok(Ok(uid)) => uid,
            Ok(Err(e)) => return Err(deny(format!("cannot learn the caller's uid: {e}"))),
            Err(_) => return Err(deny("the bus did not tell the caller's uid in time".into())),
        };
        let caller = Caller::new(uid, sender.to_string());
        if uid == 0 {
            debug!(%sender, "root caller");
            return Ok(caller);
        }
        match tokio::time::timeout(self.timeout, ask_polkit(conn, sender)).await {
            Ok(Ok(Verdict::Authorized)) => Ok(caller),
            Ok(Ok(Verdict::Challenge)) => Err(deny(format!(
                "uid {uid} needs to authenticate for {ACTION_MANAGE_DEVICES}; run as root or use pkexec"
            ))),
            Ok(Ok(Verdict::No)) => Err(deny(format!(
                "uid {uid} is not allowed {ACTION_MANAGE_DEVICES}"
            ))),
            Ok(Err(e)) => Err(deny(format!(
                "uid {uid} is not root and polkit could not be asked: {}",
                short(&e)
            ))),
            Err(_) => Err(deny(format!(
                "uid {uid} is not root and polkit did not answer in time"
            ))),
        }
    }
}

async fn caller_uid(conn: &Connection, sender: &UniqueName<'_>) -> zbus::Result<u32> {
    let dbus = zbus::fdo::DBusProxy::builder(conn)
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    Ok(dbus
        .get_connection_unix_user(BusName::Unique(sender.as_ref()))
        .await?)
}

enum Verdict {
    Authorized,
    Challenge,
    No,
}

async fn ask_polkit(conn: &Connection, sender: &UniqueName<'_>) -> zbus::Result<Verdict> {
    let authority = AuthorityProxy::builder(conn)
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let subject = (
        "system-bus-name",
        HashMap::from([("name", Value::from(sender.as_str()))]),
    );
    let (authorized, challenge, _) = authority
        .check_authorization(
            &subject,
            ACTION_MANAGE_DEVICES,
            &HashMap::new(),
            NO_INTERACTION,
            "",
        )
        .await?;
    Ok(match (authorized, challenge) {
        (true, false) => Verdict::Authorized,
        (_, true) => Verdict::Challenge,
        (false, false) => Verdict::No,
    })
}

/// A zbus error in one line, with the D-Bus error name when there is one.
fn short(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(fdo) => zbus::DBusError::name(fdo.as_ref()).to_string(),
        other => other.to_string(),
    }
}
