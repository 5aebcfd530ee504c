//! One or more tests per rule of the crate docs' rule table ("The rules" on the crate page),
//! named after it, plus the historical regressions.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use mmu_notifier::{
    Event, GetError, ListSubscriber, Range, RegisterError, SecondaryTlb, SharedSubscriber,
    Subscriptions, WouldBlock,
};

/// Which callbacks a test subscriber behaves as implementing: the others act as the
/// trait's empty defaults (they are still called, and do nothing).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Ops(u8);

impl Ops {
    const RELEASE: Ops = Ops(1);
    const CLEAR_FLUSH_YOUNG: Ops = Ops(2);
    const CLEAR_YOUNG: Ops = Ops(4);
    const TEST_YOUNG: Ops = Ops(8);
    const INVALIDATE_RANGE_START: Ops = Ops(16);
    const INVALIDATE_RANGE_END: Ops = Ops(32);
    const fn union(self, o: Ops) -> Ops {
        Ops(self.0 | o.0)
    }
    fn has(self, o: Ops) -> bool {
        self.0 & o.0 == o.0
    }
}

impl std::ops::BitOr for Ops {
    type Output = Ops;
    fn bitor(self, o: Ops) -> Ops {
        self.union(o)
    }
}

/// A configurable subscriber that records what happened to it.
struct Recorder {
    name: &'static str,
    ops: Ops,
    log: Arc<Mutex<Vec<String>>>,
    /// Start fails in non-blockable ranges.
    fails_nonblocking: bool,
    /// Start fails even in blockable ranges (a buggy subscriber).
    fails_always: bool,
    young: bool,
    starts: AtomicUsize,
    ends: AtomicUsize,
    releases: AtomicUsize,
    young_calls: AtomicUsize,
    /// Set once the subscriber must not be called any more.
    dead: AtomicBool,
    called_while_dead: AtomicUsize,
}

