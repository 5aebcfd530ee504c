//! Tests written for mutants of the registration cache that the rest of the suite let
//! survive (see docs/mutants.md): the keyed registrar's deregistration, and the
//! configuration builders keeping what they do not change.

mod common;

use std::sync::Arc;

use common::*;
use mmu_uffd::CacheConfig;
use mmu_uffd::RegCache;
use parking_lot::Mutex;

/// A keyed cache deregisters each registration through the keyed registrar, with the
/// attributes it was registered under: not a no-op, not with another key.
#[test]
fn keyed_registrations_are_deregistered_with_their_key() {
    let Some(m) = monitor_or_skip("keyed_registrations_are_deregistered_with_their_key") else {
        return;
    };
    let released: Arc<Mutex<Vec<(u32, usize)>>> = Arc::default();
    let r2 = released.clone();
    let cache = RegCache::with_keyed_fns(
        &m,
        CacheConfig::default(),
        |&access: &u32, ptr, _len| Ok::<_, std::io::Error>(ptr as usize),
        move |&access: &u32, start: usize| r2.lock().push((access, start)),
    );
    let p = anon(4);
    let read = cache.get_with(&1, p, 4 * PAGE).unwrap();
    let write = cache.get_with(&2, p, 4 * PAGE).unwrap();
    assert_eq!((*read, *write), (p as usize, p as usize));
    assert_eq!(read.len(), 4 * PAGE);
    assert!(!read.is_empty(), "a handle covers at least one page");
    drop((read, write));
    assert!(released.lock().is_empty(), "cached, not yet released");
    cache.clear();
    let mut got = released.lock().clone();
    got.sort();
    assert_eq!(got, vec![(1, p as usize), (2, p as usize)]);
    unmap(p, 4 * PAGE);
}

/// `with_gate_skipped` (fault injection) sets only its own switch: the other settings of
/// the configuration are kept.
#[cfg(feature = "fault-injection")]
#[test]
fn gate_skipped_config_keeps_the_other_settings() {
    let c = CacheConfig::default()
        .with_capacity(7)
        .with_merge(false)
        .with_gate_skipped();
    assert!(c.skip_gate);
    assert_eq!(c.capacity, 7);
    assert!(!c.merge);
    assert!(!CacheConfig::default().skip_gate, "off by default");
}
