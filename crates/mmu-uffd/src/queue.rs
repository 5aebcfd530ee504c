//! The hand-over queue between the monitor's reading and its applying (see `applier` for
//! which of the monitor's two threads does which, and when).
//!
//! # Why two threads
//!
//! A thread that unmaps watched memory sleeps in the kernel until the monitor *reads* its
//! event. If the thread that reads could itself wait for such a thread (by allocating: the
//! allocator may be trimming watched heap memory, or a forking thread may hold the
//! allocator's locks until its FORK event is read), the process would hang. So the reader
//! only polls, reads into a fixed buffer, closes forked children's descriptors and puts
//! what it read here; it never allocates, never runs user code and never takes a lock that
//! a user thread may hold. The applier runs the invalidations (user callbacks, which may
//! allocate and even unmap watched memory: the reader is still there to read that event).
//!
//! # The protocol
//!
//! - Reader (`push`, `published`): for each `read()` (batch `n`, numbered by the gate), push
//!   every invalidation it carried, then publish `n`: every event of batches up to `n` is in
//!   the queue. The queue never blocks the reader for long and never makes it wait for the
//!   applier's progress: when the fixed ring is full, further invalidations are merged into
//!   one *overflow* range covering all of them (invalidating more than asked is always
//!   safe; only precision is lost, and a counter says so).
//! - Applier (`take`): takes everything at once into its own buffer (and the overflow, and
//!   the published batch number), then applies it with the lock released; after that it
//!   may tell the gate that batches up to that number are applied. Only the thread that
//!   holds the applying role takes (see `applier`); `pending` tells a thread that just
//!   gave the role up whether something was pushed meanwhile (under this lock: that is
//!   what makes the role's hand-over lose nothing).
//!
//! The lock is `std::sync::Mutex`: on Linux a futex, which neither allocates nor keeps
//! per-thread state (parking_lot's would create the reader's parking record, an allocation,
//! the first time it blocked). It is held only to copy fixed-size data.

use std::sync::{Mutex, MutexGuard};

use mmu_notifier::Event;

/// Ring capacity, in invalidations (32 bytes each).
pub(crate) const CAPACITY: usize = 512;

/// One unit of work for the applier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// Invalidate `[start, end)` with `event`.
    Invalidate { start: u64, end: u64, event: Event },
    /// `[from, from + len)` moved to `to` (mremap): the registration moved with it. The
    /// applier moves the explicit watches along (the invalidation of the old range is a
    /// separate `Invalidate`). Dropped, not merged, when the ring is full: the only loss is
    /// that an explicit watch moved then may be unwatched later like a cache lease's range.
    Moved { from: u64, to: u64, len: u64 },
    /// An event type this code does not know (the applier logs it).
    Unknown(u8),
}

impl Work {
    const NONE: Work = Work::Unknown(0);
}

/// What the applier takes in one go.
#[derive(Debug)]
pub(crate) struct Taken {
    /// Invalidations in the order they were read.
    pub(crate) work: Box<[Work; CAPACITY]>,
    /// How many of `work` are filled.
    pub(crate) len: usize,
    /// Invalidations that did not fit, merged into one range.
    pub(crate) overflow: Option<(u64, u64, Event)>,
    /// Every event of batches up to this number is in `work` or `overflow` (or was
    /// taken before).
    pub(crate) through: u64,
}

impl Taken {
    pub(crate) fn new() -> Taken {
        Taken {
            work: Box::new([Work::NONE; CAPACITY]),
            len: 0,
            overflow: None,
            through: 0,
        }
    }

    /// The invalidations taken, overflow last.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Work> + '_ {
        self.work[..self.len].iter().copied().chain(
            self.overflow
                .map(|(start, end, event)| Work::Invalidate { start, end, event }),
        )
    }
}

#[derive(Debug)]
struct Ring {
    work: Box<[Work; CAPACITY]>,
    len: usize,
    overflow: Option<(u64, u64, Event)>,
    published: u64,
    /// The `published` number the last `take` took.
    taken: u64,
}

/// The queue (see the module docs).
#[derive(Debug)]
pub(crate) struct Queue {
    ring: Mutex<Ring>,
}

