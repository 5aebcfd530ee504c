//! The per-address-space subscriptions object and the primary-side API.
//!
//! # How list subscribers are found: a published snapshot
//!
//! The list of subscribers is an immutable snapshot published through one atomic
//! pointer. Writers (register, unregister, put, release) serialise on `state`, build a new
//! snapshot, swap the pointer, and free the old one only after a grace period of the
//! address space's [`Srcu`] domain. Readers (every primary-side call) enter a read-side
//! section, load the pointer (Acquire: pairs with the Release half of the swap, so the
//! entries are initialised) and call subscribers with no lock held, so callbacks may sleep
//! and may take their own locks freely.
//!
//! # What an invalidation costs
//!
//! The snapshot is laid out for the invalidation path. Its list subscribers and its
//! secondary TLBs are two separate slices of bare trait objects, resolved when the
//! snapshot is built (the `Arc`s that own them sit in the same snapshot), so a loop over
//! either is one indirect call per subscriber: no kind to match, no offset of the value
//! inside its `Arc` to compute. A flag in the same cache line says whether the interval
//! part must run (set by the first interval insert); while it is clear, an invalidation
//! never touches the interval state, and when set, that part runs out of line. Start and
//! end are inline at the primary's call site, with the list loops; reporting a failed
//! start is out of line. The orderings are the ones above, nothing more: the read-side
//! section and the Acquire load of the snapshot. With one list subscriber, start + end
//! is about 50 instructions beyond the subscriber's own two calls (it was 133), most of
//! them the read-side section and the guard.
//!
//! # Why an invalidation holds its read-side section from start to end
//!
//! [`InvalidateGuard`] keeps the section and the snapshot it started with until it drops.
//! That gives two rules for free:
//! - *Register never misses an in-flight invalidation ([rule 4](crate#the-rules)).* `register` publishes the
//!   new snapshot, then waits for a grace period. Every invalidation that loaded the old
//!   snapshot began before the grace period, so it has ended when `register` returns;
//!   every later one loads the new snapshot and calls the new subscriber's start. (Linux
//!   excludes invalidations with `mm_take_all_locks`; this is the same guarantee without
//!   reaching into the primary's locks.)
//! - *No end without a start.* `end` walks the snapshot `start` walked, so a subscriber
//!   registered in between never sees a stray end, and one unregistered in between still
//!   gets its end: `unregister` waits for the guard.
//!
//! # Release: the per-registration state machine
//!
//! Each registration is `Live`, `Releasing(by thread)` or `Released`. Whoever moves it from
//! `Live` to `Releasing` (address-space exit or `unregister`) calls `release`, outside every
//! lock, while the subscriber is *still in the list* so that invalidations keep reaching it
//! (a 2012 kernel fix: a notifier removed before its release ran let reclaim free a page a
//! secondary still mapped). The loser of a race waits on `state_cv` until `Released`, so
//! release runs exactly once and both callers return after it finished (the 2013 fixes of
//! a double release and of an unregister touching an already removed node).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::Arc as StdArc;

use crate::error::{GetError, RegisterError};
use crate::interval::{self, Itree, ItreeActive};
use crate::list::{ListSubscriber, SecondaryTlb, SharedSubscriber};
use crate::range::{Range, WouldBlock};
use crate::srcu::{Srcu, SrcuReadGuard};
use crate::sync::{thread, Arc, AtomicPtr, AtomicU64, Condvar, Mutex, MutexGuard};

/// A registered subscriber, by kind: the kind decides which callbacks exist (a secondary
/// TLB has no start/end, a list subscriber no TLB op), and every callback that exists is
/// called.
#[derive(Clone)]
enum Callbacks {
    List(StdArc<dyn ListSubscriber>),
    Tlb(StdArc<dyn SecondaryTlb>),
}

impl Callbacks {
    fn release(&self) {
        match self {
            Callbacks::List(s) => s.release(),
            Callbacks::Tlb(s) => s.release(),
        }
    }
}

/// A list subscriber as the readers call it: the trait object resolved once, when its
/// snapshot is built, so that an invalidation makes one indirect call per subscriber and
/// nothing else (no kind to match on, no offset of the value inside its `Arc` to compute).
#[derive(Clone, Copy)]
struct ListPtr(NonNull<dyn ListSubscriber>);

impl ListPtr {
    fn new(sub: &StdArc<dyn ListSubscriber>) -> Self {
        Self(NonNull::from(&**sub))
    }
}

/// A secondary TLB as the readers call it (see [`ListPtr`]).
#[derive(Clone, Copy)]
struct TlbPtr(NonNull<dyn SecondaryTlb>);

/// List subscribers a snapshot holds on its own first cache line (see [`Snapshot`]).
const HEAD: usize = 2;

/// What fills the unused places of [`Snapshot::head`]: never called (a snapshot's list
/// slice covers only the places in use), there so that every place holds a valid pointer.
struct Vacant;
impl ListSubscriber for Vacant {}
static VACANT: Vacant = Vacant;

