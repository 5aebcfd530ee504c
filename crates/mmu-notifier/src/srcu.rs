//! A small sleepable RCU (SRCU) domain: read-side sections that may sleep, a blocking
//! [`synchronize`](Srcu::synchronize), callbacks run after a grace period
//! ([`call`](Srcu::call)) and a [`barrier`](Srcu::barrier) that waits for them.
//!
//! # The protocol
//!
//! Readers never wait and never write shared state: each thread that enters a section of a
//! domain owns a *reader slot* of that domain, with, for each of two counter *indices*
//! (`idx & 1` selects the one new readers use), a lock count and an unlock count that only
//! the owning thread writes (a load and a store, no atomic read-modify-write). A reader:
//!
//! 1. loads `idx` (Acquire: pairs with the flip, so a reader that sees the new index also
//!    sees everything the updater published before flipping),
//! 2. increments `lock[i]` of its slot, then a *reader barrier*,
//! 3. runs its section (it may sleep),
//! 4. increments `unlock[i]` of its slot with Release, so that everything the section did
//!    happens-before an updater that reads this increment.
//!
//! The reader barrier must order the lock increment before the section's loads, against
//! the updater's barrier in step 1 below (the store-buffering pattern). Where the kernel
//! offers `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` the barrier is asymmetric, as in
//! liburcu: readers only stop the compiler, and the updater's barrier makes every running
//! thread of the process execute a full fence (a sleeping thread already did, at its
//! context switch). Elsewhere, and always under loom, both sides use SeqCst fences. The
//! choice is made once per process, before any reader of any domain exists.
//!
//! A grace period (`synchronize`), one at a time under `gp_lock`:
//!
//! 1. updater barrier: the updater's prior writes (an unpublished pointer, a removed entry)
//!    are ordered before its counter reads. Barrier against barrier: either the reader's
//!    lock increment is visible to the sums below, or the reader's section sees those
//!    writes.
//! 2. wait until the *inactive* index balances: stale readers that loaded it before the
//!    previous flip and incremented late must not hide in it once it becomes active;
//! 3. flip `idx` so new readers move to the other index;
//! 4. wait until the old index balances.
//!
//! "Balanced" sums the unlock counts first (Acquire), then the lock counts. A reader whose
//! unlock was seen has its lock seen too (its lock happens-before its unlock), so equal sums
//! mean every reader whose lock increment was visible has left. A reader whose increment
//! was not visible is ordered after step 1 and so already sees the update: it is not a
//! pre-existing reader. Counters wrap; equality is all that is compared. A slot that was
//! added to the domain after the updater listed the slots belongs to a thread that
//! registered it after the updater's barrier (the registry is a mutex), so it too sees the
//! update. Slots are never removed while the domain lives; a thread that exits leaves its
//! slot balanced and another thread adopts it.
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

#[cfg(loom)]
use crate::sync::thread;
use crate::sync::{
    fence, thread_local, Arc, AtomicBool, AtomicU64, AtomicUsize, Backoff, CachePadded, Condvar,
    Mutex,
};

mod barrier;

/// One thread's counters in one domain. Only the owning thread writes them.
#[derive(Default)]
struct ReaderSlot {
    lock: [AtomicUsize; 2],
    unlock: [AtomicUsize; 2],
    /// A live thread owns the slot (cleared when it exits, so another may adopt it).
    owned: AtomicBool,
}

impl ReaderSlot {
    /// Whether the owner is inside a section (only meaningful on the owning thread).
    fn inside(&self) -> bool {
        let locks = self.lock[0]
            .load(Relaxed)
            .wrapping_add(self.lock[1].load(Relaxed));
        let unlocks = self.unlock[0]
            .load(Relaxed)
            .wrapping_add(self.unlock[1].load(Relaxed));
        locks != unlocks
    }
}

type Slot = Arc<CachePadded<ReaderSlot>>;
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
    /// The process's barrier flavour (`barrier::asymmetric()`), copied here when the domain
    /// is created: the flavour is decided before the first domain exists and never
    /// changes, and a reader then finds it on the line it reads `id` and `idx` from,
    /// instead of loading a static from another line.
    asymmetric: bool,
    /// Every reader slot of the domain; only ever grows.
    slots: Mutex<Vec<Slot>>,
    /// Cleared when the domain is dropped, so threads can forget their slots of it.
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
    gp_lock: Mutex<()>,
    grace_periods: AtomicU64,
    deferred: Mutex<DeferQueue>,
    deferred_cv: Condvar,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.alive.store(false, Relaxed);
    }
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
///
/// A read-side section is not async-signal-safe: do not enter one from a signal handler
/// that may interrupt a section of the same domain on the same thread.
#[derive(Clone)]
pub struct Srcu {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Srcu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Srcu")
            .field("id", &self.inner.id)
            .field("grace_periods", &self.grace_periods())
            .field("asymmetric_barriers", &barrier::asymmetric())
            .finish()
    }
}

