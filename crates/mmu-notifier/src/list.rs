//! List subscribers: secondary MMUs that receive every callback for the whole address space
//! (Linux's `struct mmu_notifier` with its `mmu_notifier_ops`).

use std::fmt;

use crate::range::{Range, WouldBlock};

/// The set of optional callbacks a [`ListSubscriber`] implements.
///
/// Rust cannot ask a trait object which default methods were overridden, so a subscriber
/// declares them here, next to its implementation; registration checks the declaration
/// against the rules (a subscriber implements either
/// [`ARCH_INVALIDATE_SECONDARY_TLBS`](Ops::ARCH_INVALIDATE_SECONDARY_TLBS) or the
/// start/end pair, never both) and the core only calls what is declared.
///
/// ```
/// use mmu_notifier::Ops;
/// let ops = Ops::INVALIDATE_RANGE_START | Ops::INVALIDATE_RANGE_END;
/// assert!(ops.contains(Ops::INVALIDATE_RANGE_END));
/// assert!(!ops.contains(Ops::RELEASE));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ops(u8);

impl Ops {
    /// No optional callback.
    pub const NONE: Ops = Ops(0);
    /// [`ListSubscriber::release`].
    pub const RELEASE: Ops = Ops(1 << 0);
    /// [`ListSubscriber::clear_flush_young`].
    pub const CLEAR_FLUSH_YOUNG: Ops = Ops(1 << 1);
    /// [`ListSubscriber::clear_young`].
    pub const CLEAR_YOUNG: Ops = Ops(1 << 2);
    /// [`ListSubscriber::test_young`].
    pub const TEST_YOUNG: Ops = Ops(1 << 3);
    /// [`ListSubscriber::invalidate_range_start`].
    pub const INVALIDATE_RANGE_START: Ops = Ops(1 << 4);
    /// [`ListSubscriber::invalidate_range_end`].
    pub const INVALIDATE_RANGE_END: Ops = Ops(1 << 5);
    /// [`ListSubscriber::arch_invalidate_secondary_tlbs`].
    pub const ARCH_INVALIDATE_SECONDARY_TLBS: Ops = Ops(1 << 6);

    const NAMES: [&'static str; 7] = [
        "RELEASE",
        "CLEAR_FLUSH_YOUNG",
        "CLEAR_YOUNG",
        "TEST_YOUNG",
        "INVALIDATE_RANGE_START",
        "INVALIDATE_RANGE_END",
        "ARCH_INVALIDATE_SECONDARY_TLBS",
    ];

    /// Whether every callback in `other` is in `self`.
    pub const fn contains(self, other: Ops) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share a callback.
    pub const fn intersects(self, other: Ops) -> bool {
        self.0 & other.0 != 0
    }

    /// The union of two sets.
    pub const fn union(self, other: Ops) -> Ops {
        Ops(self.0 | other.0)
    }
}

impl std::ops::BitOr for Ops {
    type Output = Ops;
    fn bitor(self, rhs: Ops) -> Ops {
        self.union(rhs)
    }
}

impl fmt::Debug for Ops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect();
        if names.is_empty() {
            write!(f, "Ops(NONE)")
        } else {
            write!(f, "Ops({})", names.join(" | "))
        }
    }
}

/// A secondary MMU that subscribes to the whole address space.
///
/// Every callback is optional (the defaults do nothing) and must be declared in
/// [`ops`](ListSubscriber::ops). Callbacks run without any lock of the core held, inside a
/// read-side section of the address space's grace-period domain; they may sleep unless
/// the range is non-blockable.
///
/// # Rules
/// - Implement either [`arch_invalidate_secondary_tlbs`](Self::arch_invalidate_secondary_tlbs)
///   (a TLB that shares the primary's page tables) or the
///   [`invalidate_range_start`](Self::invalidate_range_start) /
///   [`invalidate_range_end`](Self::invalidate_range_end) pair, never both.
/// - When `invalidate_range_start` returns, the subscriber holds no translation into the
///   range and creates none until the matching `invalidate_range_end`.
/// - A start may fail (return [`WouldBlock`]) only in a non-blockable range, and a
///   subscriber whose start can fail must not implement `invalidate_range_end`: after a
///   failure the core calls `end` on every subscriber that has one, so it could not tell.
/// - Never unregister a subscriber of the same address space from inside a callback
///   (that waits for the callback itself; it panics instead of hanging).
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::collections::BTreeMap;
/// use mmu_notifier::{Event, ListSubscriber, Ops, Range, Subscriptions, WouldBlock};
///
/// /// A secondary TLB caching virtual page -> frame.
/// #[derive(Default)]
/// struct DeviceTlb { entries: Mutex<BTreeMap<u64, u64>> }
///
/// impl ListSubscriber for DeviceTlb {
///     fn ops(&self) -> Ops { Ops::INVALIDATE_RANGE_START }
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
    /// Which of the optional callbacks below this subscriber implements. Read once, at
    /// registration.
    fn ops(&self) -> Ops;

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

    /// The primary flushed its TLB for `[start, end)` after clearing or downgrading page
    /// table entries: drop the secondary TLB's cached copies (for secondaries that share
    /// the primary's page tables).
    fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        let _ = (start, end);
    }
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
