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
        #[cfg(feature = "fault-injection")]
        if shared.inject_no_proc_maps.load(Relaxed) {
            ranges.clear();
        }
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

    /// The entry's interval subscription, reduced to the collision-retry protocol (the
    /// real one is modelled in mmu-notifier and in `cache`): whether it is inserted, its
    /// invalidation count, and the validity flag, all under its lock.
    #[derive(Default)]
    struct Sub {
        inserted: bool,
        seq: u64,
        valid: bool,
    }

    /// The memory at the address: a version number, and whether that version is
    /// registered with the descriptor; `verified` is the monitor's set (one range).
    fn model(forget_first: bool) {
        loom::model(move || {
            let sub = Arc::new(Mutex::new(Sub::default()));
            let pages = Arc::new(AtomicU64::new(1));
            let registered = Arc::new(AtomicBool::new(true));
            let verified = Arc::new(Mutex::new(true)); // version 1: registered and checked
            let invalidate = {
                let sub = sub.clone();
                move || {
                    let mut s = sub.lock().unwrap();
                    if s.inserted {
                        s.seq += 1;
                        s.valid = false;
                    }
                }
            };
            let primary = {
                let (pages, registered, verified) =
                    (pages.clone(), registered.clone(), verified.clone());
                loom::thread::spawn(move || {
                    // munmap + mmap of new, unregistered memory at the address.
                    pages.store(2, Release);
                    registered.store(false, Release);
                    // The applier takes up the UNMAP event.
                    if forget_first {
                        *verified.lock().unwrap() = false;
                        invalidate();
                    } else {
                        invalidate();
                        *verified.lock().unwrap() = false;
                    }
                })
            };
            // The miss: subscription first, then the lease, then the registration.
            sub.lock().unwrap().inserted = true;
            let mut pinned = 0;
            for _ in 0..2 {
                let seq = sub.lock().unwrap().seq; // read_begin
                {
                    let mut v = verified.lock().unwrap();
                    if !*v {
                        registered.store(true, Release); // UFFDIO_REGISTER + hole check
                        *v = true;
                    }
                }
                pinned = pages.load(Acquire); // the user's register: pins what is mapped
                let mut s = sub.lock().unwrap();
                if s.seq != seq {
                    continue; // read_retry: deregister, start again
                }
                s.valid = true;
                break;
            }
            primary.join().unwrap();
            if sub.lock().unwrap().valid {
                assert_eq!(pinned, pages.load(Acquire), "a valid entry pins old pages");
                assert!(
                    registered.load(Acquire),
                    "a valid entry over memory that is not registered"
                );
            }
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

    /// The applying role (see "Two threads, one role"): two threads each read one batch
    /// (numbered and pushed under the reading lock) and try to apply. Whatever the
    /// interleaving, at most one applies at a time, `applied` only grows, and once both
    /// are done every batch has been applied. Without the re-check after giving the role
    /// up, a batch pushed while the other thread held the role is left behind.
    fn role_model(recheck: bool) {
        use loom::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
        loom::model(move || {
            // (published, taken), the queue's ring under its lock.
            let queue = Arc::new(Mutex::new((0u64, 0u64)));
            let reading = Arc::new(Mutex::new(0u64));
            let role = Arc::new(AtomicBool::new(false));
            let applied = Arc::new(AtomicU64::new(0));
            let inside = Arc::new(AtomicUsize::new(0));
            let thread = || {
                let (queue, reading, role, applied, inside) = (
                    queue.clone(),
                    reading.clone(),
                    role.clone(),
                    applied.clone(),
                    inside.clone(),
                );
                loom::thread::spawn(move || {
                    {
                        let mut r = reading.lock().unwrap(); // gate.begin + read + push
                        *r += 1;
                        let mut q = queue.lock().unwrap();
                        q.0 = q.0.max(*r);
                    }
                    loop {
                        if role
                            .compare_exchange(false, true, Acquire, Relaxed)
                            .is_err()
                        {
                            return;
                        }
                        assert_eq!(inside.fetch_add(1, SeqCst), 0, "two threads apply");
                        loop {
                            let through = {
                                let mut q = queue.lock().unwrap();
                                let fresh = q.0 > q.1;
                                q.1 = q.0;
                                fresh.then_some(q.0)
                            };
                            let Some(t) = through else { break };
                            assert!(t >= applied.load(Relaxed), "applied went back");
                            applied.store(t, Release); // gate.applied_through
                        }
                        inside.fetch_sub(1, SeqCst);
                        role.store(false, Release);
                        if !recheck {
                            return;
                        }
                        let pending = {
                            let q = queue.lock().unwrap();
                            q.0 > q.1
                        };
                        if !pending {
                            return;
                        }
                    }
                })
            };
            let (a, b) = (thread(), thread());
            a.join().unwrap();
            b.join().unwrap();
            assert_eq!(applied.load(Acquire), 2, "a batch was left in the queue");
        });
    }

    #[test]
    fn the_applying_role_leaves_no_batch_behind() {
        role_model(true);
    }

    /// The checker catches a hand-over without the re-check.
    #[test]
    #[should_panic(expected = "left in the queue")]
    fn giving_the_role_up_without_the_recheck_is_caught() {
        role_model(false);
    }
}
