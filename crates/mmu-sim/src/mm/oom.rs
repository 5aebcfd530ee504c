//! The OOM reaper.
//!
//! # What Linux does
//! When a process is killed for memory, the OOM reaper frees its private memory before
//! the process gets to exit: it only tries to take the mmap lock for reading (the victim
//! may hold it), and for each private mapping starts a non-blockable `Unmap` invalidation
//! of the mapping; a subscriber that would have to sleep fails the start, and the mapping
//! is skipped for a later pass. Passes are retried a few times (10, 100 ms apart) until
//! one reaps everything.
//!
//! # What the simulation follows
//! The same trylock, the same non-blockable invalidation per private mapping, the same
//! retry loop with the attempts and delay as parameters.

use std::time::Duration;

use mmu_notifier::{Event, Range};

use super::AddressSpace;
use crate::op::SimOp;

/// What one pass of the OOM reaper did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomReap {
    /// Private mappings whose pages were freed.
    pub reaped: usize,
    /// Private mappings skipped because a subscriber would have had to sleep.
    pub skipped: usize,
    /// The mmap lock was taken by someone else: nothing was tried.
    pub lock_contended: bool,
}

impl OomReap {
    /// Whether the pass reaped everything it could (no retry needed).
    pub fn is_complete(&self) -> bool {
        self.skipped == 0 && !self.lock_contended
    }
}

impl AddressSpace {
    /// One pass of the OOM reaper (Linux's `__oom_reap_task_mm`): without waiting for the
    /// mmap lock, frees the pages of every private mapping, each inside a non-blockable
    /// `Unmap` invalidation of the mapping. A mapping whose invalidation would block
    /// (a subscriber answered `WouldBlock`) is skipped for a later pass.
    pub fn oom_reap(&self) -> OomReap {
        let Some(vmas) = self.mmap.try_read() else {
            return OomReap {
                lock_contended: true,
                ..OomReap::default()
            };
        };
        let mut r = OomReap::default();
        for vma in vmas.iter().filter(|v| !v.shared) {
            let range = Range::new(vma.start, vma.end, Event::Unmap).expect("non-empty");
            match self.try_invalidate(range, SimOp::OomReap) {
                Ok(inv) => {
                    self.zap(&inv, vma.start, vma.end);
                    r.reaped += 1;
                }
                Err(_) => r.skipped += 1,
            }
        }
        r
    }

    /// The OOM reaper's retry loop: passes until one is complete, at most `attempts`,
    /// sleeping `delay` between them (Linux: 10 attempts, 100 ms apart). Returns the last
    /// pass.
    pub fn oom_reap_with_retries(&self, attempts: u32, delay: Duration) -> OomReap {
        let mut last = OomReap::default();
        for n in 0..attempts.max(1) {
            if n > 0 {
                std::thread::sleep(delay);
            }
            last = self.oom_reap();
            if last.is_complete() {
                break;
            }
        }
        last
    }
}
