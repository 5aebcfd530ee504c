//! The monitor's two threads, and applying: what was read becomes interval
//! invalidations (the user callbacks run here), and the stop sequence.
//!
//! # Two threads, one role
//!
//! Both threads run the same loop: wait for events (see `reader`: the kernel wakes one of
//! them per event), read them into the queue, then try to take the *applying role* and,
//! if they get it, apply everything queued and tell the gate how far that went. A thread
//! that cannot take the role leaves its batch in the queue for the thread that holds it
//! and goes back to waiting.
//!
//! - **Why a thread may apply what it read.** Applying runs user code: a callback may
//!   allocate (and block on an allocator lock held by a thread that waits in `munmap`
//!   for its event to be read) or unmap watched memory itself. That is safe as long as
//!   another thread is free to read meanwhile. The role is taken with a compare-and-swap
//!   that never waits, so at most one thread runs user code and the other only ever
//!   waits in `epoll_wait` or for the monitor's own short locks: it is always free to
//!   read, and the kernel wakes it, not the busy one.
//! - **Why it is fast.** On one CPU, the thread that the unmap wakes applies at once: the
//!   callback runs after one context switch, as for a bare userfaultfd reader, instead of
//!   handing the batch to a second thread (a futex wake and at least two more switches).
//! - **Nothing is left in the queue.** A thread that gives the role up stores that
//!   (Release), then asks the queue whether anything was pushed meanwhile (`pending`,
//!   under the queue's lock), and takes the role again if so. A thread that pushed and
//!   failed to take the role pushed under the same lock: either the holder's `pending`
//!   came after the push and sees it, or it came before, so the holder's giving-up
//!   happened before the push (through the lock) and the pusher's compare-and-swap sees
//!   the role free. A stop request is made the same way (`stopping`, then `poke`).
//! - **Batches in order.** Only the role holder takes from the queue and calls
//!   `applied_through`, with the number its take returned: the gate's counter only grows,
//!   and reaches a batch's number only after every event up to it was applied.
//!
//! # Stop
//!
//! Requested by `Drop`, by a failed read, or caused by a panicking callback; run by the
//! thread that holds the applying role, once. In this order:
//! 1. the gate is closed for good: lookups and queries fail from now on;
//! 2. every subscription gets a `Release` invalidation (nothing can be trusted once events
//!    stop); the other thread still reads meanwhile, so a callback that unmaps cannot
//!    hang;
//! 3. every mapping of the process is unregistered (a forked child may hold a copy of the
//!    descriptor, so closing ours would not end the registrations), and our handles to the
//!    descriptor are given up;
//! 4. `released` tells both threads to read what is left (releasing blocked threads) and
//!    exit, which closes the descriptor.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::monitor::{bump, Shared};
use crate::queue::{Taken, Work};
use crate::reader::{self, Waiter, BATCH};
use crate::sys::{self, RawMsg, Uffd};

/// What one monitor thread owns, all allocated before it starts (a thread that reads
/// must not allocate afterwards).
pub(crate) struct Worker {
    pub(crate) waiter: Waiter,
    pub(crate) taken: Taken,
    /// Whether this thread busy-polls (`MonitorConfig::busy_poll`; one of the two only).
    pub(crate) polls: bool,
}

/// A monitor thread's body (signals are already blocked).
pub(crate) fn run(shared: &Arc<Shared>, uffd: &Uffd, mut w: Worker) {
    let mut buf = [RawMsg::ZERO; BATCH];
    let mut last_event = Instant::now();
    let mut failed = false;
    loop {
        // Busy polling: only look (no sleep) until `busy_poll` has passed since the last
        // event.
        let spin =
            w.polls && !shared.busy_poll.is_zero() && last_event.elapsed() < shared.busy_poll;
        let (events, woken) = if failed {
            // Reads fail: wait for the stop sequence (run here or on the other thread).
            std::thread::sleep(Duration::from_millis(1));
            (false, false)
        } else {
            match w.waiter.wait(!spin) {
                Ok(r) => r,
                Err(e) => {
                    request_stop(shared, e);
                    failed = true;
                    (false, false)
                }
            }
        };
        if woken {
            // Cleared before `released` is read: a stop's final signal is either consumed
            // here (and `released`, stored before it, is seen below) or still pending for
            // the next wait.
            shared.wake.clear();
        }
        if shared.released.load(Acquire) {
            break;
        }
        if events {
            if !shared.busy_poll.is_zero() {
                last_event = Instant::now();
            }
            bump(&shared.stats.batches);
            if let Err(e) = reader::read_pending(shared, uffd, &mut buf) {
                request_stop(shared, e);
                failed = true;
            }
        } else if spin {
            std::hint::spin_loop();
        }
        if try_apply(shared, &mut w.taken) {
            break; // this thread ran the stop sequence
        }
    }
    reader::drain_unapplied(shared, uffd);
}

