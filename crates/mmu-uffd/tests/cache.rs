//! The registration cache on real memory: hits, misses, invalidation, LRU bound,
//! deregistration (when, and on which thread), merging, errors, and a multi-threaded
//! never-stale check.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use mmu_uffd::{CacheConfig, Error, RegCache};

/// An address nothing in the test process maps (far below the mmap area).
const NEVER_MAPPED: usize = 0x1000_0000_0000;

#[test]
fn hit_returns_the_same_registration_and_partial_ranges_hit() {
    let Some(m) = monitor_or_skip("hit_returns_the_same_registration") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(8);
    let a = cache.get(p, 8 * PAGE).unwrap();
    // SAFETY: inside the 8-page mapping.
    let inner = unsafe { p.add(3 * PAGE + 17) };
    let b = cache.get(inner, 100).unwrap();
    assert_eq!(*a, *b, "a sub-range hits the covering entry");
    assert_eq!(a.start(), p);
    assert_eq!(a.len(), 8 * PAGE);
    assert_eq!(counts.registered.load(Ordering::SeqCst), 1);
    let st = cache.stats();
    assert_eq!((st.hits, st.misses, st.entries), (1, 1, 1));
    unmap(p, 8 * PAGE);
}

#[test]
fn unaligned_requests_register_whole_pages() {
    let Some(m) = monitor_or_skip("unaligned_requests_register_whole_pages") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    // SAFETY: inside the mapping.
    let q = unsafe { p.add(PAGE + 100) };
    let h = cache.get(q, PAGE).unwrap(); // spans pages 1 and 2
    assert_eq!(h.start() as usize, p as usize + PAGE);
    assert_eq!(h.len(), 2 * PAGE);
    assert_eq!(h.registration().1, 2 * PAGE);
    unmap(p, 4 * PAGE);
}

#[test]
fn invalidated_entries_miss_and_are_replaced() {
    let Some(m) = monitor_or_skip("invalidated_entries_miss_and_are_replaced") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    let old = cache.get(p, 4 * PAGE).unwrap();
    replace_with(p, 4 * PAGE, 7); // new memory at the same address
    assert!(!old.is_valid());
    let new = cache.get(p, 4 * PAGE).unwrap();
    assert!(new.is_valid());
    assert_ne!(
        new.registration().2,
        old.registration().2,
        "a new registration"
    );
    let st = cache.stats();
    assert_eq!(st.invalidated_found, 1);
    assert_eq!(st.misses, 2);
    // The old registration is still held by `old`: not deregistered yet.
    assert_eq!(counts.deregistered.load(Ordering::SeqCst), 0);
    drop(old);
    assert_eq!(counts.deregistered.load(Ordering::SeqCst), 1);
    // And the new memory is watched: its unmap invalidates the new entry too.
    unmap(p, 4 * PAGE);
    assert!(!new.is_valid());
}

#[test]
fn madvise_dontneed_invalidates() {
    let Some(m) = monitor_or_skip("madvise_dontneed_invalidates") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    // SAFETY: inside the mapping.
    madvise(unsafe { p.add(2 * PAGE) }, PAGE, libc::MADV_DONTNEED);
    assert!(!h.is_valid());
    let h2 = cache.get(p, PAGE).unwrap();
    assert!(h2.is_valid());
    assert_ne!(h2.registration().2, h.registration().2);
    unmap(p, 4 * PAGE);
}

#[test]
fn lru_evicts_the_least_recently_used_and_keeps_used_ones_registered() {
    let Some(m) = monitor_or_skip("lru_evicts_the_least_recently_used") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default().with_capacity(2));
    let bufs: Vec<*mut u8> = (0..3).map(|_| anon(1)).collect();
    drop(cache.get(bufs[0], PAGE).unwrap());
    let b1 = cache.get(bufs[1], PAGE).unwrap(); // kept alive by the test
    drop(cache.get(bufs[0], PAGE).unwrap()); // A is now more recent than B
    drop(cache.get(bufs[2], PAGE).unwrap()); // evicts B
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.stats().evictions, 1);
    // B was evicted but its handle is alive: still registered and valid.
    assert_eq!(counts.deregistered.load(Ordering::SeqCst), 0);
    assert!(b1.is_valid());
    drop(b1);
    assert_eq!(counts.deregistered.load(Ordering::SeqCst), 1);
    // A is still cached (a hit), B is not (a miss).
    let before = cache.stats();
    drop(cache.get(bufs[0], PAGE).unwrap());
    assert_eq!(cache.stats().hits, before.hits + 1);
    drop(cache.get(bufs[1], PAGE).unwrap());
    assert_eq!(cache.stats().misses, before.misses + 1);
    for b in bufs {
        unmap(b, PAGE);
    }
    drop(cache);
    assert_eq!(
        counts.registered.load(Ordering::SeqCst),
        counts.deregistered.load(Ordering::SeqCst),
        "dropping the cache deregisters everything not in use"
    );
}

