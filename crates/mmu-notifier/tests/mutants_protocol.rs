//! Protocol edges that mutation testing (`scripts/mutants.sh`) found untested: each test
//! here names the behaviour it pins down, and `docs/mutants.md` lists the mutants it kills.
//!
//! A mutant that turns a try-lock into a blocking lock makes the test deadlock, which a
//! mutation run can only report as a timeout; these tests run the step that must not wait
//! on a helper thread and fail after a generous deadline instead.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use mmu_notifier::{
    Event, IntervalContext, IntervalLock, IntervalSubscriber, LockedIntervalContext,
    LockedIntervalSubscriber, OwnerToken, Range, Subscriptions, WouldBlock,
};

const P: u64 = 4096;

/// Long enough never to fire on a loaded machine when the step does not wait at all.
const DEADLINE: Duration = Duration::from_secs(20);

fn unmap(start: u64, end: u64) -> Range {
    Range::new(start, end, Event::Unmap).unwrap()
}

/// Counts its invalidations.
#[derive(Debug)]
struct Counter(Arc<AtomicUsize>);

impl IntervalSubscriber for Counter {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0.fetch_add(1, SeqCst);
        Ok(())
    }
}

/// Counts its invalidations in the shared state.
struct Shared;

impl LockedIntervalSubscriber for Shared {
    type State = usize;
    fn invalidate(
        &self,
        n: &mut usize,
        _: &Range,
        _: &mut LockedIntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        *n += 1;
        Ok(())
    }
}

/// Runs a non-blockable invalidation of `range` on another thread and returns its outcome;
/// panics if it has not returned by the deadline (it waited for a lock).
fn try_invalidate_elsewhere(mm: &Subscriptions, range: Range) -> Result<(), WouldBlock> {
    let (tx, rx) = mpsc::channel();
    let mm = mm.clone();
    // Detached on purpose: if it is stuck, the test fails here and the process exits.
    thread::spawn(move || {
        let outcome = mm.try_invalidate_range_start(range).map(drop);
        let _ = tx.send(outcome);
    });
    rx.recv_timeout(DEADLINE)
        .expect("a non-blockable invalidation waited for a held user lock")
}

#[test]
fn a_nonblockable_invalidation_try_locks_a_subscriptions_own_lock() {
    let mm = Subscriptions::new();
    let n = Arc::new(AtomicUsize::new(0));
    let sub = mm.insert_interval(0..P, Counter(n.clone())).unwrap();
    let held = sub.lock();
    assert_eq!(try_invalidate_elsewhere(&mm, unmap(0, P)), Err(WouldBlock));
    assert_eq!(n.load(SeqCst), 0, "invalidate ran without the user lock");
    assert_eq!(mm.stats().interval_seq & 1, 0, "the interval part ended");
    drop(held);
    assert_eq!(try_invalidate_elsewhere(&mm, unmap(0, P)), Ok(()));
    assert_eq!(n.load(SeqCst), 1);
    assert_eq!(mm.stats().subscriber_bugs, 0);
}

#[test]
fn a_nonblockable_invalidation_try_locks_a_shared_interval_lock() {
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(0usize);
    let _a = mm.insert_locked_interval(0..P, &lock, Shared).unwrap();
    let held = lock.lock();
    assert_eq!(try_invalidate_elsewhere(&mm, unmap(0, P)), Err(WouldBlock));
    assert_eq!(*held, 0);
    drop(held);
    assert_eq!(try_invalidate_elsewhere(&mm, unmap(0, P)), Ok(()));
    assert_eq!(*lock.lock(), 1);
    assert_eq!(mm.stats().subscriber_bugs, 0);
}

/// Every `Debug` of the crate shows what it is about (ranges in hex, the state of a
/// subscription): they are what a user sees in a failed assertion or a log line.
#[test]
fn debug_output_shows_ranges_in_hex_and_the_sequence() {
    let mm = Subscriptions::new();
    let n = Arc::new(AtomicUsize::new(0));
    let sub = mm.insert_interval(0x1000..0x3000, Counter(n)).unwrap();
    let s = format!("{sub:?}");
    assert!(s.starts_with("IntervalSubscription"), "{s}");
    assert!(s.contains("0x1000..0x3000"), "{s}");
    assert!(s.contains("seq: 1"), "idle insert takes seq - 1: {s}");
    let seq = sub.read_begin();
    assert_eq!(format!("{seq:?}"), "ReadSeq(1)");
    assert_eq!(format!("{:?}", sub.lock()), "IntervalGuard(Counter(0))");

    let lock = IntervalLock::new(7u32);
    let locked = mm
        .insert_locked_interval(0x4000..0x5000, &lock, Shared2)
        .unwrap();
    let s = format!("{locked:?}");
    assert!(s.starts_with("LockedIntervalSubscription"), "{s}");
    assert!(s.contains("0x4000..0x5000"), "{s}");
    assert!(format!("{lock:?}").starts_with("IntervalLock"));
    assert_eq!(format!("{:?}", lock.lock()), "IntervalLockGuard(7)");

    let r = unmap(0x1000, 0x2000).with_owner(OwnerToken(9));
    assert_eq!(
        format!("{r:?}"),
        "Range(0x1000..0x2000, Unmap, blockable, owner 9)"
    );
    let g = mm.invalidate_range_start(r);
    let s = format!("{g:?}");
    assert!(s.starts_with("InvalidateGuard"), "{s}");
    assert!(s.contains("0x1000..0x2000"), "{s}");
    drop(g);
    let s = format!("{mm:?}");
    assert!(s.contains("interval_subscriptions: 2"), "{s}");
    assert!(s.contains("interval_seq: 4"), "{s}");
    assert!(format!("{:?}", mm.srcu()).starts_with("Srcu"));
}

/// Like [`Shared`], over a `u32` state.
struct Shared2;

impl LockedIntervalSubscriber for Shared2 {
    type State = u32;
    fn invalidate(
        &self,
        _: &mut u32,
        _: &Range,
        _: &mut LockedIntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        Ok(())
    }
}
