//! Many interval subscriptions under one user lock (Linux drivers' notifier lock with
//! `mmu_interval_set_seq`).
//!
//! # The protocol with a shared lock
//!
//! A device mirror usually covers many intervals of an address space and keeps one lock
//! for all of them (a GPU driver's `notifier_lock`, an SVM mutex). With one lock per
//! subscription, a fill that spans two subscriptions would need two locks and an order
//! between them. Here the subscriber owns an [`IntervalLock`] and inserts any number of
//! subscriptions under it:
//!
//! - an invalidation calls `invalidate` once for each subscription it overlaps, each time
//!   taking the shared lock (a try-lock in a non-blockable range: if the lock is busy,
//!   `invalidate` is not called and the invalidation fails with
//!   [`WouldBlock`]), setting that subscription's sequence under it
//!   (Linux's `mmu_interval_set_seq`, done by the library so it cannot be forgotten) and
//!   passing the locked state; `invalidate` should drop only what it mirrors of that
//!   subscription's range;
//! - a fill calls `read_begin` on each subscription it reads through, gathers without the
//!   lock, then takes the lock once and asks the guard
//!   [`read_retry`](IntervalLockGuard::read_retry) for each of them. The guard is the
//!   proof that the lock is held (the same rule as the one-lock path), and `read_retry`
//!   checks that the subscription really is one of this lock's. The fill starts again if
//!   *any* of them was invalidated meanwhile; a fill over many busy intervals retries
//!   more often, so keep the span of one fill to what one device operation needs.
//!
//! Never start an invalidation of the address space (as its primary) while holding the
//! shared lock of one of its subscriptions: a blockable invalidation of an overlapping
//! range waits for that lock, i.e. for the caller.
//!
//! The sequence protocol, the deferred changes and the removal rules are the module's
//! (see [`IntervalSubscriber`](crate::IntervalSubscriber)); only where the user lock
//! lives differs. A subscription's own data `T` is immutable (`&self`); per-interval
//! mutable state belongs in the locked state `S`.

use std::ops;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::{
    answered, insert_node, lock_user, remove_node, split_node, update, ErasedNode, Handle, HexSpan,
    IntervalError, NodeCore, ReadSeq,
};
use crate::range::{Range, WouldBlock};
use crate::subscriptions::Subscriptions;
use crate::sync::{Mutex, MutexGuard};

/// A user lock shared by many interval subscriptions of one subscriber, around the
/// subscriber's state `S`.
///
/// # Example: one device mirror, two intervals, one lock
/// ```
/// use std::collections::BTreeMap;
/// use std::sync::Arc;
/// use mmu_notifier::{
///     Event, IntervalLock, LockedIntervalContext, LockedIntervalSubscriber, Range,
///     Subscriptions, WouldBlock,
/// };
///
/// /// The device's page table: virtual page -> frame, for every interval it mirrors.
/// #[derive(Default)]
/// struct DevicePt { pages: BTreeMap<u64, u64> }
///
/// /// One mirrored interval (immutable; the mutable state is the locked `DevicePt`).
/// struct Buffer;
///
/// impl LockedIntervalSubscriber for Buffer {
///     type State = DevicePt;
///     fn invalidate(
///         &self,
///         pt: &mut DevicePt,
///         r: &Range,
///         _: &mut LockedIntervalContext<'_, Self>,
///     ) -> Result<(), WouldBlock> {
///         pt.pages.retain(|&va, _| !r.overlaps(va, va + 4096));
///         Ok(())
///     }
/// }
///
/// let mm = Subscriptions::new();
/// let lock = IntervalLock::new(DevicePt::default());
/// let a = mm.insert_locked_interval(0x10000..0x12000, &lock, Buffer)?;
/// let b = mm.insert_locked_interval(0x40000..0x42000, &lock, Buffer)?;
///
/// // A fill that spans both subscriptions takes one lock: `read_begin` on each, and
/// // `read_retry` on each under the lock (the attempt is lost if either was invalidated).
/// let mut budget = mmu_notifier::RetryBudget::attempts(16);
/// mmu_notifier::interval::retry(&mut budget, |budget| {
///     a.try_fill_with(
///         &[&b],
///         budget,
///         || Ok((7, 8)), // ... ask the primary MMU, may sleep ...
///         |pt, (fa, fb)| {
///             pt.pages.insert(0x10000, fa);
///             pt.pages.insert(0x40000, fb);
///             Ok(mmu_notifier::Install::Done(()))
///         },
///     )
/// })?;
/// drop(mm.invalidate_range_start(Range::new(0x40000, 0x41000, Event::Unmap)?));
/// assert_eq!(lock.lock().pages.keys().copied().collect::<Vec<_>>(), [0x10000]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct IntervalLock<S> {
    state: Mutex<S>,
}

impl<S: Send + 'static> IntervalLock<S> {
    /// A new lock around `state`, to share between subscriptions.
    pub fn new(state: S) -> Arc<Self> {
        Arc::new(IntervalLock {
            state: Mutex::new(state),
        })
    }

    /// Takes the lock.
    pub fn lock(&self) -> IntervalLockGuard<'_, S> {
        IntervalLockGuard {
            guard: self.state.lock(),
            lock: self,
        }
    }
}

