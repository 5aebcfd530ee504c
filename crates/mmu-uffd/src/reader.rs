//! The reader thread: polls the descriptor, reads events into a fixed buffer, and hands
//! them to the applier (see `queue` for why the two are separate threads).
//!
//! # What the reader may do
//!
//! Only system calls on its own descriptors and lock-free or futex-only synchronization:
//! `poll`, `read`, `close` of a forked child's descriptor, the write-protect safety net
//! for an unexpected fault, the gate's counter, the queue's futex lock, and `unpark` of
//! the applier. It never allocates (no formatting, no logging, no collections), never runs
//! user code, and never takes a lock a user thread may hold. Hence a thread it must
//! release can never be waiting for it: not an allocator trimming watched heap memory, not
//! a fork holding the allocator's locks, not an invalidation callback that unmaps.
//!
//! # One batch
//!
//! `gate.begin()` numbers the batch *before* the `read()` that releases its unmappers;
//! forked children's descriptors are closed at once (a child's unmaps would otherwise wait
//! on a context nobody reads); the invalidations go to the queue with the batch number;
//! the applier is woken. A read that fails because no descriptor slot is free for a
//! child's context (EMFILE/ENFILE; the kernel leaves the FORK event queued) publishes the
//! empty batch, sleeps a millisecond and tries again: the forking thread waits, nothing is
//! lost, and the monitor recovers as soon as a slot frees up.
//!
//! # Stop
//!
//! The reader keeps reading after `stopping` is set (the applier may be blocked on an
//! event while it releases the subscriptions) until the applier sets `released`; then it
//! reads whatever is still queued, without applying it, and exits. Its clone of the
//! descriptor is then dropped, which closes it.

use std::sync::atomic::Ordering::Acquire;
use std::sync::atomic::Ordering::Release;
use std::thread::Thread;
use std::time::{Duration, Instant};

use mmu_notifier::Event;

use crate::monitor::{bump, Shared};
use crate::queue::Work;
use crate::sys::{self, Message, RawMsg, Uffd};

/// Messages read per `read()`, on the stack.
const BATCH: usize = 64;

/// The reader's body (signals are already blocked).
pub(crate) fn run(shared: &Shared, uffd: &Uffd, applier: &Thread) {
    if let Err(e) = serve(shared, uffd, applier) {
        // No formatting here: the applier turns the errno into the stop reason.
        shared
            .read_errno
            .store(e.raw_os_error().unwrap_or(-1), Release);
        shared.stopping.store(true, Release);
        applier.unpark();
        // Reads fail: nothing more to do than wait for the release, so that the final
        // drain below runs after everything is unregistered.
        while !shared.released.load(Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    drain_unapplied(uffd);
}

fn serve(shared: &Shared, uffd: &Uffd, applier: &Thread) -> std::io::Result<()> {
    let mut buf = [RawMsg::ZERO; BATCH];
    // Busy polling: only look (poll with no timeout) until `busy_poll` has passed since
    // the last event. The gate is only entered once poll says an event is pending, so
    // lookups are not slowed by the spinning.
    let mut last_event = Instant::now();
    loop {
        let spin = !shared.busy_poll.is_zero() && last_event.elapsed() < shared.busy_poll;
        let (events, woken) = sys::poll2(uffd.raw(), shared.wake.raw(), !spin)?;
        if woken {
            shared.wake.clear();
        }
        if shared.released.load(Acquire) {
            return Ok(());
        }
        if shared.stopping.load(Acquire) {
            applier.unpark();
        }
        if !events {
            if spin {
                std::hint::spin_loop();
            }
            continue;
        }
        if !shared.busy_poll.is_zero() {
            last_event = Instant::now();
        }
        bump(&shared.stats.batches);
        read_pending(shared, uffd, &mut buf, applier)?;
    }
}

/// Reads until the descriptor has nothing more, one batch per `read()`.
fn read_pending(
    shared: &Shared,
    uffd: &Uffd,
    buf: &mut [RawMsg; BATCH],
    applier: &Thread,
) -> std::io::Result<()> {
    loop {
        let batch = shared.gate.begin();
        let n = match uffd.read(buf) {
            Ok(n) => n,
            Err(e) => {
                // Publish the empty batch either way, or lookups would wait for it.
                shared.queue.push(batch, std::iter::empty());
                shared.counted.store(batch, Release);
                applier.unpark();
                return match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE) => {
                        bump(&shared.stats.read_backoffs);
                        std::thread::sleep(Duration::from_millis(1));
                        Ok(())
                    }
                    _ => Err(e),
                };
            }
        };
        let msgs = &buf[..n];
        // Children's descriptors and fault wake-ups first: they release threads that wait
        // for us, and must not depend on the applier.
        for m in msgs {
            match m.decode() {
                Message::Fork { fd } => {
                    bump(&shared.stats.forks);
                    sys::close_received(fd);
                }
                Message::Pagefault { address, .. } => {
                    bump(&shared.stats.unexpected_faults);
                    let page = address & !(shared.page - 1);
                    // The safety net: nothing is write-protected, so no fault is expected;
                    // if one comes, unprotect and wake the faulting thread.
                    let _ = uffd.unprotect(page, shared.page);
                }
                _ => {}
            }
        }
        let merged = shared.queue.push(
            batch,
            msgs.iter().flat_map(|m| work(shared, m.decode())).flatten(),
        );
        shared
            .stats
            .merged
            .fetch_add(merged, std::sync::atomic::Ordering::Relaxed);
        // Release: the counters bumped above are visible to whoever sees the batch counted.
        shared.counted.store(batch, Release);
        applier.unpark();
        if n < BATCH {
            return Ok(());
        }
    }
}

/// What the applier must do for a message (and the message's counter).
fn work(shared: &Shared, msg: Message) -> [Option<Work>; 2] {
    let (start, end, event) = match msg {
        Message::Unmap { start, end } => {
            bump(&shared.stats.unmaps);
            (start, end, Event::Unmap)
        }
        Message::Remove { start, end } => {
            bump(&shared.stats.removes);
            (start, end, Event::Clear)
        }
        Message::Remap { from, to, len } => {
            bump(&shared.stats.remaps);
            // The moved mapping keeps its registration (REMAP is enabled): only the old
            // range is invalid.
            let old_end = from.saturating_add(len);
            return [
                Some(Work::Invalidate {
                    start: from,
                    end: old_end,
                    event: Event::Unmap,
                }),
                Some(Work::Moved { from, to, len }),
            ];
        }
        Message::Unknown(kind) => {
            bump(&shared.stats.unknown);
            return [Some(Work::Unknown(kind)), None];
        }
        Message::Fork { .. } | Message::Pagefault { .. } => return [None, None],
    };
    [Some(Work::Invalidate { start, end, event }), None]
}

/// At stop, after everything was unregistered: reads what is still queued so that every
/// blocked thread continues (closing children's descriptors), without applying it: every
/// subscription has been released already.
fn drain_unapplied(uffd: &Uffd) {
    let mut buf = [RawMsg::ZERO; 16];
    while let Ok(n) = uffd.read(&mut buf) {
        if n == 0 {
            break;
        }
        for m in &buf[..n] {
            if let Message::Fork { fd } = m.decode() {
                sys::close_received(fd);
            }
        }
    }
}