/// A read failed: record why (no formatting here: the stop sequence turns the errno into
/// the reason) and request the stop.
fn request_stop(shared: &Shared, e: std::io::Error) {
    let _ = shared
        .read_errno
        .compare_exchange(0, e.raw_os_error().unwrap_or(-1), Release, Relaxed);
    shared.stopping.store(true, Release);
    shared.queue.poke();
}

/// Takes the applying role if it is free and applies everything queued, again as long as
/// something was pushed meanwhile; runs the stop sequence instead once it is requested.
/// Returns true if this thread ran the stop sequence.
fn try_apply(shared: &Shared, taken: &mut Taken) -> bool {
    loop {
        // Acquire: pairs with the Release of the thread that gave the role up (its
        // applications, and its last take, happen before ours).
        if shared
            .applying
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            return false; // the holder will see what we pushed (see the module docs)
        }
        if shared.stopping.load(Acquire) {
            let why = shared.read_errno.load(Acquire);
            let why = (why != 0).then(|| {
                format!(
                    "reading userfaultfd events failed: {}",
                    std::io::Error::from_raw_os_error(why)
                )
            });
            stop(shared, why);
            return true; // the role stays taken: nothing is applied after the stop
        }
        while shared.queue.take(taken) {
            match catch_unwind(AssertUnwindSafe(|| apply(shared, taken))) {
                Ok(()) => shared.gate.applied_through(taken.through),
                Err(payload) => {
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    stop(
                        shared,
                        Some(format!(
                            "an invalidation callback panicked on the monitor thread: {msg}"
                        )),
                    );
                    return true;
                }
            }
        }
        // Release: what we applied happens before the next holder's take.
        shared.applying.store(false, Release);
        // Under the queue's lock: a push (or a stop request) made while we held the role
        // is seen here, or its thread sees the role free (see the module docs).
        if !shared.queue.pending() && !shared.stopping.load(Acquire) {
            return false;
        }
    }
}

fn apply(shared: &Shared, taken: &Taken) {
    // First, in one go, the ranges leave the monitor's verified set (a miss over them
    // registers and checks again); only then do their invalidations run. The order is
    // what makes a miss that skipped its system calls sound (see "Registering" in
    // `monitor`).
    shared.forget(taken.iter().filter_map(|w| match w {
        Work::Invalidate { start, end, .. } => Some((start, end)),
        _ => None,
    }));
    for w in taken.iter() {
        match w {
            Work::Invalidate { start, end, event } => shared.invalidate(start, end, event),
            Work::Moved { from, to, len } => shared.moved(from, to, len),
            Work::Unknown(kind) => tracing::warn!("unknown userfaultfd event {kind:#x}"),
        }
    }
}