/// An immutable list of subscribers, published through `MmInner::list`.
///
/// The list subscribers and the TLBs are kept apart, each as the bare trait objects the
/// readers call; `owners` holds the `Arc` of every one of them, so that a pointer in
/// `head`, `list` or `tlbs` is valid for as long as the snapshot is.
///
/// An invalidation's calls wait on a chain of dependent loads (the address space, its
/// snapshot pointer, the snapshot, the subscriber's pointer, its function), and every
/// subscriber call that ends in an atomic read-modify-write waits for all of them. With up
/// to [`HEAD`] list subscribers their pointers are in the snapshot itself, on the line
/// that also holds `n_list` and `itree` (the snapshot is aligned to a cache line), one
/// load fewer than reaching them through a separate allocation.
#[repr(C, align(64))]
struct Snapshot {
    /// Number of list subscribers.
    n_list: usize,
    /// Invalidations must run the interval part (set once, by the first interval insert).
    /// Kept here so that the fast path reads one cache line.
    itree: bool,
    /// The list subscribers if there are at most [`HEAD`] (the other places hold
    /// [`VACANT`]).
    head: [ListPtr; HEAD],
    /// The list subscribers if there are more than [`HEAD`]; empty otherwise.
    list: Box<[ListPtr]>,
    tlbs: Box<[TlbPtr]>,
    /// Never read: held for its drop, which keeps every pointee of `head`, `list` and
    /// `tlbs` alive for as long as the snapshot.
    #[allow(dead_code)]
    owners: Box<[Callbacks]>,
}

impl Snapshot {
    fn new(owners: Box<[Callbacks]>, itree: bool) -> Self {
        let mut list: Vec<ListPtr> = owners
            .iter()
            .filter_map(|c| match c {
                Callbacks::List(s) => Some(ListPtr::new(s)),
                Callbacks::Tlb(_) => None,
            })
            .collect();
        let n_list = list.len();
        let mut head = [ListPtr(NonNull::from(&VACANT as &dyn ListSubscriber)); HEAD];
        if n_list <= HEAD {
            head[..n_list].copy_from_slice(&list);
            list.clear();
        }
        let tlbs = owners
            .iter()
            .filter_map(|c| match c {
                Callbacks::Tlb(s) => Some(TlbPtr(NonNull::from(&**s))),
                Callbacks::List(_) => None,
            })
            .collect();
        Self {
            n_list,
            itree,
            head,
            list: list.into_boxed_slice(),
            tlbs,
            owners,
        }
    }

    /// The list subscribers, in registration order.
    #[inline]
    fn list(&self) -> impl Iterator<Item = &dyn ListSubscriber> + '_ {
        let ptrs = self.head.get(..self.n_list).unwrap_or(&self.list);
        // SAFETY: every pointer in `head` and `list` was taken from an `Arc` in `owners`
        // (or is `VACANT`, a static), which this snapshot owns and never changes: the
        // pointee lives at least as long as `self`, and it is `Sync`, so a shared
        // reference on any thread is sound.
        ptrs.iter().map(|p| unsafe { p.0.as_ref() })
    }

    /// The secondary TLBs, in registration order.
    #[inline]
    fn tlbs(&self) -> impl Iterator<Item = &dyn SecondaryTlb> + '_ {
        // SAFETY: as in `list`: the `Arc`s in `owners` keep every pointee alive.
        self.tlbs.iter().map(|p| unsafe { p.0.as_ref() })
    }
}

/// A snapshot that has been unpublished and waits for a grace period before it is freed.
struct RetiredSnapshot(*mut Snapshot);

// SAFETY: a retired snapshot is only ever freed, once, by whoever owns this value; the
// subscribers it points to are `Send + Sync` (both traits require it).
unsafe impl Send for RetiredSnapshot {}

