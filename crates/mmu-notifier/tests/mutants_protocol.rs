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

/// Records the events of its invalidations.
struct Events(Arc<std::sync::Mutex<Vec<Event>>>);

impl IntervalSubscriber for Events {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0.lock().unwrap().push(r.event());
        Ok(())
    }
}

/// Address-space release runs one `Release` invalidation; releasing again does nothing.
#[test]
fn a_second_release_invalidates_nothing() {
    let mm = Subscriptions::new();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _a = mm.insert_interval(0..P, Events(seen.clone())).unwrap();
    mm.release();
    mm.release();
    assert_eq!(*seen.lock().unwrap(), [Event::Release]);
    assert_eq!(mm.stats().interval_seq, 4, "one frozen period");
}

/// Moving a subscription while an invalidation that found nothing is in flight freezes the
/// tree (that invalidation may cover the new range): the moved subscription takes the odd
/// sequence and a fill through it waits for the end.
#[test]
fn an_update_while_a_partial_exclusion_is_in_flight_freezes_and_takes_the_odd_seq() {
    let mm = Subscriptions::new();
    let n = Arc::new(AtomicUsize::new(0));
    let a = Arc::new(mm.insert_interval(0..P, Counter(n.clone())).unwrap());
    let g = mm.invalidate_range_start(unmap(10 * P, 11 * P)); // misses a
    assert_eq!(mm.stats().interval_seq, 2, "partially excluded");
    a.update(10 * P..11 * P).unwrap();
    assert_eq!(mm.stats().interval_seq, 3, "the update froze the tree");
    assert!(format!("{a:?}").contains("seq: 3"), "{a:?}");
    assert_eq!(
        a.range(),
        Some(10 * P..11 * P),
        "moved at once (not frozen)"
    );
    let (tx, rx) = mpsc::channel();
    let filler = {
        let a = a.clone();
        thread::spawn(move || {
            let seq = a.read_begin();
            tx.send(()).unwrap();
            seq
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "read_begin returned while the update's freeze was in force"
    );
    drop(g);
    let seq = filler.join().unwrap();
    assert_eq!(mm.stats().interval_seq, 4);
    assert!(!a.lock().read_retry(seq));
    assert_eq!(
        n.load(SeqCst),
        0,
        "the in-flight invalidation had found nothing"
    );
}

/// The halves of a split may lie either way round; they must not overlap, whichever is
/// below.
#[test]
fn split_halves_may_be_in_either_order_and_must_not_overlap() {
    let mm = Subscriptions::new();
    let n = Arc::new(AtomicUsize::new(0));
    let a = mm
        .insert_interval(4 * P..8 * P, Counter(n.clone()))
        .unwrap();
    // The new subscription below the old one.
    let low = a
        .split(6 * P..8 * P, 4 * P..5 * P, Counter(n.clone()))
        .unwrap();
    assert_eq!(a.range(), Some(6 * P..8 * P));
    assert_eq!(low.range(), Some(4 * P..5 * P));
    drop(mm.invalidate_range_start(unmap(5 * P, 6 * P)));
    assert_eq!(n.load(SeqCst), 0, "the hole");
    drop(mm.invalidate_range_start(unmap(4 * P, 5 * P)));
    assert_eq!(n.load(SeqCst), 1);
    // Overlapping halves, either way round.
    for (left, right) in [(6 * P..8 * P, 7 * P..9 * P), (6 * P..8 * P, 5 * P..7 * P)] {
        assert_eq!(
            a.split(left, right, Counter(n.clone())).unwrap_err(),
            mmu_notifier::IntervalError::SplitOverlap
        );
    }
    assert_eq!(
        a.range(),
        Some(6 * P..8 * P),
        "a refused split changes nothing"
    );
    assert_eq!(mm.stats().interval_subscriptions, 2);
}

/// A range's accessors and its overlap test, at the edges (half-open: touching is not
/// overlapping).
#[test]
fn range_accessors_and_half_open_overlap() {
    let r = Range::new(0x1000, 0x3000, Event::Clear).unwrap();
    assert_eq!((r.start(), r.end(), r.len()), (0x1000, 0x3000, 0x2000));
    assert!(!r.is_empty());
    assert_eq!(r.event(), Event::Clear);
    assert!(r.blockable());
    assert_eq!(r.owner(), None);
    assert!(r.overlaps(0x2fff, 0x4000));
    assert!(r.overlaps(0, 0x1001));
    assert!(r.overlaps(0x1800, 0x1900));
    assert!(r.overlaps(0, u64::MAX));
    assert!(!r.overlaps(0x3000, 0x4000), "starts at the end");
    assert!(!r.overlaps(0, 0x1000), "ends at the start");
    let all = Range::everything(Event::Release);
    assert_eq!((all.start(), all.end()), (0, u64::MAX));
    assert_eq!(all.event(), Event::Release);
    assert!(all.blockable());
    assert_eq!(
        format!("{all:?}"),
        "Range(0x0..0xffffffffffffffff, Release, blockable)"
    );
}

/// The list subscriber that implements nothing: aging answers "not young", its start
/// succeeds, even in a non-blockable range.
#[test]
fn a_list_subscriber_that_implements_nothing_is_never_young_and_never_blocks() {
    struct Nothing;
    impl mmu_notifier::ListSubscriber for Nothing {}
    let mm = Subscriptions::new();
    let _r = mm.register(Arc::new(Nothing)).unwrap();
    assert!(!mm.clear_flush_young(0, P));
    assert!(!mm.clear_young(0, P));
    assert!(!mm.test_young(0));
    drop(mm.try_invalidate_range_start(unmap(0, P)).unwrap());
}

/// Aging ORs the answers of every subscriber: two young subscribers still make "young".
#[test]
fn aging_with_two_young_subscribers_is_young() {
    struct Young(AtomicUsize);
    impl mmu_notifier::ListSubscriber for Young {
        fn clear_flush_young(&self, _: u64, _: u64) -> bool {
            self.0.fetch_add(1, SeqCst);
            true
        }
        fn clear_young(&self, _: u64, _: u64) -> bool {
            self.0.fetch_add(1, SeqCst);
            true
        }
    }
    let mm = Subscriptions::new();
    let subs = [
        Arc::new(Young(AtomicUsize::new(0))),
        Arc::new(Young(AtomicUsize::new(0))),
    ];
    let _regs: Vec<_> = subs
        .iter()
        .map(|s| mm.register(s.clone()).unwrap())
        .collect();
    assert!(mm.clear_flush_young(0, P));
    assert!(mm.clear_young(0, P));
    assert!(
        subs.iter().all(|s| s.0.load(SeqCst) == 2),
        "every one asked"
    );
}

#[test]
fn same_tells_handles_of_one_address_space_apart_from_another() {
    let mm = Subscriptions::new();
    assert!(mm.same(&mm.clone()));
    assert!(!mm.same(&Subscriptions::new()));
}

/// Shared subscribers of two types on one address space: the first `get` of the second
/// type registers it (the "already registered" check matches the type, not any entry).
#[test]
fn shared_subscribers_of_two_types_are_both_registered() {
    struct A;
    impl mmu_notifier::ListSubscriber for A {}
    impl mmu_notifier::SharedSubscriber for A {
        fn alloc(_: &Subscriptions) -> Result<Self, mmu_notifier::GetError> {
            Ok(A)
        }
    }
    struct B;
    impl mmu_notifier::ListSubscriber for B {}
    impl mmu_notifier::SharedSubscriber for B {
        fn alloc(_: &Subscriptions) -> Result<Self, mmu_notifier::GetError> {
            Ok(B)
        }
    }
    let mm = Subscriptions::new();
    let (tx, rx) = mpsc::channel();
    {
        let mm = mm.clone();
        // Detached: a get that loops for ever fails the test at the deadline below.
        thread::spawn(move || {
            let a = mm.get::<A>().unwrap();
            let b = mm.get::<B>().unwrap();
            let n = mm.stats().list_subscribers;
            drop((a, b));
            let _ = tx.send(n);
        });
    }
    let n = rx
        .recv_timeout(DEADLINE)
        .expect("the first get of a second shared type never returned");
    assert_eq!(n, 2);
}

/// Two first `get`s of one type that both allocate: one instance is registered and
/// shared, the other dropped unused.
#[test]
fn racing_first_gets_register_one_instance() {
    static BOTH_ALLOCATING: std::sync::Barrier = std::sync::Barrier::new(2);
    static ALLOCS: AtomicUsize = AtomicUsize::new(0);
    struct Racy(usize);
    impl mmu_notifier::ListSubscriber for Racy {}
    impl mmu_notifier::SharedSubscriber for Racy {
        fn alloc(_: &Subscriptions) -> Result<Self, mmu_notifier::GetError> {
            let n = ALLOCS.fetch_add(1, SeqCst);
            // Both callers are past the "already registered?" look-up when this returns.
            BOTH_ALLOCATING.wait();
            Ok(Racy(n))
        }
    }
    let mm = Subscriptions::new();
    let getters: Vec<_> = (0..2)
        .map(|_| {
            let mm = mm.clone();
            thread::spawn(move || {
                let h = mm.get::<Racy>().unwrap();
                let id = h.0;
                (h, id)
            })
        })
        .collect();
    let got: Vec<_> = getters.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(ALLOCS.load(SeqCst), 2, "both allocated");
    assert_eq!(got[0].1, got[1].1, "both share one instance");
    assert_eq!(mm.stats().list_subscribers, 1, "one registration");
}

/// Every handle leads back to its own address space.
#[test]
fn handles_lead_back_to_their_address_space() {
    struct Reg;
    impl mmu_notifier::ListSubscriber for Reg {}
    impl mmu_notifier::SharedSubscriber for Reg {
        fn alloc(_: &Subscriptions) -> Result<Self, mmu_notifier::GetError> {
            Ok(Reg)
        }
    }
    let mm = Subscriptions::new();
    let n = Arc::new(AtomicUsize::new(0));
    let sub = mm.insert_interval(0..P, Counter(n)).unwrap();
    assert!(sub.subscriptions().same(&mm));
    let lock = IntervalLock::new(0usize);
    let locked = mm.insert_locked_interval(P..2 * P, &lock, Shared).unwrap();
    assert!(locked.subscriptions().same(&mm));
    assert!(Arc::ptr_eq(locked.lock(), &lock));
    let seq = locked.read_begin();
    assert!(!locked.check_retry(seq), "nothing ran since read_begin");
    drop(mm.invalidate_range_start(unmap(P, 2 * P)));
    assert!(locked.check_retry(seq));
    let reg = mm.register(Arc::new(Reg)).unwrap();
    assert!(reg.subscriptions().same(&mm));
    assert!(
        format!("{reg:?}").starts_with("ListRegistration { id: "),
        "{reg:?}"
    );
    let shared = mm.get::<Reg>().unwrap();
    assert!(shared.subscriptions().same(&mm));
    let s = format!("{shared:?}");
    assert!(s.starts_with("Shared") && s.contains("Reg"), "{s}");
    let g = mm.invalidate_range_start(unmap(0, P));
    assert!(g.subscriptions().same(&mm));
    assert_eq!((g.range().start(), g.range().end()), (0, P));
}

/// A `get` that loses the race to register still returns only after the winner's grace
/// period: an invalidation in flight when both started has ended by then.
#[test]
fn a_get_that_lost_the_race_waits_for_the_winners_grace_period() {
    static BOTH_ALLOCATING: std::sync::Barrier = std::sync::Barrier::new(2);
    struct Slow;
    impl mmu_notifier::ListSubscriber for Slow {}
    impl mmu_notifier::SharedSubscriber for Slow {
        fn alloc(_: &Subscriptions) -> Result<Self, mmu_notifier::GetError> {
            BOTH_ALLOCATING.wait();
            Ok(Slow)
        }
    }
    let mm = Subscriptions::new();
    let (held_tx, held_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    let primary = {
        let mm = mm.clone();
        thread::spawn(move || {
            let g = mm.invalidate_range_start(unmap(0, P));
            held_tx.send(()).unwrap();
            end_rx.recv().unwrap();
            drop(g);
        })
    };
    held_rx.recv().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let getters: Vec<_> = (0..2)
        .map(|_| {
            let (mm, done_tx) = (mm.clone(), done_tx.clone());
            thread::spawn(move || {
                let h = mm.get::<Slow>().unwrap();
                done_tx.send(()).unwrap();
                h
            })
        })
        .collect();
    assert!(
        done_rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "a get returned while an invalidation it may have missed was in flight"
    );
    end_tx.send(()).unwrap();
    primary.join().unwrap();
    for t in getters {
        drop(t.join().unwrap());
    }
}

/// What a shared-lock subscriber's callback sees in its context: the odd sequence, the
/// address space, and a move of its own subscription that applies at the end.
#[test]
fn a_locked_callbacks_context_shows_the_odd_seq_and_moves_its_subscription() {
    #[derive(Default)]
    struct Seen(Vec<String>);
    struct Mover;
    impl LockedIntervalSubscriber for Mover {
        type State = Seen;
        fn invalidate(
            &self,
            seen: &mut Seen,
            _: &Range,
            ctx: &mut LockedIntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            seen.0.push(format!("{ctx:?}"));
            seen.0.push(format!("cur_seq {}", ctx.cur_seq()));
            let n = ctx.subscriptions().stats().interval_subscriptions;
            seen.0.push(format!("subscriptions {n}"));
            ctx.update_self(8 * P..9 * P).unwrap();
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(Seen::default());
    let a = mm.insert_locked_interval(0..P, &lock, Mover).unwrap();
    drop(mm.invalidate_range_start(unmap(0, P)));
    assert_eq!(
        lock.lock().0,
        [
            "LockedIntervalContext { cur_seq: 3 }",
            "cur_seq 3",
            "subscriptions 1"
        ]
    );
    assert_eq!(a.range(), Some(8 * P..9 * P), "moved by update_self");
}

/// `remove` of a shared-lock subscription waits for the invalidation in flight, then
/// runs `release` (dropping it would not wait).
#[test]
fn removing_a_locked_subscription_waits_for_the_invalidation_in_flight() {
    struct Rel(Arc<AtomicUsize>);
    impl LockedIntervalSubscriber for Rel {
        type State = ();
        fn invalidate(
            &self,
            _: &mut (),
            _: &Range,
            _: &mut LockedIntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            Ok(())
        }
        fn release(&self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let mm = Subscriptions::new();
    let lock = IntervalLock::new(());
    let released = Arc::new(AtomicUsize::new(0));
    let a = mm
        .insert_locked_interval(0..P, &lock, Rel(released.clone()))
        .unwrap();
    let (held_tx, held_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    let primary = {
        let mm = mm.clone();
        thread::spawn(move || {
            let g = mm.invalidate_range_start(unmap(0, P));
            held_tx.send(()).unwrap();
            end_rx.recv().unwrap();
            drop(g);
        })
    };
    held_rx.recv().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let remover = thread::spawn(move || {
        a.remove();
        done_tx.send(()).unwrap();
    });
    assert!(
        done_rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "remove returned while an invalidation could still call the subscription"
    );
    assert_eq!(released.load(SeqCst), 0);
    end_tx.send(()).unwrap();
    primary.join().unwrap();
    remover.join().unwrap();
    assert_eq!(released.load(SeqCst), 1);
}
