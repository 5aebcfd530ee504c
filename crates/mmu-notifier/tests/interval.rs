//! Interval subscriptions: the collision-retry protocol, deferred tree updates, safe updates
//! from inside callbacks, and the historical fixes.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use mmu_notifier::{
    Event, IntervalContext, IntervalError, IntervalSubscriber, IntervalSubscription,
    ListSubscriber, Range, Subscriptions, WouldBlock,
};

/// Shared record of what the subscribers saw.
#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Log {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// What a test subscriber should do from inside its callback.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    Nothing,
    RemoveSelf,
    Update(u64, u64),
    Split((u64, u64), (u64, u64)),
    Insert(u64, u64),
}

struct Sub {
    name: String,
    log: Arc<Log>,
    action: Action,
    releases: Arc<AtomicUsize>,
    spawned: Arc<Mutex<Vec<IntervalSubscription<Sub>>>>,
}

impl Sub {
    fn new(name: &str, log: &Arc<Log>) -> Self {
        Sub {
            name: name.into(),
            log: log.clone(),
            action: Action::Nothing,
            releases: Arc::new(AtomicUsize::new(0)),
            spawned: Arc::new(Mutex::new(Vec::new())),
        }
    }
    fn with(mut self, action: Action) -> Self {
        self.action = action;
        self
    }
}

impl IntervalSubscriber for Sub {
    fn invalidate(
        &mut self,
        r: &Range,
        ctx: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.log.push(format!("{}:{:?}", self.name, r.event()));
        match std::mem::replace(&mut self.action, Action::Nothing) {
            Action::Nothing => {}
            Action::RemoveSelf => ctx.remove_self(),
            Action::Update(s, l) => ctx.update_self(s..s + l).unwrap(),
            Action::Split(a, b) => {
                let mut right = Sub::new(&format!("{}-right", self.name), &self.log);
                right.releases = self.releases.clone();
                let h = ctx
                    .split_self(a.0..a.0 + a.1, b.0..b.0 + b.1, right)
                    .unwrap();
                self.spawned.lock().unwrap().push(h);
            }
            Action::Insert(s, l) => {
                let h = ctx
                    .subscriptions()
                    .insert_interval(s..s + l, Sub::new("inserted", &self.log))
                    .unwrap();
                self.spawned.lock().unwrap().push(h);
            }
        }
        Ok(())
    }
    fn release(&mut self) {
        self.releases.fetch_add(1, SeqCst);
        self.log.push(format!("{}:release", self.name));
    }
}

/// A subscriber without a release op.
struct Plain(Arc<AtomicUsize>);
impl IntervalSubscriber for Plain {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0.fetch_add(1, SeqCst);
        Ok(())
    }
}

const P: u64 = 4096;

fn r(start: u64, end: u64) -> Range {
    Range::new(start, end, Event::Unmap).unwrap()
}

#[test]
fn seq_starts_at_two_and_is_odd_only_while_a_subscription_is_being_invalidated() {
    let mm = Subscriptions::new();
    assert_eq!(mm.stats().interval_seq, 2);
    let log = Arc::new(Log::default());
    let _s = mm
        .insert_interval(10 * P..11 * P, Sub::new("a", &log))
        .unwrap();
    {
        let _g = mm.invalidate_range_start(r(0, P)); // misses it
        assert_eq!(
            mm.stats().interval_seq,
            2,
            "partially excluded: seq stays even"
        );
    }
    {
        let _g = mm.invalidate_range_start(r(10 * P, 11 * P));
        assert_eq!(mm.stats().interval_seq, 3, "frozen: odd");
    }
    assert_eq!(mm.stats().interval_seq, 4);
    assert_eq!(log.take(), ["a:Unmap"]);
}

#[test]
fn only_overlapping_subscriptions_are_invalidated_closed_intervals() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _a = mm.insert_interval(0..P, Sub::new("a", &log)).unwrap(); // [0, P-1]
    let _b = mm.insert_interval(P..2 * P, Sub::new("b", &log)).unwrap(); // [P, 2P-1]
    drop(mm.invalidate_range_start(r(P - 1, P))); // last byte of a only
    assert_eq!(log.take(), ["a:Unmap"]);
    drop(mm.invalidate_range_start(r(P, P + 1)));
    assert_eq!(log.take(), ["b:Unmap"]);
    drop(mm.invalidate_range_start(r(2 * P, 3 * P)));
    assert!(log.take().is_empty());
}

