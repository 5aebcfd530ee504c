//! List subscribers: secondary MMUs that receive every callback for the whole address space
//! (Linux's `struct mmu_notifier` with its `mmu_notifier_ops`).
//!
//! # Implementing a callback is what makes it called
//!
//! Linux's ops table is a set of function pointers: filling one in is the declaration. The
//! traits here keep that property: every callback of a registered subscriber is called, and
//! the ones it does not implement are the traits' empty defaults, which are exactly "not
//! there" (an `end` that does nothing, an aging call that answers "not young"). There is
//! no separate list of implemented callbacks that could disagree with the code.
//!
//! The one combination Linux refuses at registration, a subscriber with both the
//! secondary-TLB op and the start/end pair, cannot be written: they belong to two traits,
//! [`ListSubscriber`] (keeps its own copies: start/end) and [`SecondaryTlb`] (shares the
//! primary's page tables: the TLB op), registered by
//! [`register`](crate::Subscriptions::register) and
//! [`register_tlb`](crate::Subscriptions::register_tlb).
//!
//! ```compile_fail
//! use mmu_notifier::ListSubscriber;
//! struct Both;
//! impl ListSubscriber for Both {
//!     // error: not a member of `ListSubscriber`: a TLB that shares the page tables is a
//!     // `SecondaryTlb`, and has no start/end.
//!     fn arch_invalidate_secondary_tlbs(&self, _start: u64, _end: u64) {}
//! }
//! ```

use crate::range::{Range, WouldBlock};

/// A secondary MMU that subscribes to the whole address space.
///
/// Every callback is optional: the defaults do nothing, and every callback of a registered
/// subscriber is called (implementing one is what makes it called). Callbacks run without
/// any lock of the core held, inside a read-side section of the address space's
/// grace-period domain; they may sleep unless the range is non-blockable.
///
/// A secondary TLB that shares the primary's page tables (and so keeps no copies of its
/// own) is a [`SecondaryTlb`] instead.
///
/// # Rules
/// - When `invalidate_range_start` returns, the subscriber holds no translation into the
///   range and creates none until the matching `invalidate_range_end`.
/// - A start may fail (return [`WouldBlock`]) only in a non-blockable range. After a
///   failure the core calls `end` on every subscriber, the failed one included, so a
///   subscriber whose start can fail must not do real work in `invalidate_range_end`
///   (it could not tell whether its start succeeded).
/// - Never unregister a subscriber of the same address space from inside a callback
///   (that waits for the callback itself; it panics instead of hanging).
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::collections::BTreeMap;
/// use mmu_notifier::{Event, ListSubscriber, Range, Subscriptions, WouldBlock};
///
/// /// A secondary TLB caching virtual page -> frame.
/// #[derive(Default)]
/// struct DeviceTlb { entries: Mutex<BTreeMap<u64, u64>> }
///
/// impl ListSubscriber for DeviceTlb {
///     fn invalidate_range_start(&self, range: &Range) -> Result<(), WouldBlock> {
///         let mut e = match (range.blockable(), self.entries.try_lock()) {
///             (_, Ok(e)) => e,
///             (false, Err(_)) => return Err(WouldBlock),
///             (true, Err(_)) => self.entries.lock().unwrap(),
///         };
///         let doomed: Vec<u64> = e.range(range.start()..range.end()).map(|(k, _)| *k).collect();
///         doomed.iter().for_each(|k| { e.remove(k); });
///         Ok(())
///     }
/// }
///
/// let mm = Subscriptions::new();
/// let tlb = Arc::new(DeviceTlb::default());
/// let reg = mm.register(tlb.clone())?;
/// tlb.entries.lock().unwrap().insert(0x5000, 42);
/// drop(mm.invalidate_range_start(Range::new(0x4000, 0x6000, Event::Unmap)?)); // start..end
/// assert!(tlb.entries.lock().unwrap().is_empty());
/// reg.unregister();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait ListSubscriber: Send + Sync + 'static {
    /// The address space is going away (or the subscriber is being unregistered before it
    /// did): tear down every translation. Called exactly once per registration. Invalidation
    /// callbacks can still arrive concurrently until `release` returns.
    fn release(&self) {}

    /// Clears the accessed bit of the secondary's translations in `[start, end)` and
    /// flushes; returns whether any was set.
    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        let _ = (start, end);
        false
    }

    /// Like [`clear_flush_young`](Self::clear_flush_young) without the flush.
    fn clear_young(&self, start: u64, end: u64) -> bool {
        let _ = (start, end);
        false
    }

    /// Whether the secondary's translation of `addr` has been accessed.
    fn test_young(&self, addr: u64) -> bool {
        let _ = addr;
        false
    }

    /// The primary is about to change `range`: drop every translation into it and create
    /// none until `invalidate_range_end`. In a non-blockable range, return [`WouldBlock`]
    /// instead of sleeping.
    fn invalidate_range_start(&self, range: &Range) -> Result<(), WouldBlock> {
        let _ = range;
        Ok(())
    }

    /// The change announced by `invalidate_range_start` is complete; translations into the
    /// range may be created again.
    fn invalidate_range_end(&self, range: &Range) {
        let _ = range;
    }
}

/// A secondary TLB that shares the primary's page tables (an IOMMU in shared-virtual-memory
/// mode, Linux's `arch_invalidate_secondary_tlbs` users): it keeps no copies of its own, so
/// it has no start/end (invalidations never call it); it only drops its cached walks when
/// the primary flushes its TLB.
/// Registered by [`Subscriptions::register_tlb`](crate::Subscriptions::register_tlb).
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// use mmu_notifier::{SecondaryTlb, Subscriptions};
///
/// #[derive(Default)]
/// struct Iotlb { flushes: AtomicU64 }
/// impl SecondaryTlb for Iotlb {
///     fn arch_invalidate_secondary_tlbs(&self, _start: u64, _end: u64) {
///         self.flushes.fetch_add(1, Ordering::Relaxed); // ... queue an IOTLB flush ...
///     }
/// }
///
/// let mm = Subscriptions::new();
/// let tlb = Arc::new(Iotlb::default());
/// let reg = mm.register_tlb(tlb.clone())?;
/// mm.arch_invalidate_secondary_tlbs(0x1000, 0x2000); // the primary flushed its TLB
/// assert_eq!(tlb.flushes.load(Ordering::Relaxed), 1);
/// reg.unregister();
/// # Ok::<(), mmu_notifier::RegisterError>(())
/// ```
pub trait SecondaryTlb: Send + Sync + 'static {
    /// The primary flushed its TLB for `[start, end)` after clearing or downgrading page
    /// table entries: drop the cached copies of those entries.
    fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64);

    /// The address space is going away (or the subscriber is being unregistered before it
    /// did). Called exactly once per registration; the default does nothing.
    fn release(&self) {}
}

/// A list subscriber shared by every user on one address space: one instance per
/// (address space, type), created on the first [`Subscriptions::get`](crate::Subscriptions::get)
/// and freed after the last put (Linux's `mmu_notifier_get` / `mmu_notifier_put`).
pub trait SharedSubscriber: ListSubscriber + Sized {
    /// The most users one instance may have; a `get` beyond it fails with
    /// [`GetError::TooManyUsers`](crate::GetError::TooManyUsers).
    const MAX_USERS: u32 = u32::MAX;

    /// Creates the instance for an address space (called by the first `get`).
    fn alloc(mm: &crate::Subscriptions) -> Result<Self, crate::GetError>;
}
