//! A small sleepable RCU (SRCU) domain: read-side sections that may sleep, a blocking
//! [`synchronize`](Srcu::synchronize), callbacks run after a grace period
//! ([`call`](Srcu::call)) and a [`barrier`](Srcu::barrier) that waits for them.
//!
//! # The protocol
//!
//! Readers never wait and never write shared state beyond two counters. The domain has two
//! counter *indices* (`idx & 1` selects the one new readers use) and, per index, a lock
//! count and an unlock count, each striped over a few cache-padded slots so that readers on
//! different threads do not bounce one cache line. A reader:
//!
//! 1. loads `idx` (Acquire: pairs with the flip, so a reader that sees the new index also
//!    sees everything the updater published before flipping),
//! 2. increments `lock[i]` of its stripe, followed by a full barrier (SeqCst RMW, plus a
//!    SeqCst fence on architectures where the RMW is not already one),
//! 3. runs its section (it may sleep),
//! 4. increments `unlock[i]` of the same stripe with Release, so that everything the
//!    section did happens-before an updater that reads this increment.
//!
//! A grace period (`synchronize`), one at a time under `gp_lock`:
//!
//! 1. SeqCst fence: the updater's prior writes (an unpublished pointer, a removed entry)
//!    are ordered before its counter reads. Fence-against-fence: either the reader's lock
//!    increment is visible to the sums below, or the reader's section sees those writes.
//! 2. wait until the *inactive* index balances: stale readers that loaded it before the
//!    previous flip and incremented late must not hide in it once it becomes active;
//! 3. flip `idx` so new readers move to the other index;
//! 4. wait until the old index balances.
//!
//! "Balanced" sums the unlock counts first (Acquire), then the lock counts. A reader whose
//! unlock was seen has its lock seen too (its lock happens-before its unlock), so equal sums
//! mean every reader whose lock increment was visible has left. A reader whose increment
//! was not visible is ordered after step 1 and so already sees the update: it is not a
//! pre-existing reader. Counters wrap; equality is all that is compared.
//!
//! Deferred callbacks are queued under a mutex; a worker thread (spawned on demand, exiting
//! when the queue is empty) takes the whole batch, runs one grace period, then runs the
//! batch. Every callback therefore runs exactly once, after a grace period that began after
//! it was queued. `barrier` waits until the count of completed callbacks reaches the count
//! queued when it was called.
//!
//! Misuse that would deadlock (a `synchronize` or `barrier` from inside a read-side section
//! of the same domain, a `barrier` from inside a deferred callback) panics with a message
//! that says so, instead of hanging.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use crate::sync::{
    fence, thread, thread_local, Arc, AtomicU64, AtomicUsize, Backoff, CachePadded, Condvar, Mutex,
};

/// Per-stripe counters: `lock[i]`/`unlock[i]` for each of the two indices.
#[derive(Default)]
struct Stripe {
    lock: [AtomicUsize; 2],
    unlock: [AtomicUsize; 2],
}

type Callback = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct DeferQueue {
    pending: Vec<Callback>,
    worker_running: bool,
    queued: u64,
    done: u64,
}

struct Inner {
    id: u64,
    idx: AtomicUsize,
    stripes: Box<[CachePadded<Stripe>]>,
    gp_lock: Mutex<()>,
    grace_periods: AtomicU64,
    deferred: Mutex<DeferQueue>,
    deferred_cv: Condvar,
}

/// A sleepable-RCU domain. Cloning gives another handle to the same domain.
///
/// ```
/// use mmu_notifier::Srcu;
/// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
///
/// let srcu = Srcu::new();
/// let reader = srcu.read_lock();        // may sleep while held
/// drop(reader);
/// srcu.synchronize();                   // every section that began before has ended
///
/// let ran = Arc::new(AtomicBool::new(false));
/// let r = ran.clone();
/// srcu.call(move || r.store(true, Ordering::SeqCst)); // runs after a grace period
/// srcu.barrier();                       // waits for it
/// assert!(ran.load(Ordering::SeqCst));
/// ```
#[derive(Clone)]
pub struct Srcu {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Srcu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Srcu")
            .field("id", &self.inner.id)
            .field("grace_periods", &self.grace_periods())
            .finish()
    }
}

impl Default for Srcu {
    fn default() -> Self {
        Self::new()
    }
}

