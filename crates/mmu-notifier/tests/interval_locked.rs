//! Many interval subscriptions under one user lock (`IntervalLock`): one lock for a fill
//! that spans several subscriptions, the sequence set under it by the library, the guard's
//! `read_retry`, non-blockable invalidations meeting the held lock, and removal.
#![cfg(not(loom))]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mmu_notifier::{
    Event, IntervalLock, LockedIntervalContext, LockedIntervalSubscriber,
    LockedIntervalSubscription, Range, Subscriptions, WouldBlock,
};

const P: u64 = 4096;

fn unmap(start: u64, end: u64) -> Range {
    Range::new(start, end, Event::Unmap).unwrap()
}

/// A device page table shared by every interval of one device: page -> value.
#[derive(Default)]
struct DevicePt {
    pages: BTreeMap<u64, u64>,
    invalidations: u64,
}

/// One mirrored interval.
struct Buffer {
    releases: Arc<AtomicUsize>,
    /// Answer WouldBlock to non-blockable ranges (a subscriber that must sleep).
    sleeps: bool,
}

impl Buffer {
    fn new() -> Self {
        Buffer {
            releases: Arc::new(AtomicUsize::new(0)),
            sleeps: false,
        }
    }
}

impl LockedIntervalSubscriber for Buffer {
    type State = DevicePt;
    fn invalidate(
        &self,
        pt: &mut DevicePt,
        r: &Range,
        _: &mut LockedIntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        if self.sleeps && !r.blockable() {
            return Err(WouldBlock);
        }
        pt.invalidations += 1;
        pt.pages.retain(|&p, _| !r.overlaps(p * P, (p + 1) * P));
        Ok(())
    }
    fn release(&self) {
        self.releases.fetch_add(1, SeqCst);
    }
}

type Sub = LockedIntervalSubscription<Buffer>;

#[test]
fn a_fill_spanning_two_subscriptions_takes_one_lock_and_retries_when_either_was_invalidated() {
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(DevicePt::default());
    let a = mm
        .insert_locked_interval(0..4 * P, &lock, Buffer::new())
        .unwrap();
    let b = mm
        .insert_locked_interval(16 * P..20 * P, &lock, Buffer::new())
        .unwrap();
    for (victim, other) in [(&a, &b), (&b, &a)] {
        let (sv, so) = (victim.read_begin(), other.read_begin());
        // An invalidation of `victim` only, between read_begin and the lock.
        let start = victim.range().unwrap().start;
        drop(mm.invalidate_range_start(unmap(start, start + P)));
        let pt = lock.lock();
        assert!(pt.read_retry(victim, sv), "the invalidated one must retry");
        assert!(!pt.read_retry(other, so), "the other one is still good");
        drop(pt);
        // A second round with no invalidation is accepted for both.
        let (sv, so) = (victim.read_begin(), other.read_begin());
        let mut pt = lock.lock();
        assert!(!pt.read_retry(victim, sv) && !pt.read_retry(other, so));
        pt.pages.insert(start / P, 1);
    }
    assert_eq!(lock.lock().invalidations, 2);
    // One invalidation over both calls both, each under the same lock.
    drop(mm.invalidate_range_start(unmap(0, 32 * P)));
    let pt = lock.lock();
    assert_eq!(pt.invalidations, 4);
    assert!(pt.pages.is_empty());
}

#[test]
fn a_nonblocking_invalidation_meeting_the_held_shared_lock_fails_and_a_blockable_one_waits() {
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(DevicePt::default());
    let _a = mm
        .insert_locked_interval(0..P, &lock, Buffer::new())
        .unwrap();
    let _b = mm
        .insert_locked_interval(8 * P..9 * P, &lock, Buffer::new())
        .unwrap();
    let held = lock.lock();
    // Non-blockable, on the *other* subscription: it shares the held lock.
    assert_eq!(
        mm.try_invalidate_range_start(unmap(8 * P, 9 * P)).err(),
        Some(WouldBlock)
    );
    assert_eq!(mm.stats().interval_seq & 1, 0, "the interval part ended");
    // Blockable: waits for the lock.
    let done = Arc::new(AtomicBool::new(false));
    let t = {
        let (mm, done) = (mm.clone(), done.clone());
        thread::spawn(move || {
            drop(mm.invalidate_range_start(unmap(8 * P, 9 * P)));
            done.store(true, SeqCst);
        })
    };
    thread::sleep(Duration::from_millis(30));
    assert!(
        !done.load(SeqCst),
        "a blockable invalidation took a held lock"
    );
    assert_eq!(held.invalidations, 0);
    drop(held);
    t.join().unwrap();
    assert_eq!(lock.lock().invalidations, 1);
    // With the lock free, the non-blockable one succeeds.
    drop(mm.try_invalidate_range_start(unmap(8 * P, 9 * P)).unwrap());
    assert_eq!(lock.lock().invalidations, 2);
    assert_eq!(mm.stats().subscriber_bugs, 0);
}