/// The stop sequence (see the module docs), on the thread that holds the applying role.
fn stop(shared: &Shared, why: Option<String>) {
    if let Some(w) = &why {
        tracing::error!("mmu-uffd monitor stopped: {w}");
    }
    *shared.stop_reason.lock() = why;
    shared.stopping.store(true, Release);
    shared.gate.stop();
    // A callback that panics again on `Release` must not keep the rest of the stop from
    // running (the other thread waits for `released`; unmappers for the unregistering).
    if catch_unwind(AssertUnwindSafe(|| shared.subs.release())).is_err() {
        tracing::error!("mmu-uffd: a subscriber panicked on its Release invalidation");
    }
    // Waits for watches and probes in progress (they hold the read side).
    let uffd = shared.uffd.write().take();
    if let Some(uffd) = uffd {
        // Every mapping of the process, one at a time: the kernel carries registrations
        // along mremap moves and in-place growth, which no bookkeeping here sees
        // completely. Unregistering a mapping this descriptor does not hold changes
        // nothing (the kernel refuses another context's, and skips unregistered ones).
        // Without /proc, what the bookkeeping knows.
        let mut ranges = sys::mappings();
        if ranges.is_empty() {
            ranges = shared.known_registered();
        }
        for (s, e) in ranges {
            let _ = uffd.unregister(s, e - s);
        }
    }
    shared.released.store(true, Release);
    shared.wake.signal();
}

#[cfg(all(test, loom))]
mod loom_model {
    //! A miss that skips its system calls because the range is verified (see
    //! "Registering" in `monitor`), against an unmap whose event the applier takes up:
    //! whatever the interleaving, an entry left valid has registered the current memory,
    //! and that memory is registered (its own unmap will be seen). The applier must empty
    //! the verified set *before* the invalidation runs; the broken variant (after) fails.
    use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Release};
    use loom::sync::{Arc, Mutex};
    use mmu_notifier::{
        Event, IntervalContext, IntervalSubscriber, Range, Subscriptions, WouldBlock,
    };

    struct Flag(Arc<AtomicBool>);

    impl IntervalSubscriber for Flag {
        fn invalidate(
            &mut self,
            _: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            self.0.store(false, Release);
            Ok(())
        }
    }

    /// The memory at the address: a version number, and whether that version is
    /// registered with the descriptor; `verified` is the monitor's set (one range).
    fn model(forget_first: bool) {
        loom::model(move || {
            let mm = Subscriptions::new();
            let pages = Arc::new(AtomicU64::new(1));
            let registered = Arc::new(AtomicBool::new(true));
            let verified = Arc::new(Mutex::new(true)); // version 1: registered and checked
            let primary = {
                let (mm, pages, registered, verified) = (
                    mm.clone(),
                    pages.clone(),
                    registered.clone(),
                    verified.clone(),
                );
                loom::thread::spawn(move || {
                    // munmap + mmap of new, unregistered memory at the address.
                    pages.store(2, Release);
                    registered.store(false, Release);
                    // The applier takes up the UNMAP event.
                    let range = Range::new(0x1000, 0x2000, Event::Unmap).unwrap();
                    if forget_first {
                        *verified.lock().unwrap() = false;
                        drop(mm.invalidate_range_start(range));
                    } else {
                        drop(mm.invalidate_range_start(range));
                        *verified.lock().unwrap() = false;
                    }
                })
            };
            // The miss: subscription first, then the lease, then the registration.
            let valid = Arc::new(AtomicBool::new(false));
            let sub = mm
                .insert_interval(0x1000..0x2000, Flag(valid.clone()))
                .unwrap();
            let mut pinned = 0;
            for _ in 0..2 {
                let seq = sub.read_begin();
                {
                    let mut v = verified.lock().unwrap();
                    if !*v {
                        registered.store(true, Release); // UFFDIO_REGISTER + hole check
                        *v = true;
                    }
                }
                pinned = pages.load(Acquire); // the user's register: pins what is mapped
                let guard = sub.lock();
                if guard.read_retry(seq) {
                    continue;
                }
                valid.store(true, Release);
                break;
            }
            primary.join().unwrap();
            if valid.load(Acquire) {
                assert_eq!(pinned, pages.load(Acquire), "a valid entry pins old pages");
                assert!(
                    registered.load(Acquire),
                    "a valid entry over memory that is not registered"
                );
            }
            drop(sub);
        });
    }

    #[test]
    fn a_verified_miss_never_leaves_a_valid_entry_over_unwatched_memory() {
        model(true);
    }

    /// The checker catches the wrong order.
    #[test]
    #[should_panic(expected = "not registered")]
    fn forgetting_after_the_invalidation_is_caught() {
        model(false);
    }
}
