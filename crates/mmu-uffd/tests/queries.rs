//! Every query answers for the calls that returned before it: right after munmap returned
//! (on the same thread, or on a thread that was told so), `purge_invalid`, `len`, `stats`,
//! `is_valid`, `Monitor::try_sync` and `Monitor::sync` show the invalidation applied. As
//! documented, `len` and `stats` count the entries left in the index once the invalidated
//! ones are removed (they purge, like `purge_invalid`), and count the removed ones in
//! `invalidated_found`.
//!
//! The kernel lets munmap return once the monitor has *read* its event, not once it has
//! applied it; each query must wait for (or, `try_sync`, report) the application. Each
//! round asks one query first, right after the munmap: a query asked after another one
//! would find the work done by the first.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use mmu_notifier::{IntervalContext, IntervalSubscriber, IntervalSubscription, Range, WouldBlock};
use mmu_uffd::{CacheConfig, Monitor};

const ROUNDS: usize = 200;

/// A raw subscriber whose `invalidate` takes a while (as real work would): the window
/// between the monitor reading an event and having applied it, which every query must
/// wait out, is then wide open.
struct Slow;

impl IntervalSubscriber for Slow {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        std::thread::sleep(Duration::from_micros(300));
        Ok(())
    }
}

/// A monitor (or `None`: the test skips) and a watchdog that fails the test if it hangs.
fn start(test: &str) -> Option<(Monitor, Watchdog)> {
    let m = monitor_or_skip(test)?;
    Some((m, Watchdog::new(test, Duration::from_secs(60))))
}

/// Subscribes a [`Slow`] subscriber to `[p, p + len)` (which keeps the gap between the
/// event read and the event applied open), then unmaps it; the subscription is returned
/// to live as long as the caller's checks.
fn unmap_slowly(m: &Monitor, p: *mut u8, len: usize) -> IntervalSubscription<Slow> {
    let slow = m
        .subscriptions()
        .insert_interval(p as u64..p as u64 + len as u64, Slow)
        .unwrap();
    unmap(p, len);
    slow
}

/// Watches `[p, p + len)` and subscribes a [`Flag`] to it.
fn flag_on(m: &Monitor, p: *mut u8, len: usize) -> (IntervalSubscription<Flag>, Arc<AtomicBool>) {
    m.watch(p, len).expect("watch");
    let flag = Arc::new(AtomicBool::new(false));
    let sub = m
        .subscriptions()
        .insert_interval(p as u64..p as u64 + len as u64, Flag(flag.clone()))
        .expect("subscribe");
    (sub, flag)
}

/// `purge_invalid` right after munmap removes the entry (returns 1); then `len` and
/// `stats` no longer count it, `stats` counts it as found invalidated, and the handle is
/// invalid. The registration is released when the last handle goes.
#[test]
fn purge_invalid_right_after_munmap_removes_the_entry() {
    let Some((m, _dog)) = start("purge_invalid_right_after_munmap_removes_the_entry") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    for round in 0..ROUNDS {
        let p = anon(2);
        let h = cache.get(p, 2 * PAGE).unwrap();
        assert_eq!(cache.len(), 1);
        let _slow = unmap_slowly(&m, p, 2 * PAGE);
        assert_eq!(
            cache.purge_invalid(),
            1,
            "round {round}: the entry was not purged"
        );
        assert_eq!(cache.len(), 0, "round {round}");
        let st = cache.stats();
        assert_eq!(st.entries, 0, "round {round}: {st:?}");
        assert_eq!(
            st.invalidated_found,
            round as u64 + 1,
            "round {round}: {st:?}"
        );
        assert!(!h.is_valid(), "round {round}");
        assert_eq!(cache.purge_invalid(), 0, "round {round}: purged twice");
        let released = counts.deregistered.load(SeqCst);
        drop(h);
        assert_eq!(
            counts.deregistered.load(SeqCst),
            released + 1,
            "round {round}"
        );
    }
}

/// `len` right after munmap no longer counts the entry: it waits for the event like a
/// lookup and removes the entries it invalidated (so `purge_invalid` finds nothing left).
#[test]
fn len_right_after_munmap_no_longer_counts_the_entry() {
    let Some((m, _dog)) = start("len_right_after_munmap_no_longer_counts_the_entry") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let keep = anon(1);
    drop(cache.get(keep, PAGE).unwrap());
    for round in 0..ROUNDS {
        let p = anon(2);
        let h = cache.get(p, 2 * PAGE).unwrap();
        let _slow = unmap_slowly(&m, p, 2 * PAGE);
        assert_eq!(cache.len(), 1, "round {round}: only `keep` is left");
        assert!(!cache.is_empty());
        assert_eq!(cache.purge_invalid(), 0, "round {round}: len did not purge");
        assert!(!h.is_valid(), "round {round}");
    }
    assert_eq!(cache.stats().invalidated_found, ROUNDS as u64);
    unmap(keep, PAGE);
}