#[test]
fn would_block_is_an_error_only_in_nonblockable_ranges() {
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(DevicePt::default());
    let mut sleeper = Buffer::new();
    sleeper.sleeps = true;
    let _s = mm.insert_locked_interval(0..P, &lock, sleeper).unwrap();
    assert_eq!(
        mm.try_invalidate_range_start(unmap(0, P)).err(),
        Some(WouldBlock)
    );
    assert_eq!(
        mm.stats().subscriber_bugs,
        0,
        "legal in a non-blockable range"
    );
    drop(mm.invalidate_range_start(unmap(0, P)));
    assert_eq!(lock.lock().invalidations, 1);
}

#[test]
#[should_panic(expected = "not inserted under")]
fn read_retry_with_another_locks_guard_panics() {
    let mm = Subscriptions::new();
    let (l1, l2) = (
        IntervalLock::new(DevicePt::default()),
        IntervalLock::new(DevicePt::default()),
    );
    let a = mm.insert_locked_interval(0..P, &l1, Buffer::new()).unwrap();
    let seq = a.read_begin();
    let _ = l2.lock().read_retry(&a, seq);
}

#[test]
fn release_runs_once_on_every_removal_path_and_dropping_with_the_lock_held_never_waits() {
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(DevicePt::default());
    let mk = |r: std::ops::Range<u64>| {
        let b = Buffer::new();
        let n = b.releases.clone();
        (mm.insert_locked_interval(r, &lock, b).unwrap(), n)
    };
    let (a, na) = mk(0..P);
    let (b, nb) = mk(P..2 * P);
    let (c, nc) = mk(2 * P..3 * P);
    a.remove();
    b.remove_nowait();
    {
        // Dropping a subscription while holding the shared lock: release does not take it.
        let _pt = lock.lock();
        drop(c);
    }
    for n in [&na, &nb, &nc] {
        assert_eq!(n.load(SeqCst), 1);
    }
    // Removed while frozen: released at the end of the invalidation, not before.
    let (d, nd) = mk(4 * P..5 * P);
    let g = mm.invalidate_range_start(unmap(4 * P, 5 * P));
    d.remove_nowait();
    assert_eq!(nd.load(SeqCst), 0);
    drop(g);
    assert_eq!(nd.load(SeqCst), 1);
    assert_eq!(mm.stats().interval_subscriptions, 0);
}

#[test]
fn split_and_update_keep_the_lock_and_route_invalidations() {
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(DevicePt::default());
    let a = mm
        .insert_locked_interval(0..10 * P, &lock, Buffer::new())
        .unwrap();
    let right = a.split(0..4 * P, 6 * P..10 * P, Buffer::new()).unwrap();
    assert!(Arc::ptr_eq(right.lock(), &lock));
    assert_eq!(a.range(), Some(0..4 * P));
    assert_eq!(right.range(), Some(6 * P..10 * P));
    drop(mm.invalidate_range_start(unmap(4 * P, 6 * P))); // the hole
    assert_eq!(lock.lock().invalidations, 0);
    right.update(20 * P..21 * P).unwrap();
    drop(mm.invalidate_range_start(unmap(20 * P, 21 * P)));
    assert_eq!(lock.lock().invalidations, 1);
    assert!(
        format!("{right:?}").contains("0x14000..0x15000"),
        "{right:?}"
    );
}

/// Removes itself from its own callback (never waits), with the shared lock held.
struct OneShot(Arc<AtomicUsize>);

impl LockedIntervalSubscriber for OneShot {
    type State = u64;
    fn invalidate(
        &self,
        calls: &mut u64,
        _: &Range,
        ctx: &mut LockedIntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        *calls += 1;
        ctx.remove_self();
        Ok(())
    }
    fn release(&self) {
        self.0.fetch_add(1, SeqCst);
    }
}

