//! loom models of the interval-subscription protocols: a fill racing an invalidation,
//! insert while the tree is frozen and while an invalidation that found nothing is in
//! flight, remove during an invalidation (the 2022 fix), remove-with-release from inside a
//! callback, update / split while frozen, and a fill through two subscriptions that share
//! one user lock racing an invalidation of one of them.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p mmu-notifier --release --test loom_interval`.
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use loom::thread;
use mmu_notifier::{
    Event, IntervalContext, IntervalLock, IntervalSubscriber, IntervalSubscription,
    LockedIntervalContext, LockedIntervalSubscriber, Range, Subscriptions, WouldBlock,
};

const P: u64 = 4096;

fn page(n: u64) -> Range {
    Range::new(n * P, (n + 1) * P, Event::Unmap).unwrap()
}

/// A secondary's copy of one value of the primary.
struct Mirror {
    val: Option<u64>,
    /// Set by the test once the subscription is removed: no callback may follow.
    removed: Arc<AtomicBool>,
}

impl Mirror {
    fn new() -> Self {
        Mirror {
            val: None,
            removed: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl IntervalSubscriber for Mirror {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        assert!(
            !self.removed.load(SeqCst),
            "invalidate after remove returned"
        );
        self.val = None;
        Ok(())
    }
}

/// One attempt of the fill protocol; a rejected fill gives up (the model checks safety).
fn fill(sub: &IntervalSubscription<Mirror>, primary: &AtomicU64) {
    let seq = sub.read_begin();
    let v = primary.load(SeqCst);
    let mut m = sub.lock();
    if !m.read_retry(seq) {
        m.val = Some(v);
    }
}

/// The coherence check: an installed copy equals the primary's value.
fn check(sub: &IntervalSubscription<Mirror>, primary: &AtomicU64) {
    if let Some(v) = sub.lock().val {
        assert_eq!(v, primary.load(SeqCst), "a stale translation was installed");
    }
}

/// The primary changes `value` inside an invalidation of `range`.
fn remap(mm: &Subscriptions, range: Range, value: &AtomicU64) {
    let g = mm.invalidate_range_start(range);
    value.store(2, SeqCst);
    drop(g);
}

#[test]
fn a_fill_overlapping_an_invalidation_is_rejected_one_after_it_accepted() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let primary = Arc::new(AtomicU64::new(1));
        let sub = mm.insert_interval(0..P, Mirror::new()).unwrap();
        let t = {
            let (mm, primary) = (mm.clone(), primary.clone());
            thread::spawn(move || remap(&mm, page(0), &primary))
        };
        fill(&sub, &primary);
        t.join().unwrap();
        check(&sub, &primary);
        // After the end, a fill is accepted.
        let seq = sub.read_begin();
        assert!(!sub.lock().read_retry(seq));
    });
}

#[test]
fn insert_while_the_tree_is_frozen() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let primary = Arc::new(AtomicU64::new(1));
        let _x = mm.insert_interval(0..P, Mirror::new()).unwrap();
        let t = {
            let (mm, primary) = (mm.clone(), primary.clone());
            // Covers x (freezes the tree) and the new subscription's page.
            thread::spawn(move || remap(&mm, Range::new(0, 2 * P, Event::Unmap).unwrap(), &primary))
        };
        let y = mm.insert_interval(P..2 * P, Mirror::new()).unwrap();
        fill(&y, &primary);
        t.join().unwrap();
        check(&y, &primary);
    });
}

#[test]
fn insert_while_an_invalidation_that_found_nothing_is_in_flight() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let primary = Arc::new(AtomicU64::new(1));
        let _far = mm.insert_interval(100 * P..101 * P, Mirror::new()).unwrap();
        let t = {
            let (mm, primary) = (mm.clone(), primary.clone());
            thread::spawn(move || remap(&mm, page(0), &primary))
        };
        let y = mm.insert_interval(0..P, Mirror::new()).unwrap();
        fill(&y, &primary);
        t.join().unwrap();
        check(&y, &primary);
    });
}

#[test]
fn remove_does_not_return_while_the_node_is_on_the_deferred_list() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let x = Mirror::new();
        let removed = x.removed.clone();
        let x = mm.insert_interval(0..P, x).unwrap();
        let t = {
            let mm = mm.clone();
            thread::spawn(move || drop(mm.invalidate_range_start(page(0))))
        };
        x.remove();
        removed.store(true, SeqCst);
        t.join().unwrap();
        drop(mm.invalidate_range_start(page(0)));
    });
}