/// Source of domain ids (only compared for equality, never part of a protocol).
static NEXT_DOMAIN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
/// Source of reader stripe numbers.
#[cfg(not(loom))]
static NEXT_STRIPE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(not(loom))]
thread_local! {
    /// The domains whose read-side sections this thread holds (one entry per section).
    static HELD: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Set while this thread runs deferred callbacks.
    static IN_CALLBACK_WORKER: Cell<bool> = const { Cell::new(false) };
}

// loom's `thread_local!` does not take `const` initialisers.
#[cfg(loom)]
thread_local! {
    static HELD: RefCell<Vec<u64>> = RefCell::new(Vec::new());
    static IN_CALLBACK_WORKER: Cell<bool> = Cell::new(false);
}

#[cfg(not(loom))]
std::thread_local! {
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Relaxed);
}

#[cfg(not(loom))]
fn stripe_seed() -> usize {
    STRIPE.with(|s| *s)
}

#[cfg(loom)]
fn stripe_seed() -> usize {
    // All loom threads share one OS thread, and a global counter would differ between
    // executions (loom needs every execution to be deterministic): number the threads
    // with a loom-modelled counter that is reset for every execution instead.
    loom::lazy_static! { static ref NEXT: loom::sync::atomic::AtomicUsize = loom::sync::atomic::AtomicUsize::new(0); }
    loom::thread_local! { static STRIPE: usize = NEXT.fetch_add(1, Relaxed); }
    STRIPE.with(|s| *s)
}

/// Full barrier after an atomic RMW. On x86 a locked RMW already is one (Linux's
/// `smp_mb__after_atomic` is empty there); elsewhere, and always under loom, fence.
#[inline(always)]
fn mb_after_atomic() {
    #[cfg(any(loom, not(any(target_arch = "x86", target_arch = "x86_64"))))]
    fence(SeqCst);
}

fn stripe_count() -> usize {
    #[cfg(loom)]
    {
        2
    }
    #[cfg(not(loom))]
    {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        (cpus * 2).next_power_of_two().clamp(4, 64)
    }
}

impl Srcu {
    /// A new domain with no readers and no pending callbacks.
    pub fn new() -> Self {
        let stripes = (0..stripe_count())
            .map(|_| CachePadded(Stripe::default()))
            .collect();
        Self {
            inner: Arc::new(Inner {
                id: NEXT_DOMAIN_ID.fetch_add(1, Relaxed),
                idx: AtomicUsize::new(0),
                stripes,
                gp_lock: Mutex::new(()),
                grace_periods: AtomicU64::new(0),
                deferred: Mutex::new(DeferQueue::default()),
                deferred_cv: Condvar::new(),
            }),
        }
    }