#[test]
fn deregistration_never_runs_on_the_monitor_thread() {
    let Some(m) = monitor_or_skip("deregistration_never_runs_on_the_monitor_thread") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default().with_capacity(4));
    for _ in 0..20 {
        let p = anon(2);
        drop(cache.get(p, 2 * PAGE).unwrap());
        unmap(p, 2 * PAGE); // the entry becomes invalid; nobody holds it
    }
    drop(cache);
    let threads = counts.threads.lock();
    assert_eq!(threads.len(), 20);
    assert!(
        threads.iter().all(|t| t != "mmu-uffd-monitor"),
        "deregistered on the monitor thread: {threads:?}"
    );
}

#[test]
fn overlapping_requests_merge_into_one_registration() {
    let Some(m) = monitor_or_skip("overlapping_requests_merge") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(8);
    let a = cache.get(p, 4 * PAGE).unwrap();
    // SAFETY: inside the mapping.
    let b = cache.get(unsafe { p.add(2 * PAGE) }, 4 * PAGE).unwrap();
    assert_eq!(b.start(), p, "the union of [0,4) and [2,6)");
    assert_eq!(b.len(), 6 * PAGE);
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.stats().merges, 1);
    // The first handle is still valid (its memory did not change).
    assert!(a.is_valid());
    // SAFETY: inside the mapping.
    let c = cache.get(unsafe { p.add(PAGE) }, PAGE).unwrap();
    assert_eq!(*c, *b);
    unmap(p, 8 * PAGE);

    // Without merging, the new request replaces the overlapped entry.
    let (plain, _) = counting_cache(&m, CacheConfig::default().with_merge(false));
    let q = anon(8);
    let _x = plain.get(q, 4 * PAGE).unwrap();
    // SAFETY: inside the mapping.
    let y = plain.get(unsafe { q.add(2 * PAGE) }, 4 * PAGE).unwrap();
    assert_eq!(y.len(), 4 * PAGE);
    assert_eq!(plain.len(), 1);
    unmap(q, 8 * PAGE);
}

#[test]
fn a_union_across_a_hole_falls_back_to_the_request() {
    let Some(m) = monitor_or_skip("a_union_across_a_hole") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(6);
    // SAFETY: inside the mapping.
    unmap(unsafe { p.add(3 * PAGE) }, PAGE); // hole at page 3
    let _a = cache.get(p, 3 * PAGE).unwrap();
    // [2, 3) overlaps nothing but [4, 6) overlaps nothing either; ask for [4,6) after
    // a request [0,3): no overlap, no merge. Now request [2,3) again plus [4,6).
    // SAFETY: inside the mapping.
    let b = cache.get(unsafe { p.add(4 * PAGE) }, 2 * PAGE).unwrap();
    assert_eq!(b.len(), 2 * PAGE);
    // A request overlapping [0,3) whose union would be fine: merges.
    // SAFETY: inside the mapping.
    let c = cache.get(unsafe { p.add(2 * PAGE) }, PAGE).unwrap();
    assert_eq!(c.start(), p);
    unmap(p, 3 * PAGE);
    // SAFETY: the rest of the mapping.
    unmap(unsafe { p.add(4 * PAGE) }, 2 * PAGE);
}

