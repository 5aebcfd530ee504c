//! # mmu-secondary
//!
//! The secondary MMUs of Linux (KVM, an SVA TLB, an HMM mirror, XPMEM, ODP), each a small,
//! readable model of how to write one with [`mmu_notifier`], running over the simulated
//! primary of [`mmu_sim`] and checked by its [`Checker`](mmu_sim::Checker):
//!
//! Every secondary implements [`SecondaryMmu`]: a device fault that makes an address
//! accessible through the secondary's own translation (retrying when it loses a race with
//! an invalidation), and a device access through that translation. Accesses go through
//! the address space's checker when one is attached, so every stale translation,
//! use-after-free or lost write is counted.
//!
//! # Faults: one fill loop, one policy
//!
//! Every fault of every secondary is the collision-retry loop of `mmu_notifier`'s fill
//! helper ([`IntervalSubscription::fill`](mmu_notifier::IntervalSubscription::fill), or
//! the bare [`retry`](mmu_notifier::interval::retry) loop for the list subscribers, whose
//! sequence is their own), under one policy, [`FaultRetry`]:
//!
//! - the race window (after reading the primary, before the secondary's own lock) is a
//!   schedule point ([`sched::point`]): a scheduler can run other operations right there,
//!   deterministically, so that a lost race is found and replayed exactly;
//! - a lost attempt is counted ([`SecondaryStats::retries`]), by the policy or, for KVM's
//!   and SVA's faults whose two halves are public, by the half that finds it;
//! - between two attempts the fault hands over to the scheduler under one, else yields
//!   the CPU so that the invalidation that won can finish;
//! - the fault gives up with [`SecondaryError::Timeout`] once its deadline has passed:
//!   the secondary's fault timeout ([`SecondaryMmu::set_fault_timeout`], by default
//!   [`DEFAULT_FAULT_TIMEOUT`]) from the start of the operation. Under a scheduler time
//!   means nothing and the deadline is ignored ([`sched::expired`]).
//!
//! A fault that holds a lock another task may need to go on (HMM's device-operations lock)
//! uses the policy without handover ([`FaultRetry::holding_lock`]): no schedule point, and
//! the deadline in force even under a scheduler (no collision can happen there while no
//! other task runs, so a loop that does not end is a bug worth a `Timeout`).
//!
//! # How a secondary holds its address space
//!
//! A secondary holds its [`AddressSpace`] by [`Weak`](std::sync::Weak), upgrades it for
//! the length of one operation, and answers [`SecondaryError::Gone`] when that fails; the
//! state it registers or inserts in the address space's notifier holds no reference to
//! the address space at all. Two reasons:
//!
//! - the address space owns its notifier, and the notifier holds what is subscribed: an
//!   `Arc` from there back to the address space is a cycle that no drop ever ends;
//! - a device must not keep a process's memory alive after the process has let go of it
//!   (Linux's notifier pins the `mm_struct`, `mmgrab`, never the address space,
//!   `mm_users`: the address space goes away and the secondary is told through
//!   `release`).
//!
//! The helper threads of a secondary (XPMEM's consumer and fault server) follow the same
//! rule: they outlive no operation with a strong reference.
#![deny(missing_docs)]

pub mod broken;
pub mod hmm;
pub mod kvm;
pub mod odp;
pub mod sched;
pub mod sva;
pub mod xpmem;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use mmu_notifier::{RetryBudget, RetryPolicy};

use mmu_sim::{AddressSpace, CheckedSecondary, FrameRef, SimError};

/// Why a device fault or access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecondaryError {
    /// The primary refused the fault (unmapped, protection, out of memory).
    #[error("primary fault: {0}")]
    Primary(#[from] SimError),
    /// The fault kept losing races with invalidations until its deadline.
    #[error("timed out retrying against invalidations")]
    Timeout,
    /// The address is outside what this secondary covers.
    #[error("address {0:#x} is outside the secondary's range")]
    OutOfRange(u64),
    /// The secondary was shut down or its address space released.
    #[error("the secondary is gone")]
    Gone,
}

/// Counters every secondary keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SecondaryStats {
    /// Translations installed.
    pub fills: u64,
    /// Fills abandoned and retried because an invalidation collided with them.
    pub retries: u64,
    /// Invalidation callbacks received.
    pub invalidations: u64,
    /// Non-blockable invalidations answered with `WouldBlock`.
    pub would_blocks: u64,
    /// Accesses made through a translation.
    pub accesses: u64,
}

/// Atomic counters behind [`SecondaryStats`].
#[derive(Debug, Default)]
pub struct Counters {
    fills: AtomicU64,
    retries: AtomicU64,
    invalidations: AtomicU64,
    would_blocks: AtomicU64,
    accesses: AtomicU64,
}