/// Removes itself from inside its callback; counts releases.
struct SelfRemover {
    releases: Arc<AtomicUsize>,
    released: Arc<AtomicBool>,
}

impl IntervalSubscriber for SelfRemover {
    fn invalidate(
        &mut self,
        _: &Range,
        ctx: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        assert!(!self.released.load(SeqCst), "invalidate after release");
        ctx.remove_self();
        Ok(())
    }
    fn release(&mut self) {
        self.released.store(true, SeqCst);
        self.releases.fetch_add(1, SeqCst);
    }
}

#[test]
fn remove_with_release_from_inside_a_callback() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let releases = Arc::new(AtomicUsize::new(0));
        let x = mm
            .insert_interval(
                0..P,
                SelfRemover {
                    releases: releases.clone(),
                    released: Arc::new(AtomicBool::new(false)),
                },
            )
            .unwrap();
        let t = {
            let mm = mm.clone();
            thread::spawn(move || drop(mm.invalidate_range_start(page(0))))
        };
        drop(mm.invalidate_range_start(page(0)));
        t.join().unwrap();
        assert_eq!(releases.load(SeqCst), 1, "released exactly once");
        drop(x);
        assert_eq!(releases.load(SeqCst), 1);
    });
}

#[test]
fn update_while_frozen_takes_effect_before_the_next_fill() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let page8 = Arc::new(AtomicU64::new(1));
        let x = mm.insert_interval(0..P, Mirror::new()).unwrap();
        let t = {
            let (mm, page8) = (mm.clone(), page8.clone());
            thread::spawn(move || {
                drop(mm.invalidate_range_start(page(0))); // may freeze while x moves
                remap(&mm, page(8), &page8);
            })
        };
        x.update(8 * P..9 * P).unwrap();
        fill(&x, &page8);
        t.join().unwrap();
        check(&x, &page8);
    });
}

#[test]
fn split_while_frozen_is_atomic_for_the_new_half() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let page1 = Arc::new(AtomicU64::new(1));
        let x = mm.insert_interval(0..2 * P, Mirror::new()).unwrap();
        let t = {
            let (mm, page1) = (mm.clone(), page1.clone());
            thread::spawn(move || remap(&mm, page(1), &page1))
        };
        let y = x.split(0..P, P..2 * P, Mirror::new()).unwrap();
        fill(&y, &page1);
        t.join().unwrap();
        check(&y, &page1);
    });
}

/// Page `n` of a device mirror whose pages all live under one shared lock.
struct SharedPage(usize);

impl LockedIntervalSubscriber for SharedPage {
    type State = [Option<u64>; 2];
    fn invalidate(
        &self,
        pages: &mut [Option<u64>; 2],
        _: &Range,
        _: &mut LockedIntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        pages[self.0] = None;
        Ok(())
    }
}

#[test]
fn a_fill_through_two_subscriptions_under_one_lock_races_an_invalidation_of_one() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let lock = IntervalLock::new([None, None]);
        let primary = Arc::new([AtomicU64::new(1), AtomicU64::new(1)]);
        let a = mm
            .insert_locked_interval(0..P, &lock, SharedPage(0))
            .unwrap();
        let b = mm
            .insert_locked_interval(P..2 * P, &lock, SharedPage(1))
            .unwrap();
        let t = {
            let (mm, primary) = (mm.clone(), primary.clone());
            thread::spawn(move || remap(&mm, page(1), &primary[1]))
        };
        // One fill of both pages; it installs both or neither.
        let (sa, sb) = (a.read_begin(), b.read_begin());
        let (va, vb) = (primary[0].load(SeqCst), primary[1].load(SeqCst));
        {
            let mut pages = lock.lock();
            if !pages.read_retry(&a, sa) && !pages.read_retry(&b, sb) {
                *pages = [Some(va), Some(vb)];
            }
        }
        t.join().unwrap();
        let pages = lock.lock();
        for (i, p) in pages.iter().enumerate() {
            if let Some(v) = p {
                assert_eq!(
                    *v,
                    primary[i].load(SeqCst),
                    "a stale translation was installed"
                );
            }
        }
    });
}