#[test]
fn a_fill_that_overlapped_an_invalidation_is_rejected_and_one_after_it_accepted() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let s = mm.insert_interval(0..4 * P, Sub::new("a", &log)).unwrap();
    let seq = s.read_begin();
    assert!(!s.check_retry(seq));
    drop(mm.invalidate_range_start(r(0, P)));
    assert!(s.check_retry(seq), "lock-free hint");
    assert!(
        s.lock().read_retry(seq),
        "a fill that overlapped an invalidation"
    );
    let seq = s.read_begin();
    assert!(!s.lock().read_retry(seq), "a fill after the end");
}

#[test]
fn read_begin_waits_while_its_subscription_is_being_invalidated() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let s = Arc::new(mm.insert_interval(0..4 * P, Sub::new("a", &log)).unwrap());
    let started = Arc::new(Barrier::new(2));
    let ended = Arc::new(AtomicBool::new(false));
    let primary = {
        let (mm, started, ended) = (mm.clone(), started.clone(), ended.clone());
        thread::spawn(move || {
            let g = mm.invalidate_range_start(r(0, P));
            started.wait();
            thread::sleep(Duration::from_millis(50));
            ended.store(true, SeqCst);
            drop(g);
        })
    };
    started.wait();
    let seq = s.read_begin();
    assert!(
        ended.load(SeqCst),
        "read_begin returned while its range was invalidated"
    );
    assert!(!s.lock().read_retry(seq));
    primary.join().unwrap();
}

#[test]
fn interval_subscribers_are_invalidated_before_list_subscribers_and_end_first() {
    struct ListLog(Arc<Log>);
    impl ListSubscriber for ListLog {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            self.0.push("list:start".into());
            Ok(())
        }
        fn invalidate_range_end(&self, _: &Range) {
            self.0.push("list:end".into());
        }
    }
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _l = mm.register(Arc::new(ListLog(log.clone()))).unwrap();
    let s = mm.insert_interval(0..P, Sub::new("iv", &log)).unwrap();
    let g = mm.invalidate_range_start(r(0, P));
    assert_eq!(log.take(), ["iv:Unmap", "list:start"]);
    let seq_before = mm.stats().interval_seq;
    drop(g);
    assert_eq!(seq_before & 1, 1);
    assert_eq!(log.take(), ["list:end"]);
    drop(s);
}

#[test]
fn nonblocking_invalidation_fails_when_the_user_lock_is_held_and_skips_list_subscribers() {
    struct ListLog(Arc<Log>);
    impl ListSubscriber for ListLog {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            self.0.push("list:start".into());
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _l = mm.register(Arc::new(ListLog(log.clone()))).unwrap();
    let s = mm.insert_interval(0..P, Sub::new("iv", &log)).unwrap();
    let held = s.lock(); // a fill holds the user lock
    assert_eq!(
        mm.try_invalidate_range_start(r(0, P)).err(),
        Some(WouldBlock)
    );
    assert!(
        log.take().is_empty(),
        "list subscribers not called, interval not run"
    );
    assert_eq!(
        mm.stats().interval_seq & 1,
        0,
        "the interval part ended at once"
    );
    drop(held);
    drop(mm.try_invalidate_range_start(r(0, P)).unwrap());
    assert_eq!(log.take(), ["iv:Unmap", "list:start"]);
}

#[test]
fn insert_while_frozen_is_deferred_and_read_begin_waits_for_it() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _a = mm.insert_interval(0..P, Sub::new("a", &log)).unwrap();
    let g = mm.invalidate_range_start(r(0, 8 * P)); // freezes (a overlaps)
    let b = mm
        .insert_interval(4 * P..5 * P, Sub::new("b", &log))
        .unwrap();
    assert_eq!(b.range(), Some(4 * P..5 * P));
    // A second invalidation while frozen does not reach b yet (it is not in the tree).
    drop(mm.invalidate_range_start(r(4 * P, 5 * P)));
    assert_eq!(log.take(), ["a:Unmap"]);
    let waiter = {
        let b = Arc::new(b);
        let b2 = b.clone();
        (thread::spawn(move || b2.read_begin()), b)
    };
    thread::sleep(Duration::from_millis(30));
    assert!(
        !waiter.0.is_finished(),
        "read_begin must wait for the deferred insert"
    );
    drop(g);
    let seq = waiter.0.join().unwrap();
    let b = waiter.1;
    assert!(!b.lock().read_retry(seq));
    drop(mm.invalidate_range_start(r(4 * P, 5 * P)));
    assert_eq!(log.take(), ["b:Unmap"]);
}

