//! Tests written for mutants of the registration cache and the monitor that the rest of
//! the suite let survive (see docs/mutants.md): deregistration, the configurations'
//! builders and clamps, `Debug`, the retry budget and the byte limit of a union.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use common::*;
use mmu_notifier::{Event, Range};
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
        |_: &u32, ptr, _len| Ok::<_, std::io::Error>(ptr as usize),
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

/// Zero limits written straight into the configuration's fields are raised to the
/// smallest that works, as the builders do: a zero capacity, byte limit or attempt count
/// gives the cache the builders' `with_capacity(0)`, `with_max_bytes(0)`,
/// `with_max_attempts(0)` would give.
#[test]
fn zero_limits_in_the_fields_mean_what_the_builders_make_of_them() {
    let Some(m) = monitor_or_skip("zero_limits_in_the_fields") else {
        return;
    };
    let run = |config: CacheConfig| {
        let (cache, counts) = counting_cache(&m, config);
        let a = anon(2);
        let b = anon(2);
        let first = cache.get(a, 2 * PAGE).map(|h| *h);
        let second = cache.get(b, 2 * PAGE).map(|h| *h);
        let again = cache.get(a, 2 * PAGE).map(|h| *h);
        let out = (
            first.is_ok(),
            second.is_ok(),
            again.is_ok(),
            cache.len(),
            counts.registered.load(std::sync::atomic::Ordering::SeqCst),
        );
        drop(cache);
        unmap(a, 2 * PAGE);
        unmap(b, 2 * PAGE);
        out
    };
    let mut capacity = CacheConfig::default();
    capacity.capacity = 0;
    let mut bytes = CacheConfig::default();
    bytes.max_bytes = Some(0);
    let mut attempts = CacheConfig::default();
    attempts.max_attempts = 0;
    let d = CacheConfig::default;
    // (raw fields, builders, expected: three gets served, entries kept, registrations)
    let cases = [
        (
            "capacity",
            capacity,
            d().with_capacity(0),
            (true, true, true, 1, 3),
        ),
        (
            "max_bytes",
            bytes,
            d().with_max_bytes(0),
            (true, true, true, 0, 3),
        ),
        (
            "max_attempts",
            attempts,
            d().with_max_attempts(0),
            (true, true, true, 2, 2),
        ),
    ];
    for (what, raw, built, expected) in cases {
        assert_eq!(run(raw), run(built), "{what}: fields and builder differ");
        assert_eq!(run(raw), expected, "{what}");
    }
}

/// The `Debug` of a cache and of a handle: what a user prints when a registration
/// surprises them (range in hex, validity, the configuration and counters).
#[test]
fn debug_shows_the_range_validity_configuration_and_counters() {
    let Some(m) = monitor_or_skip("debug_shows_the_range") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default().with_capacity(3));
    let p = anon(1);
    let h = cache.get(p, PAGE).unwrap();
    let shown = format!("{h:?}");
    assert_eq!(
        shown,
        format!(
            "CachedRegistration {{ start: {:#x}, end: {:#x}, attrs: (), valid: true }}",
            p as usize,
            p as usize + PAGE
        )
    );
    let shown = format!("{cache:?}");
    assert!(
        shown.starts_with("RegCache { config: CacheConfig { capacity: 3"),
        "{shown}"
    );
    assert!(
        shown.contains("stats: CacheStats { hits: 0, misses: 1"),
        "{shown}"
    );
    drop(h);
    unmap(p, PAGE);
}

/// A fill that collides on every attempt (its registration invalidates the range while it
/// registers, as a concurrent mprotect bracketed by `RegCache::invalidate` would) makes
/// exactly `max_attempts` attempts, then reports the contention: not one more, and keeps
/// nothing.
#[test]
fn a_fill_that_always_collides_makes_exactly_max_attempts_attempts() {
    let Some(m) = monitor_or_skip("a_fill_that_always_collides") else {
        return;
    };
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let a2 = attempts.clone();
    let subscriptions = m.subscriptions().clone();
    let cache = RegCache::with_fns(
        &m,
        CacheConfig::default().with_max_attempts(3),
        move |ptr: *mut u8, len: usize| {
            a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let start = ptr as u64;
            let range = Range::new(start, start + len as u64, Event::Clear).unwrap();
            drop(subscriptions.invalidate_range_start(range));
            Ok::<_, std::io::Error>(ptr as usize)
        },
        |_| {},
    );
    let p = anon(2);
    let got = cache.get(p, 2 * PAGE);
    assert!(
        matches!(got, Err(mmu_uffd::Error::Contended { .. })),
        "{got:?}"
    );
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(cache.len(), 0, "nothing stale kept");
    let st = cache.stats();
    // Three registrations made, each dropped by its collision; no lookup got one.
    assert_eq!((st.retries, st.misses, st.registered), (3, 0, 3), "{st:?}");
    unmap(p, 2 * PAGE);
}