impl RetiredSnapshot {
    /// Frees the snapshot.
    ///
    /// # Safety
    /// A grace period must have elapsed since it was unpublished, so no reader holds it.
    unsafe fn free(self) {
        // SAFETY: the pointer came from `Box::into_raw` in `publish`, was unpublished
        // exactly once (the swap that produced this value), and by the caller's contract
        // no reader can still dereference it.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReleaseState {
    Live,
    Releasing(thread::ThreadId),
    Released,
}

/// What `register_record` did.
enum Registered {
    /// A new registration, with its id.
    New(u64),
    /// A shared subscriber of that type already has users: nothing was registered.
    Existing,
}

/// One registration (a list subscriber, a secondary TLB, or a shared subscriber), from
/// `register`/`get` until its handle is done with it (`unregister`, the last `put`).
struct Record {
    sub: Callbacks,
    release: ReleaseState,
    /// Shared subscribers only: the get/put bookkeeping.
    shared: Option<SharedInfo>,
}

struct SharedInfo {
    type_id: TypeId,
    users: u32,
    instance: StdArc<dyn Any + Send + Sync>,
    /// Its registration's grace period has completed (rule 4 holds for it).
    ready: bool,
}

/// The writers' state, under `MmInner::state`. Invariants, kept by the methods below:
/// - `records` has a record for every registration whose handle still exists;
/// - `listed` holds, in registration order, the ids of the records whose subscriber is in
///   the published list (the published snapshot is `listed` mapped to their callbacks);
///   address-space release empties it, and the records stay, `Released`, until their
///   handles are done;
/// - `shared_by_type[T] == id` exactly when `records[id]` is the shared subscriber of type
///   `T` and has users.
#[derive(Default)]
struct State {
    records: HashMap<u64, Record>,
    listed: Vec<u64>,
    shared_by_type: HashMap<TypeId, u64>,
    released: bool,
    /// `release` has finished (a second, concurrent `release` waits for it).
    release_done: bool,
    /// Published snapshots tell invalidations to run the interval part.
    itree_enabled: bool,
    next_id: u64,
}

impl State {
    /// Adds a live, listed registration.
    fn add(&mut self, sub: Callbacks, shared: Option<SharedInfo>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Some(info) = &shared {
            self.shared_by_type.insert(info.type_id, id);
        }
        let release = ReleaseState::Live;
        self.records.insert(
            id,
            Record {
                sub,
                release,
                shared,
            },
        );
        self.listed.push(id);
        id
    }

    /// Forgets a registration whose handle is done. Returns whether it was listed (the
    /// caller must then publish).
    fn forget(&mut self, id: u64) -> bool {
        if let Some(info) = self.records.remove(&id).and_then(|r| r.shared) {
            if self.shared_by_type.get(&info.type_id) == Some(&id) {
                self.shared_by_type.remove(&info.type_id);
            }
        }
        let before = self.listed.len();
        self.listed.retain(|&l| l != id);
        before != self.listed.len()
    }

    fn release_state(&self, id: u64) -> Option<ReleaseState> {
        self.records.get(&id).map(|r| r.release)
    }

    fn set_release_state(&mut self, id: u64, to: ReleaseState) {
        if let Some(r) = self.records.get_mut(&id) {
            r.release = to;
        }
    }

    fn shared_mut(&mut self, id: u64) -> Option<&mut SharedInfo> {
        self.records.get_mut(&id)?.shared.as_mut()
    }
}

struct MmInner {
    srcu: Srcu,
    list: AtomicPtr<Snapshot>,
    state: Mutex<State>,
    state_cv: Condvar,
    subscriber_bugs: AtomicU64,
    itree: Itree,
}

impl Drop for MmInner {
    fn drop(&mut self) {
        let ptr = self.list.load(Relaxed);
        // SAFETY: we are the last owner of the address space: no reader can hold the
        // current snapshot (readers borrow `self`), and it was never retired.
        unsafe { RetiredSnapshot(ptr).free() };
    }
}

/// The subscriptions of one address space (Linux's `mmu_notifier_subscriptions`), and the
/// API its primary MMU calls. Cloning gives another handle to the same object.
///
/// The primary announces every change of its translations:
///
/// ```
/// use mmu_notifier::{Event, Range, Subscriptions};
/// let mm = Subscriptions::new();
/// let range = Range::new(0x10000, 0x20000, Event::Unmap)?;
/// {
///     let _inv = mm.invalidate_range_start(range); // subscribers dropped their copies
///     // ... change the page tables, free the pages ...
/// } // dropping the guard is invalidate_range_end
///
/// // From a context that must not sleep (an OOM reaper):
/// match mm.try_invalidate_range_start(range) {
///     Ok(_inv) => { /* unmap; end on drop */ }
///     Err(mmu_notifier::WouldBlock) => { /* skip this range, retry later */ }
/// }
/// # Ok::<(), mmu_notifier::RangeError>(())
/// ```
#[derive(Clone)]
pub struct Subscriptions {
    inner: Arc<MmInner>,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for Subscriptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters describing an address space's subscriptions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// List subscribers and secondary TLBs currently registered.
    pub list_subscribers: usize,
    /// Grace periods completed by the address space's domain.
    pub grace_periods: u64,
    /// Subscriber bugs reported: a start (list or interval) that failed in a blockable
    /// range.
    pub subscriber_bugs: u64,
    /// Whether [`Subscriptions::release`] has run.
    pub released: bool,
    /// Interval subscriptions (in the tree or about to be).
    pub interval_subscriptions: usize,
    /// The interval sequence count (odd while interval subscriptions are being
    /// invalidated).
    pub interval_seq: u64,
}

impl Subscriptions {
    /// A new, empty subscriptions object with its own grace-period domain.
    pub fn new() -> Self {
        let empty = Box::into_raw(Box::new(Snapshot::new(Box::new([]), false)));
        Self {
            inner: Arc::new(MmInner {
                srcu: Srcu::new(),
                list: AtomicPtr::new(empty),
                state: Mutex::new(State::default()),
                state_cv: Condvar::new(),
                subscriber_bugs: AtomicU64::new(0),
                itree: Itree::new(),
            }),
        }
    }

