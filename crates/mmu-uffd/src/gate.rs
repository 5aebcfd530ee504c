//! The event gate: makes "munmap has returned" imply "the invalidation has been applied".
//!
//! # The problem
//!
//! The kernel blocks a thread that unmaps watched memory until the monitor has *read* the
//! event, not until the monitor has *applied* it. The monitor reads, then applies (on the
//! same thread, or on the other one if it holds the applying role): between the read and
//! the end of the
//! invalidation, the unmapper may already have returned from `munmap`, mapped new memory at
//! the same address and asked the cache for it; without more, that lookup could return the
//! old, stale registration.
//!
//! # The protocol
//!
//! Two counters and a flag. Batches are numbered 1, 2, 3, ... by the monitor thread that
//! reads them (one at a time, under the reading lock); one batch is one `read()` of the
//! descriptor. "Reader" and "applier" below are roles, not threads: either monitor thread
//! reads, and the one holding the applying role applies.
//!
//! - Reader: `begin` increments `begun` *before* the `read()` that releases the unmappers,
//!   and returns the batch's number. It hands the messages and the number to the applier.
//! - Applier: applies batches in order; after every message of batches up to `n` has been
//!   applied (each an invalidation of the interval subscriptions) it calls
//!   `applied_through(n)`, which stores `applied = n`.
//! - Stop: `stop` sets `stopped` for good (before the descriptor is closed, which releases
//!   unmappers whose events will never be applied).
//! - Lookups (and every other query): `pass` loads `begun` = `b`, then waits until
//!   `applied >= b`, or fails once `stopped`. A lookup waits only for the batches begun
//!   before it looked, so a steady stream of events cannot starve it.
//!
//! # Why it is enough (orderings)
//!
//! The unmapper returns from `munmap` only after the reader's `read()` has handed over its
//! event, and that hand-over goes through the kernel's wait-queue lock (released by the
//! reader, acquired by the unmapper). `begin`'s increment (a SeqCst RMW) is sequenced before
//! the `read()`, so it happens-before everything the unmapper does after `munmap` returns,
//! and before anything another thread does after synchronizing with the unmapper. Such a
//! lookup therefore loads `begun` at least at that batch's number (read-after-write
//! coherence) and waits until `applied` reaches it. `applied_through` stores with Release
//! after the invalidations of those batches completed, and the lookup loads `applied` with
//! Acquire, which makes those invalidations (an entry's validity flag cleared under its
//! user lock) visible. A lookup that raced with `munmap` (did not start after it returned)
//! may still see the old entry: that is the ordinary linearization of two concurrent calls.
//! The unmap by another thread whose event is not even queued yet is the cache's other
//! check (`Shared::sync`).
//!
//! The fast path costs two Acquire loads of words that change only when events arrive.
//!
//! # Waiting
//!
//! A lookup that finds the gate closed waits for the monitor: the reader still has to
//! queue the batch, the applier to apply it (usually the same thread, right after). How
//! it waits depends on where they last ran. The reader (in `begin`) and the applier (in `applied_through`) each note
//! the CPU they run on; a waiter compares them with its own CPU:
//!
//! - **Same CPU as either.** Spinning there would only keep the thread it waits for off
//!   that CPU (until the waiter's time slice ends or it gives up), so the waiter yields at
//!   once: `sched_yield` lets the runnable monitor thread run (it applies, opens the
//!   gate and goes back to sleep), and the waiter finds the gate
//!   open when it is scheduled again: no futex wait or wake at all. A few yields at most
//!   (the reader may run first), then it sleeps.
//! - **Other CPUs.** The batch is a few microseconds of in-memory work happening in
//!   parallel: the waiter spins briefly (pause instructions), then sleeps.
//!
//! The CPUs are hints, read and written Relaxed: a monitor thread may migrate at any time,
//! and a wrong guess costs only time (a yield that returns at once, or a bounded spin). The
//! sleep that ends every wait is always the same: `done` is checked with `lock` held and
//! every change of the counters is followed by a wake-up under `lock`.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use crate::sync::{spin_hint, AtomicBool, AtomicU64, Condvar, Mutex};

/// Spins before sleeping when the monitor runs on other CPUs (one under loom, whose spins
/// are yields that multiply states).
const SPINS: u32 = if cfg!(loom) { 1 } else { 200 };
/// Yields before sleeping when a monitor thread last ran on the waiter's CPU.
const YIELDS: u32 = if cfg!(loom) { 1 } else { 4 };
/// A CPU not known (the initial value, or `sched_getcpu` failed).
const NO_CPU: u64 = u64::MAX;