#[test]
fn errors_are_clear() {
    let Some(m) = monitor_or_skip("errors_are_clear") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(1);
    assert!(matches!(cache.get(p, 0), Err(Error::InvalidRange { .. })));
    assert!(matches!(
        cache.get(usize::MAX as *const u8, 2),
        Err(Error::InvalidRange { .. })
    ));
    unmap(p, PAGE);
    // Unmapped memory cannot be watched.
    let e = cache.get(NEVER_MAPPED as *const u8, PAGE).unwrap_err();
    assert!(matches!(e, Error::Watch { .. }), "{e}");
    assert!(e.to_string().contains("cannot watch"), "{e}");
    // A failing registrar's error comes back with the range.
    let q = anon(1);
    let failing = RegCache::with_fns(
        &m,
        CacheConfig::default(),
        |_p: *mut u8, _l: usize| -> Result<u32, std::io::Error> {
            Err(std::io::Error::other("device full"))
        },
        |_r: u32| {},
    );
    let e = failing.get(q, PAGE).unwrap_err();
    assert!(
        matches!(e, Error::Register { .. }) && e.to_string().contains("device full"),
        "{e}"
    );
    assert!(failing.is_empty());
    unmap(q, PAGE);
}

#[test]
fn a_stopped_monitor_invalidates_everything_and_refuses() {
    let Some(m) = monitor_or_skip("a_stopped_monitor_invalidates_everything") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(2);
    let h = cache.get(p, 2 * PAGE).unwrap();
    drop(m);
    assert!(!h.is_valid());
    assert!(matches!(
        cache.get(p, PAGE),
        Err(Error::Stopped { why: None })
    ));
    // Unmapping formerly watched memory does not hang.
    unmap(p, 2 * PAGE);
    drop(h);
    drop(cache);
    assert_eq!(
        counts.registered.load(Ordering::SeqCst),
        counts.deregistered.load(Ordering::SeqCst)
    );
}

/// Several owners each recycle their own address (new memory holding a fresh token moved
/// over the old: an unmap of the old pages) and look it up, while racers look up the
/// owners' addresses concurrently. A registration records the token of the memory it
/// registered. After the owner's replacement returned, its lookup must never return a
/// registration of earlier memory, whatever the racers left in the cache.
#[test]
fn never_stale_under_concurrent_recycling() {
    let Some(m) = monitor_or_skip("never_stale_under_concurrent_recycling") else {
        return;
    };
    let m = Arc::new(m);
    const OWNERS: usize = 3;
    const ROUNDS: u64 = 400;
    let cache = Arc::new(RegCache::with_fns(
        &m,
        CacheConfig::default().with_capacity(8),
        |p: *mut u8, _len: usize| {
            // The "pinned pages": identified by the token the memory holds now. A racer may
            // register memory that is being replaced under it, so read through
            // /proc/self/mem, which reports an unmapped address as an error, not a fault.
            let mut token = [0u8; 8];
            let f = std::fs::File::open("/proc/self/mem")?;
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut token, p as u64)?;
            Ok::<u64, std::io::Error>(u64::from_ne_bytes(token))
        },
        |_t: u64| {},
    ));
    let addrs: Vec<usize> = (0..OWNERS).map(|_| anon(2) as usize).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicU64::new(0));
    let racers: Vec<_> = (0..2)
        .map(|r| {
            let (cache, addrs, stop) = (cache.clone(), addrs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let a = addrs[(n as usize + r) % addrs.len()];
                    let _ = cache.get(a as *const u8, PAGE);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let owners: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let (cache, stale) = (cache.clone(), stale.clone());
            std::thread::spawn(move || {
                for round in 1..=ROUNDS {
                    let token = ((i as u64 + 1) << 32) | round;
                    replace_with(a as *mut u8, 2 * PAGE, token);
                    let h = cache.get(a as *const u8, PAGE).expect("lookup");
                    if *h != token {
                        stale.fetch_add(1, Ordering::SeqCst);
                        eprintln!(
                            "owner {i} round {round}: got token {:#x}, want {token:#x}",
                            *h
                        );
                    }
                }
            })
        })
        .collect();
    for o in owners {
        o.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let lookups: u64 = racers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(
        stale.load(Ordering::SeqCst),
        0,
        "stale registrations handed out"
    );
    let st = cache.stats();
    let ms = m.stats();
    eprintln!("racer lookups {lookups}, cache {st:?}, monitor {ms:?}");
    // The first replacement of an address nobody had looked up yet is not watched.
    assert!(ms.unmaps >= OWNERS as u64 * (ROUNDS - 1));
    assert!(st.invalidated_found + st.misses > 0);
    for a in addrs {
        unmap(a as *mut u8, 2 * PAGE);
    }
}

/// Invalidated entries leave the index (and are deregistered, releasing their pages) at
/// the next lookup of anything, not only when LRU eviction reaches them.
#[test]
fn invalidated_entries_are_purged_at_the_next_lookup() {
    let Some(m) = monitor_or_skip("invalidated_entries_are_purged") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(2);
    let other = anon(1);
    drop(cache.get(p, 2 * PAGE).unwrap());
    drop(cache.get(other, PAGE).unwrap());
    unmap(p, 2 * PAGE);
    assert_eq!(counts.deregistered.load(Ordering::SeqCst), 0);
    drop(cache.get(other, PAGE).unwrap()); // a hit elsewhere purges
    assert_eq!(counts.deregistered.load(Ordering::SeqCst), 1);
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.stats().invalidated_found, 1);
    assert_eq!(cache.purge_invalid(), 0, "nothing left to purge");
    unmap(other, PAGE);
}

