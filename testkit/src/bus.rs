//! A private `dbus-daemon` for tests: the real bus, with a policy of the test's choosing.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use passthroughd_proto::dbus::Bus;

/// A `dbus-daemon` on a socket in a temporary directory; killed on drop.
#[derive(Debug)]
pub struct TestBus {
    pub dir: tempfile::TempDir,
    pub address: String,
    child: Child,
}

/// Anyone (any uid) may connect, own names and call.
const OPEN_POLICY: &str = r#"<policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>"#;

impl TestBus {
    /// A session-like bus that lets anyone (any uid) connect, own names and call.
    pub fn start() -> Self {
        Self::with_policy(OPEN_POLICY)
    }

    pub fn with_policy(policy: &str) -> Self {
        Self::with_policy_and_services(policy, None)
    }

    /// A bus like [`TestBus::start`] that activates services from `servicedir` (D-Bus activation
    /// files, `[D-BUS Service]` with `Name=` and `Exec=`): a call to a name no one owns runs
    /// that name's `Exec=` as the test's user. Files written after the start are found once the
    /// bus reloads (`org.freedesktop.DBus.ReloadConfig`).
    pub fn with_services(servicedir: &Path) -> Self {
        Self::with_policy_and_services(OPEN_POLICY, Some(servicedir))
    }

    fn with_policy_and_services(policy: &str, servicedir: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Let an unprivileged CLI (setpriv) reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("starting dbus-daemon");
        let socket = dir.path().join("bus");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  {services}
  {policy}
</busconfig>
"#,
                socket.display(),
                services = servicedir
                    .map(|d| format!("<servicedir>{}</servicedir>", d.display()))
                    .unwrap_or_default(),
            ),
        )
        .expect("starting dbus-daemon");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--print-address", "--nofork"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dbus-daemon must be installed (package dbus)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("starting dbus-daemon"))
            .read_line(&mut line)
            .expect("starting dbus-daemon");
        let address = line.trim().to_owned();
        assert!(address.starts_with("unix:"), "dbus-daemon said {line:?}");
        Self {
            dir,
            address,
            child,
        }
    }

    /// Kills the bus now, as if it had crashed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn bus(&self) -> Bus {
        Bus::Address(self.address.clone())
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