    /// The grace-period domain that protects this address space's callbacks.
    pub fn srcu(&self) -> &Srcu {
        &self.inner.srcu
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let (interval_subscriptions, interval_seq) = self.inner.itree.counts();
        let state = self.inner.state.lock();
        Stats {
            interval_subscriptions,
            interval_seq,
            list_subscribers: state.listed.len(),
            grace_periods: self.inner.srcu.grace_periods(),
            subscriber_bugs: self.inner.subscriber_bugs.load(Relaxed),
            released: state.released,
        }
    }

    /// Whether both handles name the same address space.
    pub fn same(&self, other: &Subscriptions) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    // ----- readers ------------------------------------------------------------------

    /// Enters a read-side section and borrows the current snapshot for its duration.
    #[inline]
    fn read(&self) -> (SrcuReadGuard<'_>, &Snapshot) {
        let guard = self.inner.srcu.read_lock();
        // Acquire: pairs with the AcqRel swap in `publish`; the snapshot's contents are
        // visible.
        let ptr = self.inner.list.load(Acquire);
        // SAFETY: `ptr` is never null (there is always a published snapshot) and a
        // snapshot is freed only after it has been unpublished and a grace period has
        // elapsed. We hold a read-side section that began before we loaded `ptr`, so that
        // grace period cannot end while the returned borrow (tied to the guard's
        // lifetime by the caller keeping both together) is in use.
        let snap = unsafe { &*ptr };
        (guard, snap)
    }

    pub(crate) fn itree(&self) -> &Itree {
        &self.inner.itree
    }

    pub(crate) fn report_bug(&self, what: std::fmt::Arguments<'_>) {
        self.inner.subscriber_bugs.fetch_add(1, Relaxed);
        tracing::error!("mmu notifier subscriber bug: {what}");
    }

    /// Announces that the primary is about to change `range` (blockable: subscribers may
    /// sleep). When this returns every subscriber has dropped its translations into the
    /// range; they create none until the returned guard drops (`invalidate_range_end`).
    ///
    /// It takes the user lock of every interval subscription overlapping the range: a
    /// thread that holds one of those locks (an [`IntervalGuard`](crate::IntervalGuard)
    /// or an [`IntervalLockGuard`](crate::IntervalLockGuard)) must not call it, or it
    /// waits for itself.
    ///
    /// A subscriber start that fails here is a bug in the subscriber: it is logged,
    /// counted in [`Stats::subscriber_bugs`], and the invalidation carries on.
    #[inline]
    pub fn invalidate_range_start(&self, mut range: Range) -> InvalidateGuard<'_> {
        range.set_blockable(true);
        let (read, snap) = self.read();
        // Inline: the list subscribers' calls, one indirect call each. Out of line: the
        // interval part, and reporting a failed start (both rare on this path).
        let itree = if snap.itree {
            self.start_intervals(&range)
        } else {
            None
        };
        for sub in snap.list() {
            if sub.invalidate_range_start(&range).is_err() {
                self.start_failed(&range);
            }
        }
        InvalidateGuard {
            mm: self,
            itree: itree.map(ItreeActive::hand_over).is_some(),
            _read: read,
            snap,
            range,
            _not_send: PhantomData,
        }
    }

