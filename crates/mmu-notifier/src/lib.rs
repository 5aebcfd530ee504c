//! # mmu-notifier
//!
//! The Linux kernel's MMU notifier subsystem, in Rust. A *primary MMU* (the page tables of
//! an address space) announces every change of its translations; *secondary MMUs* that
//! copy some of those translations (a hypervisor's shadow page tables, a device TLB, a GPU
//! or NIC mirror, a registration cache) subscribe and drop their copies in time, without
//! pinning a single page.
//!
//! # Writing a secondary: interval subscriptions and the fill loop
//!
//! A secondary that mirrors part of an address space subscribes to that range with
//! [`Subscriptions::insert_interval`] (Linux's `mmu_interval_notifier_insert`). Its state
//! lives behind the subscription's *user lock*; the primary's invalidations of the range
//! call [`IntervalSubscriber::invalidate`] with that lock held. To install a translation it
//! runs the *fill loop*, which detects a fill that raced an invalidation:
//!
//! 1. `let seq = sub.read_begin();` (waits while the range is being invalidated);
//! 2. ask the primary for the translation, without the lock (it may sleep);
//! 3. `let mut state = sub.lock(); if state.read_retry(seq) { /* start again */ }`, else
//!    install under the lock.
//!
//! `read_retry` is a method of the lock's guard, so it cannot be called without the lock.
//! [`IntervalSubscription::fill`] runs that loop for you (the gather and the install as
//! closures, a [`RetryBudget`] or your own [`RetryPolicy`] between attempts): the install
//! closure only runs under the lock with a sequence still current.
//! A secondary that mirrors many intervals under one lock of its own shares an
//! [`IntervalLock`] between them ([`Subscriptions::insert_locked_interval`]); a fill that
//! spans several subscriptions then takes one lock. The protocol (the sequence count, the
//! deferred tree changes, removal) is written down in the [`interval`] module, the shared
//! lock's in [`interval::locked`], the list's publication and release state machine in
//! [`subscriptions`], the grace periods in [`srcu`].
//!
//! ```
//! use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, Subscriptions, WouldBlock};
//! use mmu_notifier::{Install, RetryBudget};
//!
//! /// A device mirror of one page: the frame it maps, if any.
//! struct Mirror(Option<u64>);
//!
//! impl IntervalSubscriber for Mirror {
//!     fn invalidate(&mut self, _: &Range, _: &mut IntervalContext<'_, Self>) -> Result<(), WouldBlock> {
//!         self.0 = None; // ... and flush the device ...
//!         Ok(())
//!     }
//! }
//!
//! let mm = Subscriptions::new();
//! let sub = mm.insert_interval(0x4000..0x5000, Mirror(None))?;
//! sub.fill(
//!     &mut RetryBudget::attempts(16),
//!     || Ok(42), // 1-2: read_begin, then walk the primary's page table (may sleep)
//!     |m, frame| {
//!         m.0 = Some(frame); // 3: under the lock, read_retry found no invalidation
//!         Ok(Install::Done(()))
//!     },
//! )?;
//! assert_eq!(sub.lock().0, Some(42));
//! drop(mm.invalidate_range_start(Range::new(0x4000, 0x5000, Event::Unmap)?));
//! assert_eq!(sub.lock().0, None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The other kinds of subscriber
//!
//! - [`ListSubscriber`]: gets every callback for the whole address space (start/end, the
//!   aging calls, `release`): [`register`](Subscriptions::register) /
//!   [`ListRegistration::unregister`], and the shared one-per-type form
//!   [`get`](Subscriptions::get) / [`Shared::put`].
//! - [`SecondaryTlb`]: a TLB that shares the primary's page tables and only needs
//!   [`arch_invalidate_secondary_tlbs`](Subscriptions::arch_invalidate_secondary_tlbs):
//!   [`register_tlb`](Subscriptions::register_tlb).
//!
//! Every callback a subscriber implements is called; the trait defaults are empty. There is
//! no separate declaration of which callbacks exist, so none can be implemented and then
//! silently ignored.
//!
//! # The primary's side
//!
//! [`Subscriptions`] is one per address space:
//! [`invalidate_range_start`](Subscriptions::invalidate_range_start) returns an
//! [`InvalidateGuard`] whose drop is `invalidate_range_end`;
//! [`try_invalidate_range_start`](Subscriptions::try_invalidate_range_start) is the
//! non-blocking form; [`release`](Subscriptions::release) is process exit. Callbacks run
//! inside a read-side section of the address space's sleepable-RCU domain, [`Srcu`].
//!
//! Ranges are half-open byte ranges everywhere (`start..end`, like [`Range`]); `Debug`
//! prints addresses in hex.
//!
//! # The rules
//!
//! What the subsystem guarantees and requires, numbered so that tests and comments can
//! name them:
//!
//! | rule | |
//! |---|---|
//! | 1 | A secondary either keeps its own copies (start/end: [`ListSubscriber`]) or shares the primary's tables (the TLB op: [`SecondaryTlb`]), never both: the two are different traits. |
//! | 2 | `clear_flush_young` and `clear_young` ask every list subscriber and OR the answers; `test_young` stops at the first that says young. |
//! | 3 | A start may fail ([`WouldBlock`]) only in a non-blockable range; then `end` runs on every list subscriber and the caller gets no guard. A failure in a blockable range is a reported subscriber bug ([`Stats::subscriber_bugs`]) and the invalidation carries on. |
//! | 4 | `register` returns only after every invalidation in flight when it was called has either ended or called the new subscriber's start: no end without its start. |
//! | 5 | `unregister` runs `release` unless address-space release already did (or waits for it), and returns when no callback of the subscriber runs or will run. Called from inside a callback it would wait for itself: it panics with a message. |
//! | 6 | Address-space [`release`](Subscriptions::release) runs each list subscriber's `release` exactly once, while the subscriber still receives invalidations; nothing can register afterwards. |
//! | 7 | [`get`](Subscriptions::get) shares one subscriber per type and counts users; the last [`put`](Shared::put) removes it and frees it after a grace period, without waiting ([`synchronize`](Subscriptions::synchronize) waits for that). |
//! | 8 | An invalidation calls interval subscriptions first, then list subscribers in registration order; `end` runs in the same order. |
//!
//! # Errors and panics
//!
//! A mistake the caller can check for at run time is an error ([`RegisterError`],
//! [`IntervalError`], [`RangeError`], [`GetError`]): a released address space, an empty
//! range, a registration from inside a callback. A call that would wait for the calling
//! thread itself (a waiting `unregister`, `remove` or `read_begin` from inside a callback
//! of the same address space) panics with a message saying so, because returning would
//! leave the caller's protocol broken (the subscriber would stay registered, or a fill
//! would proceed unsynchronised). Destructors never wait and never panic.
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![warn(unsafe_op_in_unsafe_fn)]

mod error;
pub mod interval;
pub mod itree;
pub mod list;
mod range;
pub mod srcu;
pub mod subscriptions;
mod sync;

pub use error::{GetError, RegisterError};
pub use interval::{Install, RetryBudget, RetryExhausted, RetryPolicy};
pub use interval::{
    IntervalContext, IntervalError, IntervalGuard, IntervalLock, IntervalLockGuard,
    IntervalSubscriber, IntervalSubscription, LockedIntervalContext, LockedIntervalSubscriber,
    LockedIntervalSubscription, ReadSeq,
};
pub use list::{ListSubscriber, SecondaryTlb, SharedSubscriber};
pub use range::{Event, OwnerToken, Range, RangeError, WouldBlock};
pub use srcu::{Srcu, SrcuReadGuard};
pub use subscriptions::{InvalidateGuard, ListRegistration, Shared, Stats, Subscriptions};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
