//! Interval subscriptions and the collision-retry protocol (Linux's `mmu_interval_notifier`),
//! with the safe-update capabilities of the unmerged 2019 patch.
//!
//! # The sequence count: a seqcount with many writers
//!
//! Each address space keeps `seq` (starts at 2) and `active` (invalidations in flight that
//! counted themselves), under an internal lock of the address space (the *tree lock*, never
//! held while a callback runs; not to be confused with the user locks below). The write
//! side has two states:
//!
//! - *partially excluded*: `active > 0`, `seq` even. Invalidations are running but none has
//!   found a subscription in its range; the tree may change.
//! - *fully excluded* (the tree is *frozen*): `active > 0`, `seq` odd. At least one
//!   invalidation is calling subscriptions; the tree must not change, so inserts, updates
//!   and removals are queued on a deferred list.
//!
//! An invalidation, under the lock, counts itself (`active += 1`), collects the
//! subscriptions overlapping its range, and if there are any makes `seq` odd (`seq |= 1`);
//! then, without the lock, it calls each one's `invalidate` with that odd `cur_seq`. Its end,
//! under the lock, uncounts itself; only the *last* end (`active` reaches 0) of a frozen
//! period makes `seq` even again (`seq += 1`), applies the deferred list, and wakes waiters.
//!
//! # The subscriber's side
//!
//! The library takes the *user lock* of a subscription around its `invalidate` (try-locked
//! when the range is not blockable: if it is busy the subscription answers `WouldBlock`)
//! and sets the subscription's own sequence to `cur_seq` under it, so `set_seq` cannot be
//! forgotten. The user lock is either the subscription's own, with the subscriber's state
//! `T` inside ([`IntervalSubscriber`], the simple path), or an [`IntervalLock`] that the
//! subscriber owns and shares between many subscriptions ([`LockedIntervalSubscriber`]:
//! one lock for a whole device mirror, so a fill that spans several subscriptions takes one
//! lock). When the user lock is busy in a non-blockable range, `invalidate` is not called
//! at all and the invalidation fails with `WouldBlock`. The fill path:
//!
//! 1. `s = read_begin()`: the subscription's sequence; if it equals the current odd `seq`
//!    this subscription is being invalidated, so wait until that `seq` is released;
//! 2. gather translations from the primary, without the user lock (may sleep);
//! 3. take the user lock; `read_retry(s)` (a method of the lock's guard, so it cannot be
//!    called without the lock) is true if an invalidation set a newer sequence meanwhile:
//!    drop what was gathered and start again; else install, and unlock.
//!
//! `read_begin` is lock-free unless it has to wait: it loads the subscription's sequence
//! (Acquire) and then the address space's (a mirror of the value under the tree lock). An
//! invalidation stores the odd `seq` before any `invalidate` callback sets a subscription's
//! sequence to it, so a `read_begin` that reads `cur_seq` from the subscription reads at
//! least `cur_seq` from the address space: it cannot miss that it must wait. Any other race
//! is closed by `read_retry` under the user lock, which the invalidation also takes.
//!
//! A subscription's sequence only moves forward and is only ever set to an odd value of
//! the address-space `seq` (or `seq - 1` when it is inserted idle).
//!
//! # Inserting, updating, removing
//!
//! - Insert while frozen: deferred; the new subscription's sequence is the current odd
//!   `seq`, so `read_begin` waits until the insertion has been applied. Insert while
//!   partially excluded: some in-flight invalidation may cover the new range, so freeze
//!   (`seq |= 1`), insert now and take that `seq`. Idle: insert now with `seq - 1`.
//! - Update (move the range) follows the same rules: deferred while frozen, with the
//!   subscription's sequence pushed to the current odd `seq` so that the move takes effect
//!   no later than the next `read_begin`.
//! - Remove while frozen: deferred (or, if the subscription's insertion is itself still
//!   deferred, cancelled on the spot). The caller chooses whether to wait:
//!   - `remove` (Linux's `mmu_interval_notifier_remove`) waits until the odd `seq` it saw
//!     has been released, re-reading `seq` under the lock (a 2022 kernel fix: an unlocked
//!     read let remove return while the node was still on the deferred list), then runs
//!     `release` itself. When it returns no callback runs or will run. Called from inside
//!     a callback it would wait for itself: it panics with a message instead.
//!   - `remove_nowait` (and `remove_self` from inside a callback) never waits: `release`
//!     runs once the subscription is out of the tree and no callback uses it, at the last
//!     end of the frozen period (or at once when not frozen).
//!
//!   Either way `release` runs exactly once per subscription.
//! - Queued changes collapse: insert then remove cancels, the last update wins, remove wins
//!   over update. A pending state is an `Option`, never an address used as a sentinel
//!   (0 is a valid start).
//! - Split (munmap punching a hole) updates one subscription and inserts another under one
//!   hold of the lock, so every invalidation sees either the whole or both halves.
//!
//! Ranges are half-open `start..end` byte ranges everywhere, like [`Range`].

pub mod fill;
pub mod locked;

use std::ops;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc as StdArc;

