//! The readers' inventory cache: shared between reads while nothing changes, never stale
//! after the engine's own mutations, dropped on an outside change (uevent) and after the TTL,
//! and off unless something reports outside changes.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use crate::common::*;
use passthroughd::engine::INVENTORY_CACHE_TTL;
use passthroughd_proto::{AssignOptions, ReleaseOptions};

#[test]
fn off_by_default_every_read_scans() {
    let host = Host::new();
    let (m, _) = host.open();
    assert!(!Arc::ptr_eq(&m.snapshot().unwrap(), &m.snapshot().unwrap()));
}

#[test]
fn shared_until_a_mutation_or_an_outside_change() {
    let host = Host::new();
    let (m, _) = host.open();
    m.enable_inventory_cache();
    let first = m.snapshot().unwrap();
    assert!(
        Arc::ptr_eq(&first, &m.snapshot().unwrap()),
        "nothing changed"
    );

    // The engine's own mutation: the next read sees it without waiting for any uevent.
    m.assign(&caller(), &[a(NIC)], AssignOptions::default())
        .unwrap();
    let after = m.snapshot().unwrap();
    assert!(!Arc::ptr_eq(&first, &after));
    assert_eq!(
        after.function(a(NIC)).unwrap().driver.as_deref(),
        Some("vfio-pci")
    );

    // An outside change reported as a uevent.
    m.release(&caller(), &[a(NIC)], ReleaseOptions::default())
        .unwrap();
    let released = m.snapshot().unwrap();
    assert_eq!(
        released.function(a(NIC)).unwrap().driver.as_deref(),
        Some("igb")
    );
    m.invalidate_inventory();
    assert!(!Arc::ptr_eq(&released, &m.snapshot().unwrap()));
}

#[test]
fn expires_after_the_ttl() {
    let host = Host::new();
    let (m, _) = host.open();
    m.enable_inventory_cache();
    let first = m.snapshot().unwrap();
    std::thread::sleep(INVENTORY_CACHE_TTL + std::time::Duration::from_millis(50));
    assert!(!Arc::ptr_eq(&first, &m.snapshot().unwrap()));
}