#[test]
fn insert_while_an_invalidation_that_found_nothing_is_in_flight_freezes_and_waits() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _a = mm
        .insert_interval(100 * P..101 * P, Sub::new("a", &log))
        .unwrap();
    let g = mm.invalidate_range_start(r(0, 8 * P)); // finds nothing: seq stays even
    assert_eq!(mm.stats().interval_seq, 2);
    let b = Arc::new(mm.insert_interval(0..P, Sub::new("b", &log)).unwrap());
    assert_eq!(mm.stats().interval_seq, 3, "the insert froze the tree");
    let b2 = b.clone();
    let waiter = thread::spawn(move || b2.read_begin());
    thread::sleep(Duration::from_millis(30));
    assert!(
        !waiter.is_finished(),
        "the in-flight invalidation may cover b: read_begin must wait"
    );
    drop(g);
    let seq = waiter.join().unwrap();
    assert!(!b.lock().read_retry(seq));
    assert_eq!(mm.stats().interval_seq, 4);
}

#[test]
fn idle_insert_takes_seq_minus_one_and_read_begin_does_not_wait() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let a = mm.insert_interval(0..P, Sub::new("a", &log)).unwrap();
    let seq = a.read_begin();
    assert!(!a.lock().read_retry(seq));
    assert!(format!("{a:?}").contains("seq: 1"), "{a:?}");
}

/// The 2022 kernel fix: remove must not return while the node is still on the deferred
/// list (it read `seq` without the lock).
#[test]
fn remove_waits_until_off_the_deferred_list_2022_fix() {
    let mm = Subscriptions::new();
    let count = Arc::new(AtomicUsize::new(0));
    let a = mm.insert_interval(0..P, Plain(count.clone())).unwrap();
    let g = mm.invalidate_range_start(r(0, P));
    assert_eq!(count.load(SeqCst), 1);
    let done = Arc::new(AtomicBool::new(false));
    let remover = {
        let done = done.clone();
        thread::spawn(move || {
            a.remove();
            done.store(true, SeqCst);
        })
    };
    thread::sleep(Duration::from_millis(30));
    assert!(
        !done.load(SeqCst),
        "remove returned while the tree was frozen"
    );
    assert_eq!(
        mm.stats().interval_subscriptions,
        1,
        "still on the deferred list"
    );
    drop(g);
    remover.join().unwrap();
    assert_eq!(mm.stats().interval_subscriptions, 0);
    drop(mm.invalidate_range_start(r(0, P)));
    assert_eq!(count.load(SeqCst), 1, "never called after remove returned");
}

#[test]
fn remove_with_release_from_inside_a_callback_releases_once_after_the_end() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let s = Sub::new("a", &log).with(Action::RemoveSelf);
    let releases = s.releases.clone();
    let a = mm.insert_interval(0..P, s).unwrap();
    let g = mm.invalidate_range_start(r(0, P));
    assert_eq!(
        releases.load(SeqCst),
        0,
        "still in use by this invalidation"
    );
    drop(g);
    assert_eq!(releases.load(SeqCst), 1);
    assert_eq!(log.take(), ["a:Unmap", "a:release"]);
    assert_eq!(a.range(), None);
    drop(mm.invalidate_range_start(r(0, P)));
    assert!(log.take().is_empty());
    drop(a); // already removed: nothing more
    assert_eq!(releases.load(SeqCst), 1);
}