pub use fill::{retry, Install, MapExhausted, RetryBudget, RetryExhausted, RetryPolicy};
pub use locked::{
    IntervalLock, IntervalLockGuard, LockedIntervalContext, LockedIntervalSubscriber,
    LockedIntervalSubscription,
};

use crate::itree::{IntervalTree, NodeKey};
use crate::range::{Range, WouldBlock};
use crate::subscriptions::Subscriptions;
use crate::sync::{AtomicBool, AtomicU64, Condvar, Mutex, MutexGuard};

/// A secondary MMU's state for one interval of an address space.
///
/// The library keeps the value behind the subscription's *user lock*: `invalidate` and
/// `release` get `&mut self` with it held, and the fill path reaches it through
/// [`IntervalSubscription::lock`].
///
/// # Example: a mirror and its fill
/// ```
/// use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, Subscriptions, WouldBlock};
///
/// /// A device mirror of one buffer: page index -> frame.
/// struct Mirror { pages: Vec<Option<u64>>, base: u64 }
///
/// impl IntervalSubscriber for Mirror {
///     fn invalidate(&mut self, r: &Range, _: &mut IntervalContext<'_, Self>) -> Result<(), WouldBlock> {
///         for (i, p) in self.pages.iter_mut().enumerate() {
///             let va = self.base + i as u64 * 4096;
///             if r.overlaps(va, va + 4096) { *p = None; }
///         }
///         Ok(())
///     }
/// }
///
/// let mm = Subscriptions::new();
/// let sub = mm.insert_interval(0x10000..0x14000, Mirror { pages: vec![None; 4], base: 0x10000 })?;
/// // The fill loop (read_begin, gather, lock, read_retry, install), retried on collisions:
/// sub.fill(
///     &mut mmu_notifier::RetryBudget::attempts(16),
///     || Ok(77), // ... ask the primary MMU, may sleep ...
///     |mirror, frame| {
///         mirror.pages[0] = Some(frame); // under the lock, no invalidation ran meanwhile
///         Ok(mmu_notifier::Install::Done(()))
///     },
/// )?;
/// drop(mm.invalidate_range_start(Range::new(0x10000, 0x11000, Event::Clear)?));
/// assert_eq!(sub.lock().pages[0], None);
/// sub.remove();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait IntervalSubscriber: Send + Sized + 'static {
    /// The primary is changing `range`, which overlaps this subscription: drop every
    /// translation into it. Called with the user lock held (`&mut self`) and the
    /// subscription's sequence already advanced. In a non-blockable range, return
    /// [`WouldBlock`] instead of sleeping. `ctx` can remove, move or split this subscription
    /// and reach the address space (to insert new ones).
    fn invalidate(
        &mut self,
        range: &Range,
        ctx: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock>;

    /// The subscription is out of the tree and no callback uses it any more. Called exactly
    /// once per subscription, with the user lock held; the default does nothing. Runs on
    /// the thread that called [`remove`](IntervalSubscription::remove), or, after
    /// [`remove_nowait`](IntervalSubscription::remove_nowait) and
    /// [`remove_self`](IntervalContext::remove_self), on the one that removed it or ended
    /// the last invalidation of the frozen period it was removed in.
    fn release(&mut self) {}
}

/// Why an interval operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntervalError {
    /// The range is empty (`start >= end`).
    #[error("interval {start:#x}..{end:#x} is empty")]
    Empty {
        /// The requested start.
        start: u64,
        /// The requested end.
        end: u64,
    },
    /// The address space has been released (its process exited).
    #[error("the address space has been released; no new interval subscriptions")]
    Released,
    /// The subscription has been removed.
    #[error("the interval subscription has been removed")]
    Removed,
    /// The first interval subscription of an address space cannot be inserted from inside
    /// one of its callbacks (enabling interval tracking waits for in-flight invalidations).
    #[error(
        "the first interval subscription of an address space cannot be inserted from inside \
         one of its callbacks or while holding one of its InvalidateGuards"
    )]
    FirstInsertInCallback,
    /// The two halves of a split must not overlap.
    #[error("the halves of a split overlap")]
    SplitOverlap,
}

/// The last byte of a non-empty half-open range (the tree stores closed intervals).
fn last_of(range: &ops::Range<u64>) -> Result<u64, IntervalError> {
    if range.start >= range.end {
        return Err(IntervalError::Empty {
            start: range.start,
            end: range.end,
        });
    }
    Ok(range.end - 1)
}

/// Formats a half-open range in hex, as every `Debug` of this crate does.
pub(crate) struct HexSpan<'a>(pub(crate) &'a Option<ops::Range<u64>>);

impl std::fmt::Debug for HexSpan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{:#x}..{:#x}", r.start, r.end),
            None => write!(f, "removed"),
        }
    }
}

/// The part of a subscription the protocol touches without knowing `T`: sixteen bytes (see
/// [`IntervalSubscription::memory_overhead`] for the whole cost of a subscription).
pub(crate) struct NodeCore {
    /// The subscription's sequence (`invalidate_seq`).
    seq: AtomicU64,
    /// Where it sits: a [`NodeKey`] in bits, [`NOT_IN_TREE`] (its insertion is deferred) or
    /// [`REMOVED`]. Only read and written under the interval lock (Relaxed suffices).
    pos: AtomicU64,
}