impl Counters {
    /// Counts a fill.
    pub fn fill(&self) {
        self.fills.fetch_add(1, Relaxed);
    }
    /// Counts a retry.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }
    /// Counts an invalidation callback.
    pub fn invalidation(&self) {
        self.invalidations.fetch_add(1, Relaxed);
    }
    /// Counts a `WouldBlock` answer.
    pub fn would_block(&self) {
        self.would_blocks.fetch_add(1, Relaxed);
    }
    /// Counts an access.
    pub fn access(&self) {
        self.accesses.fetch_add(1, Relaxed);
    }
    /// A snapshot.
    pub fn snapshot(&self) -> SecondaryStats {
        SecondaryStats {
            fills: self.fills.load(Relaxed),
            retries: self.retries.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            would_blocks: self.would_blocks.load(Relaxed),
            accesses: self.accesses.load(Relaxed),
        }
    }
}

/// A secondary MMU as a device driver sees it.
pub trait SecondaryMmu: CheckedSecondary {
    /// A device fault at `addr`: makes it accessible (writable if `write`) through the
    /// secondary's own translation, faulting the primary without pinning and retrying
    /// when an invalidation collides.
    fn fault(&self, addr: u64, write: bool) -> Result<(), SecondaryError>;

    /// A device access at `addr` through the secondary's translation, faulting first if it
    /// has none (or only a read-only one for a write). Returns the data read, or the data
    /// written.
    fn access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError>;

    /// The counters.
    fn stats(&self) -> SecondaryStats;

    /// The secondary's fault-timeout setting, which its faults start their
    /// [`FaultRetry`] from.
    fn timeout_setting(&self) -> &FaultTimeout;

    /// How long a fault keeps retrying against colliding invalidations before it fails
    /// with [`SecondaryError::Timeout`] ([`DEFAULT_FAULT_TIMEOUT`] unless set).
    fn fault_timeout(&self) -> Duration {
        self.timeout_setting().get()
    }

    /// Sets the fault timeout (saturates at about 584 years); faults that have started
    /// keep theirs.
    fn set_fault_timeout(&self, timeout: Duration) {
        self.timeout_setting().set(timeout);
    }

    /// Migrates `npages` pages from `start` to the device's own memory, if the secondary
    /// has any (the HMM mirror does: its `Migrate` invalidation carries its owner token
    /// and it keeps its translations through it). Returns the pages moved; the default
    /// moves nothing.
    fn migrate_to_device(&self, start: u64, npages: u64) -> Result<usize, SecondaryError> {
        let _ = (start, npages);
        Ok(0)
    }
}

/// Reads or writes the page at `addr` through a translation to `frame`, as the device
/// would, through the address space's checker when one is attached (so incoherent
/// accesses are counted). Call it with the lock the secondary's invalidation takes held.
pub fn device_access(
    mm: &AddressSpace,
    secondary: &dyn CheckedSecondary,
    addr: u64,
    frame: FrameRef,
    write: Option<u64>,
) -> u64 {
    match (mm.checker(), write) {
        (Some(c), Some(v)) => {
            c.write(mm, secondary, addr, frame, v);
            v
        }
        (Some(c), None) => c.read(mm, secondary, addr, frame),
        (None, Some(v)) => {
            mm.frames().write(frame.pfn, v);
            v
        }
        (None, None) => mm.frames().read(frame.pfn),
    }
}

/// Reports an install to the address space's checker, if one is attached. Call it with
/// the secondary's lock held, just before making the translation visible.
pub fn report_install(
    mm: &AddressSpace,
    secondary: &dyn CheckedSecondary,
    addr: u64,
    frame: FrameRef,
    writable: bool,
) {
    if let Some(c) = mm.checker() {
        c.check_install(mm, secondary, addr, frame, writable);
    }
}

/// How long a fault keeps retrying against colliding invalidations before it fails with
/// [`SecondaryError::Timeout`], unless [`SecondaryMmu::set_fault_timeout`] says otherwise.
/// (Linux's HMM gives up after 1 s, `HMM_RANGE_DEFAULT_TIMEOUT`; KVM retries as long as it
/// takes. A simulation on a loaded machine needs slack: a timeout here is a livelock, not
/// a slow scheduler.)
pub const DEFAULT_FAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A secondary's fault timeout: the one setting behind [`SecondaryMmu::set_fault_timeout`].
#[derive(Debug)]
pub struct FaultTimeout {
    /// Nanoseconds; a configuration value no other data depends on (Relaxed).
    ns: AtomicU64,
}

