//! What an invalidation announces: a range of virtual addresses, why it changes, whether the
//! subscribers may sleep, and who caused it.

use std::fmt;

/// Why the primary MMU is changing the translations of a range.
///
/// A secondary uses the event to decide how much to tear down: an `Unmap` means the range
/// is gone, a `SoftDirty` reset leaves the same pages with the same access, and so on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// The range is unmapped: `munmap`, or `mremap` moving pages away.
    Unmap,
    /// Entries are cleared for another reason: `madvise`, a COW break, reclaim, migration
    /// of a mapped page, KSM merging, THP split or collapse.
    Clear,
    /// `mprotect` over the range: the new protection applies to the whole range, the CPU
    /// page tables need not be inspected.
    ProtectionVma,
    /// Per-page write protection (e.g. `fork` of a copy-on-write mapping): inspect the
    /// CPU page tables to learn which pages changed.
    ProtectionPage,
    /// Soft-dirty tracking is reset: same pages, same access.
    SoftDirty,
    /// The address space is going away. Only interval subscribers receive it, once, over
    /// the whole space, from [`Subscriptions::release`](crate::Subscriptions::release).
    Release,
    /// Device memory migration. A subscriber may ignore it when the range's
    /// [`owner`](Range::owner) is its own token.
    Migrate,
    /// A device loses exclusive access to the pages. The owner is set when the exclusive
    /// entry is being created by that owner.
    Exclusive,
}

impl Event {
    /// Every event, in declaration order.
    pub const ALL: [Event; 8] = [
        Event::Unmap,
        Event::Clear,
        Event::ProtectionVma,
        Event::ProtectionPage,
        Event::SoftDirty,
        Event::Release,
        Event::Migrate,
        Event::Exclusive,
    ];
}

/// An opaque token naming the agent that caused an invalidation, so that a subscriber can
/// recognise (and skip) its own device migrations or exclusive-access grabs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OwnerToken(pub u64);

/// The error a subscriber returns from `invalidate_range_start` in a non-blockable range
/// when it would have to sleep, and that the non-blocking start returns to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a subscriber would have to block in a non-blockable invalidation")]
pub struct WouldBlock;

/// A range that cannot be an invalidation range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `end` is not above `start`: the range is empty or inverted.
    #[error("empty or inverted range: start {start:#x}, end {end:#x} (end is exclusive and must be above start)")]
    Empty {
        /// The requested start.
        start: u64,
        /// The requested (exclusive) end.
        end: u64,
    },
}

/// An invalidation range: `[start, end)`, the event, whether subscribers may block, and
/// an optional owner token.
///
/// The primary builds one with [`Range::new`] and passes it to
/// [`Subscriptions::invalidate_range_start`](crate::Subscriptions::invalidate_range_start)
/// (which marks it blockable) or
/// [`Subscriptions::try_invalidate_range_start`](crate::Subscriptions::try_invalidate_range_start)
/// (non-blockable).
///
/// ```
/// use mmu_notifier::{Event, OwnerToken, Range};
/// let r = Range::new(0x1000, 0x3000, Event::Migrate)?.with_owner(OwnerToken(7));
/// assert_eq!(r.len(), 0x2000);
/// assert!(r.overlaps(0x2fff, 0x5000));
/// assert_eq!(r.owner(), Some(OwnerToken(7)));
/// assert!(Range::new(0x3000, 0x3000, Event::Unmap).is_err());
/// # Ok::<(), mmu_notifier::RangeError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    start: u64,
    end: u64,
    /// The owner token's value; 0 when there is none (then `has_owner` is false), so that
    /// equal ranges compare and hash equal field by field.
    owner: u64,
    event: Event,
    blockable: bool,
    has_owner: bool,
}

// Four words, so that every copy of a range on the invalidation path is two vector moves
// (an `Option<OwnerToken>` field made it five).
const _: () = assert!(std::mem::size_of::<Range>() == 32);

impl Range {
    /// A blockable range `[start, end)` for `event`, with no owner.
    pub fn new(start: u64, end: u64, event: Event) -> Result<Self, RangeError> {
        if end <= start {
            return Err(RangeError::Empty { start, end });
        }
        Ok(Self {
            start,
            end,
            owner: 0,
            event,
            blockable: true,
            has_owner: false,
        })
    }

    /// The whole address space `[0, u64::MAX)`.
    pub fn everything(event: Event) -> Self {
        Self {
            start: 0,
            end: u64::MAX,
            owner: 0,
            event,
            blockable: true,
            has_owner: false,
        }
    }

    /// The same range with an owner token.
    pub fn with_owner(mut self, owner: OwnerToken) -> Self {
        self.owner = owner.0;
        self.has_owner = true;
        self
    }

    /// Makes the range blockable or not. Ranges are built blockable, so on the blockable
    /// path this changes nothing: the store is out of line, and the range stays where it
    /// is (a byte store into it would make the compiler copy it to a new place, field by
    /// field, and the whole-word loads that follow would wait for that store).
    #[inline]
    pub(crate) fn set_blockable(&mut self, blockable: bool) {
        if self.blockable != blockable {
            self.store_blockable(blockable);
        }
    }

    #[cold]
    #[inline(never)]
    fn store_blockable(&mut self, blockable: bool) {
        self.blockable = blockable;
    }

    /// First address of the range.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// One past the last address of the range.
    pub fn end(&self) -> u64 {
        self.end
    }
    /// Number of bytes covered.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Always false: a range is never empty (kept for the `len`/`is_empty` convention).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Why the range changes.
    pub fn event(&self) -> Event {
        self.event
    }
    /// Whether subscribers may sleep while handling this range. In a non-blockable range a
    /// subscriber that would need to sleep returns [`WouldBlock`].
    pub fn blockable(&self) -> bool {
        self.blockable
    }
    /// The agent that caused the invalidation, if it said.
    pub fn owner(&self) -> Option<OwnerToken> {
        self.has_owner.then_some(OwnerToken(self.owner))
    }
    /// Whether `[start, end)` shares at least one byte with this range.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end && self.start < end
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Range({:#x}..{:#x}, {:?}, {}",
            self.start,
            self.end,
            self.event,
            if self.blockable {
                "blockable"
            } else {
                "non-blockable"
            }
        )?;
        if let Some(o) = self.owner() {
            write!(f, ", owner {}", o.0)?;
        }
        write!(f, ")")
    }
}