    /// The interval part of a blockable start (interval subscriptions first, rule 8): a
    /// blockable one cannot fail.
    #[cold]
    #[inline(never)]
    fn start_intervals(&self, range: &Range) -> Option<ItreeActive<'_>> {
        interval::inv_start(self, range).ok()
    }

    #[cold]
    #[inline(never)]
    fn start_failed(&self, range: &Range) {
        self.report_bug(format_args!(
            "invalidate_range_start failed in a blockable range {range:?}"
        ));
    }

    /// Non-blocking [`invalidate_range_start`](Self::invalidate_range_start): subscribers
    /// that would have to sleep return [`WouldBlock`]. An interval subscription whose user
    /// lock is busy is one of them: its `invalidate` is not called, and the result is
    /// `Err(WouldBlock)`.
    ///
    /// Every subscriber's start is still called. If any failed, `end` is then called on
    /// every subscriber (so the ones whose start succeeded stay balanced), and the caller
    /// gets `Err(WouldBlock)` and no guard, so it cannot call `end` by mistake.
    pub fn try_invalidate_range_start(
        &self,
        mut range: Range,
    ) -> Result<InvalidateGuard<'_>, WouldBlock> {
        range.set_blockable(false);
        let (read, snap) = self.read();
        // Interval subscriptions first; if one cannot proceed, the interval part has
        // already ended and list subscribers are not called.
        let itree = if snap.itree {
            Some(interval::inv_start(self, &range)?)
        } else {
            None
        };
        // From here on the guard exists: on failure its drop is exactly the required
        // unwinding (the interval part ends, then `end` runs on every subscriber that has
        // one), and the caller gets no guard.
        let guard = InvalidateGuard {
            mm: self,
            itree: itree.map(ItreeActive::hand_over).is_some(),
            _read: read,
            snap,
            range,
            _not_send: PhantomData,
        };
        let mut failed = false;
        for sub in snap.list() {
            failed |= sub.invalidate_range_start(&range).is_err();
        }
        if failed {
            drop(guard);
            return Err(WouldBlock);
        }
        Ok(guard)
    }

    /// Reclaim aging: clears the accessed state of `[start, end)` in every secondary (with
    /// a flush). Returns whether any subscriber had it set (every subscriber is asked).
    pub fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        let (_read, snap) = self.read();
        snap.list()
            .fold(false, |young, s| s.clear_flush_young(start, end) | young)
    }

    /// Like [`clear_flush_young`](Self::clear_flush_young) without the flush.
    pub fn clear_young(&self, start: u64, end: u64) -> bool {
        let (_read, snap) = self.read();
        snap.list()
            .fold(false, |young, s| s.clear_young(start, end) | young)
    }

    /// Whether any secondary has accessed `addr`; stops at the first that says so.
    pub fn test_young(&self, addr: u64) -> bool {
        let (_read, snap) = self.read();
        snap.list().any(|s| s.test_young(addr))
    }

    /// The primary flushed its TLB for `[start, end)` after clearing or downgrading page
    /// table entries: tells the secondary TLBs that share its tables.
    pub fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        let (_read, snap) = self.read();
        for tlb in snap.tlbs() {
            tlb.arch_invalidate_secondary_tlbs(start, end);
        }
    }

    // ----- writers ------------------------------------------------------------------

    /// Publishes a snapshot of the listed registrations and returns the one it replaces,
    /// which the caller must free after a grace period.
    fn publish(&self, state: &MutexGuard<'_, State>) -> RetiredSnapshot {
        let owners = state
            .listed
            .iter()
            .map(|id| state.records[id].sub.clone())
            .collect();
        let new = Box::into_raw(Box::new(Snapshot::new(owners, state.itree_enabled)));
        // AcqRel: Release publishes the new snapshot's contents to readers' Acquire load;
        // Acquire makes the old one's contents ours to free. Writers are serialised by
        // `state`, so the swap returns exactly the snapshot the previous writer published.
        RetiredSnapshot(self.inner.list.swap(new, AcqRel))
    }

    /// Publishes a snapshot that makes invalidations run the interval part, and waits for
    /// a grace period (the first interval insert).
    pub(crate) fn publish_itree_enabled(&self) {
        let old = {
            let mut state = self.inner.state.lock();
            state.itree_enabled = true;
            self.publish(&state)
        };
        self.retire_sync(old);
    }

    /// Waits for a grace period, then frees `old`.
    fn retire_sync(&self, old: RetiredSnapshot) {
        self.inner.srcu.synchronize();
        // SAFETY: a grace period has elapsed since `old` was unpublished.
        unsafe { old.free() };
    }

    /// Adds a registration, publishes it and waits for the grace period of rule 4.
    /// `shared` registers the shared subscriber of a type, unless one with users exists:
    /// then nothing is registered and the answer is [`Registered::Existing`].
    fn register_record(
        &self,
        sub: Callbacks,
        shared: Option<(TypeId, StdArc<dyn Any + Send + Sync>)>,
    ) -> Result<Registered, RegisterError> {
        // Checked before anything is published: the grace period below would wait for
        // the caller itself.
        if self.inner.srcu.held_by_current_thread() {
            return Err(RegisterError::InsideCallback);
        }
        let (id, old) = {
            let mut state = self.inner.state.lock();
            if state.released {
                return Err(RegisterError::Released);
            }
            if let Some((type_id, _)) = &shared {
                if state.shared_by_type.contains_key(type_id) {
                    return Ok(Registered::Existing);
                }
            }
            let shared = shared.map(|(type_id, instance)| SharedInfo {
                type_id,
                users: 1,
                instance,
                ready: false,
            });
            let id = state.add(sub, shared);
            (id, self.publish(&state))
        };
        // Rule 4: every invalidation that could have missed the new subscriber (it loaded
        // the old snapshot) has ended when this grace period has.
        self.retire_sync(old);
        let mut state = self.inner.state.lock();
        if let Some(info) = state.shared_mut(id) {
            info.ready = true;
            self.inner.state_cv.notify_all();
        }
        Ok(Registered::New(id))
    }

    /// Registers a list subscriber (Linux's `mmu_notifier_register`). When this returns,
    /// every later callback reaches it, and no invalidation that was in flight when it was
    /// called is still running (each either ended before, or called the new subscriber's
    /// start): rule 4 of the [crate rules](crate#the-rules).
    ///
    /// Errors: [`RegisterError::Released`] after the address space was released;
    /// [`RegisterError::InsideCallback`] from inside a callback of this address space or
    /// while holding one of its [`InvalidateGuard`]s (registration waits for in-flight
    /// invalidations, so it would wait for the caller itself).
    pub fn register<S: ListSubscriber>(
        &self,
        subscriber: StdArc<S>,
    ) -> Result<ListRegistration, RegisterError> {
        self.register_callbacks(Callbacks::List(subscriber))
    }

    /// Registers a secondary TLB that shares the primary's page tables: it gets
    /// [`arch_invalidate_secondary_tlbs`](Self::arch_invalidate_secondary_tlbs) and
    /// `release`, and no start/end. Same guarantees and errors as
    /// [`register`](Self::register).
    pub fn register_tlb<S: SecondaryTlb>(
        &self,
        subscriber: StdArc<S>,
    ) -> Result<ListRegistration, RegisterError> {
        self.register_callbacks(Callbacks::Tlb(subscriber))
    }

    fn register_callbacks(&self, sub: Callbacks) -> Result<ListRegistration, RegisterError> {
        let Registered::New(id) = self.register_record(sub.clone(), None)? else {
            unreachable!("only shared registrations can find an existing instance")
        };
        Ok(ListRegistration {
            mm: self.clone(),
            id,
            sub,
            done: false,
        })
    }

    fn finish_release(&self, id: u64) {
        self.inner
            .state
            .lock()
            .set_release_state(id, ReleaseState::Released);
        self.inner.state_cv.notify_all();
    }

    /// Address-space exit (Linux's `__mmu_notifier_release`): every list subscriber's
    /// `release` runs exactly once, while it is still in the list; an `unregister` racing
    /// with this either does the release itself (and this waits for it) or waits for this
    /// one. When this returns every release has finished, the list is empty, no callback
    /// of a released subscriber is running, and nothing more can subscribe. The primary
    /// may free the pages afterwards. Calling it again does nothing.
    pub fn release(&self) {
        self.release_intervals();
        let claimed: Vec<(u64, Callbacks)> = {
            let mut state = self.inner.state.lock();
            if state.released {
                // Another release is running or ran: return only once it has finished.
                while !state.release_done {
                    state = self.inner.state_cv.wait(state);
                }
                return;
            }
            state.released = true;
            let me = thread::current().id();
            let state = &mut *state;
            let mut claimed = Vec::new();
            for id in &state.listed {
                let record = state.records.get_mut(id).expect("listed ids have records");
                if record.release == ReleaseState::Live {
                    record.release = ReleaseState::Releasing(me);
                    claimed.push((*id, record.sub.clone()));
                }
            }
            claimed
        };
        for (id, sub) in claimed {
            self.run_release(id, &sub);
        }
        let old = {
            let mut state = self.inner.state.lock();
            // Releases claimed by racing unregisters must finish before the subscribers
            // leave the list.
            while state
                .listed
                .iter()
                .any(|id| matches!(state.release_state(*id), Some(ReleaseState::Releasing(_))))
            {
                state = self.inner.state_cv.wait(state);
            }
            state.listed.clear();
            self.publish(&state)
        };
        self.retire_sync(old);
        self.inner.state.lock().release_done = true;
        self.inner.state_cv.notify_all();
    }

    /// Runs a claimed `release`, inside a read-side section (so that `synchronize` and
    /// unregister's grace period wait for it, as Linux runs it under `srcu_read_lock`),
    /// and marks it finished even if the callback panics.
    fn run_release(&self, id: u64, sub: &Callbacks) {
        struct Finish<'a>(&'a Subscriptions, u64);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.finish_release(self.1);
            }
        }
        let _finish = Finish(self, id);
        let _read = self.inner.srcu.read_lock();
        sub.release();
    }

    /// Takes a counted reference on the one shared subscriber of type `T` for this address
    /// space, allocating and registering it with [`SharedSubscriber::alloc`] on first use
    /// (Linux's `mmu_notifier_get`). Dropping the returned handle (or calling
    /// [`Shared::put`]) gives the reference back; the last one removes the subscriber and
    /// frees it after a grace period, asynchronously (see [`synchronize`](Self::synchronize)).
    ///
    /// Concurrent first `get`s of one type may each call `alloc`; one instance is
    /// registered and shared, the others are dropped unused. `alloc` runs with no lock of
    /// this address space held, so it may itself call `get` for another type.
    ///
    /// Errors: [`GetError::TooManyUsers`] past [`SharedSubscriber::MAX_USERS`]; the
    /// registration errors of [`register`](Self::register) (a released address space, a
    /// first `get` from inside a callback); whatever `alloc` returns.
    ///
    /// A `put` without a matching `get` cannot be written: the handle is consumed.
    ///
    /// ```compile_fail
    /// # use mmu_notifier::*;
    /// # fn f<T: SharedSubscriber>(mm: &Subscriptions) -> Result<(), GetError> {
    /// let h = mm.get::<T>()?;
    /// h.put();
    /// h.put(); // error: use of moved value
    /// # Ok(()) }
    /// ```
    pub fn get<T: SharedSubscriber>(&self) -> Result<Shared<T>, GetError> {
        let mut fresh: Option<StdArc<T>> = None;
        loop {
            {
                let mut state = self.inner.state.lock();
                if state.released {
                    return Err(RegisterError::Released.into());
                }
                if let Some(&id) = state.shared_by_type.get(&TypeId::of::<T>()) {
                    let info = state
                        .shared_mut(id)
                        .expect("indexed shared subscribers exist");
                    if info.users >= T::MAX_USERS {
                        return Err(GetError::TooManyUsers {
                            limit: T::MAX_USERS,
                        });
                    }
                    info.users += 1;
                    let sub = info
                        .instance
                        .clone()
                        .downcast::<T>()
                        .expect("shared subscriber stored under its own TypeId");
                    // Another get is still registering it: wait for its grace period, so
                    // that rule 4 holds for this caller too (unless the caller is inside a
                    // read-side section, which that grace period would wait for).
                    if !self.inner.srcu.held_by_current_thread() {
                        while state
                            .records
                            .get(&id)
                            .and_then(|r| r.shared.as_ref())
                            .is_some_and(|i| !i.ready)
                        {
                            state = self.inner.state_cv.wait(state);
                        }
                    }
                    drop(state);
                    drop(fresh); // lost a race to allocate: unused
                    return Ok(Shared {
                        mm: self.clone(),
                        id,
                        sub,
                        done: false,
                    });
                }
            }
            let sub = match fresh.take() {
                Some(sub) => sub,
                None => StdArc::new(T::alloc(self)?),
            };
            let instance: StdArc<dyn Any + Send + Sync> = sub.clone();
            let shared = Some((TypeId::of::<T>(), instance));
            match self.register_record(Callbacks::List(sub.clone()), shared)? {
                Registered::New(id) => {
                    return Ok(Shared {
                        mm: self.clone(),
                        id,
                        sub,
                        done: false,
                    })
                }
                // Another get registered one meanwhile: share it, drop ours unused.
                Registered::Existing => fresh = Some(sub),
            }
        }
    }

    fn put(&self, id: u64) {
        let mut state = self.inner.state.lock();
        let info = state
            .shared_mut(id)
            .expect("put of a shared subscriber that has no users (a put without a get)");
        info.users -= 1;
        if info.users > 0 {
            return;
        }
        let retired = state.forget(id).then(|| self.publish(&state));
        drop(state);
        if let Some(old) = retired {
            // SAFETY (of the deferred free): `call` runs it after a grace period that
            // began after the unpublish above.
            self.inner.srcu.call(move || unsafe { old.free() });
        }
    }

    /// Waits until every free queued by a last [`Shared::put`] has run (Linux's
    /// `mmu_notifier_synchronize`). After it returns, no callback of a put-away shared
    /// subscriber is running or will run.
    pub fn synchronize(&self) {
        self.inner.srcu.barrier();
    }
}