impl Queue {
    /// Allocates the ring (once, on the constructing thread).
    pub(crate) fn new() -> Queue {
        Queue {
            ring: Mutex::new(Ring {
                work: Box::new([Work::NONE; CAPACITY]),
                len: 0,
                overflow: None,
                published: 0,
                taken: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // Nothing panics with the lock held (only copies); recover the data regardless.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reader: hands over one batch's invalidations and publishes the batch number.
    /// Returns how many did not fit in the ring and were merged into the overflow range.
    pub(crate) fn push(&self, batch: u64, work: impl Iterator<Item = Work>) -> u64 {
        let mut merged = 0;
        let mut r = self.lock();
        for w in work {
            if r.len < CAPACITY {
                let i = r.len;
                r.work[i] = w;
                r.len += 1;
                continue;
            }
            if let Work::Invalidate { start, end, event } = w {
                merged += 1;
                r.overflow = Some(match r.overflow {
                    None => (start, end, event),
                    Some((s, e, ev)) => (s.min(start), e.max(end), stronger(ev, event)),
                });
            }
        }
        r.published = r.published.max(batch);
        merged
    }

    /// Applier: moves everything queued into `into` (its previous contents are
    /// replaced). Returns false if nothing new was published since the last take.
    pub(crate) fn take(&self, into: &mut Taken) -> bool {
        let mut r = self.lock();
        let fresh = Self::fresh(&r);
        into.work[..r.len].copy_from_slice(&r.work[..r.len]);
        into.len = r.len;
        into.overflow = r.overflow.take();
        into.through = r.published;
        r.taken = r.published;
        r.len = 0;
        fresh
    }

    /// Whether a `take` now would find something new. The lock is taken even though
    /// only a snapshot is returned: that acquisition orders the caller's earlier stores
    /// (giving up the applying role) before every later `push` (see `applier`).
    pub(crate) fn pending(&self) -> bool {
        Self::fresh(&self.lock())
    }

    /// Takes and releases the lock: a thread that stores a request (stop) before this
    /// is seen by every `pending` caller that locks after it (see `applier`).
    pub(crate) fn poke(&self) {
        drop(self.lock());
    }

    fn fresh(r: &Ring) -> bool {
        r.published > r.taken || r.len > 0 || r.overflow.is_some()
    }
}

/// The event to report for a merged range: an unmap if any part was unmapped.
fn stronger(a: Event, b: Event) -> Event {
    if a == Event::Unmap || b == Event::Unmap {
        Event::Unmap
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(start: u64, end: u64, event: Event) -> Work {
        Work::Invalidate { start, end, event }
    }

    #[test]
    fn take_returns_what_was_pushed_in_order_and_the_batch() {
        let q = Queue::new();
        let mut t = Taken::new();
        assert!(!q.take(&mut t), "nothing published yet");
        assert!(!q.pending());
        q.push(1, [inv(0, 10, Event::Unmap), Work::Unknown(7)].into_iter());
        q.push(2, std::iter::empty());
        assert!(q.pending());
        assert!(q.take(&mut t));
        assert!(!q.pending(), "everything taken");
        assert_eq!(t.through, 2);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![inv(0, 10, Event::Unmap), Work::Unknown(7)]
        );
        assert!(!q.take(&mut t), "taken already");
        assert_eq!(t.iter().count(), 0);
        assert_eq!(t.through, 2);
    }

    #[test]
    fn a_full_ring_merges_into_one_covering_overflow_range() {
        let q = Queue::new();
        let fill = (0..CAPACITY as u64).map(|i| inv(i * 10, i * 10 + 1, Event::Clear));
        assert_eq!(q.push(1, fill), 0);
        let extra = [
            inv(100_000, 100_010, Event::Clear),
            inv(50_000, 50_001, Event::Unmap),
            Work::Unknown(3), // dropped: nothing to invalidate
        ];
        assert_eq!(q.push(2, extra.into_iter()), 2);
        let mut t = Taken::new();
        assert!(q.take(&mut t));
        assert_eq!(t.len, CAPACITY);
        assert_eq!(t.overflow, Some((50_000, 100_010, Event::Unmap)));
        assert_eq!(t.iter().count(), CAPACITY + 1);
        assert_eq!(t.through, 2);
    }

    #[test]
    fn a_newer_empty_batch_and_late_work_of_a_taken_batch_are_both_fresh() {
        let q = Queue::new();
        let mut t = Taken::new();
        q.push(1, std::iter::empty());
        assert!(q.take(&mut t), "a newer batch, even with no work, is fresh");
        assert_eq!((t.through, t.iter().count()), (1, 0));
        q.push(1, [inv(0, 10, Event::Clear)].into_iter());
        assert!(
            q.take(&mut t),
            "work under an already-taken batch number is fresh"
        );
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![inv(0, 10, Event::Clear)]);
    }

    #[test]
    fn an_unmap_wins_a_merge_from_either_side_and_otherwise_the_first_event_stays() {
        assert_eq!(stronger(Event::Unmap, Event::Clear), Event::Unmap);
        assert_eq!(stronger(Event::Clear, Event::Unmap), Event::Unmap);
        assert_eq!(stronger(Event::Clear, Event::Clear), Event::Clear);
    }
}