/// The CPU the calling thread runs on, or [`NO_CPU`]. Under loom there are no CPUs: every
/// waiter takes the spinning branch (loom's spins are yields anyway).
#[inline]
fn current_cpu() -> u64 {
    #[cfg(not(loom))]
    {
        // SAFETY: sched_getcpu takes no arguments and only returns a value (through rseq
        // or the vDSO: no system call on current kernels).
        let cpu = unsafe { libc::sched_getcpu() };
        if cpu >= 0 {
            return cpu as u64;
        }
    }
    NO_CPU
}

/// Lets another runnable thread of this CPU run (under loom: a loom yield).
fn yield_cpu() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// What a reader learns at the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Every batch begun before the call has been applied: proceed.
    Open,
    /// The monitor has stopped: invalidations no longer arrive.
    Stopped,
}

/// The gate between the monitor's event batches and the lookups.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Batches whose `read()` has started (reader only).
    begun: AtomicU64,
    /// Every batch up to this number has been applied (applier only).
    applied: AtomicU64,
    stopped: AtomicBool,
    /// The CPU the reader last began a batch on, and the one the applier last applied
    /// one on ([`NO_CPU`] if not known). Scheduling hints only (see "Waiting").
    reader_cpu: AtomicU64,
    applier_cpu: AtomicU64,
    /// Lookups that gave up spinning sleep here. They check the counters with `lock`
    /// held, and `wake` takes `lock` after changing them, so a wake-up cannot fall between
    /// a sleeper's check and its sleep.
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
            begun: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            reader_cpu: AtomicU64::new(NO_CPU),
            applier_cpu: AtomicU64::new(NO_CPU),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Reader: a `read()` is about to hand over events; returns the batch's number.
    /// Allocation-free and lock-free (the reader may never wait for a user thread).
    pub(crate) fn begin(&self) -> u64 {
        note_cpu(&self.reader_cpu);
        // SeqCst RMW: ordered before the read() that follows (see the module docs); the
        // kernel's lock hand-over carries it to the unmapper.
        self.begun.fetch_add(1, SeqCst) + 1
    }

    /// Applier: every event of batches up to `batch` has been applied.
    pub(crate) fn applied_through(&self, batch: u64) {
        note_cpu(&self.applier_cpu);
        // Release: publishes the invalidations applied so far to any lookup that loads the
        // new value with Acquire.
        self.applied.store(batch, Release);
        self.wake();
    }

    /// The monitor stops for good: every later `pass` answers `Stopped`.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, SeqCst);
        self.wake();
    }

    fn wake(&self) {
        // Always through the lock (once per batch: cheap next to the system calls). A
        // sleeper that checked before this acquisition is already waiting and gets the
        // notification; one that checks after sees the new value, ordered by the lock.
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    /// Batches begun so far.
    pub(crate) fn begun(&self) -> u64 {
        self.begun.load(Acquire)
    }

    /// Whether the monitor has stopped.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Acquire)
    }

    /// Lookup, without waiting: `None` while a batch begun before the call is not applied.
    #[inline]
    pub(crate) fn try_pass(&self) -> Option<Pass> {
        let target = self.begun.load(Acquire);
        if self.stopped.load(Acquire) {
            Some(Pass::Stopped)
        } else if self.applied.load(Acquire) < target {
            None
        } else {
            Some(Pass::Open)
        }
    }

    /// Lookup: returns once every batch begun before the call has been applied (or the
    /// monitor has stopped).
    #[inline]
    pub(crate) fn pass(&self) -> Pass {
        // Acquire on both: see the module docs.
        let target = self.begun.load(Acquire);
        if self.applied.load(Acquire) >= target && !self.stopped.load(Acquire) {
            return Pass::Open;
        }
        self.pass_slow(target)
    }

    #[cold]
    fn pass_slow(&self, target: u64) -> Pass {
        let done = || {
            if self.stopped.load(Acquire) {
                Some(Pass::Stopped)
            } else if self.applied.load(Acquire) >= target {
                Some(Pass::Open)
            } else {
                None
            }
        };
        // Yield or spin a little first (see "Waiting" in the module docs).
        let me = current_cpu();
        // Relaxed: hints; a stale value only picks the less efficient branch.
        let shared = me != NO_CPU
            && (self.reader_cpu.load(Relaxed) == me || self.applier_cpu.load(Relaxed) == me);
        let (rounds, pause): (u32, fn()) = if shared {
            (YIELDS, yield_cpu)
        } else {
            (SPINS, spin_hint)
        };
        for _ in 0..rounds {
            if let Some(p) = done() {
                return p;
            }
            pause();
        }
        let mut g = self.lock.lock();
        loop {
            if let Some(p) = done() {
                return p;
            }
            g = self.cv.wait(g);
        }
    }
}