#[test]
fn a_waiting_remove_from_inside_a_callback_panics_with_a_clear_message() {
    struct RemovesOther(Option<IntervalSubscription<Plain>>);
    impl IntervalSubscriber for RemovesOther {
        fn invalidate(
            &mut self,
            _: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            if let Some(s) = self.0.take() {
                s.remove();
            }
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let plain = mm
        .insert_interval(0..P, Plain(Arc::new(AtomicUsize::new(0))))
        .unwrap();
    let _r = mm.insert_interval(0..P, RemovesOther(Some(plain))).unwrap();
    let mm2 = mm.clone();
    let err = thread::spawn(move || drop(mm2.invalidate_range_start(r(0, P))))
        .join()
        .unwrap_err();
    let msg = err.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(msg.contains("wait for itself"), "{msg}");
    // The address space is not wedged by the panic: the interval part ended on unwind.
    assert_eq!(mm.stats().interval_seq & 1, 0);
}

#[test]
fn insert_from_inside_a_callback_is_deferred_to_the_end() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let s = Sub::new("a", &log).with(Action::Insert(8 * P, P));
    let spawned = s.spawned.clone();
    let _a = mm.insert_interval(0..P, s).unwrap();
    drop(mm.invalidate_range_start(r(0, P)));
    assert_eq!(spawned.lock().unwrap().len(), 1);
    drop(mm.invalidate_range_start(r(8 * P, 9 * P)));
    assert_eq!(log.take(), ["a:Unmap", "inserted:Unmap"]);
}

#[test]
fn queued_changes_collapse_insert_then_remove_cancels() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _a = mm.insert_interval(0..P, Sub::new("a", &log)).unwrap();
    let g = mm.invalidate_range_start(r(0, P));
    let b = Sub::new("b", &log);
    let rel = b.releases.clone();
    let b = mm.insert_interval(4 * P..5 * P, b).unwrap();
    b.remove_nowait(); // cancels the deferred insert: released at once
    assert_eq!(rel.load(SeqCst), 1);
    drop(g);
    assert_eq!(mm.stats().interval_subscriptions, 1);
    drop(mm.invalidate_range_start(r(4 * P, 5 * P)));
    assert_eq!(log.take(), ["a:Unmap", "b:release"]);
}

#[test]
fn queued_changes_collapse_last_update_wins_and_remove_wins_over_update() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let a = mm.insert_interval(0..P, Sub::new("a", &log)).unwrap();
    let b = Sub::new("b", &log);
    let b_rel = b.releases.clone();
    let b = mm.insert_interval(2 * P..3 * P, b).unwrap();
    let g = mm.invalidate_range_start(r(0, 4 * P));
    a.update(10 * P..11 * P).unwrap();
    a.update(20 * P..21 * P).unwrap(); // last wins
    b.update(30 * P..31 * P).unwrap();
    b.remove_nowait(); // remove wins over the update
    assert_eq!(a.range(), Some(20 * P..21 * P));
    drop(g);
    assert_eq!(b_rel.load(SeqCst), 1);
    log.take();
    drop(mm.invalidate_range_start(r(0, 40 * P)));
    assert_eq!(log.take(), ["a:Unmap"]);
    drop(mm.invalidate_range_start(r(10 * P, 11 * P)));
    drop(mm.invalidate_range_start(r(30 * P, 31 * P)));
    assert!(
        log.take().is_empty(),
        "neither the first update nor b remained"
    );
    assert_eq!(
        a.update(0..0),
        Err(IntervalError::Empty { start: 0, end: 0 })
    );
}

#[test]
fn an_update_takes_effect_no_later_than_the_next_read_begin() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let a = Arc::new(mm.insert_interval(0..P, Sub::new("a", &log)).unwrap());
    let g = mm.invalidate_range_start(r(0, P));
    a.update(8 * P..9 * P).unwrap();
    let a2 = a.clone();
    let waiter = thread::spawn(move || a2.read_begin());
    thread::sleep(Duration::from_millis(30));
    assert!(!waiter.is_finished());
    drop(g);
    let seq = waiter.join().unwrap();
    drop(mm.invalidate_range_start(r(8 * P, 9 * P)));
    assert!(a.lock().read_retry(seq), "the moved range is watched");
}

#[test]
fn update_self_from_inside_a_callback_moves_the_range_after_the_end() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    // The first page is unmapped: the subscription shrinks to the rest.
    let a = mm
        .insert_interval(0..4 * P, Sub::new("a", &log).with(Action::Update(P, 3 * P)))
        .unwrap();
    drop(mm.invalidate_range_start(r(0, P)));
    assert_eq!(a.range(), Some(P..4 * P));
    drop(mm.invalidate_range_start(r(0, P)));
    drop(mm.invalidate_range_start(r(3 * P, 4 * P)));
    assert_eq!(log.take(), ["a:Unmap", "a:Unmap"]);
}