impl Default for Srcu {
    fn default() -> Self {
        Self::new()
    }
}

/// Source of domain ids: unique for the life of the process, only compared for equality.
static NEXT_DOMAIN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// This thread's slots, by domain. Dropped at thread exit, which hands the slots back.
struct ThreadSlots(Vec<(u64, std::sync::Arc<std::sync::atomic::AtomicBool>, Slot)>);

impl Drop for ThreadSlots {
    fn drop(&mut self) {
        // Later thread-local destructors of this thread must not reach a slot through the
        // fast path once it may belong to another thread.
        let _ = LAST.try_with(|l| l.set((0, std::ptr::null())));
        for (_, _, slot) in &self.0 {
            // Only a balanced slot can be handed over: one left inside a section (a leaked
            // guard, a guard in another thread-local) stays owned forever, so its count
            // keeps holding grace periods back and nobody else's increments mix with it.
            if !slot.inside() {
                // Release: our last counter stores happen-before the adopter's Acquire CAS.
                slot.owned.store(false, Release);
            }
        }
    }
}

#[cfg(not(loom))]
thread_local! {
    /// The last domain this thread read in and its slot there: the fast path.
    static LAST: Cell<(u64, *const ReaderSlot)> = const { Cell::new((0, std::ptr::null())) };
    static SLOTS: RefCell<ThreadSlots> = const { RefCell::new(ThreadSlots(Vec::new())) };
    /// Set while this thread runs deferred callbacks.
    static IN_CALLBACK_WORKER: Cell<bool> = const { Cell::new(false) };
}

// loom's `thread_local!` does not take `const` initialisers.
#[cfg(loom)]
thread_local! {
    static LAST: Cell<(u64, *const ReaderSlot)> = Cell::new((0, std::ptr::null()));
    static SLOTS: RefCell<ThreadSlots> = RefCell::new(ThreadSlots(Vec::new()));
    static IN_CALLBACK_WORKER: Cell<bool> = Cell::new(false);
}

impl Srcu {
    /// A new domain with no readers and no pending callbacks.
    pub fn new() -> Self {
        // Decide the barrier flavour before any reader of this domain can exist.
        barrier::init();
        Self {
            inner: Arc::new(Inner {
                id: NEXT_DOMAIN_ID.fetch_add(1, Relaxed),
                idx: AtomicUsize::new(0),
                asymmetric: barrier::asymmetric(),
                slots: Mutex::new(Vec::new()),
                alive: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
                gp_lock: Mutex::new(()),
                grace_periods: AtomicU64::new(0),
                deferred: Mutex::new(DeferQueue::default()),
                deferred_cv: Condvar::new(),
            }),
        }
    }

    /// This thread's slot in this domain, if it has one.
    #[inline]
    fn find_slot(&self) -> Option<&ReaderSlot> {
        // During thread teardown the thread-locals may be gone: then there is no slot.
        let (id, ptr) = LAST.try_with(Cell::get).ok()?;
        if id == self.inner.id {
            // SAFETY: `LAST` only holds a pointer to a slot of the domain with that id
            // (ids are never reused), and a domain keeps every slot in `slots` for as long
            // as it lives; `&self` keeps it alive for the returned borrow.
            return Some(unsafe { &*ptr });
        }
        let found = SLOTS
            .try_with(|s| {
                s.borrow()
                    .0
                    .iter()
                    .find(|(id, _, _)| *id == self.inner.id)
                    .map(|(_, _, slot)| &***slot as *const ReaderSlot)
            })
            .ok()??;
        let _ = LAST.try_with(|l| l.set((self.inner.id, found)));
        // SAFETY: as above: a slot of this domain, kept alive by `self.inner.slots`.
        Some(unsafe { &*found })
    }

    /// This thread's slot in this domain, adopting a free one or creating one on first use.
    #[inline]
    fn slot(&self) -> &ReaderSlot {
        // The fast path: the domain this thread read in last.
        if let Ok((id, ptr)) = LAST.try_with(Cell::get) {
            if id == self.inner.id {
                // SAFETY: as in `find_slot`.
                return unsafe { &*ptr };
            }
        }
        self.other_slot()
    }

    #[cold]
    #[inline(never)]
    fn other_slot(&self) -> &ReaderSlot {
        match self.find_slot() {
            Some(slot) => slot,
            None => self.new_slot(),
        }
    }

