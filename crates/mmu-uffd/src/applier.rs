//! The applier thread: turns what the reader handed over into interval invalidations, and
//! runs the stop sequence.
//!
//! # Applying
//!
//! Take everything queued (see `queue`), invalidate each range on the monitor's
//! subscriptions (the user callbacks run here, on this thread), then tell the gate that
//! every batch up to the number taken is applied. Between batches the thread parks; the
//! reader unparks it after each hand-over (an unpark before the park is not lost).
//!
//! # Stop
//!
//! Requested by `Drop`, by a failed read (the reader), or caused here by a panicking
//! callback. In this order:
//! 1. the gate is closed for good: lookups and queries fail from now on;
//! 2. every subscription gets a `Release` invalidation (nothing can be trusted once events
//!    stop); the reader still reads meanwhile, so a callback that unmaps cannot hang;
//! 3. every mapping of the process is unregistered (a forked child may hold a copy of the
//!    descriptor, so closing ours would not end the registrations), and our handles to the
//!    descriptor are given up;
//! 4. `released` tells the reader to read what is left (releasing blocked threads) and
//!    exit, which closes the descriptor.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::Arc;

use crate::monitor::Shared;
use crate::queue::{Taken, Work};
use crate::sys;

/// The applier's body.
pub(crate) fn run(shared: Arc<Shared>) {
    let mut taken = Taken::new();
    let why = loop {
        if shared.stopping.load(Acquire) {
            break None;
        }
        if !shared.queue.take(&mut taken) {
            std::thread::park();
            continue;
        }
        match catch_unwind(AssertUnwindSafe(|| apply(&shared, &taken))) {
            Ok(()) => shared.gate.applied_through(taken.through),
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                break Some(format!(
                    "an invalidation callback panicked on the monitor thread: {msg}"
                ));
            }
        }
    };
    let why = why.or_else(|| match shared.read_errno.load(Acquire) {
        0 => None,
        errno => Some(format!(
            "reading userfaultfd events failed: {}",
            std::io::Error::from_raw_os_error(errno)
        )),
    });
    if let Some(w) = &why {
        tracing::error!("mmu-uffd monitor stopped: {w}");
    }
    stop(&shared, why);
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

/// The stop sequence (see the module docs).
fn stop(shared: &Shared, why: Option<String>) {
    *shared.stop_reason.lock() = why;
    shared.stopping.store(true, Release);
    shared.gate.stop();
    // A callback that panics again on `Release` must not keep the rest of the stop from
    // running (the reader waits for `released`; unmappers for the unregistering).
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