/// A registrar with exactly `capacity` slots (io_uring's fixed-buffer table, an RDMA
/// device's region limit) never runs out because of the cache: dead entries are purged and
/// a full index evicts before registering.
#[test]
fn a_registrar_with_capacity_slots_never_runs_out() {
    let Some(m) = monitor_or_skip("a_registrar_with_capacity_slots_never_runs_out") else {
        return;
    };
    const SLOTS: usize = 4;
    let free = Arc::new(parking_lot::Mutex::new((0..SLOTS).collect::<Vec<usize>>()));
    let (f1, f2) = (free.clone(), free.clone());
    let cache = RegCache::with_fns(
        &m,
        CacheConfig::default().with_capacity(SLOTS),
        move |_p: *mut u8, _l: usize| {
            f1.lock()
                .pop()
                .ok_or_else(|| std::io::Error::other("no free slot"))
        },
        move |slot: usize| f2.lock().push(slot),
    );
    // Buffers that die (unmapped) and buffers that stay, interleaved, many more than slots.
    let keep: Vec<*mut u8> = (0..SLOTS + 2).map(|_| anon(1)).collect();
    for round in 0..40 {
        let p = anon(1);
        drop(cache.get(p, PAGE).expect("a dead buffer's lookup"));
        unmap(p, PAGE);
        let k = keep[round % keep.len()];
        drop(cache.get(k, PAGE).expect("a live buffer's lookup"));
    }
    assert!(cache.len() <= SLOTS);
    drop(cache);
    assert_eq!(free.lock().len(), SLOTS, "every slot came back");
    for k in keep {
        unmap(k, PAGE);
    }
}

/// A lookup from inside an invalidation callback (the monitor thread, mid-batch) fails
/// with `OnMonitorThread` instead of waiting for itself.
#[test]
fn a_lookup_from_a_callback_is_refused_not_deadlocked() {
    use mmu_notifier::{IntervalContext, IntervalSubscriber, Range, WouldBlock};
    let Some(m) = monitor_or_skip("a_lookup_from_a_callback_is_refused") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let cache = Arc::new(cache);
    let other = anon(1) as usize;
    drop(cache.get(other as *const u8, PAGE).unwrap());
    struct Nosy(Arc<TestCache>, usize, Arc<parking_lot::Mutex<Vec<String>>>);
    impl IntervalSubscriber for Nosy {
        fn invalidate(
            &mut self,
            _: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            let r = self.0.get(self.1 as *const u8, PAGE).map(|_| ());
            self.2.lock().push(format!("{r:?}"));
            Ok(())
        }
    }
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let p = anon(1);
    m.watch(p, PAGE).unwrap();
    let sub = m
        .subscriptions()
        .insert_interval(
            p as u64..p as u64 + PAGE as u64,
            Nosy(cache.clone(), other, seen.clone()),
        )
        .unwrap();
    unmap(p, PAGE);
    drop(cache.get(other as *const u8, PAGE).unwrap()); // passes the gate: batch applied
    assert_eq!(*seen.lock(), vec!["Err(OnMonitorThread)".to_string()]);
    drop(sub);
    unmap(other as *mut u8, PAGE);
}
