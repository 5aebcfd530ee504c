//! loom models of the list-subscriber protocols: register racing an in-flight
//! invalidation, unregister racing release and invalidations, put from inside release.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p mmu-notifier --release --test loom_core`.
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::sync::Mutex;
use loom::thread;
use mmu_notifier::{
    Event, GetError, ListSubscriber, Range, Shared, SharedSubscriber, Subscriptions, WouldBlock,
};

#[derive(Default)]
struct Counting {
    starts: AtomicUsize,
    ends: AtomicUsize,
    releases: AtomicUsize,
    release_done: AtomicBool,
    /// Set by the test once the subscriber must never be called again.
    dead: AtomicBool,
}

impl ListSubscriber for Counting {
    fn release(&self) {
        assert!(!self.dead.load(SeqCst), "release after unregister returned");
        self.releases.fetch_add(1, SeqCst);
        self.release_done.store(true, SeqCst);
    }
    fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
        assert!(!self.dead.load(SeqCst), "start after unregister returned");
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Range) {
        assert!(!self.dead.load(SeqCst), "end after unregister returned");
        let ends = self.ends.fetch_add(1, SeqCst) + 1;
        assert!(self.starts.load(SeqCst) >= ends, "an end without its start");
    }
}

/// Marks the end of an invalidation: its `end` runs last, just before the section ends.
#[derive(Default)]
struct EndProbe {
    ended: AtomicBool,
}

impl ListSubscriber for EndProbe {
    fn invalidate_range_end(&self, _: &Range) {
        self.ended.store(true, SeqCst);
    }
}

fn range() -> Range {
    Range::new(0x1000, 0x2000, Event::Unmap).unwrap()
}

#[test]
fn register_racing_an_in_flight_invalidation_never_misses_it() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let probe = Arc::new(EndProbe::default());
        let _p = mm.register(probe.clone()).unwrap();
        let returned = Arc::new(AtomicBool::new(false));
        let sub = Arc::new(Counting::default());
        let primary = {
            let (mm, returned) = (mm.clone(), returned.clone());
            thread::spawn(move || {
                let g = mm.invalidate_range_start(range());
                returned.store(true, SeqCst);
                drop(g);
            })
        };
        let reg = mm.register(sub.clone()).unwrap();
        // When register returns, an invalidation whose start has returned has either
        // ended, or called the new subscriber's start.
        if returned.load(SeqCst) && !probe.ended.load(SeqCst) {
            assert_eq!(
                sub.starts.load(SeqCst),
                1,
                "register missed an in-flight invalidation"
            );
        }
        primary.join().unwrap();
        assert_eq!(sub.starts.load(SeqCst), sub.ends.load(SeqCst));
        drop(reg);
    });
}

#[test]
fn unregister_racing_release_releases_once_and_waits_for_it() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let sub = Arc::new(Counting::default());
        let reg = mm.register(sub.clone()).unwrap();
        let exit = {
            let (mm, sub) = (mm.clone(), sub.clone());
            thread::spawn(move || {
                mm.release();
                assert!(
                    sub.release_done.load(SeqCst),
                    "exit returned before release ran"
                );
            })
        };
        reg.unregister();
        assert!(
            sub.release_done.load(SeqCst),
            "unregister returned before release ran"
        );
        sub.dead.store(true, SeqCst);
        exit.join().unwrap();
        assert_eq!(sub.releases.load(SeqCst), 1, "release ran exactly once");
    });
}

#[test]
fn no_callback_runs_after_unregister_returns() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let sub = Arc::new(Counting::default());
        let reg = mm.register(sub.clone()).unwrap();
        let primary = {
            let mm = mm.clone();
            thread::spawn(move || drop(mm.invalidate_range_start(range())))
        };
        reg.unregister();
        sub.dead.store(true, SeqCst);
        primary.join().unwrap();
        assert_eq!(sub.starts.load(SeqCst), sub.ends.load(SeqCst));
        assert_eq!(sub.releases.load(SeqCst), 1);
    });
}

loom::lazy_static! {
    static ref FREED: AtomicUsize = AtomicUsize::new(0);
}

struct PutsItself {
    me: Mutex<Option<Shared<PutsItself>>>,
    released: AtomicUsize,
}

impl ListSubscriber for PutsItself {
    fn release(&self) {
        self.released.fetch_add(1, SeqCst);
        let me = self.me.lock().unwrap().take();
        drop(me);
    }
    fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
        Ok(())
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
            released: AtomicUsize::new(0),
        })
    }
}

#[test]
fn put_from_inside_release() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let h = mm.get::<PutsItself>().unwrap();
        let released = {
            let s: &PutsItself = &h;
            // SAFETY: `s` lives until the last put's deferred free, after `synchronize`.
            let slot: *const Mutex<Option<Shared<PutsItself>>> = &s.me;
            let released: *const AtomicUsize = &s.released;
            *unsafe { &*slot }.lock().unwrap() = Some(h);
            released as usize
        };
        let primary = {
            let mm = mm.clone();
            thread::spawn(move || drop(mm.invalidate_range_start(range())))
        };
        mm.release();
        // SAFETY: not freed before `synchronize` below.
        assert_eq!(
            unsafe { &*(released as *const AtomicUsize) }.load(SeqCst),
            1
        );
        primary.join().unwrap();
        mm.synchronize();
        assert_eq!(FREED.load(SeqCst), 1, "freed once, after the grace period");
    });
}
