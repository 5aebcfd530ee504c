//! # mmu-notifier
//!
//! The Linux kernel's MMU notifier subsystem, in Rust. A *primary MMU* (the page tables of
//! an address space) announces every change of its translations; *secondary MMUs* that
//! copy some of those translations (a hypervisor's shadow page tables, a device TLB, a GPU
//! or NIC mirror, a registration cache) subscribe and drop their copies in time, without
//! pinning a single page.
//!
//! - [`Subscriptions`]: one per address space, and the API its primary calls:
//!   [`invalidate_range_start`](Subscriptions::invalidate_range_start) returns an
//!   [`InvalidateGuard`] whose drop is `invalidate_range_end`;
//!   [`try_invalidate_range_start`](Subscriptions::try_invalidate_range_start) is the
//!   non-blocking form; [`release`](Subscriptions::release) is process exit; the aging
//!   calls and [`arch_invalidate_secondary_tlbs`](Subscriptions::arch_invalidate_secondary_tlbs).
//! - [`ListSubscriber`]: a secondary that gets every callback for the whole space;
//!   [`register`](Subscriptions::register) / [`ListRegistration::unregister`], and the
//!   shared one-per-type form [`get`](Subscriptions::get) / [`Shared::put`].
//! - [`Srcu`]: the sleepable-RCU grace-period domain the callbacks run under.
//!
//! Each mechanism's protocol (states, who may do what, memory orderings) is written down
//! at the top of its module.
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//! use mmu_notifier::{Event, ListSubscriber, Ops, Range, Subscriptions, WouldBlock};
//!
//! #[derive(Default)]
//! struct Counter { starts: AtomicUsize, ends: AtomicUsize }
//! impl ListSubscriber for Counter {
//!     fn ops(&self) -> Ops { Ops::INVALIDATE_RANGE_START | Ops::INVALIDATE_RANGE_END }
//!     fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
//!         self.starts.fetch_add(1, Ordering::Relaxed);
//!         Ok(())
//!     }
//!     fn invalidate_range_end(&self, _: &Range) { self.ends.fetch_add(1, Ordering::Relaxed); }
//! }
//!
//! let mm = Subscriptions::new();
//! let c = Arc::new(Counter::default());
//! let reg = mm.register(c.clone())?;
//! let guard = mm.invalidate_range_start(Range::new(0, 4096, Event::Clear)?);
//! assert_eq!((c.starts.load(Ordering::Relaxed), c.ends.load(Ordering::Relaxed)), (1, 0));
//! drop(guard);
//! assert_eq!(c.ends.load(Ordering::Relaxed), 1);
//! reg.unregister();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

mod error;
mod interval;
pub mod itree;
mod list;
mod range;
mod srcu;
mod subscriptions;
mod sync;

pub use error::{GetError, RegisterError};
pub use interval::{
    IntervalContext, IntervalError, IntervalGuard, IntervalSubscriber, IntervalSubscription,
    ReadSeq,
};
pub use list::{ListSubscriber, Ops, SharedSubscriber};
pub use range::{Event, OwnerToken, Range, RangeError, WouldBlock};
pub use srcu::{Srcu, SrcuReadGuard};
pub use subscriptions::{InvalidateGuard, ListRegistration, Shared, Stats, Subscriptions};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
