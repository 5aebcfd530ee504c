//! The monitor's verified set (see "Registering" in the monitor's docs): a miss on memory
//! already registered and checked makes no system call, and everything that can change
//! that memory (an event, an unregistration) makes the next miss register and check again.
//! Each test fails if the set kept a range it must forget: the new memory would go
//! unwatched (its unmap unseen, the entry stale) or a hole would be accepted.

mod common;

use common::*;
use mmu_uffd::{CacheConfig, Error};

fn at(p: *mut u8, page: usize) -> *mut u8 {
    // SAFETY: callers stay inside their own mappings.
    unsafe { p.add(page * PAGE) }
}

/// A one-entry cache without merging: every lookup of another page evicts.
fn one_entry(m: &mmu_uffd::Monitor) -> TestCache {
    counting_cache(m, CacheConfig::default().with_capacity(1).with_merge(false)).0
}

#[test]
fn a_miss_on_checked_memory_makes_no_system_call_until_an_event_touches_it() {
    let Some(m) = monitor_or_skip("a_miss_on_checked_memory_makes_no_system_call") else {
        return;
    };
    let cache = one_entry(&m);
    let p = anon(4);
    let regs = |m: &mmu_uffd::Monitor| {
        let s = m.stats();
        (s.watch_registrations, s.verified_leases)
    };
    let r0 = regs(&m);
    drop(cache.get(p, PAGE).unwrap());
    drop(cache.get(at(p, 2), PAGE).unwrap()); // evicts the first entry
    assert_eq!(
        regs(&m),
        (r0.0 + 2, r0.1),
        "two new ranges: two registrations"
    );
    // Page 0 again: still registered (idle) and checked: no system call.
    let h = cache.get(p, PAGE).unwrap();
    assert_eq!(regs(&m), (r0.0 + 2, r0.1 + 1), "a verified miss registered");
    assert!(h.is_valid());
    drop(h);
    // New memory at the same address (an UNMAP event for the old): registered again...
    replace_with(p, 4 * PAGE, 7);
    let h = cache.get(p, PAGE).unwrap();
    assert_eq!(
        regs(&m).0,
        r0.0 + 3,
        "new memory at a verified address was not registered"
    );
    // ...so its unmap is seen.
    unmap(p, PAGE);
    assert!(
        !h.is_valid(),
        "the new memory's unmap was not seen: it was never registered"
    );
    unmap(at(p, 1), 3 * PAGE);
}

#[test]
fn a_hole_punched_in_checked_memory_fails_the_next_miss() {
    let Some(m) = monitor_or_skip("a_hole_punched_in_checked_memory_fails_the_next_miss") else {
        return;
    };
    let cache = one_entry(&m);
    let p = anon(3);
    drop(cache.get(p, 3 * PAGE).unwrap());
    let other = anon(1);
    drop(cache.get(other, PAGE).unwrap()); // evicts it; p stays registered and checked
    unmap(at(p, 1), PAGE);
    match cache.get(p, 3 * PAGE) {
        Err(Error::Watch { .. }) => {}
        Ok(h) => panic!("a range with a hole was registered: {h:?}"),
        Err(e) => panic!("unexpected error: {e}"),
    }
    unmap(p, PAGE);
    unmap(at(p, 2), PAGE);
    unmap(other, PAGE);
}

#[test]
fn unwatched_memory_is_registered_again_by_the_next_miss() {
    let Some(m) = monitor_or_skip("unwatched_memory_is_registered_again_by_the_next_miss") else {
        return;
    };
    let cache = one_entry(&m);
    let p = anon(2);
    drop(cache.get(p, 2 * PAGE).unwrap());
    cache.clear(); // unregisters the idle range
    let before = m.stats().watch_registrations;
    let h = cache.get(p, 2 * PAGE).unwrap();
    assert_eq!(
        m.stats().watch_registrations,
        before + 1,
        "unregistered memory was taken as registered"
    );
    unmap(p, PAGE);
    assert!(
        !h.is_valid(),
        "the unmap of unregistered memory went unseen"
    );
    unmap(at(p, 1), PAGE);
}