/// An invalidation in progress: `invalidate_range_start` has returned, and dropping this
/// guard is `invalidate_range_end`.
///
/// The guard holds a read-side section of the address space's grace-period domain, so an
/// `unregister` waits for it, and `register` returns only after it ended. Not `Send`: the
/// invalidation belongs to the thread that started it.
#[must_use = "dropping the guard immediately ends the invalidation"]
pub struct InvalidateGuard<'a> {
    mm: &'a Subscriptions,
    /// The interval part is in progress: the drop ends it (see `ItreeActive::hand_over`).
    itree: bool,
    _read: SrcuReadGuard<'a>,
    snap: &'a Snapshot,
    range: Range,
    _not_send: PhantomData<*const ()>,
}

impl InvalidateGuard<'_> {
    /// The range being invalidated.
    pub fn range(&self) -> &Range {
        &self.range
    }
    /// The address space.
    pub fn subscriptions(&self) -> &Subscriptions {
        self.mm
    }

    /// [`Subscriptions::arch_invalidate_secondary_tlbs`] for a TLB flush made inside this
    /// invalidation (between start and end, as a primary's flush after clearing entries
    /// is): tells the secondary TLBs of the snapshot this invalidation started with, in the
    /// read-side section it already holds, instead of entering another one.
    ///
    /// A TLB registered after this invalidation started is not told, and need not be: its
    /// `register` returns only after this invalidation has ended (rule 4), and a TLB may
    /// rely on its registration only once `register` has returned, by which time the
    /// entries flushed here were cleared.
    ///
    /// ```
    /// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
    /// use mmu_notifier::{Event, Range, SecondaryTlb, Subscriptions};
    ///
    /// #[derive(Default)]
    /// struct Iotlb { flushes: AtomicU64 }
    /// impl SecondaryTlb for Iotlb {
    ///     fn arch_invalidate_secondary_tlbs(&self, _start: u64, _end: u64) {
    ///         self.flushes.fetch_add(1, Ordering::Relaxed);
    ///     }
    /// }
    ///
    /// let mm = Subscriptions::new();
    /// let tlb = Arc::new(Iotlb::default());
    /// let reg = mm.register_tlb(tlb.clone())?;
    /// let inv = mm.invalidate_range_start(Range::new(0x1000, 0x3000, Event::Unmap)?);
    /// // ... clear the entries ...
    /// inv.arch_invalidate_secondary_tlbs(0x1000, 0x3000); // the primary flushed its TLB
    /// drop(inv);
    /// assert_eq!(tlb.flushes.load(Ordering::Relaxed), 1);
    /// reg.unregister();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        for tlb in self.snap.tlbs() {
            tlb.arch_invalidate_secondary_tlbs(start, end);
        }
    }
}