impl Recorder {
    fn new(name: &'static str, ops: Ops, log: &Arc<Mutex<Vec<String>>>) -> Self {
        Self {
            name,
            ops,
            log: log.clone(),
            fails_nonblocking: false,
            fails_always: false,
            young: false,
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            young_calls: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            called_while_dead: AtomicUsize::new(0),
        }
    }
    fn note(&self, what: &str) {
        if self.dead.load(SeqCst) {
            self.called_while_dead.fetch_add(1, SeqCst);
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{what}", self.name));
    }
}

impl ListSubscriber for Recorder {
    fn release(&self) {
        if self.ops.has(Ops::RELEASE) {
            self.releases.fetch_add(1, SeqCst);
            self.note("release");
        }
    }
    fn clear_flush_young(&self, _: u64, _: u64) -> bool {
        if !self.ops.has(Ops::CLEAR_FLUSH_YOUNG) {
            return false;
        }
        self.young_calls.fetch_add(1, SeqCst);
        self.note("cfy");
        self.young
    }
    fn clear_young(&self, _: u64, _: u64) -> bool {
        if !self.ops.has(Ops::CLEAR_YOUNG) {
            return false;
        }
        self.young_calls.fetch_add(1, SeqCst);
        self.note("cy");
        self.young
    }
    fn test_young(&self, _: u64) -> bool {
        if !self.ops.has(Ops::TEST_YOUNG) {
            return false;
        }
        self.young_calls.fetch_add(1, SeqCst);
        self.note("ty");
        self.young
    }
    fn invalidate_range_start(&self, range: &Range) -> Result<(), WouldBlock> {
        if !self.ops.has(Ops::INVALIDATE_RANGE_START) {
            return Ok(());
        }
        self.note("start");
        if self.fails_always || (self.fails_nonblocking && !range.blockable()) {
            return Err(WouldBlock);
        }
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Range) {
        if self.ops.has(Ops::INVALIDATE_RANGE_END) {
            self.ends.fetch_add(1, SeqCst);
            self.note("end");
        }
    }
}

/// A secondary TLB sharing the primary's page tables: only the TLB op and release.
struct TlbRecorder {
    log: Arc<Mutex<Vec<String>>>,
}

impl SecondaryTlb for TlbRecorder {
    fn arch_invalidate_secondary_tlbs(&self, _: u64, _: u64) {
        self.log.lock().unwrap().push("tlb:tlb".into());
    }
    fn release(&self) {
        self.log.lock().unwrap().push("tlb:release".into());
    }
}

const START_END: Ops = Ops::INVALIDATE_RANGE_START.union(Ops::INVALIDATE_RANGE_END);

fn log() -> Arc<Mutex<Vec<String>>> {
    Arc::new(Mutex::new(Vec::new()))
}

fn range(event: Event) -> Range {
    Range::new(0x1000, 0x5000, event).unwrap()
}

// ----- rule 1 -------------------------------------------------------------------------

// A subscriber with both the TLB op and start/end cannot be written (the two belong to
// different traits): that half of rule 1 is a compile-fail doc test of `ListSubscriber`.

#[test]
fn rule1_tlb_only_and_start_end_only_register_and_get_their_calls() {
    let mm = Subscriptions::new();
    let l = log();
    let tlb = Arc::new(TlbRecorder { log: l.clone() });
    let kvm = Arc::new(Recorder::new("kvm", START_END | Ops::RELEASE, &l));
    let a = mm.register_tlb(tlb).unwrap();
    let _b = mm.register(kvm.clone()).unwrap();
    drop(mm.invalidate_range_start(range(Event::Clear)));
    mm.arch_invalidate_secondary_tlbs(0x1000, 0x2000);
    a.unregister();
    mm.release();
    assert_eq!(
        *l.lock().unwrap(),
        [
            "kvm:start",
            "kvm:end",
            "tlb:tlb",
            "tlb:release",
            "kvm:release"
        ]
        .map(String::from)
    );
}

/// Every list subscriber gets start and end once, in registration order, whatever their
/// number: the first few are kept apart from the rest for speed, so the count goes up to
/// 5 and back to 0 (a TLB among them), through every path that walks the list.
#[test]
fn rule1_every_list_subscriber_is_called_once_in_order_at_any_count() {
    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
    let mm = Subscriptions::new();
    let l = log();
    let _tlb = mm
        .register_tlb(Arc::new(TlbRecorder { log: l.clone() }))
        .unwrap();
    let all = START_END | Ops::TEST_YOUNG | Ops::CLEAR_YOUNG | Ops::CLEAR_FLUSH_YOUNG;
    let mut regs = Vec::new();
    let check = |live: &[&str], regs_len: usize| {
        assert_eq!(live.len(), regs_len);
        l.lock().unwrap().clear();
        drop(mm.invalidate_range_start(range(Event::Clear)));
        drop(mm.try_invalidate_range_start(range(Event::Clear)).unwrap());
        mm.clear_flush_young(0x1000, 0x2000);
        mm.clear_young(0x1000, 0x2000);
        mm.test_young(0x1000);
        let mut want = Vec::new();
        for _ in 0..2 {
            want.extend(live.iter().map(|n| format!("{n}:start")));
            want.extend(live.iter().map(|n| format!("{n}:end")));
        }
        for op in ["cfy", "cy", "ty"] {
            want.extend(live.iter().map(|n| format!("{n}:{op}")));
        }
        assert_eq!(
            *l.lock().unwrap(),
            want,
            "with {} list subscribers",
            live.len()
        );
    };
    check(&[], 0);
    for (i, name) in NAMES.into_iter().enumerate() {
        let r = Arc::new(Recorder::new(name, all, &l));
        regs.push(mm.register(r).unwrap());
        check(&NAMES[..=i], regs.len());
    }
    // Unregister from the front: the remaining ones keep their order.
    for i in 0..NAMES.len() {
        regs.remove(0).unregister();
        check(&NAMES[i + 1..], regs.len());
    }
}

// ----- rule 2 -------------------------------------------------------------------------

fn young_set(
    young: [bool; 3],
) -> (
    Subscriptions,
    Vec<Arc<Recorder>>,
    Vec<mmu_notifier::ListRegistration>,
) {
    let mm = Subscriptions::new();
    let l = log();
    let ops = Ops::CLEAR_FLUSH_YOUNG | Ops::CLEAR_YOUNG | Ops::TEST_YOUNG;
    let subs: Vec<Arc<Recorder>> = young
        .iter()
        .map(|&y| {
            let mut r = Recorder::new("y", ops, &l);
            r.young = y;
            Arc::new(r)
        })
        .collect();
    let regs = subs
        .iter()
        .map(|s| mm.register(s.clone()).unwrap())
        .collect();
    (mm, subs, regs)
}

#[test]
fn rule2_clear_flush_young_and_clear_young_or_over_all_subscribers() {
    let (mm, subs, _regs) = young_set([false, true, false]);
    assert!(mm.clear_flush_young(0, 0x1000));
    assert!(
        subs.iter().all(|s| s.young_calls.load(SeqCst) == 1),
        "every subscriber asked"
    );
    assert!(mm.clear_young(0, 0x1000));
    assert!(subs.iter().all(|s| s.young_calls.load(SeqCst) == 2));
    let (mm, _subs, _regs) = young_set([false, false, false]);
    assert!(!mm.clear_flush_young(0, 0x1000));
    assert!(!mm.clear_young(0, 0x1000));
}

#[test]
fn rule2_test_young_stops_at_the_first_young_subscriber() {
    let (mm, subs, _regs) = young_set([false, true, true]);
    assert!(mm.test_young(0x1000));
    let calls: Vec<usize> = subs.iter().map(|s| s.young_calls.load(SeqCst)).collect();
    assert_eq!(calls, [1, 1, 0]);
    let (mm, subs, _regs) = young_set([false, false, false]);
    assert!(!mm.test_young(0x1000));
    assert!(subs.iter().all(|s| s.young_calls.load(SeqCst) == 1));
}

// ----- rule 3 -------------------------------------------------------------------------

/// The 2021 fix: after a non-blocking start fails, `end` runs on every subscriber that has
/// an end op, so the ones whose start succeeded stay balanced; the caller gets WouldBlock
/// and no guard.
#[test]
fn rule3_nonblocking_failure_calls_end_on_every_subscriber_with_end() {
    let mm = Subscriptions::new();
    let l = log();
    let a = Arc::new(Recorder::new("a", START_END, &l));
    let mut f = Recorder::new("fail", Ops::INVALIDATE_RANGE_START, &l);
    f.fails_nonblocking = true;
    let f = Arc::new(f);
    let b = Arc::new(Recorder::new("b", START_END, &l));
    let _r = [a.clone(), f.clone(), b.clone()].map(|s| mm.register(s).unwrap());

    let res = mm.try_invalidate_range_start(range(Event::Unmap));
    assert_eq!(res.err(), Some(WouldBlock));
    // All starts called, even the one after the failure; then every end.
    assert_eq!(
        *l.lock().unwrap(),
        ["a:start", "fail:start", "b:start", "a:end", "b:end"].map(String::from)
    );
    for s in [&a, &b] {
        assert_eq!(
            s.starts.load(SeqCst),
            s.ends.load(SeqCst),
            "{} balanced",
            s.name
        );
    }
    assert_eq!(
        mm.stats().subscriber_bugs,
        0,
        "a failing start without end is legal"
    );

    // A blockable start of the same subscribers succeeds.
    l.lock().unwrap().clear();
    drop(mm.invalidate_range_start(range(Event::Unmap)));
    assert_eq!(a.ends.load(SeqCst), 2);
}

#[test]
fn rule3_nonblocking_success_returns_a_guard_whose_drop_is_end() {
    let mm = Subscriptions::new();
    let l = log();
    let a = Arc::new(Recorder::new("a", START_END, &l));
    let _r = mm.register(a.clone()).unwrap();
    let g = mm.try_invalidate_range_start(range(Event::Unmap)).unwrap();
    assert!(!g.range().blockable());
    assert_eq!((a.starts.load(SeqCst), a.ends.load(SeqCst)), (1, 0));
    drop(g);
    assert_eq!(a.ends.load(SeqCst), 1);
}

#[test]
fn rule3_failure_in_a_blockable_range_is_reported_and_the_invalidation_carries_on() {
    let mm = Subscriptions::new();
    let l = log();
    let mut bad = Recorder::new("bad", Ops::INVALIDATE_RANGE_START, &l);
    bad.fails_always = true;
    let good = Arc::new(Recorder::new("good", START_END, &l));
    let _r1 = mm.register(Arc::new(bad)).unwrap();
    let _r2 = mm.register(good.clone()).unwrap();
    let g = mm.invalidate_range_start(range(Event::Clear));
    assert_eq!(mm.stats().subscriber_bugs, 1);
    assert_eq!(
        good.starts.load(SeqCst),
        1,
        "later subscribers still invalidated"
    );
    drop(g);
    assert_eq!(good.ends.load(SeqCst), 1);
}

#[test]
fn rule3_a_failing_start_still_gets_its_end() {
    let mm = Subscriptions::new();
    let l = log();
    let mut bad = Recorder::new("bad", START_END, &l);
    bad.fails_nonblocking = true;
    let bad = Arc::new(bad);
    let _r = mm.register(bad.clone()).unwrap();
    assert!(mm.try_invalidate_range_start(range(Event::Unmap)).is_err());
    assert_eq!(
        (bad.starts.load(SeqCst), bad.ends.load(SeqCst)),
        (0, 1),
        "end is called on every subscriber, the failed one included"
    );
}

// ----- rule 4 -------------------------------------------------------------------------

#[test]
fn rule4_register_waits_for_in_flight_invalidations_and_never_gives_a_lone_end() {
    let mm = Subscriptions::new();
    let l = log();
    let in_flight = Arc::new(Barrier::new(2));
    let registered = Arc::new(AtomicBool::new(false));
    let sub = Arc::new(Recorder::new("new", START_END, &l));
    let primary = {
        let (mm, in_flight, registered) = (mm.clone(), in_flight.clone(), registered.clone());
        thread::spawn(move || {
            let g = mm.invalidate_range_start(range(Event::Unmap));
            in_flight.wait();
            thread::sleep(Duration::from_millis(50));
            assert!(
                !registered.load(SeqCst),
                "register returned while an invalidation it missed was in flight"
            );
            drop(g);
        })
    };
    in_flight.wait();
    let reg = mm.register(sub.clone()).unwrap();
    registered.store(true, SeqCst);
    primary.join().unwrap();
    assert_eq!(sub.ends.load(SeqCst), 0, "never an end without its start");
    drop(mm.invalidate_range_start(range(Event::Unmap)));
    assert_eq!((sub.starts.load(SeqCst), sub.ends.load(SeqCst)), (1, 1));
    drop(reg);
}

#[test]
fn rule4_concurrent_invalidations_and_registrations_stay_balanced() {
    let mm = Subscriptions::new();
    let stop = Arc::new(AtomicBool::new(false));
    let primaries: Vec<_> = (0..2)
        .map(|i| {
            let (mm, stop) = (mm.clone(), stop.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(SeqCst) {
                    let g = mm.invalidate_range_start(range(Event::Clear));
                    if (n + i) % 64 == 0 {
                        thread::yield_now();
                    }
                    drop(g);
                    n += 1;
                }
            })
        })
        .collect();
    let l = log();
    let mut subs = Vec::new();
    for _ in 0..200 {
        let s = Arc::new(Recorder::new("s", START_END, &l));
        let reg = mm.register(s.clone()).unwrap();
        thread::yield_now();
        drop(reg);
        // After unregister no guard is left that saw this subscriber's start.
        assert_eq!(s.starts.load(SeqCst), s.ends.load(SeqCst));
        subs.push(s);
        l.lock().unwrap().clear();
    }
    stop.store(true, SeqCst);
    primaries.into_iter().for_each(|p| p.join().unwrap());
}