impl Default for FaultTimeout {
    fn default() -> Self {
        Self::new(DEFAULT_FAULT_TIMEOUT)
    }
}

impl FaultTimeout {
    /// A timeout of `timeout` (saturates at about 584 years).
    pub fn new(timeout: Duration) -> Self {
        let t = FaultTimeout {
            ns: AtomicU64::new(0),
        };
        t.set(timeout);
        t
    }

    /// The timeout.
    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.ns.load(Relaxed))
    }

    /// Sets the timeout (saturates at about 584 years).
    pub fn set(&self, timeout: Duration) {
        let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        self.ns.store(ns, Relaxed);
    }

    /// The retry policy of a fault starting now: this timeout from now, lost attempts
    /// counted in `counters` if given.
    pub fn start<'a>(&self, counters: Option<&'a Counters>) -> FaultRetry<'a> {
        FaultRetry {
            budget: RetryBudget::timeout(self.get()),
            counters,
            handover: true,
        }
    }
}

/// The retry policy of every secondary's fault (see the [crate docs](crate#faults-one-fill-loop-one-policy)):
/// a schedule point in the race window, a counted retry, a handover or a yield between
/// attempts, [`SecondaryError::Timeout`] past the deadline (ignored under a scheduler).
#[derive(Debug)]
pub struct FaultRetry<'a> {
    budget: RetryBudget,
    counters: Option<&'a Counters>,
    handover: bool,
}

impl FaultRetry<'_> {
    /// The same policy for a caller that holds a lock another task may need: no schedule
    /// point, and the deadline in force even under a scheduler.
    pub fn holding_lock(&mut self) -> FaultRetry<'_> {
        FaultRetry {
            budget: self.budget,
            counters: self.counters,
            handover: false,
        }
    }

    /// Whether the fault's deadline has passed (never under a scheduler, unless the
    /// policy holds a lock).
    pub fn expired(&self) -> bool {
        match self.budget.deadline() {
            Some(d) if self.handover => sched::expired(d),
            Some(d) => Instant::now() >= d,
            None => false,
        }
    }

    /// Gives up if the deadline has passed: for the loops around a fill (an access that
    /// faults, then finds its translation dropped again).
    pub fn check(&self) -> Result<(), SecondaryError> {
        if self.expired() {
            Err(SecondaryError::Timeout)
        } else {
            Ok(())
        }
    }
}

impl RetryPolicy for FaultRetry<'_> {
    type Error = SecondaryError;

    fn window(&mut self) {
        if self.handover {
            sched::point();
        }
    }

    fn again(&mut self) -> Result<(), SecondaryError> {
        if let Some(c) = self.counters {
            c.retry();
        }
        self.check()?;
        if self.handover && sched::active() {
            sched::point();
        } else {
            // Let the invalidating thread finish (two cores, and a build running beside).
            std::thread::yield_now();
        }
        Ok(())
    }
}

/// The page holding `addr`.
pub(crate) fn page_of(addr: u64) -> u64 {
    addr & !(mmu_sim::PAGE_SIZE - 1)
}

/// One translation of a secondary's page-keyed table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Translation {
    pub(crate) frame: FrameRef,
    pub(crate) writable: bool,
}

/// Unregisters, unless the current thread is inside a callback (or holds an invalidation)
/// of the same address space: unregistering waits for a grace period, that is for every
/// running callback, including ours. Then a helper thread named `thread` does it; if none
/// can be started the registration is leaked (its subscriber is already retired: it holds
/// nothing and installs nothing) rather than deadlocking.
pub(crate) fn unregister_outside_callbacks(reg: mmu_notifier::ListRegistration, thread: &str) {
    if !reg.subscriptions().srcu().held_by_current_thread() {
        reg.unregister();
        return;
    }
    let slot = std::sync::Arc::new(parking_lot::Mutex::new(Some(reg)));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            if let Some(reg) = theirs.lock().take() {
                reg.unregister();
            }
        });
    if spawned.is_err() {
        if let Some(reg) = slot.lock().take() {
            std::mem::forget(reg);
        }
    }
}

/// Removes and returns the entries of a page-keyed table for the pages overlapping
/// `[start, end)` (two `split_off`s: no scan, no temporary list of keys).
pub(crate) fn take_pages<V>(
    table: &mut BTreeMap<u64, V>,
    start: u64,
    end: u64,
) -> BTreeMap<u64, V> {
    let start = start & !(mmu_sim::PAGE_SIZE - 1);
    if end <= start {
        return BTreeMap::new();
    }
    let mut taken = table.split_off(&start);
    let mut above = taken.split_off(&end);
    table.append(&mut above);
    taken
}