const NOT_IN_TREE: u64 = u64::MAX;
const REMOVED: u64 = u64::MAX - 1;

impl NodeCore {
    fn pos(&self) -> u64 {
        self.pos.load(Relaxed)
    }
    fn set_pos(&self, pos: u64) {
        self.pos.store(pos, Relaxed);
    }
    fn key(&self) -> Option<NodeKey> {
        match self.pos() {
            NOT_IN_TREE | REMOVED => None,
            bits => Some(NodeKey::from_bits(bits)),
        }
    }
}

struct Node<T> {
    core: NodeCore,
    /// The user lock, around the subscriber's state.
    user: Mutex<T>,
}

/// `Node<T>` with `T` erased, as the tree stores it.
pub(crate) trait ErasedNode: Send + Sync {
    fn core(&self) -> &NodeCore;
    /// Locks the user lock (try-lock when not blockable), sets the sequence, calls
    /// `invalidate`. False when the subscriber could not proceed without blocking.
    fn invalidate(self: StdArc<Self>, mm: &Subscriptions, range: &Range, cur_seq: u64) -> bool;
    fn release(&self);
}

impl<T: IntervalSubscriber> ErasedNode for Node<T> {
    fn core(&self) -> &NodeCore {
        &self.core
    }

    fn invalidate(self: StdArc<Self>, mm: &Subscriptions, range: &Range, cur_seq: u64) -> bool {
        let Some(mut user) = lock_user(&self.user, &self.core, range, cur_seq) else {
            return false;
        };
        let mut ctx = IntervalContext {
            mm,
            node: &self,
            cur_seq,
        };
        let answer = user.invalidate(range, &mut ctx);
        answered(mm, range, answer)
    }

    fn release(&self) {
        self.user.lock().release();
    }
}

/// Takes a user lock for an invalidation (blocking in a blockable range, a try-lock
/// otherwise: `None` when it is busy) and sets the subscription's sequence under it.
fn lock_user<'a, S>(
    lock: &'a Mutex<S>,
    core: &NodeCore,
    range: &Range,
    cur_seq: u64,
) -> Option<MutexGuard<'a, S>> {
    let guard = if range.blockable() {
        lock.lock()
    } else {
        lock.try_lock()?
    };
    // set_seq, under the user lock: Release pairs with read_begin's Acquire (see the module
    // docs); fetch_max keeps it monotonic against an update that pushed it.
    core.seq.fetch_max(cur_seq, Release);
    Some(guard)
}

/// Whether the invalidation may proceed after a subscriber's answer. `WouldBlock` in a
/// blockable range is a subscriber bug: reported, and the invalidation carries on.
fn answered(mm: &Subscriptions, range: &Range, answer: Result<(), WouldBlock>) -> bool {
    match answer {
        Ok(()) => true,
        Err(WouldBlock) if range.blockable() => {
            mm.report_bug(format_args!(
                "interval invalidate returned WouldBlock in a blockable range {range:?}"
            ));
            true
        }
        Err(WouldBlock) => false,
    }
}

fn same(a: &StdArc<dyn ErasedNode>, b: &dyn ErasedNode) -> bool {
    std::ptr::eq(a.core(), b.core())
}

/// A change queued while the tree is frozen. Each subscription has at most one; a later
/// change of the same subscription rewrites it (that is how changes collapse).
enum DeferredOp {
    /// Insert at `[start, last]`.
    Insert(u64, u64),
    /// Move to `[start, last]`.
    Update(u64, u64),
    /// Remove; `waiter`: a `remove` call waits for the end and runs `release` itself.
    Remove { waiter: bool },
}

struct Deferred {
    node: StdArc<dyn ErasedNode>,
    op: DeferredOp,
}

pub(crate) struct ItreeState {
    seq: u64,
    active: u64,
    tree: IntervalTree<StdArc<dyn ErasedNode>>,
    deferred: Vec<Deferred>,
    /// Live subscriptions (in the tree or about to be).
    count: usize,
    released: bool,
}

impl ItreeState {
    fn frozen(&self) -> bool {
        self.seq & 1 == 1
    }
    fn pending(&self, node: &dyn ErasedNode) -> Option<usize> {
        self.deferred.iter().position(|d| same(&d.node, node))
    }
}

/// The interval half of an address space's subscriptions.
pub(crate) struct Itree {
    state: Mutex<ItreeState>,
    cv: Condvar,
    /// Mirror of `state.seq` for lock-free `read_begin` (written under the lock).
    seq: AtomicU64,
    /// Set once the grace period after `enabled` has passed: every in-flight invalidation
    /// counts itself in `active`. Inserts wait for it.
    ready: AtomicBool,
    /// Serialises that first enabling.
    enable_lock: Mutex<()>,
}