impl<S> std::fmt::Debug for IntervalLock<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalLock").finish_non_exhaustive()
    }
}

/// An [`IntervalLock`], held: derefs to the subscriber's state.
pub struct IntervalLockGuard<'a, S> {
    guard: MutexGuard<'a, S>,
    lock: &'a IntervalLock<S>,
}

impl<S> IntervalLockGuard<'_, S> {
    /// Whether an invalidation of `sub` ran since `seq` was read from it (or is running):
    /// drop what was gathered through `sub` and start again. Only callable with the lock
    /// held, which orders it against `invalidate`.
    ///
    /// # Panics
    /// If `sub` was inserted under another lock: its invalidations do not take this one,
    /// so the answer would mean nothing.
    pub fn read_retry<T>(&self, sub: &LockedIntervalSubscription<T>, seq: ReadSeq) -> bool
    where
        T: LockedIntervalSubscriber<State = S>,
    {
        assert!(
            std::ptr::eq(self.lock, &*sub.handle.node.lock),
            "read_retry with the guard of a lock the subscription was not inserted under"
        );
        // Relaxed: the invalidation sets the sequence under this same lock, which orders it.
        sub.handle.node.core.seq.load(Relaxed) != seq.0
    }
}

impl<S> std::ops::Deref for IntervalLockGuard<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.guard
    }
}

impl<S> std::ops::DerefMut for IntervalLockGuard<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.guard
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for IntervalLockGuard<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("IntervalLockGuard")
            .field(&*self.guard)
            .finish()
    }
}

/// One interval of a subscriber whose subscriptions share an [`IntervalLock`].
pub trait LockedIntervalSubscriber: Send + Sync + Sized + 'static {
    /// What the shared lock protects (the device's page table, say).
    type State: Send + 'static;

    /// The primary is changing `range`, which overlaps this subscription: drop every
    /// translation into it from `state`. Called with the shared lock held and the
    /// subscription's sequence already advanced. In a non-blockable range (the lock was
    /// only try-locked) return [`WouldBlock`] instead of sleeping.
    fn invalidate(
        &self,
        state: &mut Self::State,
        range: &Range,
        ctx: &mut LockedIntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock>;

    /// The subscription is out of the tree and no callback uses it any more. Called
    /// exactly once per subscription, on the same threads as
    /// [`IntervalSubscriber::release`](crate::IntervalSubscriber::release); the default
    /// does nothing. It does not take the shared lock (a subscription is often dropped
    /// with that lock held): clean the shared state where you remove the subscription.
    fn release(&self) {}
}

struct LockedNode<T: LockedIntervalSubscriber> {
    core: NodeCore,
    lock: Arc<IntervalLock<T::State>>,
    data: T,
}

impl<T: LockedIntervalSubscriber> ErasedNode for LockedNode<T> {
    fn core(&self) -> &NodeCore {
        &self.core
    }

    fn invalidate(self: Arc<Self>, mm: &Subscriptions, range: &Range, cur_seq: u64) -> bool {
        let Some(mut state) = lock_user(&self.lock.state, &self.core, range, cur_seq) else {
            return false;
        };
        let mut ctx = LockedIntervalContext {
            mm,
            node: &self,
            cur_seq,
        };
        let answer = self.data.invalidate(&mut state, range, &mut ctx);
        answered(mm, range, answer)
    }

    fn release(&self) {
        self.data.release();
    }
}

fn new_node<T: LockedIntervalSubscriber>(
    lock: &Arc<IntervalLock<T::State>>,
    data: T,
) -> Arc<LockedNode<T>> {
    Arc::new(LockedNode {
        core: NodeCore::new(),
        lock: lock.clone(),
        data,
    })
}

/// An interval subscription under a shared [`IntervalLock`]. Created by
/// [`Subscriptions::insert_locked_interval`]; removal and dropping behave as for
/// [`IntervalSubscription`](crate::IntervalSubscription).
#[must_use = "dropping the subscription removes it"]
pub struct LockedIntervalSubscription<T: LockedIntervalSubscriber> {
    handle: Handle<LockedNode<T>>,
}

impl<T: LockedIntervalSubscriber> std::fmt::Debug for LockedIntervalSubscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedIntervalSubscription")
            .field("range", &HexSpan(&self.range()))
            .field("seq", &self.handle.node.core.seq.load(Relaxed))
            .finish()
    }
}

impl<T: LockedIntervalSubscriber> LockedIntervalSubscription<T> {
    /// Begins a fill through this subscription (see
    /// [`IntervalSubscription::read_begin`](crate::IntervalSubscription::read_begin));
    /// check the result with the lock guard's
    /// [`read_retry`](IntervalLockGuard::read_retry).
    ///
    /// # Panics
    /// If it would have to wait while the current thread is inside a callback of the same
    /// address space or holds one of its `InvalidateGuard`s.
    pub fn read_begin(&self) -> ReadSeq {
        self.handle.read_begin()
    }