/// `stats` right after munmap shows the entry gone from the index and counted as found
/// invalidated.
#[test]
fn stats_right_after_munmap_count_the_entry_as_invalidated() {
    let Some((m, _dog)) = start("stats_right_after_munmap_count_the_entry_as_invalidated") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    for round in 0..ROUNDS {
        let p = anon(2);
        let h = cache.get(p, 2 * PAGE).unwrap();
        let _slow = unmap_slowly(&m, p, 2 * PAGE);
        let st = cache.stats();
        assert_eq!(
            (st.entries, st.invalidated_found, st.misses, st.hits),
            (0, round as u64 + 1, round as u64 + 1, 0),
            "round {round}: {st:?}"
        );
        assert!(!h.is_valid(), "round {round}");
    }
}

/// `is_valid` right after munmap is false.
#[test]
fn is_valid_right_after_munmap_is_false() {
    let Some((m, _dog)) = start("is_valid_right_after_munmap_is_false") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    for round in 0..ROUNDS {
        let p = anon(2);
        let h = cache.get(p, 2 * PAGE).unwrap();
        let other = cache.get(p, PAGE).unwrap();
        assert!(h.is_valid());
        let _slow = unmap_slowly(&m, p, 2 * PAGE);
        assert!(!h.is_valid(), "round {round}: valid after munmap returned");
        assert!(!other.is_valid(), "round {round}");
    }
}

/// `try_sync` right after munmap may say an event is still being applied, but says so
/// only until it has been applied: once it answers true, a raw subscriber (no gate) has
/// seen the invalidation; `sync` then returns at once and the cache's handle is invalid.
#[test]
fn try_sync_after_munmap_is_true_only_once_applied() {
    let Some((m, _dog)) = start("try_sync_after_munmap_is_true_only_once_applied") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let mut not_yet = 0;
    for round in 0..ROUNDS {
        let p = anon(2);
        let h = cache.get(p, 2 * PAGE).unwrap();
        let (_sub, flag) = flag_on(&m, p, 2 * PAGE);
        unmap(p, 2 * PAGE);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !m.try_sync().expect("the monitor runs") {
            not_yet += 1;
            assert!(
                Instant::now() < deadline,
                "round {round}: try_sync never true"
            );
            std::thread::yield_now();
        }
        assert!(
            flag.load(SeqCst),
            "round {round}: try_sync true before the unmap was applied"
        );
        m.sync().unwrap();
        assert!(!h.is_valid(), "round {round}");
    }
    eprintln!("try_sync answered false {not_yet} times in {ROUNDS} rounds");
}

/// `sync` right after munmap or madvise(DONTNEED) returns only once a raw subscriber (no
/// gate) has seen the invalidation, and leaves the cache's handle invalid.
#[test]
fn sync_after_munmap_or_madvise_applies_it() {
    let Some((m, _dog)) = start("sync_after_munmap_or_madvise_applies_it") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    for round in 0..ROUNDS {
        let p = anon(2);
        let h = cache.get(p, 2 * PAGE).unwrap();
        let (_sub, flag) = flag_on(&m, p, 2 * PAGE);
        let madvised = round % 2 == 1;
        if madvised {
            madvise(p, 2 * PAGE, libc::MADV_DONTNEED);
        } else {
            unmap(p, 2 * PAGE);
        }
        m.sync().unwrap();
        assert!(
            flag.load(SeqCst),
            "round {round} (madvise: {madvised}): sync returned before the event was applied"
        );
        assert!(!h.is_valid(), "round {round}");
        if madvised {
            unmap(p, 2 * PAGE);
        }
    }
}

/// Thread A unmaps and tells thread B once munmap returned, then waits for B; B's `sync`
/// returns only once the invalidation is applied (a raw subscriber saw it), and B's
/// `is_valid` of the cache's handle is false.
#[test]
fn sync_on_another_thread_after_munmap_applies_it() {
    let Some((m, _dog)) = start("sync_on_another_thread_after_munmap_applies_it") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (to_b, at_b) = mpsc::channel::<(usize, Arc<AtomicBool>, TestHandle)>();
    let (to_a, at_a) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let m = &m;
        let b = s.spawn(move || {
            let mut rounds = 0;
            for (p, flag, h) in at_b {
                m.sync().unwrap();
                assert!(
                    flag.load(SeqCst),
                    "round {rounds}: sync on another thread returned before the unmap of \
                     {p:#x} was applied"
                );
                assert!(!h.is_valid(), "round {rounds}");
                rounds += 1;
                to_a.send(()).unwrap();
            }
            rounds
        });
        // Thread A (this one).
        for _ in 0..ROUNDS {
            let p = anon(2);
            let h = cache.get(p, 2 * PAGE).unwrap();
            let (sub, flag) = flag_on(m, p, 2 * PAGE);
            unmap(p, 2 * PAGE);
            to_b.send((p as usize, flag, h)).unwrap();
            at_a.recv().expect("thread B failed");
            drop(sub);
        }
        drop(to_b);
        assert_eq!(b.join().unwrap(), ROUNDS);
    });
}

type TestHandle = mmu_uffd::CachedRegistration<
    mmu_uffd::FnRegistrar<
        Box<dyn Fn(*mut u8, usize) -> Result<(usize, usize, usize), std::io::Error> + Send + Sync>,
        Box<dyn Fn((usize, usize, usize)) + Send + Sync>,
    >,
>;
