//! The hotplug loop: device events, coalesced into bursts, handed to the engine, announced.
//!
//! Events come in bursts (64 VFs appear at once, a rescan adds a whole bridge): the loop waits
//! until events stop for a moment (or a burst has lasted long enough) and hands the engine one
//! [`Batch`] per burst, so a storm of events costs a few passes, not one rescan each. Every
//! event also makes readers' cached inventory stale at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use passthroughd_proto::PciAddress;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tracing::warn;
use zbus::Connection;
use zbus::object_server::SignalEmitter;

use crate::engine::{Caller, Engine, HotplugReport};
use crate::kernel::events::{Action, DeviceEvent};
use crate::service::{ManagerObject, announce_changes};
use passthroughd_proto::dbus::PATH;

/// A burst is over once no event came for this long... The events of one burst (a rescan, VFs
/// made by a fast PF) come microseconds to a few milliseconds apart. Longer would hold back a
/// device that appears on its own, and when VFs appear one by one, slower than this (about
/// 90 ms apart in the TCG test bed), each is claimed as it appears, not after the last.
pub const QUIET: Duration = Duration::from_millis(25);
/// ...or once it has lasted this long (a steady stream is still handled in passes).
pub const LONGEST: Duration = Duration::from_secs(1);

/// What one burst of events changed, function by function (the last event about a function
/// wins: added then removed is removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub added: BTreeSet<PciAddress>,
    pub removed: BTreeSet<PciAddress>,
    /// Events in the burst, of any kind.
    pub events: usize,
}

impl Batch {
    fn push(&mut self, event: DeviceEvent) {
        self.events += 1;
        match event.action {
            Action::Add => {
                self.removed.remove(&event.address);
                self.added.insert(event.address);
            }
            Action::Remove => {
                self.added.remove(&event.address);
                self.removed.insert(event.address);
            }
            Action::Other => {}
        }
    }
}

/// The next burst: waits for an event, then takes every event until [`QUIET`] passes without
/// one or the burst has lasted [`LONGEST`]. `None` once the sender is gone.
pub async fn next_batch(
    events: &mut UnboundedReceiver<DeviceEvent>,
    quiet: Duration,
    longest: Duration,
) -> Option<Batch> {
    let mut batch = Batch::default();
    batch.push(events.recv().await?);
    let end = Instant::now() + longest;
    loop {
        let wait = quiet.min(end.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(event)) => batch.push(event),
            Ok(None) | Err(_) => return Some(batch),
        }
        if Instant::now() >= end {
            return Some(batch);
        }
    }
}

/// Hands every burst to the engine (off the async threads) and announces what it did. Ends
/// when the event source does.
pub async fn hotplug_loop(
    engine: Arc<Engine>,
    mut events: UnboundedReceiver<DeviceEvent>,
    connection: Connection,
) {
    while let Some(batch) = next_batch(&mut events, QUIET, LONGEST).await {
        engine.invalidate_inventory();
        if batch.added.is_empty() && batch.removed.is_empty() {
            continue;
        }
        let worker = Arc::clone(&engine);
        let (added, removed) = (batch.added.clone(), batch.removed.clone());
        let report = tokio::task::spawn_blocking(move || {
            worker.device_events(&Caller::new(0, "hotplug"), &added, &removed)
        })
        .await;
        match report {
            Ok(Ok(report)) => announce(&connection, &report).await,
            Ok(Err(e)) => warn!(error = %crate::error::chain(&e), "hotplug pass failed"),
            Err(e) => warn!(%e, "hotplug pass stopped"),
        }
    }
}

/// `Hotplug` signals (and the driver changes) of one pass.
async fn announce(connection: &Connection, report: &HotplugReport) {
    let Ok(emitter) = SignalEmitter::new(connection, PATH) else {
        return;
    };
    for address in &report.removed {
        let _ = ManagerObject::hotplug(&emitter, &address.to_string(), "removed", "still claimed")
            .await;
    }
    for c in &report.apply.changes {
        let _ = ManagerObject::hotplug(&emitter, &c.function, "claimed", &c.entry).await;
    }
    for r in report.apply.refused.iter().chain(&report.apply.failed) {
        let function = r.function.as_deref().unwrap_or(&r.entry);
        let _ = ManagerObject::hotplug(&emitter, function, "refused", &r.reason).await;
    }
    announce_changes(connection, &report.apply).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: Action, n: u32) -> DeviceEvent {
        DeviceEvent {
            action,
            address: PciAddress::new(0, 1, (n / 8) as u8 % 32, (n % 8) as u8).unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_a_thousand_events_is_a_few_batches() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..1000 {
            tx.send(event(Action::Add, n % 256)).unwrap();
        }
        drop(tx);
        let mut batches = Vec::new();
        while let Some(b) = next_batch(&mut rx, QUIET, LONGEST).await {
            batches.push(b);
        }
        assert_eq!(batches.len(), 1, "{} passes", batches.len());
        assert_eq!(batches[0].events, 1000);
        assert_eq!(batches[0].added.len(), 256);
    }

    #[tokio::test(start_paused = true)]
    async fn functions_appearing_one_by_one_are_each_handled_as_they_appear() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for n in 0..7 {
                tx.send(event(Action::Add, n)).unwrap();
                tokio::time::sleep(Duration::from_millis(90)).await;
            }
        });
        let start = Instant::now();
        let first = next_batch(&mut rx, QUIET, LONGEST).await.unwrap();
        assert_eq!(first.added.len(), 1);
        assert!(start.elapsed() <= QUIET, "held back {:?}", start.elapsed());
        let mut batches = 1;
        while next_batch(&mut rx, QUIET, LONGEST).await.is_some() {
            batches += 1;
        }
        assert_eq!(batches, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_is_cut_into_passes_and_the_last_event_wins() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for n in 0..100 {
                tx.send(event(Action::Add, n)).unwrap();
                tokio::time::sleep(QUIET / 2).await;
            }
            tx.send(event(Action::Remove, 99)).unwrap();
        });
        let mut batches = Vec::new();
        while let Some(b) = next_batch(&mut rx, QUIET, LONGEST).await {
            batches.push(b);
        }
        assert!(
            (2..=4).contains(&batches.len()),
            "a 1.25 s stream in {} passes",
            batches.len()
        );
        let last = batches.last().unwrap();
        assert!(last.removed.contains(&event(Action::Add, 99).address));
        assert!(!last.added.contains(&event(Action::Add, 99).address));
        assert_eq!(batches.iter().map(|b| b.events).sum::<usize>(), 101);
    }
}
