//! The fill loop of the collision-retry protocol, written once.
//!
//! # The protocol
//!
//! Every fill of a secondary MMU is the same loop around one subscription (or several
//! under one [`IntervalLock`](super::IntervalLock)):
//!
//! 1. `seq = read_begin()` (waits while an invalidation of the subscription is running);
//! 2. *gather*: read the primary without the user lock (may sleep, may fault, may even
//!    invalidate and call this very subscription back);
//! 3. the *race window*: an invalidation that runs here must make step 4 start again
//!    ([`RetryPolicy::window`] is called here, with no lock held, so that a scheduler can
//!    put other work exactly in the window);
//! 4. take the user lock; if `read_retry(seq)` says an invalidation ran since step 1,
//!    unlock, drop what was gathered, ask the policy whether to try again
//!    ([`RetryPolicy::again`]: waits a little, or gives up with an error) and go back to 1;
//!    else *install* what was gathered, under the lock.
//!
//! [`IntervalSubscription::fill`] and [`LockedIntervalSubscription::fill`] run that loop;
//! the caller gives the gather and the install steps as closures. The install closure
//! only ever runs with the lock held and a sequence that `read_retry` has just found
//! current: it cannot install what an invalidation has since torn down. It may still
//! refuse ([`Install::Retry`]) for a reason of its own (a fence of the device, a chunk
//! that moved), which costs an attempt like a collision.
//!
//! How long to keep trying is the policy's business. [`RetryBudget`] is the usual one: a
//! bound on attempts and/or a deadline, with the CPU yielded between attempts so that the
//! invalidation that won can finish (it runs on another thread that may need this CPU).
//! A caller with a scheduler of its own, counters or an error type of its own implements
//! [`RetryPolicy`] around one.
//!
//! [`retry`] is the bare loop, for fills whose attempt is not one subscription's (a fill
//! that first looks up which subscription covers the address, a list subscriber with a
//! sequence of its own): each attempt returns `None` when it lost a race.

use std::time::{Duration, Instant};

use super::{
    IntervalGuard, IntervalLockGuard, IntervalSubscriber, IntervalSubscription,
    LockedIntervalSubscriber, LockedIntervalSubscription, ReadSeq,
};

/// What the install step of a fill decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install<R> {
    /// Installed; the fill returns this.
    Done(R),
    /// Not installed, for a reason of the caller's (not a collision, which the fill
    /// catches before calling install): start again, like after a collision.
    Retry,
}

/// A fill ran out of attempts or time: invalidations kept colliding with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("gave up after {attempts} attempts: invalidations kept colliding with the fill")]
pub struct RetryExhausted {
    /// The attempts made, all of them lost.
    pub attempts: u32,
}

/// How a fill waits between attempts, and when it gives up.
pub trait RetryPolicy {
    /// What the fill fails with: the policy's when it gives up, and the gather's and the
    /// install's.
    type Error;

    /// Called in every attempt's race window: after the gather, before the user lock,
    /// with no lock of the fill held. The default does nothing; a deterministic scheduler
    /// hands control over here.
    fn window(&mut self) {}

    /// Called after an attempt was lost, with no lock of the fill held: `Ok` to try
    /// again (after waiting as the policy sees fit), `Err` to give up.
    fn again(&mut self) -> Result<(), Self::Error>;
}

/// The usual retry policy: at most so many attempts and/or until a deadline, yielding
/// the CPU between attempts. Its error is [`RetryExhausted`];
/// [`map_err`](Self::map_err) turns it into the caller's.
///
/// A budget is for one fill (it counts the attempts of that fill); make a new one for
/// the next.
#[derive(Clone, Copy, Debug)]
pub struct RetryBudget {
    max_attempts: Option<u32>,
    deadline: Option<Instant>,
    attempts: u32,
}

impl RetryBudget {
    /// No bound at all: tries until the fill succeeds.
    pub fn unlimited() -> Self {
        RetryBudget {
            max_attempts: None,
            deadline: None,
            attempts: 0,
        }
    }

    /// At most `max` attempts (at least 1).
    pub fn attempts(max: u32) -> Self {
        RetryBudget {
            max_attempts: Some(max.max(1)),
            ..Self::unlimited()
        }
    }

    /// Attempts until `timeout` from now has passed (a timeout too long to represent is
    /// no deadline at all).
    pub fn timeout(timeout: Duration) -> Self {
        Self::unlimited().with_deadline(Instant::now().checked_add(timeout))
    }

