//! The event gate: makes "munmap has returned" imply "the invalidation has been applied".
//!
//! # The problem
//!
//! The kernel blocks a thread that unmaps watched memory until the monitor has *read* the
//! event, not until the monitor has *applied* it. Between the monitor's `read()` and the end
//! of its `invalidate_range_start`/`end`, the unmapper may already have returned from
//! `munmap`, mapped new memory at the same address and asked the cache for it: without
//! more, that lookup could return the old, stale registration.
//!
//! # The protocol
//!
//! One word, `state`: bit 0 `BUSY`, bit 1 `STOPPED`, the rest an epoch count.
//!
//! - Monitor: when `poll` says events are pending, `begin` sets `BUSY` *before* the
//!   `read()` that releases the unmappers; then it applies every event it read (each an
//!   invalidation of the interval subscriptions); then `end` clears `BUSY` and advances the
//!   epoch in one store. Several reads may happen inside one busy period.
//! - Stop: `stop` sets `BUSY | STOPPED` for good (before the descriptor is closed, which
//!   releases unmappers whose events will never be applied).
//! - Readers (cache lookups, fills): `pass` loads `state`; if neither bit is set the lookup
//!   proceeds. If `BUSY`, it waits until the word changes (the batch ended) and looks again;
//!   if `STOPPED`, it fails.
//!
//! # Why it is enough (orderings)
//!
//! The unmapper returns from `munmap` only after the monitor's `read()` has handed over its
//! event, and that hand-over goes through the kernel's wait-queue lock (released by the
//! reader, acquired by the unmapper). `begin`'s store (SeqCst RMW) is sequenced before the
//! `read()`, so it happens-before everything the unmapper does after `munmap` returns, and
//! before anything that another thread does after synchronizing with the unmapper. Such a
//! lookup therefore loads `BUSY` or a later value (read-after-write coherence). `BUSY`
//! makes it wait; a later value was written by `end` with Release after the invalidation
//! completed, and the lookup's Acquire load makes that invalidation (the entry's validity
//! flag cleared under its user lock) visible. A lookup that raced with `munmap` (did not
//! start after it returned) may still see the old entry: that is the ordinary
//! linearization of two concurrent calls.
//!
//! The fast path costs one Acquire load of a word that changes only when events arrive.

use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};

use crate::sync::{spin_hint, AtomicU64, Condvar, Mutex};

const BUSY: u64 = 1;
const STOPPED: u64 = 2;
const EPOCH: u64 = 4;
/// Spins before sleeping (one under loom, whose spins are yields that multiply states).
const SPINS: u32 = if cfg!(loom) { 1 } else { 200 };

/// What a reader learns at the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// No event is being applied: proceed.
    Open,
    /// The monitor has stopped: invalidations no longer arrive.
    Stopped,
}