impl std::fmt::Debug for InvalidateGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidateGuard")
            .field("range", &self.range)
            .finish()
    }
}

impl InvalidateGuard<'_> {
    #[cold]
    #[inline(never)]
    fn end_intervals(&self) {
        interval::inv_end(self.mm);
    }
}

impl Drop for InvalidateGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Interval end first, then list subscribers, in the order start called them.
        if self.itree {
            self.end_intervals();
        }
        for sub in self.snap.list() {
            sub.invalidate_range_end(&self.range);
        }
    }
}

/// A registered list subscriber. [`unregister`](Self::unregister) (or dropping the handle)
/// removes it.
#[must_use = "dropping the registration unregisters the subscriber"]
pub struct ListRegistration {
    mm: Subscriptions,
    id: u64,
    sub: Callbacks,
    done: bool,
}

impl std::fmt::Debug for ListRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListRegistration")
            .field("id", &self.id)
            .finish()
    }
}

impl ListRegistration {
    /// The address space this subscriber is registered on.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.mm
    }

    /// Unregisters (Linux's `mmu_notifier_unregister`): calls `release` unless the address
    /// space already released this subscriber (or is releasing it: then waits for that
    /// release to finish), removes it from the list, and waits for a grace period. After
    /// it returns no callback of this subscriber is running, and none will run, ever.
    ///
    /// # Panics
    /// Called from inside a callback of the same address space (including the
    /// subscriber's own `release`) or while holding one of its [`InvalidateGuard`]s:
    /// it would wait for itself forever.
    pub fn unregister(mut self) {
        self.unregister_inner();
    }

    fn unregister_inner(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mm = &self.mm;
        assert!(
            !mm.inner.srcu.held_by_current_thread(),
            "unregister called from inside a notifier callback of the same address space, \
             or while holding one of its InvalidateGuards: it would wait for itself forever"
        );
        let mut state = mm.inner.state.lock();
        let must_release = loop {
            match state.release_state(self.id) {
                Some(ReleaseState::Live) => {
                    state.set_release_state(
                        self.id,
                        ReleaseState::Releasing(thread::current().id()),
                    );
                    break true;
                }
                Some(ReleaseState::Releasing(owner)) => {
                    assert!(
                        owner != thread::current().id(),
                        "a list subscriber was unregistered from inside a release callback \
                         running on this thread (its own, or a sibling's during address-space \
                         release): it would wait for that release, i.e. for itself, forever"
                    );
                    state = mm.inner.state_cv.wait(state);
                }
                Some(ReleaseState::Released) | None => break false,
            }
        };
        if must_release {
            drop(state);
            mm.run_release(self.id, &self.sub);
            state = mm.inner.state.lock();
        }
        let retired = state.forget(self.id).then(|| mm.publish(&state));
        drop(state);
        match retired {
            Some(old) => mm.retire_sync(old),
            // Already out of the list (address-space release removed it): still wait, so
            // that no callback that started before is running when we return.
            None => mm.inner.srcu.synchronize(),
        }
    }
}

impl Drop for ListRegistration {
    fn drop(&mut self) {
        self.unregister_inner();
    }
}

/// A counted reference on the shared subscriber of type `T` of one address space (see
/// [`Subscriptions::get`]). Dereferences to `T`; dropping it is `put`.
#[must_use = "dropping the handle puts the reference back"]
pub struct Shared<T: SharedSubscriber> {
    mm: Subscriptions,
    id: u64,
    sub: StdArc<T>,
    done: bool,
}

impl<T: SharedSubscriber> Shared<T> {
    /// Gives the reference back (Linux's `mmu_notifier_put`). The last put removes the
    /// subscriber from the list and frees it after a grace period, asynchronously. Never
    /// waits, so it may be called from the subscriber's own `release`.
    pub fn put(mut self) {
        self.put_inner();
    }

    fn put_inner(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            self.mm.put(self.id);
        }
    }

    /// The address space.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.mm
    }
}

impl<T: SharedSubscriber> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.sub
    }
}

impl<T: SharedSubscriber> Drop for Shared<T> {
    fn drop(&mut self) {
        self.put_inner();
    }
}

impl<T: SharedSubscriber> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("type", &std::any::type_name::<T>())
            .field("id", &self.id)
            .finish()
    }
}