#[test]
fn split_from_inside_a_callback_punches_a_hole_atomically() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    // [0, 10P) loses [4P, 6P): left [0, 4P), right [6P, 10P).
    let s = Sub::new("a", &log).with(Action::Split((0, 4 * P), (6 * P, 4 * P)));
    let spawned = s.spawned.clone();
    let a = mm.insert_interval(0..10 * P, s).unwrap();
    let g = mm.invalidate_range_start(r(4 * P, 6 * P));
    // While frozen, a second invalidation of the right half still reaches the whole one.
    drop(mm.invalidate_range_start(r(7 * P, 8 * P)));
    drop(g);
    assert_eq!(log.take(), ["a:Unmap", "a:Unmap"]);
    assert_eq!(a.range(), Some(0..4 * P));
    let right = spawned.lock().unwrap().pop().unwrap();
    assert_eq!(right.range(), Some(6 * P..10 * P));
    drop(mm.invalidate_range_start(r(4 * P, 6 * P)));
    assert!(log.take().is_empty(), "the hole is not watched");
    drop(mm.invalidate_range_start(r(3 * P, 7 * P)));
    assert_eq!(log.take(), ["a:Unmap", "a-right:Unmap"]);
    assert_eq!(
        a.split(0..P, 0..2 * P, Sub::new("x", &log)).unwrap_err(),
        IntervalError::SplitOverlap
    );
}

#[test]
fn bad_intervals_are_errors() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    assert_eq!(
        mm.insert_interval(0..0, Sub::new("z", &log)).unwrap_err(),
        IntervalError::Empty { start: 0, end: 0 }
    );
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 5 * P..3 * P;
    let err = mm
        .insert_interval(reversed, Sub::new("r", &log))
        .unwrap_err();
    assert_eq!(
        err,
        IntervalError::Empty {
            start: 5 * P,
            end: 3 * P
        }
    );
    assert_eq!(err.to_string(), "interval 0x5000..0x3000 is empty");
    // Up to the end of the space is fine.
    let top = mm
        .insert_interval(u64::MAX - P..u64::MAX, Sub::new("top", &log))
        .unwrap();
    assert_eq!(top.range(), Some(u64::MAX - P..u64::MAX));
    // Address 0 is a valid start (no sentinel).
    let zero = mm.insert_interval(0..1, Sub::new("zero", &log)).unwrap();
    assert_eq!(zero.range(), Some(0..1));
    assert!(format!("{zero:?}").contains("range: 0x0..0x1"), "{zero:?}");
}

/// The 2020 kernel fix: insert must check that the address space is still alive (its
/// process has not exited), not merely that the structure is allocated.
#[test]
fn insert_checks_the_address_space_is_alive_2020_fix() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let a = mm.insert_interval(0..P, Sub::new("a", &log)).unwrap();
    mm.release();
    assert_eq!(
        log.take(),
        ["a:Release"],
        "one Release invalidation over everything"
    );
    assert_eq!(
        mm.insert_interval(0..P, Sub::new("late", &log))
            .unwrap_err(),
        IntervalError::Released
    );
    drop(a);
}

