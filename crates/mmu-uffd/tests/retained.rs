//! Retained leases (see "Retained leases" in the cache's docs): an entry evicted while
//! valid and unused leaves its memory registered and verified, so the next miss on it
//! makes no system call; `CacheConfig::with_retained(0)` restores unwatching it, `clear`
//! drops what is retained, and memory replaced under a retained lease is registered again
//! (its unmap is seen).

mod common;

use common::*;
use mmu_uffd::{CacheConfig, Monitor};

fn registrations(m: &Monitor) -> u64 {
    m.stats().watch_registrations
}

/// How many REMOVE events one madvise(DONTNEED) of `[p, p + len)` produced (memory
/// registered with the monitor sends one; unregistered memory none).
fn removes_from_madvise(m: &Monitor, p: *mut u8, len: usize) -> u64 {
    let before = m.stats().removes;
    madvise(p, len, libc::MADV_DONTNEED);
    m.stats().removes - before
}

/// A one-entry cache without merging: every lookup of another range evicts.
fn one_entry(m: &Monitor, retained: usize) -> TestCache {
    counting_cache(
        m,
        CacheConfig::default()
            .with_capacity(1)
            .with_merge(false)
            .with_retained(retained),
    )
    .0
}

/// Evicts `p`'s entry (valid, no handle) by caching `q`, then lets the monitor unwatch
/// what is idle (`len` does); the registrations the next miss on `p` made.
fn miss_after_eviction(m: &Monitor, cache: &TestCache, p: *mut u8, q: *mut u8) -> u64 {
    drop(cache.get(p, 2 * PAGE).unwrap());
    drop(cache.get(q, PAGE).unwrap()); // evicts p's entry
    assert_eq!(cache.len(), 1);
    let before = registrations(m);
    let h = cache.get(p, 2 * PAGE).unwrap();
    assert!(h.is_valid());
    registrations(m) - before
}

#[test]
fn an_evicted_entry_keeps_its_memory_registered_until_cleared() {
    let Some(m) = monitor_or_skip("an_evicted_entry_keeps_its_memory_registered_until_cleared")
    else {
        return;
    };
    let (p, q) = (anon(2), anon(1));
    let cache = one_entry(&m, 1024);
    assert_eq!(
        miss_after_eviction(&m, &cache, p, q),
        0,
        "a miss on retained memory registered it again"
    );
    // q's entry was evicted in turn, and retained: still registered after `len`.
    assert_eq!(cache.len(), 1);
    touch(q, PAGE);
    assert_eq!(
        removes_from_madvise(&m, q, PAGE),
        1,
        "retained but unwatched"
    );
    cache.clear();
    touch(p, 2 * PAGE);
    touch(q, PAGE);
    assert_eq!(
        removes_from_madvise(&m, p, 2 * PAGE),
        0,
        "cleared but watched"
    );
    assert_eq!(removes_from_madvise(&m, q, PAGE), 0, "cleared but watched");
    drop(cache);

    // Without retention the evicted memory is unwatched, and registered again.
    let cache = one_entry(&m, 0);
    assert_eq!(
        miss_after_eviction(&m, &cache, p, q),
        1,
        "evicted memory stayed registered without retention"
    );
    assert_eq!(cache.len(), 1);
    touch(q, PAGE);
    assert_eq!(removes_from_madvise(&m, q, PAGE), 0, "evicted but watched");
    drop(cache);
    unmap(p, 2 * PAGE);
    unmap(q, PAGE);
}

#[test]
fn memory_replaced_under_a_retained_lease_is_registered_again() {
    let Some(m) = monitor_or_skip("memory_replaced_under_a_retained_lease_is_registered_again")
    else {
        return;
    };
    let (p, q) = (anon(2), anon(1));
    let cache = one_entry(&m, 1024);
    drop(cache.get(p, 2 * PAGE).unwrap());
    drop(cache.get(q, PAGE).unwrap()); // p's entry evicted, its lease retained
    replace_with(p, 2 * PAGE, 7); // new memory at p: an UNMAP event for the old
    let before = registrations(&m);
    let h = cache.get(p, 2 * PAGE).unwrap();
    assert_eq!(
        registrations(&m),
        before + 1,
        "new memory under a retained lease was taken as registered"
    );
    unmap(p, 2 * PAGE);
    assert!(!h.is_valid(), "the new memory's unmap was not seen");
    drop(h);
    unmap(q, PAGE);
}