    /// Enters a read-side section; it lasts until the guard drops. Sections nest, may
    /// sleep, and never wait for each other or for an updater.
    #[inline]
    pub fn read_lock(&self) -> SrcuReadGuard<'_> {
        let inner = &*self.inner;
        let stripe = stripe_seed() & (inner.stripes.len() - 1);
        // Acquire: pairs with the SeqCst flip in `synchronize` (see the module docs).
        let idx = inner.idx.load(Acquire) & 1;
        inner.stripes[stripe].lock[idx].fetch_add(1, SeqCst);
        mb_after_atomic();
        HELD.with(|h| h.borrow_mut().push(inner.id));
        SrcuReadGuard {
            srcu: self,
            stripe,
            idx,
            _not_send: PhantomData,
        }
    }

    /// Whether the current thread is inside a read-side section of this domain.
    pub fn held_by_current_thread(&self) -> bool {
        HELD.with(|h| h.borrow().contains(&self.inner.id))
    }

    /// Waits for a grace period: every read-side section that began before this call has
    /// ended when it returns. Sections that begin during the call are not waited for.
    ///
    /// # Panics
    /// If the current thread holds a read-side section of this domain (that would wait
    /// for itself forever).
    pub fn synchronize(&self) {
        assert!(
            !self.held_by_current_thread(),
            "Srcu::synchronize called inside a read-side section of the same domain: it would \
             wait for itself forever (e.g. unregistering a notifier from inside one of its \
             callbacks, or while holding an InvalidateGuard of the same address space)"
        );
        let inner = &*self.inner;
        let _gp = inner.gp_lock.lock();
        // Order the caller's updates before every counter read (fence against the readers'
        // barrier after their lock increment).
        fence(SeqCst);
        let cur = inner.idx.load(Relaxed); // only changed under gp_lock, which we hold
        inner.wait_balanced((cur + 1) & 1);
        // Flip: new readers use the other index. SeqCst store + fence: the flip is ordered
        // after the caller's updates for readers that Acquire-load the new index, and
        // before the reads of the old index's counters below.
        inner.idx.store(cur.wrapping_add(1), SeqCst);
        fence(SeqCst);
        inner.wait_balanced(cur & 1);
        // Order the counter reads before whatever the caller does next (frees).
        fence(SeqCst);
        inner.grace_periods.fetch_add(1, Relaxed);
    }

    /// Queues `f` to run once, on a worker thread, after a grace period that begins after
    /// this call. Never blocks on readers; safe to call inside a read-side section.
    pub fn call(&self, f: impl FnOnce() + Send + 'static) {
        let spawn = {
            let mut q = self.inner.deferred.lock();
            q.pending.push(Box::new(f));
            q.queued += 1;
            !std::mem::replace(&mut q.worker_running, true)
        };
        if spawn {
            let srcu = self.clone();
            let _ = thread::spawn(move || srcu.run_deferred());
        }
    }

    fn run_deferred(&self) {
        IN_CALLBACK_WORKER.with(|w| w.set(true));
        loop {
            let batch = {
                let mut q = self.inner.deferred.lock();
                if q.pending.is_empty() {
                    q.worker_running = false;
                    self.inner.deferred_cv.notify_all();
                    break;
                }
                std::mem::take(&mut q.pending)
            };
            self.synchronize();
            let n = batch.len() as u64;
            for f in batch {
                f();
            }
            let mut q = self.inner.deferred.lock();
            q.done += n;
            self.inner.deferred_cv.notify_all();
        }
        IN_CALLBACK_WORKER.with(|w| w.set(false));
    }

    /// Waits until every callback queued by [`call`](Srcu::call) before this call has run.
    ///
    /// # Panics
    /// From inside a deferred callback or a read-side section of this domain (either
    /// would wait for itself).
    pub fn barrier(&self) {
        assert!(
            !IN_CALLBACK_WORKER.with(|w| w.get()),
            "Srcu::barrier called from inside a deferred callback: it would wait for itself"
        );
        assert!(
            !self.held_by_current_thread(),
            "Srcu::barrier called inside a read-side section of the same domain: it would \
             wait for itself forever"
        );
        let mut q = self.inner.deferred.lock();
        let target = q.queued;
        while q.done < target {
            q = self.inner.deferred_cv.wait(q);
        }
    }

    /// Number of grace periods completed so far (a statistic).
    pub fn grace_periods(&self) -> u64 {
        self.inner.grace_periods.load(Relaxed)
    }
}

impl Inner {
    fn wait_balanced(&self, idx: usize) {
        let mut backoff = Backoff::new();
        loop {
            // Unlocks first (Acquire: a seen unlock carries its lock and its section)...
            let unlocks = self.stripes.iter().fold(0usize, |acc, s| {
                acc.wrapping_add(s.unlock[idx].load(Acquire))
            });
            // ...then locks. An unbalanced sum means a reader whose lock we see is inside.
            let locks = self
                .stripes
                .iter()
                .fold(0usize, |acc, s| acc.wrapping_add(s.lock[idx].load(Acquire)));
            if locks == unlocks {
                return;
            }
            backoff.snooze();
        }
    }
}

/// A read-side section of an [`Srcu`] domain; dropping it leaves the section.
///
/// Not `Send`: the section belongs to the thread that entered it (the deadlock checks in
/// `synchronize` rely on that).
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct SrcuReadGuard<'a> {
    srcu: &'a Srcu,
    stripe: usize,
    idx: usize,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for SrcuReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrcuReadGuard")
            .field("idx", &self.idx)
            .finish()
    }
}

impl Drop for SrcuReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let inner = &*self.srcu.inner;
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(pos) = h.iter().rposition(|&d| d == inner.id) {
                h.swap_remove(pos);
            }
        });
        // Release: the section's accesses happen-before an updater that sees this count.
        inner.stripes[self.stripe].unlock[self.idx].fetch_add(1, Release);
    }
}
