//! Keeping the ResourceSlices current: the daemon's signals and the plugin's own prepares wake
//! the publisher; a periodic resync catches anything missed.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::daemon::Daemon;
use crate::plugin::Plugin;
use crate::slices::Publisher;

/// Wakes the publisher on the daemon's signals: VFs created or destroyed, drivers changed
/// (hotplug, assign, release), assignments changed (leases of VMs included).
pub async fn follow_daemon(daemon: Daemon, changed: Arc<tokio::sync::Notify>) {
    let proxy = daemon.proxy();
    let streams = async {
        Ok::<_, zbus::Error>((
            proxy.receive_vfs_changed().await?,
            proxy.receive_driver_changed().await?,
            proxy.receive_assignment_changed().await?,
        ))
    };
    let (mut vfs, mut drivers, mut assignments) = match streams.await {
        Ok(streams) => streams,
        Err(e) => {
            warn!("not following the daemon's signals ({e}): slices follow the resync only");
            return;
        }
    };
    loop {
        let event = tokio::select! {
            e = vfs.next() => e.map(|_| ()),
            e = drivers.next() => e.map(|_| ()),
            e = assignments.next() => e.map(|_| ()),
        };
        if event.is_none() {
            warn!("the daemon's signals stopped");
            return;
        }
        changed.notify_one();
    }
}

/// Publishes what the node offers now, then again after each change (a burst of signals is
/// one publish) and every `resync`.
pub async fn keep_slices(plugin: Arc<Plugin>, mut publisher: Publisher, resync: Duration) {
    loop {
        match plugin.offered().await {
            Ok(devices) => match publisher.publish(&devices).await {
                Ok(true) => info!(devices = devices.len(), "ResourceSlices updated"),
                Ok(false) => {}
                Err(e) => warn!("publishing the ResourceSlices: {}", e.one_line()),
            },
            Err(e) => warn!("reading what the node offers: {e}"),
        }
        tokio::select! {
            () = plugin.changed.notified() => {}
            () = tokio::time::sleep(resync) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