/// Records the calling thread's CPU in `slot` (a store only when it changed, so the line
/// is not dirtied on every batch). Nothing under loom (no CPUs; and no extra states).
#[inline]
fn note_cpu(slot: &AtomicU64) {
    #[cfg(not(loom))]
    {
        let cpu = current_cpu();
        // Relaxed: a scheduling hint, never part of the protocol.
        if slot.load(Relaxed) != cpu {
            slot.store(cpu, Relaxed);
        }
    }
    #[cfg(loom)]
    let _ = slot;
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
                    // Reader and applier on one loom thread: the hand-over to the applier
                    // is program order here (the queue's lock in the real code).
                    let batch = gate.begin();
                    handed_over.store(true, Release); // read(): the unmapper may return
                    valid.store(false, Release); // the invalidation
                    gate.applied_through(batch);
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
                        let batch = gate.begin();
                        handed[i].store(true, Release);
                        applied[i].store(true, Release);
                        gate.applied_through(batch);
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

    /// The real shape: the reader begins and reads batches while the applier, on another
    /// thread, applies earlier ones (the queue between them is a mutex). A lookup that
    /// observed batch 1's hand-over passes only once batch 1 is applied, even while
    /// batch 2 is begun and not applied (and it does not wait for batch 2 if it looked
    /// before batch 2 began).
    #[test]
    fn reader_and_applier_on_separate_threads() {
        loom::model(|| {
            let gate = Arc::new(Gate::new());
            let applied = Arc::new(AtomicBool::new(false));
            let handed = Arc::new(AtomicBool::new(false));
            let queue = Arc::new(loom::sync::Mutex::new(0u64));
            let reader = {
                let (gate, handed, queue) = (gate.clone(), handed.clone(), queue.clone());
                loom::thread::spawn(move || {
                    for _ in 0..2 {
                        let batch = gate.begin();
                        if batch == 1 {
                            handed.store(true, Release); // read(): batch 1's unmapper returns
                        }
                        *queue.lock().unwrap() = batch;
                    }
                })
            };
            let applier = {
                let (gate, applied, queue) = (gate.clone(), applied.clone(), queue.clone());
                loom::thread::spawn(move || {
                    let mut done = 0;
                    while done < 2 {
                        let through = *queue.lock().unwrap();
                        if through > done {
                            if done == 0 {
                                applied.store(true, Release); // batch 1's invalidation
                            }
                            gate.applied_through(through);
                            done = through;
                        } else {
                            loom::thread::yield_now();
                        }
                    }
                })
            };
            if handed.load(Acquire) {
                assert_eq!(gate.pass(), Pass::Open);
                assert!(applied.load(Acquire), "batch 1 handed over but not applied");
            }
            reader.join().unwrap();
            applier.join().unwrap();
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

#[cfg(all(test, not(loom)))]
mod tests {
    //! The waiting branches with real threads (the orderings are the loom models' job).
    use super::{current_cpu, Gate, Pass, NO_CPU};
    use std::sync::Arc;

    /// Pins the calling thread to the CPU it runs on; threads it spawns inherit that.
    fn pin_here() -> bool {
        let cpu = current_cpu();
        if cpu == NO_CPU {
            return false;
        }
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it;
        // sched_setaffinity(0, ...) applies to the calling thread only.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }

    /// Everything on one CPU: the waiter sees the reader's CPU as its own, takes the
    /// yielding branch, and passes once the applier (which can only run because the
    /// waiter gives the CPU away, or after it sleeps) has applied the batch.
    #[test]
    fn waiter_on_the_monitors_cpu_passes() {
        // In a thread of its own, so that the pinning ends with it.
        std::thread::spawn(|| {
            if !pin_here() {
                println!("SKIPPED: cannot pin to one CPU (sched_getcpu/sched_setaffinity)");
                return;
            }
            for round in 1..=50u64 {
                let gate = Arc::new(Gate::new());
                let batch = gate.begin(); // the reader's CPU: this one
                assert_eq!(gate.reader_cpu.load(super::Relaxed), current_cpu());
                let applier = {
                    let gate = gate.clone();
                    std::thread::spawn(move || gate.applied_through(batch))
                };
                assert_eq!(gate.pass(), Pass::Open, "round {round}");
                assert_eq!(gate.applied.load(super::Acquire), batch);
                applier.join().unwrap();
            }
            // And a stop releases a waiter on the yielding branch as well.
            let gate = Arc::new(Gate::new());
            gate.begin();
            let stopper = {
                let gate = gate.clone();
                std::thread::spawn(move || gate.stop())
            };
            assert_eq!(gate.pass(), Pass::Stopped);
            stopper.join().unwrap();
        })
        .join()
        .unwrap();
    }
}