/// With a byte limit, a fill merges with an overlapping entry only if the union fits the
/// limit: a union that fits is registered whole, one that does not leaves the request
/// registered alone.
#[test]
fn a_union_is_registered_only_if_it_fits_the_byte_limit() {
    let Some(m) = monitor_or_skip("a_union_is_registered_only_if_it_fits") else {
        return;
    };
    let p = anon(8);
    let at = |page: usize| p.wrapping_add(page * PAGE);
    let (cache, _) = counting_cache(&m, CacheConfig::default().with_max_bytes(3 * PAGE as u64));
    let first = cache.get(at(0), 2 * PAGE).unwrap();
    // [1, 3) overlaps [0, 2): the union [0, 3) is 3 pages, within the limit.
    let fits = cache.get(at(1), 2 * PAGE).unwrap();
    assert_eq!(
        (fits.start(), fits.len()),
        (at(0), 3 * PAGE),
        "the union, registered whole"
    );
    // [2, 4) overlaps [0, 3): the union [0, 4) is 4 pages, over the limit.
    let alone = cache.get(at(2), 2 * PAGE).unwrap();
    assert_eq!(
        (alone.start(), alone.len()),
        (at(2), 2 * PAGE),
        "the request alone"
    );
    assert_eq!(cache.stats().merges, 1);
    drop((first, fits, alone));
    drop(cache);
    unmap(p, 8 * PAGE);
}

/// The monitor's configuration builder sets what it names and keeps the rest; the
/// monitor's `Debug` says what it can watch and whether it stopped.
#[test]
fn monitor_config_and_debug() {
    use mmu_uffd::MonitorConfig;
    let d = std::time::Duration::from_micros(50);
    let c = MonitorConfig::default()
        .with_fork_events(true)
        .with_busy_poll(d);
    assert_eq!(c.busy_poll, d);
    assert!(c.fork_events);
    assert_eq!(
        MonitorConfig::default().busy_poll,
        std::time::Duration::ZERO
    );
    let Some(m) = monitor_or_skip("monitor_config_and_debug") else {
        return;
    };
    let shown = format!("{m:?}");
    assert!(shown.contains("capabilities: Capabilities {"), "{shown}");
    assert!(shown.contains("stopped: false"), "{shown}");
}

/// A monitor dropped from inside one of its own invalidation callbacks (its last owner
/// was the subscriber) stops without joining the thread it runs on: the callback returns.
#[test]
fn a_monitor_dropped_inside_its_own_callback_stops() {
    use mmu_notifier::{IntervalContext, IntervalSubscriber, WouldBlock};
    use mmu_uffd::Monitor;
    use std::sync::mpsc;

    type Slot = Arc<Mutex<Option<Monitor>>>;
    struct Dropper(Slot, mpsc::Sender<()>);
    impl IntervalSubscriber for Dropper {
        fn invalidate(
            &mut self,
            _: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            let last_owner = self.0.lock().take();
            if let Some(m) = last_owner {
                drop(m);
                let _ = self.1.send(());
            }
            Ok(())
        }
    }
    let Some(m) = monitor_or_skip("a_monitor_dropped_inside_its_own_callback_stops") else {
        return;
    };
    let p = anon(2);
    m.watch(p, 2 * PAGE).unwrap();
    let slot: Slot = Arc::default();
    let (tx, dropped) = mpsc::channel();
    let start = p as u64;
    let sub = m
        .subscriptions()
        .insert_interval(start..start + 2 * PAGE as u64, Dropper(slot.clone(), tx))
        .unwrap();
    *slot.lock() = Some(m);
    unmap(p, 2 * PAGE); // a monitor thread runs the callback, which drops the monitor
    dropped
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the callback that dropped the monitor never returned");
    drop(sub);
}