    /// This budget with a deadline (or none).
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The attempts lost so far.
    pub fn attempts_lost(&self) -> u32 {
        self.attempts
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Counts a lost attempt: an error if that was the last one the budget allows (or the
    /// deadline has passed), else nothing. Does not wait ([`again`](RetryPolicy::again)
    /// does this, then yields).
    pub fn spend(&mut self) -> Result<(), RetryExhausted> {
        self.attempts = self.attempts.saturating_add(1);
        let out_of_attempts = self.max_attempts.is_some_and(|m| self.attempts >= m);
        if out_of_attempts || self.expired() {
            return Err(RetryExhausted {
                attempts: self.attempts,
            });
        }
        Ok(())
    }

    /// This budget, failing with `f(exhausted)` instead of [`RetryExhausted`].
    pub fn map_err<E, F: FnMut(RetryExhausted) -> E>(self, f: F) -> MapExhausted<F> {
        MapExhausted { budget: self, f }
    }
}

impl RetryPolicy for RetryBudget {
    type Error = RetryExhausted;

    fn again(&mut self) -> Result<(), RetryExhausted> {
        self.spend()?;
        // Let the invalidation that won finish: it may need this CPU (a loom yield in
        // a model, where every wait loop must let the scheduler run the others).
        crate::sync::thread::yield_now();
        Ok(())
    }
}

/// A [`RetryBudget`] with the caller's error (see [`RetryBudget::map_err`]).
pub struct MapExhausted<F> {
    budget: RetryBudget,
    f: F,
}

impl<F> MapExhausted<F> {
    /// The budget inside.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }
}

impl<F> std::fmt::Debug for MapExhausted<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MapExhausted").field(&self.budget).finish()
    }
}

impl<E, F: FnMut(RetryExhausted) -> E> RetryPolicy for MapExhausted<F> {
    type Error = E;

    fn again(&mut self) -> Result<(), E> {
        self.budget.again().map_err(&mut self.f)
    }
}

/// The bare retry loop: runs `attempt` until it returns `Some`, asking `policy` between
/// two attempts (an attempt returns `None` when it lost a race). Errors of `attempt` end
/// the loop at once.
pub fn retry<P: RetryPolicy, R>(
    policy: &mut P,
    mut attempt: impl FnMut(&mut P) -> Result<Option<R>, P::Error>,
) -> Result<R, P::Error> {
    loop {
        if let Some(done) = attempt(policy)? {
            return Ok(done);
        }
        policy.again()?;
    }
}

/// One attempt of the protocol (module docs, steps 1 to 4), for both kinds of
/// subscription: `begin` is `read_begin`, `lock` takes the user lock, `stale` is the
/// guard's `read_retry`. The gathered value is dropped after the lock is released.
fn attempt<P, S, L, G, R>(
    policy: &mut P,
    begin: impl FnOnce() -> S,
    gather: impl FnOnce() -> Result<G, P::Error>,
    lock: impl FnOnce() -> L,
    stale: impl FnOnce(&L, S) -> bool,
    install: impl FnOnce(&mut L, G) -> Result<Install<R>, P::Error>,
) -> Result<Option<R>, P::Error>
where
    P: RetryPolicy,
{
    let seq = begin();
    let gathered = gather()?;
    policy.window();
    let mut guard = lock();
    if stale(&guard, seq) {
        drop(guard);
        drop(gathered);
        return Ok(None);
    }
    match install(&mut guard, gathered)? {
        Install::Done(r) => Ok(Some(r)),
        Install::Retry => Ok(None),
    }
}