    #[cold]
    fn new_slot(&self) -> &ReaderSlot {
        let slot = {
            let mut slots = self.inner.slots.lock();
            // Acquire on success: the previous owner's counter stores are ours now.
            let free = slots.iter().find(|s| {
                s.owned
                    .compare_exchange(false, true, Acquire, Relaxed)
                    .is_ok()
            });
            match free {
                Some(s) => s.clone(),
                None => {
                    let s: Slot = Arc::new(CachePadded(ReaderSlot::default()));
                    s.owned.store(true, Relaxed);
                    slots.push(s.clone());
                    s
                }
            }
        };
        let ptr: *const ReaderSlot = &**slot;
        // If this thread's thread-locals are already destroyed (a read from another
        // thread-local's destructor), the slot is simply never handed back: it stays owned.
        let _ = SLOTS.try_with(|s| {
            let mut s = s.borrow_mut();
            // Forget slots of domains that no longer exist (they hold nothing).
            if s.0.len() >= 16 {
                s.0.retain(|(_, alive, _)| alive.load(Relaxed));
            }
            s.0.push((self.inner.id, self.inner.alive.clone(), slot));
        });
        let _ = LAST.try_with(|l| l.set((self.inner.id, ptr)));
        // SAFETY: a slot of this domain, kept alive by `self.inner.slots`.
        unsafe { &*ptr }
    }

    /// Enters a read-side section; it lasts until the guard drops. Sections nest, may
    /// sleep, and never wait for each other or for an updater.
    #[inline]
    pub fn read_lock(&self) -> SrcuReadGuard<'_> {
        let slot = self.slot();
        // Acquire: pairs with the flip in `synchronize` (see the module docs).
        let idx = self.inner.idx.load(Acquire) & 1;
        // Only this thread writes its slot: a plain load and store suffice.
        let n = slot.lock[idx].load(Relaxed);
        slot.lock[idx].store(n.wrapping_add(1), Relaxed);
        barrier::reader(self.inner.asymmetric);
        SrcuReadGuard {
            unlock: &slot.unlock[idx],
            _not_send: PhantomData,
        }
    }

    /// Whether the current thread is inside a read-side section of this domain.
    pub fn held_by_current_thread(&self) -> bool {
        self.find_slot().is_some_and(ReaderSlot::inside)
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
        // Order the caller's updates before every counter read (against the readers'
        // barrier after their lock increment).
        barrier::updater();
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
            self.spawn_worker();
        }
    }

    fn spawn_worker(&self) {
        let srcu = self.clone();
        #[cfg(not(loom))]
        let spawned = std::thread::Builder::new()
            .name("srcu-callbacks".into())
            .spawn(move || srcu.run_deferred())
            .is_ok();
        #[cfg(loom)]
        let spawned = {
            let _ = thread::spawn(move || srcu.run_deferred());
            true
        };
        if !spawned {
            // No thread could be created: leave the callbacks queued; the next `call` or
            // `barrier` tries again (`barrier` runs them itself).
            tracing::warn!("could not spawn the SRCU callback thread; callbacks stay queued");
            self.inner.deferred.lock().worker_running = false;
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
                // A panicking callback must not take the others, or the worker, with it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                    tracing::error!("an SRCU deferred callback panicked");
                }
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
            if !q.worker_running {
                // Nobody is running them (a spawn failed): run them here.
                q.worker_running = true;
                drop(q);
                self.run_deferred();
                q = self.inner.deferred.lock();
                continue;
            }
            q = self.inner.deferred_cv.wait(q);
        }
    }

    /// Number of grace periods completed so far (a statistic).
    pub fn grace_periods(&self) -> u64 {
        self.inner.grace_periods.load(Relaxed)
    }

    /// Number of reader slots of this domain: one per thread that has read in it, except
    /// that a thread which exited hands its slot to the next new reader.
    pub fn reader_slots(&self) -> usize {
        self.inner.slots.lock().len()
    }

    /// Whether read-side sections use the asymmetric (membarrier) barrier in this process.
    pub fn asymmetric_barriers() -> bool {
        barrier::init();
        barrier::asymmetric()
    }
}

impl Inner {
    fn wait_balanced(&self, idx: usize) {
        // A snapshot of the slot list: slots added later belong to readers that started
        // after our barrier (see the module docs).
        let slots: Vec<Slot> = self.slots.lock().clone();
        let mut backoff = Backoff::new();
        loop {
            // Unlocks first (Acquire: a seen unlock carries its lock and its section)...
            let unlocks = slots.iter().fold(0usize, |acc, s| {
                acc.wrapping_add(s.unlock[idx].load(Acquire))
            });
            // ...then locks. An unbalanced sum means a reader whose lock we see is inside.
            let locks = slots
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
/// Not `Send`: the section is counted in the entering thread's own slot, which only that
/// thread may write.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct SrcuReadGuard<'a> {
    /// The unlock count of the index this section entered on, in this thread's slot.
    unlock: &'a AtomicUsize,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for SrcuReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrcuReadGuard").finish_non_exhaustive()
    }
}

impl Drop for SrcuReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let unlock = self.unlock;
        // Release: the section's accesses happen-before an updater that sees this count.
        // Only this thread writes the slot, so load + store is an increment.
        unlock.store(unlock.load(Relaxed).wrapping_add(1), Release);
    }
}
