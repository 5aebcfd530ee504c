//! The monitor against the real kernel: which system calls on watched memory become which
//! invalidations, with exact ranges and kinds, for every memory type; madvise, mprotect,
//! mremap, `MAP_FIXED`, fork, many threads, shutdown and errors.
//!
//! Every test starts its own monitor (or skips, printing why, where userfaultfd is
//! unavailable) and records every invalidation the monitor delivers with a [`Recorder`]
//! over the whole address space. A monitor only hears about memory registered on its own
//! descriptor, so tests running in parallel do not see each other's events. Exactness
//! ("this call produced exactly these events") rests on two facts:
//!
//! - the kernel does not let a call that raised an event return before the monitor has
//!   *read* the event, and the monitor's gate (passed by `CachedRegistration::is_valid` and
//!   `RegCache::get`) waits until what was read has been *applied*: right after an unmapping
//!   call and one pass of the gate, the recorder already holds that call's events;
//! - "produced nothing" is checked with [`fence`]: it unmaps a watched sentinel page and
//!   passes the gate. An event of an earlier call would have been read before that call
//!   returned, so it would be in the log by then.

#[path = "../common/mod.rs"]
mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::recording::*;
use common::*;
use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, WouldBlock};
use mmu_uffd::{CacheConfig, Error, MonitorConfig, MonitorState};
use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The tests of this binary share one process. The fork tests count the process's
/// descriptors and its FORK events, which any other test's monitor would disturb (a fork
/// also copies every other test's mappings): they run alone, the others in parallel.
static PROCESS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    PROCESS.read()
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    PROCESS.write()
}

mod errors;
mod fork;
mod madvise;
mod map_fixed;
mod mremap;
// One file per job, each with `use super::*` for the imports and helpers above.
mod munmap;
mod shutdown;
mod threads;
mod unwatch;
