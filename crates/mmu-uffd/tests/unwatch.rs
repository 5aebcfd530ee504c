//! Memory is watched only while something needs it: a cache entry's range is unwatched
//! when its last entry goes, never while another entry or an explicit watch still covers
//! it. Observed through the kernel: madvise of watched memory sends a REMOVE event (counted
//! by the monitor when read, before madvise returns), of unwatched memory none.

mod common;

use common::*;
use mmu_uffd::{CacheConfig, Monitor};

/// How many REMOVE events one madvise(DONTNEED) of `[p, p + len)` produced.
fn removes_from_madvise(m: &Monitor, p: *mut u8, len: usize) -> u64 {
    let before = m.stats().removes;
    madvise(p, len, libc::MADV_DONTNEED);
    m.stats().removes - before
}

#[test]
fn the_last_entry_unwatches_its_memory() {
    let Some(m) = monitor_or_skip("the_last_entry_unwatches_its_memory") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(8);
    let h = cache.get(p, 8 * PAGE).unwrap();
    drop(h);
    // Cached (the index still holds the entry): watched.
    assert_eq!(removes_from_madvise(&m, p, PAGE), 1);
    // The madvise invalidated the entry; the next query purges it, which deregisters it
    // and ends its lease: no longer watched.
    assert_eq!(cache.len(), 0);
    assert_eq!(
        counts
            .deregistered
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(m.stats().unwatched >= 1);
    touch(p, 8 * PAGE);
    assert_eq!(removes_from_madvise(&m, p, 8 * PAGE), 0, "still watched");
    // Cached again: watched again.
    let h = cache.get(p, 8 * PAGE).unwrap();
    assert_eq!(removes_from_madvise(&m, p, PAGE), 1);
    assert!(!h.is_valid());
    drop(h);
    cache.clear();
    assert_eq!(
        removes_from_madvise(&m, p, 8 * PAGE),
        0,
        "cleared but watched"
    );
    unmap(p, 8 * PAGE);
}

#[test]
fn memory_another_entry_needs_stays_watched() {
    let Some(m) = monitor_or_skip("memory_another_entry_needs_stays_watched") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default().with_merge(false));
    let p = anon(8);
    // Two entries overlapping on pages 2..4.
    let a = cache.get(p, 4 * PAGE).unwrap();
    // SAFETY: inside the 8-page mapping.
    let q = unsafe { p.add(2 * PAGE) };
    let b = cache.get(q, 6 * PAGE).unwrap();
    assert_ne!(a.start(), b.start(), "two entries");
    // Invalidate only the first entry (pages 0..1): it goes at the next query.
    assert_eq!(removes_from_madvise(&m, p, PAGE), 1);
    drop(a);
    assert_eq!(cache.len(), 1);
    // Pages 0..2 belonged to the first entry only: unwatched. Pages 2..8 are the second's.
    touch(p, 8 * PAGE);
    assert_eq!(removes_from_madvise(&m, p, 2 * PAGE), 0);
    assert_eq!(
        removes_from_madvise(&m, q, PAGE),
        1,
        "shared page unwatched"
    );
    // SAFETY: inside the mapping.
    let tail = unsafe { p.add(7 * PAGE) };
    assert_eq!(removes_from_madvise(&m, tail, PAGE), 1);
    drop(b);
    cache.clear();
    touch(p, 8 * PAGE);
    assert_eq!(removes_from_madvise(&m, p, 8 * PAGE), 0);
    unmap(p, 8 * PAGE);
}