/// The gate between the monitor's event batches and the lookups.
#[derive(Debug)]
pub(crate) struct Gate {
    state: AtomicU64,
    /// Readers that gave up spinning sleep here. They check `state` with `lock` held, and
    /// `wake` takes `lock` after changing `state`, so a wake-up cannot fall between a
    /// sleeper's check and its sleep.
    lock: Mutex<()>,
    cv: Condvar,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    pub(crate) fn new() -> Self {
        Gate {
            state: AtomicU64::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Monitor: events are pending and are about to be read.
    pub(crate) fn begin(&self) {
        // SeqCst RMW: ordered before the read() that follows (see the module docs); the
        // kernel's lock hand-over carries it to the unmapper.
        self.state.fetch_or(BUSY, SeqCst);
    }

    /// Monitor: every event read since `begin` has been applied.
    pub(crate) fn end(&self) {
        // Release: publishes the invalidations applied in this busy period to any lookup
        // that loads the new value with Acquire. Clear BUSY and advance the epoch at once
        // (state is BUSY here, so adding EPOCH - BUSY never borrows).
        let prev = self.state.fetch_add(EPOCH - BUSY, Release);
        debug_assert!(prev & BUSY != 0, "gate end without begin");
        self.wake();
    }

    /// The monitor stops for good: every later `pass` answers `Stopped`.
    pub(crate) fn stop(&self) {
        self.state.fetch_or(BUSY | STOPPED, SeqCst);
        self.wake();
    }

    fn wake(&self) {
        // Always through the lock (once per batch: cheap next to the system calls). A
        // sleeper that checked `state` before this acquisition is already waiting and gets
        // the notification; one that checks after sees the new state, ordered by the lock.
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    /// Whether the monitor has stopped.
    pub(crate) fn stopped(&self) -> bool {
        self.state.load(Acquire) & STOPPED != 0
    }

    /// Reader, without waiting: `None` while a batch is being applied.
    #[inline]
    pub(crate) fn try_pass(&self) -> Option<Pass> {
        let s = self.state.load(Acquire);
        if s & STOPPED != 0 {
            Some(Pass::Stopped)
        } else if s & BUSY != 0 {
            None
        } else {
            Some(Pass::Open)
        }
    }

    /// Reader: returns once no event batch is being applied (or the monitor has stopped).
    #[inline]
    pub(crate) fn pass(&self) -> Pass {
        // Acquire: see the module docs.
        let s = self.state.load(Acquire);
        if s & (BUSY | STOPPED) == 0 {
            return Pass::Open;
        }
        self.pass_slow(s)
    }

    #[cold]
    fn pass_slow(&self, mut s: u64) -> Pass {
        let mut spins = 0u32;
        loop {
            if s & STOPPED != 0 {
                return Pass::Stopped;
            }
            if s & BUSY == 0 {
                return Pass::Open;
            }
            // A batch is a few microseconds of in-memory work: spin a little first.
            if spins < SPINS {
                spins += 1;
                spin_hint();
                s = self.state.load(Acquire);
                continue;
            }
            let mut g = self.lock.lock();
            loop {
                let now = self.state.load(Acquire);
                if now != s {
                    s = now;
                    break;
                }
                g = self.cv.wait(g);
            }
            drop(g);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    //! The gate's promise, with the kernel's hand-over modelled as a Release/Acquire flag
    //! (the wait-queue lock that `read()` releases and the unmapper acquires).
    use super::{Gate, Pass};
    use loom::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Release};
    use loom::sync::Arc;

    /// A lookup that starts after munmap returned never sees the entry still valid.
    #[test]
    fn lookup_after_the_unmap_returned_sees_the_invalidation() {
        loom::model(|| {
            let gate = Arc::new(Gate::new());
            let valid = Arc::new(AtomicBool::new(true));
            let handed_over = Arc::new(AtomicBool::new(false));
            let monitor = {
                let (gate, valid, handed_over) = (gate.clone(), valid.clone(), handed_over.clone());
                loom::thread::spawn(move || {
                    gate.begin();
                    handed_over.store(true, Release); // read(): the unmapper may return
                    valid.store(false, Release); // the invalidation
                    gate.end();
                })
            };
            // The unmapper: blocked in munmap until the event is read.
            while !handed_over.load(Acquire) {
                loom::thread::yield_now();
            }
            assert_eq!(gate.pass(), Pass::Open);
            assert!(!valid.load(Acquire), "stale hit after munmap returned");
            monitor.join().unwrap();
        });
    }

    /// Two batches back to back, a lookup racing with both: whatever it passes at, every
    /// batch whose hand-over it observed has been applied.
    #[test]
    fn two_batches() {
        loom::model(|| {
            let gate = Arc::new(Gate::new());
            let applied = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let handed = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let monitor = {
                let (gate, applied, handed) = (gate.clone(), applied.clone(), handed.clone());
                loom::thread::spawn(move || {
                    for i in 0..2 {
                        gate.begin();
                        handed[i].store(true, Release);
                        applied[i].store(true, Release);
                        gate.end();
                    }
                })
            };
            let saw = [handed[0].load(Acquire), handed[1].load(Acquire)];
            assert_eq!(gate.pass(), Pass::Open);
            for i in 0..2 {
                if saw[i] {
                    assert!(
                        applied[i].load(Acquire),
                        "batch {i} handed over but not applied"
                    );
                }
            }
            monitor.join().unwrap();
        });
    }

    /// Stopping wakes a waiter and makes it fail, and every later pass fails.
    #[test]
    fn stop_releases_waiters() {
        loom::model(|| {
            let gate = Arc::new(Gate::new());
            gate.begin();
            let waiter = {
                let gate = gate.clone();
                loom::thread::spawn(move || gate.pass())
            };
            gate.stop();
            assert_eq!(waiter.join().unwrap(), Pass::Stopped);
            assert_eq!(gate.pass(), Pass::Stopped);
        });
    }
}