#[test]
fn the_first_insert_from_inside_a_callback_is_an_error() {
    struct Inserter;
    impl ListSubscriber for Inserter {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            let mm = Subscriptions::new(); // another space: fine
            assert!(mm
                .insert_interval(0..P, Plain(Arc::new(AtomicUsize::new(0))))
                .is_ok());
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let _l = mm.register(Arc::new(Inserter)).unwrap();
    let g = mm.invalidate_range_start(r(0, P));
    let err = mm
        .insert_interval(0..P, Plain(Arc::new(AtomicUsize::new(0))))
        .unwrap_err();
    assert_eq!(err, IntervalError::FirstInsertInCallback);
    drop(g);
    assert!(mm
        .insert_interval(0..P, Plain(Arc::new(AtomicUsize::new(0))))
        .is_ok());
}

#[test]
fn concurrent_fills_and_invalidations_never_install_a_stale_value() {
    // A primary value per page and a mirror; the checker: when no invalidation of the page
    // is in progress, the mirror equals the primary.
    struct Mirror {
        pages: Vec<Option<u64>>,
    }
    impl IntervalSubscriber for Mirror {
        fn invalidate(
            &mut self,
            r: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            for (i, p) in self.pages.iter_mut().enumerate() {
                if r.overlaps(i as u64 * P, (i as u64 + 1) * P) {
                    *p = None;
                }
            }
            Ok(())
        }
    }
    let npages = 8u64;
    let mm = Subscriptions::new();
    let primary: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..npages).map(std::sync::atomic::AtomicU64::new).collect());
    let sub = Arc::new(
        mm.insert_interval(
            0..npages * P,
            Mirror {
                pages: vec![None; npages as usize],
            },
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mm, primary, stop) = (mm.clone(), primary.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 1000u64;
            while !stop.load(SeqCst) {
                let page = n % npages;
                let g = mm.invalidate_range_start(r(page * P, (page + 1) * P));
                primary[page as usize].store(n, SeqCst);
                drop(g);
                n += 1;
            }
        })
    };
    let mut retries = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    for i in 0..20_000u64 {
        if std::time::Instant::now() > deadline && retries > 0 {
            break;
        }
        let page = (i * 7) % npages;
        loop {
            let seq = sub.read_begin();
            let v = primary[page as usize].load(SeqCst);
            // Gathering takes a while (a device fault): let the primary run meanwhile.
            if i % 4 == 0 {
                thread::yield_now();
            } else {
                (0..200).for_each(|_| std::hint::spin_loop());
            }
            let mut m = sub.lock();
            if m.read_retry(seq) {
                retries += 1;
                continue;
            }
            m.pages[page as usize] = Some(v);
            break;
        }
        // Check under the user lock: an installed value must be the primary's unless an
        // invalidation of that page is between its callback and its end.
        let m = sub.lock();
        if let Some(v) = m.pages[page as usize] {
            let now = primary[page as usize].load(SeqCst);
            assert!(
                v == now || mm.stats().interval_seq & 1 == 1,
                "stale translation: mirror {v}, primary {now}"
            );
        }
    }
    stop.store(true, SeqCst);
    writer.join().unwrap();
    assert!(retries > 0, "the race was never exercised");
}

#[test]
fn a_subscription_costs_under_100_bytes_beyond_its_state() {
    struct Word(#[allow(dead_code)] u64);
    impl IntervalSubscriber for Word {
        fn invalidate(
            &mut self,
            _: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            Ok(())
        }
    }
    let bytes = IntervalSubscription::<Word>::memory_overhead();
    println!("interval subscription overhead: {bytes} bytes");
    assert!(bytes < 100, "{bytes} bytes per subscription");
}

/// Implementing `release` is all it takes: it runs exactly once on every removal path, with
/// no declaration anywhere.
#[test]
fn release_runs_exactly_once_on_every_removal_path() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let mk = |name: &str, at: u64| {
        let s = Sub::new(name, &log);
        let n = s.releases.clone();
        (mm.insert_interval(at * P..(at + 1) * P, s).unwrap(), n)
    };
    let (a, na) = mk("remove", 0);
    let (b, nb) = mk("nowait", 1);
    let (c, nc) = mk("drop", 2);
    a.remove();
    b.remove_nowait();
    drop(c);
    for n in [&na, &nb, &nc] {
        assert_eq!(n.load(SeqCst), 1);
    }
    // `remove` while frozen waits for the end, then releases on its own thread.
    let (d, nd) = mk("waiting", 3);
    let g = mm.invalidate_range_start(r(3 * P, 4 * P));
    let remover = thread::spawn(move || {
        d.remove();
        thread::current().id()
    });
    thread::sleep(Duration::from_millis(30));
    assert_eq!(nd.load(SeqCst), 0, "released before the invalidation ended");
    drop(g);
    let _ = remover.join().unwrap();
    assert_eq!(nd.load(SeqCst), 1);
    assert_eq!(mm.stats().interval_subscriptions, 0);
}