/// The cache's counters add up after a multi-threaded run: every registration it created
/// is, at the end, either still an entry, or was evicted, found invalidated, replaced by an
/// overlapping fill, or dropped by a fill that collided (no byte limit, no clear). Threads reuse each other's addresses, so lookups meet
/// invalidations in every window, and a small capacity makes concurrent fills evict each
/// other's room: a path that removes an entry without counting it breaks the sum.
#[test]
fn the_counters_add_up_after_threads_reuse_each_others_addresses() {
    let Some(m) = monitor_or_skip("the_counters_add_up_after_threads_reuse_each_others_addresses")
    else {
        return;
    };
    let config = CacheConfig::default().with_capacity(3);
    let (cache, counts) = counting_cache(&m, config);
    let cache = Arc::new(cache);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    // Besides: one thread looks up a region another keeps invalidating, so lookups meet
    // invalidations between their dirty-flag check and their index lock.
    let region = anon(4) as usize;
    let mut threads: Vec<_> = (0..2)
        .map(|t| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let (mut i, mut gets) = (0usize, 0u64);
                while std::time::Instant::now() < deadline {
                    if t == 0 {
                        // Every attempt may collide with the invalidating thread: a lookup
                        // that runs out of attempts is neither a hit nor a miss.
                        match cache.get(region as *mut u8, 4 * PAGE) {
                            Ok(h) => {
                                drop(h);
                                gets += 1;
                            }
                            Err(mmu_uffd::Error::Contended { .. }) => {}
                            Err(e) => panic!("lookup of the invalidated region: {e}"),
                        }
                    } else {
                        cache.invalidate(region as *const u8, 4 * PAGE).unwrap();
                    }
                    i += 1;
                }
                (i, gets)
            })
        })
        .collect();
    threads.extend((0..4).map(|t| {
        let cache = cache.clone();
        std::thread::spawn(move || {
            let (mut i, mut gets) = (0usize, 0u64);
            while std::time::Instant::now() < deadline {
                let pages = 1 + (i + t) % 3;
                let p = anon(pages);
                for _ in 0..1 + i % 3 {
                    drop(cache.get(p, pages * PAGE).unwrap());
                    gets += 1;
                }
                let held = cache.get(p, PAGE).unwrap();
                gets += 1;
                unmap(p, pages * PAGE);
                drop(held);
                i += 1;
            }
            (i, gets)
        })
    }));
    let (mut rounds, mut gets) = (0, 0);
    for t in threads {
        let (r, g) = t.join().unwrap();
        rounds += r;
        gets += g;
    }
    let s = cache.stats();
    eprintln!("{rounds} rounds, {gets} lookups: {s:?}");
    // Every lookup was a hit or a miss, once (a hit whose window check failed is not a hit).
    assert_eq!(s.hits + s.misses, gets, "{s:?}");
    assert!(s.evictions > 0 && s.invalidated_found > 0, "{s:?}");
    assert_eq!(s.registered as usize, counts.registered.load(SeqCst));
    assert_eq!(
        s.registered,
        s.entries as u64 + s.evictions + s.invalidated_found + s.replaced + s.retries,
        "registrations that left the index uncounted (or counted twice): {s:?}"
    );
    // And what left the index was deregistered (the handles are all dropped).
    assert_eq!(
        counts.deregistered.load(SeqCst) as u64,
        s.evictions + s.invalidated_found + s.replaced + s.retries,
        "{s:?}"
    );
    unmap(region as *mut u8, 4 * PAGE);
}

/// `Monitor::stats` includes every event of the calls that returned before it: an unmap of
/// watched memory counts in `unmaps` as soon as `munmap` has returned (the kernel wakes the
/// unmapper when the monitor reads the event, before the monitor counts it: `stats` waits
/// for the count).
#[test]
fn stats_count_the_unmap_of_a_call_that_returned() {
    let Some(m) = monitor_or_skip("stats_count_the_unmap_of_a_call_that_returned") else {
        return;
    };
    let mut before = m.stats().unmaps;
    for i in 0..2000 {
        let p = anon(1);
        m.watch(p, PAGE).unwrap();
        unmap(p, PAGE);
        let now = m.stats().unmaps;
        assert_eq!(now, before + 1, "unmap #{i} not counted yet");
        before = now;
    }
}

/// Dropping a cache unregisters the memory only its entries kept watched, at once (the
/// monitor would otherwise keep it registered, and an madvise on it waiting for events,
/// until some later call tidied up).
#[test]
fn dropping_a_cache_unwatches_its_memory() {
    let Some(m) = monitor_or_skip("dropping_a_cache_unwatches_its_memory") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    drop(cache.get(p, 4 * PAGE).unwrap());
    let before = m.stats().unwatched;
    drop(cache);
    assert_eq!(
        counts.deregistered.load(SeqCst),
        1,
        "the entry was released"
    );
    assert!(
        m.stats().unwatched > before,
        "the cache's memory is still registered after the cache was dropped"
    );
    unmap(p, 4 * PAGE);
}
