//! Fork detection: a child process inherits a copy of the monitor and the cache, but not
//! the monitor thread, and its memory is not watched. A `pthread_atfork` child handler
//! advances a process-wide generation; the monitor remembers the generation it was created
//! in, and every lookup compares (one relaxed load), so a child gets [`Error::Forked`]
//! instead of a registration nobody keeps coherent.
//!
//! [`Error::Forked`]: crate::Error::Forked

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

extern "C" fn in_child() {
    // Relaxed: the child has a single thread at this point.
    GENERATION.fetch_add(1, Relaxed);
}

/// Installs the handler (once per process) and returns the current generation.
pub(crate) fn generation() -> u64 {
    INSTALL.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic (async-signal-safe, as a
        // post-fork child handler must be); the other two handlers are absent.
        unsafe {
            libc::pthread_atfork(None, None, Some(in_child));
        }
    });
    GENERATION.load(Relaxed)
}

/// The current generation, without installing anything (the fast path).
#[inline]
pub(crate) fn current() -> u64 {
    GENERATION.load(Relaxed)
}