#[test]
fn would_block_from_an_interval_subscriber_in_a_blockable_range_is_a_reported_bug() {
    struct Refuses;
    impl IntervalSubscriber for Refuses {
        fn invalidate(
            &mut self,
            _: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            Err(WouldBlock)
        }
    }
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _bad = mm.insert_interval(0..P, Refuses).unwrap();
    let _good = mm.insert_interval(0..P, Sub::new("good", &log)).unwrap();
    // Blockable: reported, and the invalidation carries on to the others.
    drop(mm.invalidate_range_start(r(0, P)));
    assert_eq!(mm.stats().subscriber_bugs, 1);
    assert_eq!(log.take(), ["good:Unmap"]);
    // Non-blockable: legal, the caller gets WouldBlock.
    assert_eq!(
        mm.try_invalidate_range_start(r(0, P)).err(),
        Some(WouldBlock)
    );
    assert_eq!(mm.stats().subscriber_bugs, 1);
}

/// A second overlapping invalidation while the tree is frozen keeps it frozen: only the
/// last end makes the sequence even again.
#[test]
fn nested_overlapping_invalidations_keep_the_tree_frozen_until_the_last_end() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let _a = mm.insert_interval(0..P, Sub::new("a", &log)).unwrap();
    let g1 = mm.invalidate_range_start(r(0, P));
    let frozen = mm.stats().interval_seq;
    assert_eq!(frozen & 1, 1);
    let g2 = mm.invalidate_range_start(r(0, P));
    assert_eq!(mm.stats().interval_seq, frozen);
    drop(g1);
    assert_eq!(mm.stats().interval_seq, frozen, "still frozen: g2 runs");
    drop(g2);
    assert_eq!(mm.stats().interval_seq, frozen + 1);
}

/// An invalidation calls every subscription it overlaps once, in address order, however
/// many there are (the first few are gathered apart from the rest); a non-blocking one
/// stops at the first whose user lock is busy, wherever it is, and calls none after it.
#[test]
fn every_overlapped_subscription_is_called_once_in_order_and_a_busy_one_stops_the_rest() {
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let subs: Vec<_> = (0..9u64)
        .map(|i| {
            mm.insert_interval(i * P..(i + 1) * P, Sub::new(&format!("s{i}"), &log))
                .unwrap()
        })
        .collect();
    for n in 0..=9u64 {
        drop(mm.invalidate_range_start(r(0, n * P + 1)));
        let want: Vec<String> = (0..=n.min(8)).map(|i| format!("s{i}:Unmap")).collect();
        assert_eq!(
            log.take(),
            want,
            "an invalidation over {} subscriptions",
            n + 1
        );
    }
    for busy in [2usize, 4, 7] {
        let held = subs[busy].lock();
        assert_eq!(
            mm.try_invalidate_range_start(r(0, 9 * P)).err(),
            Some(WouldBlock)
        );
        let want: Vec<String> = (0..busy).map(|i| format!("s{i}:Unmap")).collect();
        assert_eq!(log.take(), want, "subscription {busy} busy");
        drop(held);
    }
    assert_eq!(mm.stats().interval_seq & 1, 0, "every interval part ended");
}

/// A list subscriber whose start panics after the interval part began: the unwinding
/// ends the interval part (the tree does not stay frozen, fills are not held back), and
/// the end of a guard that did exist ends it too, exactly once.
#[test]
fn a_panicking_list_start_still_ends_the_interval_part() {
    struct Panics(AtomicBool);
    impl ListSubscriber for Panics {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            if self.0.load(SeqCst) {
                panic!("subscriber bug");
            }
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let log = Arc::new(Log::default());
    let s = mm.insert_interval(0..P, Sub::new("iv", &log)).unwrap();
    let bad = Arc::new(Panics(AtomicBool::new(true)));
    let _l = mm.register(bad.clone()).unwrap();
    for nonblocking in [false, true] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if nonblocking {
                drop(mm.try_invalidate_range_start(r(0, P)));
            } else {
                drop(mm.invalidate_range_start(r(0, P)));
            }
        }));
        assert!(r.is_err(), "the start panicked");
        assert_eq!(log.take(), ["iv:Unmap"]);
        assert_eq!(mm.stats().interval_seq & 1, 0, "the interval part ended");
    }
    bad.0.store(false, SeqCst);
    let seq = mm.stats().interval_seq;
    let g = mm.invalidate_range_start(r(0, P));
    assert_eq!(
        mm.stats().interval_seq,
        seq + 1,
        "odd while the guard lives"
    );
    drop(g);
    assert_eq!(mm.stats().interval_seq, seq + 2, "ended once by the guard");
    // A fill is not held back by a frozen tree.
    let rs = s.read_begin();
    assert!(!s.lock().read_retry(rs));
}