impl Itree {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(ItreeState {
                seq: 2,
                active: 0,
                tree: IntervalTree::new(),
                deferred: Vec::new(),
                count: 0,
                released: false,
            }),
            cv: Condvar::new(),
            seq: AtomicU64::new(2),
            ready: AtomicBool::new(false),
            enable_lock: Mutex::new(()),
        }
    }

    /// Whether the first insert has completed.
    pub(crate) fn enabled(&self) -> bool {
        self.ready.load(Acquire)
    }

    fn set_seq(&self, st: &mut ItreeState, seq: u64) {
        st.seq = seq;
        // Release: a reader that Acquires a subscription sequence set after this store sees
        // it (the invalidation's callbacks run after it in program order).
        self.seq.store(seq, Release);
    }

    /// Counters for [`Stats`](crate::Stats).
    pub(crate) fn counts(&self) -> (usize, u64) {
        let st = self.state.lock();
        (st.count, st.seq)
    }
}

/// An interval invalidation in progress: it counted itself in `active`; dropping it is
/// `mn_itree_inv_end`, also on unwind from a panicking callback.
pub(crate) struct ItreeActive<'a> {
    mm: &'a Subscriptions,
}

impl ItreeActive<'_> {
    /// Hands the end over to an invalidation guard, which calls [`inv_end`] when it drops
    /// (a `bool` in the guard instead of this value: its drop then has no `Option` to
    /// inspect twice). Only once nothing can unwind between here and the guard's
    /// creation.
    pub(crate) fn hand_over(self) {
        std::mem::forget(self);
    }
}

impl Drop for ItreeActive<'_> {
    fn drop(&mut self) {
        inv_end(self.mm);
    }
}

/// The subscriptions an invalidation found, gathered under the tree lock and called after
/// it is dropped: the first [`Hits::INLINE`] on the stack (an invalidation usually hits one
/// or a few), the rest in a vector, so that the common invalidation allocates nothing.
struct Hits {
    inline: [Option<StdArc<dyn ErasedNode>>; Hits::INLINE],
    more: Vec<StdArc<dyn ErasedNode>>,
    /// How many were found.
    len: usize,
}

impl Hits {
    const INLINE: usize = 4;

    fn new() -> Self {
        Self {
            inline: [const { None }; Hits::INLINE],
            more: Vec::new(),
            len: 0,
        }
    }