#[test]
fn an_explicit_watch_outlives_the_entries() {
    let Some(m) = monitor_or_skip("an_explicit_watch_outlives_the_entries") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    m.watch(p, 2 * PAGE).unwrap();
    drop(cache.get(p, 4 * PAGE).unwrap());
    cache.clear();
    touch(p, 4 * PAGE);
    // Pages 0..2 are watched explicitly; pages 2..4 were the entry's only.
    assert_eq!(removes_from_madvise(&m, p, 2 * PAGE), 1);
    // SAFETY: inside the mapping.
    let rest = unsafe { p.add(2 * PAGE) };
    assert_eq!(removes_from_madvise(&m, rest, 2 * PAGE), 0);
    m.unwatch(p, 2 * PAGE).unwrap();
    assert_eq!(removes_from_madvise(&m, p, 4 * PAGE), 0);
    unmap(p, 4 * PAGE);
}

/// A lease that ends while a new entry over the same (reused) address is being filled on
/// another thread never leaves the new entry's memory unwatched: every entry in use sees
/// its unmap.
#[test]
fn unwatch_races_with_a_new_lease() {
    let Some(m) = monitor_or_skip("unwatch_races_with_a_new_lease") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default().with_capacity(4));
    let cache = std::sync::Arc::new(cache);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while std::time::Instant::now() < deadline {
                    let p = anon(4);
                    let h = cache.get(p, 4 * PAGE).expect("lookup");
                    assert!(h.is_valid());
                    unmap(p, 4 * PAGE);
                    assert!(!h.is_valid(), "an entry in use missed its unmap");
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let rounds: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let st = m.stats();
    eprintln!("{rounds} rounds; {st:?}");
    assert!(rounds > 100, "only {rounds} rounds");
    assert!(st.unwatched > 0, "leases never ended");
}

/// An explicit watch moves with its memory: after `mremap` moved watched memory, the end
/// of a cache entry's lease at the new address leaves it watched (the watch was asked for,
/// and the kernel moved the registration), until `unwatch` at the new address.
#[test]
fn an_explicit_watch_moves_with_its_memory() {
    let Some(m) = monitor_or_skip("an_explicit_watch_moves_with_its_memory") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    // Another explicit watch just below (with a page between), which the move must leave
    // alone.
    let below = reserve(7);
    let fixed = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    let other = map(below as usize, 2 * PAGE, RW, fixed, -1, 0);
    // SAFETY: inside the reservation.
    let p = map(
        unsafe { below.add(3 * PAGE) } as usize,
        4 * PAGE,
        RW,
        fixed,
        -1,
        0,
    );
    touch(p, 4 * PAGE);
    m.watch(p, 4 * PAGE).unwrap();
    m.watch(other, 2 * PAGE).unwrap();
    // Eight reserved pages: p moves to the first four, fresh memory goes to the others.
    let dst = reserve(8);
    // SAFETY: inside the reservation.
    let r = unsafe { dst.add(4 * PAGE) };
    map(
        r as usize,
        4 * PAGE,
        RW,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        -1,
        0,
    );
    let q = common::recording::mremap(
        p,
        4 * PAGE,
        4 * PAGE,
        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
        dst,
    )
    .unwrap();
    m.sync().unwrap();
    drop(cache.get(q, 4 * PAGE).unwrap());
    drop(cache.get(r, 4 * PAGE).unwrap());
    // The entries' leases end: only the moved explicit watch keeps q watched; nothing
    // keeps its neighbour r.
    cache.clear();
    touch(q, 8 * PAGE);
    assert_eq!(
        removes_from_madvise(&m, q, 4 * PAGE),
        1,
        "the moved explicit watch was unwatched with the entry"
    );
    assert_eq!(
        removes_from_madvise(&m, r, 4 * PAGE),
        0,
        "the moved explicit watch covers more than the memory that moved"
    );
    m.unwatch(q, 4 * PAGE).unwrap();
    assert_eq!(removes_from_madvise(&m, q, 4 * PAGE), 0);
    touch(other, 2 * PAGE);
    assert_eq!(
        removes_from_madvise(&m, other, 2 * PAGE),
        1,
        "the move changed another explicit watch"
    );
    assert_eq!(m.state(), mmu_uffd::MonitorState::Running);
    unmap(q, 8 * PAGE);
    unmap(below, 7 * PAGE);
}