#[test]
fn remove_self_from_a_callback_under_the_shared_lock() {
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(0u64);
    let n = Arc::new(AtomicUsize::new(0));
    let s = mm
        .insert_locked_interval(0..P, &lock, OneShot(n.clone()))
        .unwrap();
    drop(mm.invalidate_range_start(unmap(0, P)));
    drop(mm.invalidate_range_start(unmap(0, P)));
    assert_eq!(*lock.lock(), 1, "called once, then out of the tree");
    assert_eq!(n.load(SeqCst), 1);
    assert_eq!(s.range(), None);
}

/// Several threads fill pages through four subscriptions under one lock while the primary
/// changes pages inside invalidations: an installed value is never stale.
#[test]
fn concurrent_fills_through_many_subscriptions_never_install_a_stale_value() {
    let (fills, stale) = stress(false);
    assert!(fills > 0, "no fill was ever accepted");
    assert_eq!(stale, 0, "stale values installed");
}

/// The check above catches a fill that skips `read_retry`.
#[test]
fn the_stress_check_catches_a_fill_that_ignores_read_retry() {
    let (_, stale) = stress(true);
    assert!(stale > 0, "a fill ignoring read_retry went unnoticed");
}

/// Returns (fills accepted, stale copies seen).
fn stress(ignore_retry: bool) -> (u64, u64) {
    const SUBS: u64 = 4;
    const PAGES_PER: u64 = 4;
    let npages = SUBS * PAGES_PER;
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(DevicePt::default());
    let subs: Arc<Vec<Sub>> = Arc::new(
        (0..SUBS)
            .map(|i| {
                let r = i * PAGES_PER * P..(i + 1) * PAGES_PER * P;
                mm.insert_locked_interval(r, &lock, Buffer::new()).unwrap()
            })
            .collect(),
    );
    let primary: Arc<Vec<AtomicU64>> = Arc::new((0..npages).map(AtomicU64::new).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mm, primary, stop) = (mm.clone(), primary.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 1000u64;
            while !stop.load(SeqCst) {
                // Sometimes one page, sometimes a range across two subscriptions.
                let first = n % npages;
                let len = if n % 3 == 0 {
                    (PAGES_PER + 1).min(npages - first)
                } else {
                    1
                };
                let g = mm.invalidate_range_start(unmap(first * P, (first + len) * P));
                for p in first..first + len {
                    primary[p as usize].store(n, SeqCst);
                }
                drop(g);
                n += 1;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_millis(700);
    let fillers: Vec<_> = (0..2u64)
        .map(|t| {
            let (subs, lock, primary) = (subs.clone(), lock.clone(), primary.clone());
            thread::spawn(move || {
                let (mut fills, mut stale) = (0u64, 0u64);
                let mut i = t;
                while Instant::now() < deadline {
                    // A fill of two pages in neighbouring subscriptions, one lock.
                    let p0 = (i * 5) % npages;
                    let p1 = (p0 + PAGES_PER) % npages;
                    let (s0, s1) = (
                        &subs[(p0 / PAGES_PER) as usize],
                        &subs[(p1 / PAGES_PER) as usize],
                    );
                    let (q0, q1) = (s0.read_begin(), s1.read_begin());
                    let (v0, v1) = (
                        primary[p0 as usize].load(SeqCst),
                        primary[p1 as usize].load(SeqCst),
                    );
                    (0..100).for_each(|_| std::hint::spin_loop());
                    let mut pt = lock.lock();
                    let retry = pt.read_retry(s0, q0) || pt.read_retry(s1, q1);
                    if !retry || ignore_retry {
                        pt.pages.insert(p0, v0);
                        pt.pages.insert(p1, v1);
                        fills += 1;
                    }
                    // The check, under the lock: every copy is the primary's (the primary
                    // changes a page only after an invalidation, which needs this lock,
                    // dropped the copy).
                    for (&p, &v) in pt.pages.iter() {
                        stale += u64::from(v != primary[p as usize].load(SeqCst));
                    }
                    drop(pt);
                    i += 1;
                }
                (fills, stale)
            })
        })
        .collect();
    let totals: Vec<(u64, u64)> = fillers.into_iter().map(|f| f.join().unwrap()).collect();
    stop.store(true, SeqCst);
    writer.join().unwrap();
    totals.iter().fold((0, 0), |(f, s), t| (f + t.0, s + t.1))
}