    fn push(&mut self, node: &StdArc<dyn ErasedNode>) {
        match self.inline.get_mut(self.len) {
            Some(free) => *free = Some(node.clone()),
            None => self.more.push(node.clone()),
        }
        self.len += 1;
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` on each, in the order they were found, until it returns false; returns
    /// whether it never did.
    fn all(self, mut f: impl FnMut(StdArc<dyn ErasedNode>) -> bool) -> bool {
        for hit in self.inline {
            let Some(node) = hit else { return true };
            if !f(node) {
                return false;
            }
        }
        self.more.into_iter().all(f)
    }
}

/// The interval part of `invalidate_range_start`. `Err` means a subscription could not
/// proceed in a non-blockable range; the interval part has then already ended.
pub(crate) fn inv_start<'a>(
    mm: &'a Subscriptions,
    range: &Range,
) -> Result<ItreeActive<'a>, WouldBlock> {
    let itree = mm.itree();
    let (hits, cur_seq) = {
        let mut st = itree.state.lock();
        st.active += 1;
        let mut hits = Hits::new();
        st.tree
            .for_each_overlap(range.start(), range.end() - 1, |_, _, _, n| hits.push(n));
        if !hits.is_empty() && !st.frozen() {
            let odd = st.seq | 1;
            itree.set_seq(&mut st, odd);
        }
        (hits, st.seq)
    };
    let active = ItreeActive { mm };
    if hits.is_empty() {
        // The common miss: nothing to call.
        return Ok(active);
    }
    if !hits.all(|node| node.invalidate(mm, range, cur_seq)) {
        drop(active);
        return Err(WouldBlock);
    }
    Ok(active)
}

pub(crate) fn inv_end(mm: &Subscriptions) {
    let itree = mm.itree();
    let releases = {
        let mut st = itree.state.lock();
        st.active -= 1;
        if st.active > 0 || !st.frozen() {
            return;
        }
        let even = st.seq + 1;
        itree.set_seq(&mut st, even);
        let releases = apply_deferred(&mut st);
        itree.cv.notify_all();
        releases
    };
    for node in releases {
        node.release();
    }
}

/// Applies the deferred list (the tree is not frozen any more). Returns the removed
/// subscriptions whose `release` must now run.
fn apply_deferred(st: &mut ItreeState) -> Vec<StdArc<dyn ErasedNode>> {
    let mut releases = Vec::new();
    if st.deferred.is_empty() {
        // The common end of an invalidation that hit: nothing was queued meanwhile.
        return releases;
    }
    for Deferred { node, op } in std::mem::take(&mut st.deferred) {
        let core = node.core();
        if let Some(k) = core.key() {
            st.tree.remove(k);
        }
        match op {
            DeferredOp::Insert(start, last) | DeferredOp::Update(start, last) => {
                let key = st.tree.insert(start, last, node.clone());
                core.set_pos(key.map_or(NOT_IN_TREE, NodeKey::to_bits));
            }
            DeferredOp::Remove { waiter } => {
                core.set_pos(REMOVED);
                st.count -= 1;
                if !waiter {
                    releases.push(node);
                }
            }
        }
    }
    releases
}

/// Enables the interval part of invalidations for this address space (the first insert).
fn enable(mm: &Subscriptions) -> Result<(), IntervalError> {
    let itree = mm.itree();
    // Acquire: pairs with the Release below; the grace period happened-before.
    if itree.ready.load(Acquire) {
        return Ok(());
    }
    if mm.srcu().held_by_current_thread() {
        return Err(IntervalError::FirstInsertInCallback);
    }
    let _once = itree.enable_lock.lock();
    if itree.ready.load(Acquire) {
        return Ok(());
    }
    // Invalidations learn that they must run the interval part from the published list
    // snapshot. Publishing one with the flag set waits for a grace period: invalidations
    // that loaded an older snapshot (and so did not count themselves in `active`) have all
    // ended when it returns. Concurrent first inserts wait on `enable_lock` meanwhile.
    mm.publish_itree_enabled();
    itree.ready.store(true, Release);
    Ok(())
}

/// Inserts a node under the lock, following the insert rules.
fn insert_locked(
    itree: &Itree,
    st: &mut ItreeState,
    node: StdArc<dyn ErasedNode>,
    start: u64,
    last: u64,
) {
    st.count += 1;
    let core = node.core();
    let seq = if st.active > 0 {
        if st.frozen() {
            // Frozen: defer; read_begin waits until this seq is released.
            core.set_pos(NOT_IN_TREE);
            st.deferred.push(Deferred {
                node: node.clone(),
                op: DeferredOp::Insert(start, last),
            });
        } else {
            // Invalidations in flight may cover the new range: freeze and take that seq.
            let odd = st.seq | 1;
            itree.set_seq(st, odd);
            let key = st.tree.insert(start, last, node.clone());
            core.set_pos(key.map_or(NOT_IN_TREE, NodeKey::to_bits));
        }
        st.seq
    } else {
        let key = st.tree.insert(start, last, node.clone());
        core.set_pos(key.map_or(NOT_IN_TREE, NodeKey::to_bits));
        st.seq - 1
    };
    core.seq.store(seq, Release);
}

/// Moves a node under the lock, following the update rules.
fn update_locked(
    itree: &Itree,
    st: &mut ItreeState,
    node: &StdArc<dyn ErasedNode>,
    start: u64,
    last: u64,
) -> Result<(), IntervalError> {
    let core = node.core();
    if core.pos() == REMOVED {
        return Err(IntervalError::Removed);
    }
    let cur = st.seq;
    if let Some(i) = st.pending(&**node) {
        // Frozen, with a change already queued: rewrite it (last update wins), unless it
        // is a removal (remove wins over update).
        let op = &mut st.deferred[i].op;
        *op = match op {
            DeferredOp::Remove { .. } => return Err(IntervalError::Removed),
            DeferredOp::Insert(..) => DeferredOp::Insert(start, last),
            DeferredOp::Update(..) => DeferredOp::Update(start, last),
        };
        core.seq.fetch_max(cur, Release);
        return Ok(());
    }
    if st.frozen() {
        st.deferred.push(Deferred {
            node: node.clone(),
            op: DeferredOp::Update(start, last),
        });
        // The move takes effect no later than the next read_begin: make it wait.
        core.seq.fetch_max(cur, Release);
        return Ok(());
    }
    if let Some(k) = core.key() {
        st.tree.remove(k);
    }
    let key = st.tree.insert(start, last, node.clone());
    core.set_pos(key.map_or(NOT_IN_TREE, NodeKey::to_bits));
    if st.active > 0 {
        // An invalidation in flight may cover the new range.
        let odd = cur | 1;
        itree.set_seq(st, odd);
        core.seq.fetch_max(odd, Release);
    }
    Ok(())
}

/// What `remove_locked` leaves the caller to do.
enum RemoveOutcome {
    /// Out of the tree and unused: call `release` now.
    Done,
    /// Deferred until the end of the frozen period of this seq: a waiter waits for it and
    /// then calls `release`; otherwise `release` runs at that end.
    Deferred(u64),
    /// Someone already removed it.
    Already,
}

fn remove_locked(
    st: &mut ItreeState,
    node: &StdArc<dyn ErasedNode>,
    waiter: bool,
) -> RemoveOutcome {
    let core = node.core();
    if core.pos() == REMOVED {
        return RemoveOutcome::Already;
    }
    if let Some(i) = st.pending(&**node) {
        return match st.deferred[i].op {
            DeferredOp::Remove { .. } => RemoveOutcome::Already,
            DeferredOp::Insert(..) => {
                // Never reached the tree: cancel the insert.
                st.deferred.remove(i);
                core.set_pos(REMOVED);
                st.count -= 1;
                RemoveOutcome::Done
            }
            DeferredOp::Update(..) => {
                st.deferred[i].op = DeferredOp::Remove { waiter }; // remove wins
                RemoveOutcome::Deferred(st.seq)
            }
        };
    }
    if st.frozen() {
        st.deferred.push(Deferred {
            node: node.clone(),
            op: DeferredOp::Remove { waiter },
        });
        return RemoveOutcome::Deferred(st.seq);
    }
    if let Some(k) = core.key() {
        st.tree.remove(k);
    }
    core.set_pos(REMOVED);
    st.count -= 1;
    RemoveOutcome::Done
}

/// The range a node covers, or will cover once its queued change applies.
fn range_locked(st: &ItreeState, node: &StdArc<dyn ErasedNode>) -> Option<ops::Range<u64>> {
    let core = node.core();
    if core.pos() == REMOVED {
        return None;
    }
    // Closed [s, l] in the tree; l < u64::MAX because every range came in half-open.
    if let Some(i) = st.pending(&**node) {
        match st.deferred[i].op {
            DeferredOp::Insert(s, l) | DeferredOp::Update(s, l) => return Some(s..l + 1),
            DeferredOp::Remove { .. } => return None,
        }
    }
    let (s, l, _) = st.tree.get(core.key()?)?;
    Some(s..l + 1)
}

/// An opaque sequence value from [`IntervalSubscription::read_begin`], to be checked with
/// [`IntervalGuard::read_retry`] (or [`IntervalLockGuard::read_retry`]) under the user lock.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReadSeq(u64);

impl std::fmt::Debug for ReadSeq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadSeq({})", self.0)
    }
}

/// What both kinds of subscription handle share: the address space and the node, typed so
/// that the fill path (`read_begin`, `check_retry`, the lock) reaches the node without a
/// virtual call. Dropping it removes the subscription without waiting.
struct Handle<N: ErasedNode + 'static> {
    mm: Subscriptions,
    node: StdArc<N>,
    done: bool,
}

impl<N: ErasedNode + 'static> Handle<N> {
    fn new(mm: &Subscriptions, node: StdArc<N>) -> Self {
        Handle {
            mm: mm.clone(),
            node,
            done: false,
        }
    }

    /// The node as the tree stores it.
    fn erased(&self) -> StdArc<dyn ErasedNode> {
        self.node.clone()
    }

    fn read_begin(&self) -> ReadSeq {
        let itree = self.mm.itree();
        let core = self.node.core();
        // Acquire: see the module docs; the address-space seq read after it is at least
        // the value an invalidation set this subscription's sequence to.
        let seq = core.seq.load(Acquire);
        if itree.seq.load(Acquire) != seq {
            return ReadSeq(seq);
        }
        assert!(
            !self.mm.srcu().held_by_current_thread(),
            "read_begin would wait for an invalidation of the same address space that the \
             current thread is running: it would wait for itself forever"
        );
        let mut st = itree.state.lock();
        while st.seq == seq {
            st = itree.cv.wait(st);
        }
        ReadSeq(seq)
    }

    fn check_retry(&self, seq: ReadSeq) -> bool {
        self.node.core().seq.load(Relaxed) != seq.0
    }

    fn range(&self) -> Option<ops::Range<u64>> {
        let st = self.mm.itree().state.lock();
        range_locked(&st, &self.erased())
    }

    fn update(&self, range: ops::Range<u64>) -> Result<(), IntervalError> {
        update(&self.mm, &self.erased(), range)
    }

    fn remove(&mut self, wait: bool) {
        if !std::mem::replace(&mut self.done, true) {
            remove_node(&self.mm, &self.erased(), wait);
        }
    }
}

impl<N: ErasedNode + 'static> Drop for Handle<N> {
    fn drop(&mut self) {
        // A destructor never waits: it may run inside a callback, or with the user lock
        // held while an invalidation waits for that lock.
        self.remove(false);
    }
}

/// An interval subscription: a secondary's state `T` for `start..end` of an address space,
/// behind the subscription's own user lock. Created by [`Subscriptions::insert_interval`].
///
/// Dropping it removes it like [`remove_nowait`](Self::remove_nowait): a destructor never
/// waits (it may run inside a callback, or with the user lock held while an invalidation
/// waits for that lock). Call [`remove`](Self::remove) to wait until no callback runs.
#[must_use = "dropping the subscription removes it"]
pub struct IntervalSubscription<T: IntervalSubscriber> {
    handle: Handle<Node<T>>,
}

impl<T: IntervalSubscriber> std::fmt::Debug for IntervalSubscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalSubscription")
            .field("range", &HexSpan(&self.range()))
            .field("seq", &self.handle.node.core.seq.load(Relaxed))
            .finish()
    }
}

/// The user lock of an interval subscription, held: derefs to the subscriber's state.
pub struct IntervalGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    core: &'a NodeCore,
}

impl<T> IntervalGuard<'_, T> {
    /// Whether an invalidation ran since `seq` was read (or is running): drop what was
    /// gathered and start again from [`IntervalSubscription::read_begin`]. Only callable
    /// with the user lock held, which orders it against `invalidate`.
    pub fn read_retry(&self, seq: ReadSeq) -> bool {
        // Relaxed: the invalidation sets the sequence under this same lock, which orders it.
        self.core.seq.load(Relaxed) != seq.0
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for IntervalGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("IntervalGuard").field(&*self.guard).finish()
    }
}

impl<T> std::ops::Deref for IntervalGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for IntervalGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T: IntervalSubscriber> IntervalSubscription<T> {
    /// Begins a fill: returns the subscription's sequence, after waiting while this
    /// subscription is being invalidated (or has a change pending in a frozen period).
    /// Lock-free when it does not wait.
    ///
    /// # Panics
    /// If it would have to wait while the current thread is inside a callback of the same
    /// address space or holds one of its `InvalidateGuard`s (it would wait for itself).
    pub fn read_begin(&self) -> ReadSeq {
        self.handle.read_begin()
    }

    /// Lock-free early hint that `seq` is stale: `true` is reliable, `false` is not (only
    /// [`IntervalGuard::read_retry`] under the lock decides).
    pub fn check_retry(&self, seq: ReadSeq) -> bool {
        self.handle.check_retry(seq)
    }

    /// Takes the user lock.
    pub fn lock(&self) -> IntervalGuard<'_, T> {
        IntervalGuard {
            guard: self.handle.node.user.lock(),
            core: &self.handle.node.core,
        }
    }

    /// The range the subscription covers, or will cover once a change queued in a frozen
    /// period is applied; `None` once removed.
    pub fn range(&self) -> Option<ops::Range<u64>> {
        self.handle.range()
    }

    /// Moves the subscription to `range`. Deferred while the tree is frozen; takes effect
    /// no later than the next `read_begin`. Never waits, so it may be called from inside
    /// callbacks.
    pub fn update(&self, range: ops::Range<u64>) -> Result<(), IntervalError> {
        self.handle.update(range)
    }

    /// Splits the subscription atomically with respect to invalidations: it moves to
    /// `left` and a new subscription with state `right_state` covers `right` (they must not
    /// overlap). For munmap punching a hole.
    pub fn split(
        &self,
        left: ops::Range<u64>,
        right: ops::Range<u64>,
        right_state: T,
    ) -> Result<IntervalSubscription<T>, IntervalError> {
        split_owned(
            &self.handle.mm,
            &self.handle.erased(),
            left,
            right,
            right_state,
        )
    }

    /// Removes the subscription (Linux's `mmu_interval_notifier_remove`), waiting if an
    /// invalidation of the current frozen period may still call it; then runs `release`
    /// on this thread. After it returns, its `invalidate` is not running and will not be
    /// called.
    ///
    /// # Panics
    /// Called from inside a callback of the same address space, or while holding one of
    /// its `InvalidateGuard`s: it would wait for itself forever (Linux deadlocks there).
    /// Use [`remove_nowait`](Self::remove_nowait) or [`IntervalContext::remove_self`].
    pub fn remove(mut self) {
        self.handle.remove(true);
    }

    /// Removes the subscription without waiting (what dropping it does): `release` runs
    /// once it is out of the tree and no callback uses it (possibly later, on the thread
    /// that ends the invalidation in flight). Allowed anywhere, callbacks included, but
    /// not while holding this subscription's user lock (`release` takes it).
    pub fn remove_nowait(mut self) {
        self.handle.remove(false);
    }

    /// The address space.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.handle.mm
    }

    /// Bytes one subscription costs beyond the subscriber's own state `T`: the shared
    /// allocation's reference counts, the protocol's sixteen-byte header and the user
    /// lock, plus its interval-tree entry and the tree's pointer back to it. (Vector growth
    /// slack in the tree is not counted.)
    pub fn memory_overhead() -> usize {
        let counts = 2 * std::mem::size_of::<usize>();
        let node = std::mem::size_of::<Node<T>>() - std::mem::size_of::<T>();
        let tree = IntervalTree::<StdArc<dyn ErasedNode>>::bytes_per_entry()
            + std::mem::size_of::<Option<StdArc<dyn ErasedNode>>>();
        counts + node + tree
    }
}

fn remove_node(mm: &Subscriptions, node: &StdArc<dyn ErasedNode>, wait: bool) {
    let itree = mm.itree();
    if wait {
        assert!(
            !mm.srcu().held_by_current_thread(),
            "an interval subscription was removed with `remove` from inside a callback of \
             its address space (or while holding one of its InvalidateGuards): it would wait \
             for itself forever. Use remove_nowait, or remove_self from the callback"
        );
    }
    let outcome = {
        let mut st = itree.state.lock();
        remove_locked(&mut st, node, wait)
    };
    match outcome {
        RemoveOutcome::Already => {}
        RemoveOutcome::Done => node.release(),
        RemoveOutcome::Deferred(_) if !wait => {} // released at the end of the period
        RemoveOutcome::Deferred(seq) => {
            // Re-read seq under the lock each time (the 2022 fix).
            let mut st = itree.state.lock();
            while st.seq == seq {
                st = itree.cv.wait(st);
            }
            drop(st);
            node.release();
        }
    }
}

/// What an interval `invalidate` callback may do besides tearing down: remove, move or split
/// its own subscription, and reach the address space.
pub struct IntervalContext<'a, T: IntervalSubscriber> {
    mm: &'a Subscriptions,
    node: &'a StdArc<Node<T>>,
    cur_seq: u64,
}

impl<T: IntervalSubscriber> std::fmt::Debug for IntervalContext<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalContext")
            .field("cur_seq", &self.cur_seq)
            .finish()
    }
}

impl<'a, T: IntervalSubscriber> IntervalContext<'a, T> {
    /// The address space (e.g. to insert new subscriptions: insertion never waits).
    pub fn subscriptions(&self) -> &'a Subscriptions {
        self.mm
    }

    /// The odd sequence value of this invalidation.
    pub fn cur_seq(&self) -> u64 {
        self.cur_seq
    }

    /// Removes this subscription without waiting; `release` runs once it is out of the
    /// tree and unused. The handle, if still held, then reports `range() == None`.
    pub fn remove_self(&mut self) {
        remove_node(self.mm, &self.erased(), false);
    }

    /// Moves this subscription (deferred until the end of the frozen period).
    pub fn update_self(&mut self, range: ops::Range<u64>) -> Result<(), IntervalError> {
        update(self.mm, &self.erased(), range)
    }

    /// Splits this subscription (see [`IntervalSubscription::split`]).
    pub fn split_self(
        &mut self,
        left: ops::Range<u64>,
        right: ops::Range<u64>,
        right_state: T,
    ) -> Result<IntervalSubscription<T>, IntervalError> {
        split_owned(self.mm, &self.erased(), left, right, right_state)
    }

    fn erased(&self) -> StdArc<dyn ErasedNode> {
        self.node.clone()
    }
}

/// Moves `node` to `range` (the handles' and the callbacks' `update`).
fn update(
    mm: &Subscriptions,
    node: &StdArc<dyn ErasedNode>,
    range: ops::Range<u64>,
) -> Result<(), IntervalError> {
    let last = last_of(&range)?;
    let itree = mm.itree();
    let mut st = itree.state.lock();
    update_locked(itree, &mut st, node, range.start, last)
}

fn new_node<T: IntervalSubscriber>(state: T) -> StdArc<Node<T>> {
    StdArc::new(Node {
        core: NodeCore::new(),
        user: Mutex::new(state),
    })
}

impl NodeCore {
    fn new() -> Self {
        NodeCore {
            seq: AtomicU64::new(0),
            pos: AtomicU64::new(NOT_IN_TREE),
        }
    }
}

/// Moves `old` to `left` and inserts `new` at `right` under one hold of the lock: an
/// invalidation sees either the whole subscription or both halves.
fn split_node(
    mm: &Subscriptions,
    old: &StdArc<dyn ErasedNode>,
    left: ops::Range<u64>,
    right: ops::Range<u64>,
    new: StdArc<dyn ErasedNode>,
) -> Result<(), IntervalError> {
    let left_last = last_of(&left)?;
    let right_last = last_of(&right)?;
    if left.start <= right_last && right.start <= left_last {
        return Err(IntervalError::SplitOverlap);
    }
    let itree = mm.itree();
    let mut st = itree.state.lock();
    if st.released {
        return Err(IntervalError::Released);
    }
    update_locked(itree, &mut st, old, left.start, left_last)?;
    insert_locked(itree, &mut st, new, right.start, right_last);
    Ok(())
}

fn split_owned<T: IntervalSubscriber>(
    mm: &Subscriptions,
    old: &StdArc<dyn ErasedNode>,
    left: ops::Range<u64>,
    right: ops::Range<u64>,
    right_state: T,
) -> Result<IntervalSubscription<T>, IntervalError> {
    let node = new_node(right_state);
    split_node(mm, old, left, right, node.clone())?;
    Ok(IntervalSubscription {
        handle: Handle::new(mm, node),
    })
}

/// Inserts `node` at `range` (both kinds' insert).
fn insert_node<N: ErasedNode + 'static>(
    mm: &Subscriptions,
    range: ops::Range<u64>,
    node: StdArc<N>,
) -> Result<Handle<N>, IntervalError> {
    let last = last_of(&range)?;
    enable(mm)?;
    let itree = mm.itree();
    let mut st = itree.state.lock();
    // The 2020 fix: check that the address space is alive, not merely allocated.
    if st.released {
        return Err(IntervalError::Released);
    }
    insert_locked(itree, &mut st, node.clone(), range.start, last);
    drop(st);
    Ok(Handle::new(mm, node))
}

impl Subscriptions {
    /// Subscribes `state` to invalidations overlapping `range` (Linux's
    /// `mmu_interval_notifier_insert`), behind a user lock of its own. Never waits for
    /// invalidations (except, once per address space, the very first insert, which waits
    /// for the ones in flight), so it may be called from inside callbacks once the address
    /// space has one interval subscription. When it returns, the subscription may not be in
    /// the tree yet; fill through [`read_begin`](IntervalSubscription::read_begin), which
    /// waits if needed.
    ///
    /// Errors: an empty range, a released address space, a first insert from inside a
    /// callback.
    pub fn insert_interval<T: IntervalSubscriber>(
        &self,
        range: ops::Range<u64>,
        state: T,
    ) -> Result<IntervalSubscription<T>, IntervalError> {
        let handle = insert_node(self, range, new_node(state))?;
        Ok(IntervalSubscription { handle })
    }

    /// The interval part of address-space release: refuse new subscriptions, then one
    /// blockable `Release` invalidation over the whole space.
    pub(crate) fn release_intervals(&self) {
        let itree = self.itree();
        if std::mem::replace(&mut itree.state.lock().released, true) || !itree.enabled() {
            return;
        }
        // Inside a read-side section like every invalidation, so that misuse from its
        // callbacks is caught the same way.
        let _read = self.srcu().read_lock();
        let range = Range::everything(crate::Event::Release);
        if let Ok(active) = inv_start(self, &range) {
            drop(active);
        }
    }
}
