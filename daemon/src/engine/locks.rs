//! Which IOMMU groups (and group-less functions) an operation is working on. Operations on
//! different groups run side by side; one on a group that is taken waits briefly, then gets
//! Busy naming what holds it. Readers never take these locks.
//!
//! A guard owns its keys and can move to another thread: a plan whose kernel write is stuck
//! keeps its groups locked on its worker thread after its caller was answered.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::engine::plan::LockKey;
use crate::error::Error;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Updates are single inserts and removes: coherent even after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
pub struct Locks {
    /// Taken keys and what took them ("an assign").
    busy: Mutex<HashMap<LockKey, String>>,
    freed: Condvar,
    /// Bumped whenever an operation lets go: readers' cached inventory is stale from then on.
    generation: Arc<AtomicU64>,
}

impl Locks {
    pub fn new(generation: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            generation,
            ..Self::default()
        })
    }

    /// Waits (up to `wait`) until no other operation holds any of `keys`, then takes them all
    /// at once (all at once, so two operations can never deadlock on each other's groups).
    pub fn acquire(
        self: &Arc<Self>,
        keys: BTreeSet<LockKey>,
        holder: &str,
        wait: Duration,
    ) -> Result<LockGuard, Error> {
        let deadline = Instant::now() + wait;
        let mut busy = lock(&self.busy);
        loop {
            match keys.iter().find_map(|k| busy.get(k).map(|h| (k, h))) {
                None => break,
                Some((key, by)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::Busy(format!(
                            "{key} is busy with another request ({by}); try again in a moment"
                        )));
                    }
                    busy = self
                        .freed
                        .wait_timeout(busy, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        for key in &keys {
            busy.insert(*key, holder.to_owned());
        }
        Ok(LockGuard {
            locks: Arc::clone(self),
            keys,
        })
    }

    /// The keys taken now, with what holds each.
    pub fn held(&self) -> Vec<(LockKey, String)> {
        let mut held: Vec<_> = lock(&self.busy)
            .iter()
            .map(|(k, h)| (*k, h.clone()))
            .collect();
        held.sort();
        held
    }
}

/// Held keys; dropping it lets the next operation on them in.
#[derive(Debug)]
pub struct LockGuard {
    locks: Arc<Locks>,
    keys: BTreeSet<LockKey>,
}

impl LockGuard {
    pub fn keys(&self) -> &BTreeSet<LockKey> {
        &self.keys
    }

    /// Takes `more` keys too (VFs that appeared during the operation), waiting up to `wait`.
    pub fn extend(
        &mut self,
        more: BTreeSet<LockKey>,
        holder: &str,
        wait: Duration,
    ) -> Result<(), Error> {
        let new: BTreeSet<LockKey> = more.difference(&self.keys).copied().collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut extra = self.locks.acquire(new, holder, wait)?;
        // The extra guard's keys now belong to this one; it drops holding none.
        self.keys.append(&mut extra.keys);
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut busy = lock(&self.locks.busy);
        for key in &self.keys {
            busy.remove(key);
        }
        // Every mutation holds its groups while it writes: once it lets go, readers must see
        // what it did, even before the kernel's uevents arrive.
        self.locks.generation.fetch_add(1, Ordering::AcqRel);
        self.locks.freed.notify_all();
    }
}