// ----- rule 5 -------------------------------------------------------------------------

#[test]
fn rule5_unregister_calls_release_once_and_no_callback_runs_after_it_returns() {
    let mm = Subscriptions::new();
    let stop = Arc::new(AtomicBool::new(false));
    let primaries: Vec<_> = (0..2)
        .map(|_| {
            let (mm, stop) = (mm.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(SeqCst) {
                    drop(mm.invalidate_range_start(range(Event::Clear)));
                    mm.clear_young(0, 0x1000);
                }
            })
        })
        .collect();
    let l = log();
    for _ in 0..100 {
        let s = Arc::new(Recorder::new(
            "s",
            START_END | Ops::RELEASE | Ops::CLEAR_YOUNG,
            &l,
        ));
        let reg = mm.register(s.clone()).unwrap();
        thread::yield_now();
        reg.unregister();
        s.dead.store(true, SeqCst);
        assert_eq!(s.releases.load(SeqCst), 1);
        thread::sleep(Duration::from_micros(200));
        assert_eq!(s.called_while_dead.load(SeqCst), 0);
        l.lock().unwrap().clear();
    }
    stop.store(true, SeqCst);
    primaries.into_iter().for_each(|p| p.join().unwrap());
}

#[test]
fn rule5_unregister_waits_for_a_callback_that_is_running() {
    struct Slow {
        entered: Barrier,
        done: AtomicBool,
    }
    impl ListSubscriber for Slow {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            self.entered.wait();
            thread::sleep(Duration::from_millis(50));
            self.done.store(true, SeqCst);
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let slow = Arc::new(Slow {
        entered: Barrier::new(2),
        done: AtomicBool::new(false),
    });
    let reg = mm.register(slow.clone()).unwrap();
    let t = {
        let mm = mm.clone();
        thread::spawn(move || drop(mm.invalidate_range_start(range(Event::Clear))))
    };
    slow.entered.wait();
    reg.unregister();
    assert!(
        slow.done.load(SeqCst),
        "unregister returned while the callback ran"
    );
    t.join().unwrap();
}

#[test]
fn rule5_unregister_from_inside_a_callback_panics_instead_of_deadlocking() {
    struct SelfRemover(Mutex<Option<mmu_notifier::ListRegistration>>);
    impl ListSubscriber for SelfRemover {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            if let Some(reg) = self.0.lock().unwrap().take() {
                reg.unregister();
            }
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let s = Arc::new(SelfRemover(Mutex::new(None)));
    *s.0.lock().unwrap() = Some(mm.register(s.clone()).unwrap());
    let mm2 = mm.clone();
    let err = thread::spawn(move || drop(mm2.invalidate_range_start(range(Event::Clear))))
        .join()
        .unwrap_err();
    let msg = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(msg.contains("would wait for itself"), "{msg}");
}

// ----- rule 6 -------------------------------------------------------------------------

#[test]
fn rule6_release_runs_every_list_release_once_then_empties_the_list() {
    let mm = Subscriptions::new();
    let l = log();
    let subs: Vec<Arc<Recorder>> = ["a", "b", "c"]
        .map(|n| Arc::new(Recorder::new(n, START_END | Ops::RELEASE, &l)))
        .into();
    let regs: Vec<_> = subs
        .iter()
        .map(|s| mm.register(s.clone()).unwrap())
        .collect();
    mm.release();
    mm.release(); // again: nothing
    assert!(subs.iter().all(|s| s.releases.load(SeqCst) == 1));
    assert_eq!(mm.stats().list_subscribers, 0);
    assert!(mm.stats().released);
    // The exit unmap after release reaches nobody.
    drop(mm.invalidate_range_start(Range::everything(Event::Unmap)));
    assert!(subs.iter().all(|s| s.starts.load(SeqCst) == 0));
    // Unregister after release: no second release.
    drop(regs);
    assert!(subs.iter().all(|s| s.releases.load(SeqCst) == 1));
}

/// Regression for the 2012 fix: a notifier taken off the list before its release ran let
/// reclaim free a page that the secondary still mapped. While `release` runs, the
/// subscriber must still receive invalidations.
#[test]
fn rule6_regression_subscriber_stays_listed_until_its_release_has_run() {
    struct Mirror {
        in_release: Barrier,
        may_finish: Barrier,
        mapped: AtomicBool,
        invalidated_during_release: AtomicBool,
        releasing: AtomicBool,
    }
    impl ListSubscriber for Mirror {
        fn release(&self) {
            self.releasing.store(true, SeqCst);
            self.in_release.wait();
            self.may_finish.wait();
            self.mapped.store(false, SeqCst);
        }
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            if self.releasing.load(SeqCst) {
                self.invalidated_during_release.store(true, SeqCst);
            }
            self.mapped.store(false, SeqCst);
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let m = Arc::new(Mirror {
        in_release: Barrier::new(2),
        may_finish: Barrier::new(2),
        mapped: AtomicBool::new(true),
        invalidated_during_release: AtomicBool::new(false),
        releasing: AtomicBool::new(false),
    });
    let _reg = mm.register(m.clone()).unwrap();
    let exit = {
        let mm = mm.clone();
        thread::spawn(move || mm.release())
    };
    m.in_release.wait();
    // Reclaim, concurrently with exit, frees a page: the secondary must be told first.
    drop(mm.invalidate_range_start(Range::new(0x2000, 0x3000, Event::Clear).unwrap()));
    assert!(
        m.invalidated_during_release.load(SeqCst),
        "the page was freed while the secondary still mapped it"
    );
    m.may_finish.wait();
    exit.join().unwrap();
}

/// Regression for the 2013 fixes: unregister racing address-space release called release
/// twice, or returned before release finished.
#[test]
fn rule6_regression_release_once_when_unregister_races_exit() {
    struct SlowRelease {
        releases: AtomicUsize,
        finished: AtomicBool,
    }
    impl ListSubscriber for SlowRelease {
        fn release(&self) {
            self.releases.fetch_add(1, SeqCst);
            thread::sleep(Duration::from_micros(300));
            self.finished.store(true, SeqCst);
        }
    }
    for i in 0..200 {
        let mm = Subscriptions::new();
        let s = Arc::new(SlowRelease {
            releases: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
        });
        let reg = mm.register(s.clone()).unwrap();
        let go = Arc::new(Barrier::new(2));
        let exit = {
            let (mm, go, s) = (mm.clone(), go.clone(), s.clone());
            thread::spawn(move || {
                go.wait();
                if i % 2 == 0 {
                    thread::yield_now();
                }
                mm.release();
                assert!(
                    s.finished.load(SeqCst),
                    "exit returned before release finished"
                );
            })
        };
        go.wait();
        reg.unregister();
        assert!(
            s.finished.load(SeqCst),
            "unregister returned before release finished"
        );
        exit.join().unwrap();
        assert_eq!(s.releases.load(SeqCst), 1, "iteration {i}");
    }
}

#[test]
fn rule6_register_after_release_is_an_error() {
    let mm = Subscriptions::new();
    mm.release();
    let l = log();
    let err = mm
        .register(Arc::new(Recorder::new("late", START_END, &l)))
        .unwrap_err();
    assert!(matches!(err, RegisterError::Released), "{err}");
    assert!(matches!(
        mm.get::<Counted>().unwrap_err(),
        GetError::Register(RegisterError::Released)
    ));
}

// ----- rule 7 -------------------------------------------------------------------------

static COUNTED_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static COUNTED_DROPS: AtomicUsize = AtomicUsize::new(0);

/// A shared subscriber that allows three users and counts allocations and frees.
struct Counted {
    starts: AtomicUsize,
}
impl ListSubscriber for Counted {
    fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }
}
impl SharedSubscriber for Counted {
    const MAX_USERS: u32 = 3;
    fn alloc(_mm: &Subscriptions) -> Result<Self, GetError> {
        COUNTED_ALLOCS.fetch_add(1, SeqCst);
        Ok(Counted {
            starts: AtomicUsize::new(0),
        })
    }
}
impl Drop for Counted {
    fn drop(&mut self) {
        COUNTED_DROPS.fetch_add(1, SeqCst);
    }
}

#[test]
fn rule7_get_shares_one_instance_counts_users_and_the_last_put_frees_after_a_grace_period() {
    let mm = Subscriptions::new();
    let allocs = COUNTED_ALLOCS.load(SeqCst);
    let drops = COUNTED_DROPS.load(SeqCst);
    let a = mm.get::<Counted>().unwrap();
    let b = mm.get::<Counted>().unwrap();
    let c = mm.get::<Counted>().unwrap();
    assert_eq!(
        COUNTED_ALLOCS.load(SeqCst),
        allocs + 1,
        "one instance per type"
    );
    assert!(std::ptr::eq(&*a, &*b) && std::ptr::eq(&*b, &*c));
    // Past the limit: a clear error.
    let err = mm.get::<Counted>().unwrap_err();
    assert!(matches!(err, GetError::TooManyUsers { limit: 3 }), "{err}");
    assert_eq!(mm.stats().list_subscribers, 1);
    drop(mm.invalidate_range_start(range(Event::Clear)));
    assert_eq!(a.starts.load(SeqCst), 1);
    a.put();
    b.put();
    assert_eq!(mm.stats().list_subscribers, 1, "one user left");
    c.put();
    assert_eq!(mm.stats().list_subscribers, 0, "last put removes it");
    mm.synchronize();
    assert_eq!(
        COUNTED_DROPS.load(SeqCst),
        drops + 1,
        "freed once synchronize returns"
    );
    // A new get allocates a fresh instance.
    let d = mm.get::<Counted>().unwrap();
    assert_eq!(COUNTED_ALLOCS.load(SeqCst), allocs + 2);
    drop(d);
    mm.synchronize();
}

#[test]
fn rule7_put_from_inside_release() {
    static RELEASED: AtomicUsize = AtomicUsize::new(0);
    static FREED: AtomicUsize = AtomicUsize::new(0);
    struct PutsItself {
        me: Mutex<Option<mmu_notifier::Shared<PutsItself>>>,
    }
    impl ListSubscriber for PutsItself {
        fn release(&self) {
            RELEASED.fetch_add(1, SeqCst);
            let me = self.me.lock().unwrap().take();
            drop(me); // put, from inside release: must not wait for anything
        }
    }
    impl Drop for PutsItself {
        fn drop(&mut self) {
            FREED.fetch_add(1, SeqCst);
        }
    }
    impl SharedSubscriber for PutsItself {
        fn alloc(_: &Subscriptions) -> Result<Self, GetError> {
            Ok(PutsItself {
                me: Mutex::new(None),
            })
        }
    }
    let mm = Subscriptions::new();
    let h = mm.get::<PutsItself>().unwrap();
    let sub: &PutsItself = &h;
    let slot = &sub.me as *const Mutex<Option<mmu_notifier::Shared<PutsItself>>>;
    // SAFETY: the instance stays alive while the handle it stores is alive.
    *unsafe { &*slot }.lock().unwrap() = Some(h);
    mm.release();
    assert_eq!(RELEASED.load(SeqCst), 1);
    assert_eq!(mm.stats().list_subscribers, 0);
    mm.synchronize();
    assert_eq!(
        FREED.load(SeqCst),
        1,
        "the last put freed it after a grace period"
    );
}

#[test]
fn rule7_synchronize_waits_for_pending_frees() {
    struct Tracked(Arc<AtomicBool>);
    impl ListSubscriber for Tracked {}
    impl Drop for Tracked {
        fn drop(&mut self) {
            thread::sleep(Duration::from_millis(20));
            self.0.store(true, SeqCst);
        }
    }
    static FLAG: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);
    impl SharedSubscriber for Tracked {
        fn alloc(_: &Subscriptions) -> Result<Self, GetError> {
            Ok(Tracked(FLAG.lock().unwrap().clone().unwrap()))
        }
    }
    let freed = Arc::new(AtomicBool::new(false));
    *FLAG.lock().unwrap() = Some(freed.clone());
    let mm = Subscriptions::new();
    mm.get::<Tracked>().unwrap().put();
    mm.synchronize();
    assert!(freed.load(SeqCst));
}

#[test]
fn rule7_alloc_failure_is_reported() {
    struct Refuses;
    impl ListSubscriber for Refuses {}
    impl SharedSubscriber for Refuses {
        fn alloc(_: &Subscriptions) -> Result<Self, GetError> {
            Err(GetError::Alloc("no device".into()))
        }
    }
    let mm = Subscriptions::new();
    let err = mm.get::<Refuses>().unwrap_err();
    assert!(err.to_string().contains("no device"), "{err}");
    assert_eq!(mm.stats().list_subscribers, 0);
}

// ----- rule 8 -------------------------------------------------------------------------

#[test]
fn rule8_list_subscribers_start_and_end_in_registration_order() {
    let mm = Subscriptions::new();
    let l = log();
    let _r = ["a", "b", "c"].map(|n| {
        mm.register(Arc::new(Recorder::new(n, START_END, &l)))
            .unwrap()
    });
    drop(mm.invalidate_range_start(range(Event::Unmap)));
    assert_eq!(
        *l.lock().unwrap(),
        ["a:start", "b:start", "c:start", "a:end", "b:end", "c:end"].map(String::from)
    );
}

// ----- ranges and events ----------------------------------------------------------------

#[test]
fn ranges_carry_event_owner_and_blockable_flag_to_subscribers() {
    struct Seen(Mutex<Vec<Range>>);
    impl ListSubscriber for Seen {
        fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
            self.0.lock().unwrap().push(*r);
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let seen = Arc::new(Seen(Mutex::new(Vec::new())));
    let _r = mm.register(seen.clone()).unwrap();
    for ev in Event::ALL {
        let r = Range::new(0x1000, 0x3000, ev)
            .unwrap()
            .with_owner(mmu_notifier::OwnerToken(9));
        drop(mm.invalidate_range_start(r));
        drop(mm.try_invalidate_range_start(r).unwrap());
    }
    let seen = seen.0.lock().unwrap();
    assert_eq!(seen.len(), 16);
    for (i, r) in seen.iter().enumerate() {
        assert_eq!(r.event(), Event::ALL[i / 2]);
        assert_eq!(r.blockable(), i % 2 == 0);
        assert_eq!((r.start(), r.end()), (0x1000, 0x3000));
        assert_eq!(r.owner(), Some(mmu_notifier::OwnerToken(9)));
    }
}

#[test]
fn bad_ranges_are_errors() {
    assert!(Range::new(5, 5, Event::Unmap).is_err());
    let e = Range::new(0x2000, 0x1000, Event::Unmap).unwrap_err();
    assert!(e.to_string().contains("0x2000"), "{e}");
}

// ----- review regressions -----------------------------------------------------------

#[test]
fn get_from_inside_a_callback_shares_an_existing_instance_and_refuses_a_first_one() {
    struct Getter {
        mm: Mutex<Option<Subscriptions>>,
        results: Mutex<Vec<Result<(), String>>>,
    }
    impl ListSubscriber for Getter {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            let mm = self.mm.lock().unwrap().clone().unwrap();
            let r = mm.get::<Counted>().map(drop).map_err(|e| e.to_string());
            self.results.lock().unwrap().push(r);
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let g = Arc::new(Getter {
        mm: Mutex::new(Some(mm.clone())),
        results: Mutex::new(Vec::new()),
    });
    let _reg = mm.register(g.clone()).unwrap();
    drop(mm.invalidate_range_start(range(Event::Clear)));
    let first = g.results.lock().unwrap().pop().unwrap();
    assert!(first.unwrap_err().contains("wait for itself"));
    let held = mm.get::<Counted>().unwrap();
    drop(mm.invalidate_range_start(range(Event::Clear))); // must not deadlock
    assert!(g.results.lock().unwrap().pop().unwrap().is_ok());
    drop(held);
    mm.synchronize();
}

#[test]
fn a_panicking_release_does_not_wedge_exit_or_a_racing_unregister() {
    struct Panics;
    impl ListSubscriber for Panics {
        fn release(&self) {
            panic!("release failed");
        }
    }
    let mm = Subscriptions::new();
    let reg = mm.register(Arc::new(Panics)).unwrap();
    let mm2 = mm.clone();
    assert!(thread::spawn(move || mm2.release()).join().is_err());
    // The release was marked finished on unwind: unregister returns.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        reg.unregister();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("unregister hung after a panicking release");
}

#[test]
fn synchronize_waits_for_a_release_whose_subscriber_a_racing_put_removed() {
    static DONE: AtomicBool = AtomicBool::new(false);
    struct SlowShared(Barrier);
    impl ListSubscriber for SlowShared {
        fn release(&self) {
            self.0.wait();
            thread::sleep(Duration::from_millis(50));
            DONE.store(true, SeqCst);
        }
    }
    impl SharedSubscriber for SlowShared {
        fn alloc(_: &Subscriptions) -> Result<Self, GetError> {
            Ok(SlowShared(Barrier::new(2)))
        }
    }
    let mm = Subscriptions::new();
    let h = mm.get::<SlowShared>().unwrap();
    let exit = {
        let mm = mm.clone();
        thread::spawn(move || mm.release())
    };
    h.0.wait(); // release is running
    h.put(); // last put while release runs: unlisted now
    mm.synchronize();
    assert!(
        DONE.load(SeqCst),
        "synchronize returned while release still ran"
    );
    exit.join().unwrap();
}

#[test]
fn concurrent_releases_both_return_after_every_release_ran() {
    static DONE: AtomicBool = AtomicBool::new(false);
    struct Slow;
    impl ListSubscriber for Slow {
        fn release(&self) {
            thread::sleep(Duration::from_millis(50));
            DONE.store(true, SeqCst);
        }
    }
    let mm = Subscriptions::new();
    let _reg = mm.register(Arc::new(Slow)).unwrap();
    let ts: Vec<_> = (0..2)
        .map(|_| {
            let mm = mm.clone();
            thread::spawn(move || {
                mm.release();
                assert!(DONE.load(SeqCst));
            })
        })
        .collect();
    ts.into_iter().for_each(|t| t.join().unwrap());
}

#[test]
fn register_inside_a_callback_is_an_error_and_leaves_nothing_registered() {
    struct Registers(Mutex<Option<Subscriptions>>, Mutex<Option<String>>);
    impl ListSubscriber for Registers {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            let mm = self.0.lock().unwrap().clone().unwrap();
            let l = log();
            let err = mm
                .register(Arc::new(Recorder::new("inner", START_END, &l)))
                .unwrap_err();
            *self.1.lock().unwrap() = Some(err.to_string());
            Ok(())
        }
    }
    let mm = Subscriptions::new();
    let s = Arc::new(Registers(Mutex::new(Some(mm.clone())), Mutex::new(None)));
    let _r = mm.register(s.clone()).unwrap();
    drop(mm.invalidate_range_start(range(Event::Clear)));
    let msg = s.1.lock().unwrap().take().unwrap();
    assert!(msg.contains("wait for itself"), "{msg}");
    assert_eq!(mm.stats().list_subscribers, 1, "nothing was published");
}

/// The mistake the old declaration allowed: a callback implemented but not declared was
/// silently never called. Now implementing it is the declaration.
#[test]
fn every_implemented_callback_is_called_with_nothing_to_declare() {
    #[derive(Default)]
    struct OnlyStart(AtomicUsize);
    impl ListSubscriber for OnlyStart {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
            self.0.fetch_add(1, SeqCst);
            Ok(())
        }
    }
    #[derive(Default)]
    struct OnlyRelease(AtomicUsize);
    impl ListSubscriber for OnlyRelease {
        fn release(&self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let mm = Subscriptions::new();
    let (s, r) = (
        Arc::new(OnlyStart::default()),
        Arc::new(OnlyRelease::default()),
    );
    let _a = mm.register(s.clone()).unwrap();
    let _b = mm.register(r.clone()).unwrap();
    drop(mm.invalidate_range_start(range(Event::Clear)));
    mm.release();
    assert_eq!((s.0.load(SeqCst), r.0.load(SeqCst)), (1, 1));
}