impl<T: IntervalSubscriber> IntervalSubscription<T> {
    /// One attempt of a fill (see the [module docs](self)): `read_begin`, `gather`
    /// without the lock, the policy's race window, the user lock, `read_retry`, and
    /// `install` under the lock if no invalidation ran meanwhile. `Ok(None)` when the
    /// attempt was lost (a collision, or `install` answered [`Install::Retry`]).
    ///
    /// # Panics
    /// As [`read_begin`](Self::read_begin).
    pub fn try_fill<P: RetryPolicy, G, R>(
        &self,
        policy: &mut P,
        gather: impl FnOnce() -> Result<G, P::Error>,
        install: impl FnOnce(&mut IntervalGuard<'_, T>, G) -> Result<Install<R>, P::Error>,
    ) -> Result<Option<R>, P::Error> {
        attempt(
            policy,
            || self.read_begin(),
            gather,
            || self.lock(),
            |g, seq| g.read_retry(seq),
            install,
        )
    }

    /// A fill: [`try_fill`](Self::try_fill) until an attempt installs, asking `policy`
    /// between attempts (see the [module docs](self)).
    ///
    /// # Example
    /// ```
    /// use mmu_notifier::{Install, RetryBudget};
    /// use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, Subscriptions, WouldBlock};
    ///
    /// /// A device's copy of one page.
    /// struct Mirror { frame: Option<u64> }
    ///
    /// impl IntervalSubscriber for Mirror {
    ///     fn invalidate(&mut self, _: &Range, _: &mut IntervalContext<'_, Self>) -> Result<(), WouldBlock> {
    ///         self.frame = None;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let mm = Subscriptions::new();
    /// let sub = mm.insert_interval(0x10000..0x11000, Mirror { frame: None })?;
    /// let mut budget = RetryBudget::attempts(8);
    /// let installed = sub.fill(
    ///     &mut budget,
    ///     || Ok(77), // ... ask the primary MMU, may sleep ...
    ///     |mirror, frame| {
    ///         mirror.frame = Some(frame); // under the lock, the sequence still current
    ///         Ok(Install::Done(frame))
    ///     },
    /// )?;
    /// assert_eq!(installed, 77);
    /// drop(mm.invalidate_range_start(Range::new(0x10000, 0x11000, Event::Clear)?));
    /// assert_eq!(sub.lock().frame, None);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn fill<P: RetryPolicy, G, R>(
        &self,
        policy: &mut P,
        mut gather: impl FnMut() -> Result<G, P::Error>,
        mut install: impl FnMut(&mut IntervalGuard<'_, T>, G) -> Result<Install<R>, P::Error>,
    ) -> Result<R, P::Error> {
        retry(policy, |p| self.try_fill(p, &mut gather, &mut install))
    }
}

impl<T: LockedIntervalSubscriber> LockedIntervalSubscription<T> {
    /// One attempt of a fill through this subscription under its shared lock (see
    /// [`IntervalSubscription::try_fill`]).
    ///
    /// # Panics
    /// As [`read_begin`](Self::read_begin).
    pub fn try_fill<P: RetryPolicy, G, R>(
        &self,
        policy: &mut P,
        gather: impl FnOnce() -> Result<G, P::Error>,
        install: impl FnOnce(&mut IntervalLockGuard<'_, T::State>, G) -> Result<Install<R>, P::Error>,
    ) -> Result<Option<R>, P::Error> {
        let lock = self.lock();
        attempt(
            policy,
            || self.read_begin(),
            gather,
            || lock.lock(),
            |g, seq| g.read_retry(self, seq),
            install,
        )
    }

    /// A fill through this subscription: [`try_fill`](Self::try_fill) until an attempt
    /// installs (see [`IntervalSubscription::fill`]).
    pub fn fill<P: RetryPolicy, G, R>(
        &self,
        policy: &mut P,
        mut gather: impl FnMut() -> Result<G, P::Error>,
        mut install: impl FnMut(&mut IntervalLockGuard<'_, T::State>, G) -> Result<Install<R>, P::Error>,
    ) -> Result<R, P::Error> {
        retry(policy, |p| self.try_fill(p, &mut gather, &mut install))
    }

    /// One attempt of a fill that reads through several subscriptions of the same shared
    /// lock (this one and `others`): `read_begin` on each, one hold of the lock, and the
    /// attempt is lost if *any* of them was invalidated meanwhile.
    ///
    /// # Panics
    /// As [`read_begin`](Self::read_begin); if one of `others` was inserted under another
    /// lock (as [`IntervalLockGuard::read_retry`]).
    pub fn try_fill_with<P: RetryPolicy, G, R>(
        &self,
        others: &[&LockedIntervalSubscription<T>],
        policy: &mut P,
        gather: impl FnOnce() -> Result<G, P::Error>,
        install: impl FnOnce(&mut IntervalLockGuard<'_, T::State>, G) -> Result<Install<R>, P::Error>,
    ) -> Result<Option<R>, P::Error> {
        let lock = self.lock();
        let subs = || std::iter::once(self).chain(others.iter().copied());
        attempt(
            policy,
            || subs().map(|s| s.read_begin()).collect::<Vec<ReadSeq>>(),
            gather,
            || lock.lock(),
            |g, seqs| subs().zip(seqs).any(|(s, seq)| g.read_retry(s, seq)),
            install,
        )
    }
}