    /// Lock-free early hint that `seq` is stale: `true` is reliable, `false` is not.
    pub fn check_retry(&self, seq: ReadSeq) -> bool {
        self.handle.check_retry(seq)
    }

    /// The subscription's own (immutable) data.
    pub fn data(&self) -> &T {
        &self.handle.node.data
    }

    /// The lock the subscription was inserted under.
    pub fn lock(&self) -> &Arc<IntervalLock<T::State>> {
        &self.handle.node.lock
    }

    /// The range the subscription covers, or will cover once a queued change is applied;
    /// `None` once removed.
    pub fn range(&self) -> Option<ops::Range<u64>> {
        self.handle.range()
    }

    /// Moves the subscription to `range` (see
    /// [`IntervalSubscription::update`](crate::IntervalSubscription::update)).
    pub fn update(&self, range: ops::Range<u64>) -> Result<(), IntervalError> {
        self.handle.update(range)
    }

    /// Splits the subscription: it moves to `left`, and a new subscription under the same
    /// lock with data `right_data` covers `right`.
    pub fn split(
        &self,
        left: ops::Range<u64>,
        right: ops::Range<u64>,
        right_data: T,
    ) -> Result<LockedIntervalSubscription<T>, IntervalError> {
        split_locked(
            &self.handle.mm,
            &self.handle.erased(),
            &self.handle.node.lock,
            left,
            right,
            right_data,
        )
    }

    /// Removes the subscription, waiting for its invalidations (see
    /// [`IntervalSubscription::remove`](crate::IntervalSubscription::remove)).
    ///
    /// # Panics
    /// From inside a callback of the same address space or while holding one of its
    /// `InvalidateGuard`s.
    pub fn remove(mut self) {
        self.handle.remove(true);
    }

    /// Removes the subscription without waiting (see
    /// [`IntervalSubscription::remove_nowait`](crate::IntervalSubscription::remove_nowait)).
    pub fn remove_nowait(mut self) {
        self.handle.remove(false);
    }

    /// The address space.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.handle.mm
    }
}

fn split_locked<T: LockedIntervalSubscriber>(
    mm: &Subscriptions,
    old: &Arc<dyn ErasedNode>,
    lock: &Arc<IntervalLock<T::State>>,
    left: ops::Range<u64>,
    right: ops::Range<u64>,
    right_data: T,
) -> Result<LockedIntervalSubscription<T>, IntervalError> {
    let node = new_node(lock, right_data);
    split_node(mm, old, left, right, node.clone())?;
    Ok(LockedIntervalSubscription {
        handle: Handle::new(mm, node),
    })
}

/// What a [`LockedIntervalSubscriber::invalidate`] callback may do besides tearing down.
pub struct LockedIntervalContext<'a, T: LockedIntervalSubscriber> {
    mm: &'a Subscriptions,
    node: &'a Arc<LockedNode<T>>,
    cur_seq: u64,
}

impl<T: LockedIntervalSubscriber> std::fmt::Debug for LockedIntervalContext<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedIntervalContext")
            .field("cur_seq", &self.cur_seq)
            .finish()
    }
}

impl<'a, T: LockedIntervalSubscriber> LockedIntervalContext<'a, T> {
    /// The address space (e.g. to insert new subscriptions: insertion never waits).
    pub fn subscriptions(&self) -> &'a Subscriptions {
        self.mm
    }

    /// The odd sequence value of this invalidation.
    pub fn cur_seq(&self) -> u64 {
        self.cur_seq
    }

    /// Removes this subscription without waiting; `release` runs once it is out of the
    /// tree and unused.
    pub fn remove_self(&mut self) {
        remove_node(self.mm, &self.erased(), false);
    }

    /// Moves this subscription (deferred until the end of the frozen period).
    pub fn update_self(&mut self, range: ops::Range<u64>) -> Result<(), IntervalError> {
        update(self.mm, &self.erased(), range)
    }

    /// Splits this subscription (see [`LockedIntervalSubscription::split`]).
    pub fn split_self(
        &mut self,
        left: ops::Range<u64>,
        right: ops::Range<u64>,
        right_data: T,
    ) -> Result<LockedIntervalSubscription<T>, IntervalError> {
        split_locked(
            self.mm,
            &self.erased(),
            &self.node.lock,
            left,
            right,
            right_data,
        )
    }

    fn erased(&self) -> Arc<dyn ErasedNode> {
        self.node.clone()
    }
}

impl Subscriptions {
    /// Subscribes `data` to invalidations overlapping `range`, under the shared user lock
    /// `lock` (see [`IntervalLock`]). Same rules and errors as
    /// [`insert_interval`](Subscriptions::insert_interval).
    pub fn insert_locked_interval<T: LockedIntervalSubscriber>(
        &self,
        range: ops::Range<u64>,
        lock: &Arc<IntervalLock<T::State>>,
        data: T,
    ) -> Result<LockedIntervalSubscription<T>, IntervalError> {
        let handle = insert_node(self, range, new_node(lock, data))?;
        Ok(LockedIntervalSubscription { handle })
    }
}
