//! GRU / SVA-style secondary TLB over the primary's own tables.
//!
//! A device that shares the process's page tables (an IOMMU in shared-virtual-addressing
//! mode, SGI's GRU) keeps no page table of its own: it walks the CPU's tables and caches
//! what it finds in a small TLB. Nothing needs tearing down before the primary changes an
//! entry, because the device reads the entry itself; only its cached copies must go, and
//! they may go at the same point as the CPU's own TLB entries: at the TLB flush that
//! follows the change. So the TLB subscribes to `arch_invalidate_secondary_tlbs` alone,
//! never to `invalidate_range_start`/`end` (the notifier refuses both at once), plus
//! `release`: when the process exits, the subscription list is emptied before the pages
//! are unmapped, so the exit's flush would never reach the TLB (Intel's SVA driver has a
//! `release` for the same reason).
//!
//! # The protocol
//!
//! The *TLB lock* guards the entries (bounded: the oldest is evicted to make room). The
//! *flush generation* counts flushes; it is bumped only with the TLB lock held.
//!
//! Who does what, and when:
//! - **The primary** clears or downgrades an entry under its page-table lock, then
//!   flushes: **`arch_invalidate_secondary_tlbs`** takes the TLB lock, bumps the
//!   generation, and drops the cached entries in the range. The primary frees the old
//!   frame only after the flush, so until then a cached entry still names a live frame
//!   (the device may use it, as the CPU may use its own TLB entry, until the flush).
//! - **A fill** (a device TLB miss; [`SvaTlb::fill`], split in two as [`SvaTlb::walk`] and
//!   [`SvaTlb::insert`]):
//!   1. read the generation → `g`;
//!   2. walk: read the primary's entry for the page (under its page-table lock). If it is
//!      not present, or not writable enough for the access, or lacks the accessed (and,
//!      for a write, dirty) bit a hardware walker would set, issue a *page request*: fault
//!      the page in through the primary (which may sleep and flush), and start again at 1;
//!   3. take the TLB lock; if the generation is no longer `g`, a flush ran since the walk
//!      began, and the entry the walk read may be one it flushed: drop it and start again;
//!      else insert it (evicting the oldest entry if the TLB is full).
//! - **A device access**: with the TLB lock held, through a cached entry (a read through
//!   any, a write only through a writable one), else fill first and try again.
//! - **Release** (process exit, or [`SvaTlb::shutdown`]): under the TLB lock, drops every
//!   entry, bumps the generation, and refuses every later fill.
//!
//! Why step 3 is enough: the walked entry is stale only if the primary changed it after
//! the walk read it (or before, unseen by the walk: see the orderings). That change is
//! followed by a flush, which takes the TLB lock. If the flush took it before step 3,
//! the generation moved and the fill starts again; if after, the flush finds the new
//! entry and drops it. Either way nothing stale survives a flush.
//!
//! Unlike a shadow MMU, the fill does not call
//! [`report_install`](crate::report_install): the checker compares an install with the
//! primary's entry *at that instant*, which a shared-table TLB may legitimately lag (the
//! primary may have cleared the entry and not flushed yet: the flush is waiting for our
//! lock and will drop what we insert). The checker verifies it instead at every flush
//! and every access.
//!
//! # Memory orderings
//!
//! The generation is bumped with the TLB lock held and compared in step 3 with it held,
//! so that comparison may be `Relaxed`. Step 1 reads it without the lock; its ordering is
//! justified there.
//!
//! ```
//! use std::sync::Arc;
//! use mmu_secondary::sva::SvaTlb;
//! use mmu_sim::{AddressSpace, FrameAllocator, Prot, PAGE_SIZE};
//!
//! let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
//! let buf = mm.mmap_anon(2 * PAGE_SIZE, Prot::READ_WRITE)?;
//! let tlb = SvaTlb::new(&mm)?;
//! tlb.write(buf, 9)?; // TLB miss, page request, walk, insert, write
//! assert_eq!(mm.read(buf)?, 9);
//! mm.munmap(buf, 2 * PAGE_SIZE)?; // the flush drops the entry
//! assert!(tlb.lookup(buf).is_none());
//! assert!(tlb.read(buf).is_err()); // the page request fails: not mapped
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Weak};

use mmu_notifier::{ListRegistration, RegisterError, SecondaryTlb};
use mmu_sim::{AddressSpace, CheckedSecondary, FrameRef, SecondaryKind, PAGE_SIZE, TASK_SIZE};
use parking_lot::Mutex;

use crate::{
    device_access, Counters, FaultRetry, FaultTimeout, SecondaryError, SecondaryMmu, SecondaryStats,
};

const P: u64 = PAGE_SIZE;

/// Entries in a TLB made by [`SvaTlb::new`].
pub const DEFAULT_CAPACITY: usize = 64;

/// The name the checker reports for this secondary.
const NAME: &str = "sva";

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// The page's virtual address.
    pub addr: u64,
    /// The frame the walk found (not pinned).
    pub frame: FrameRef,
    /// Whether the device may write through it.
    pub writable: bool,
}

/// What the TLB lock guards.
struct Entries {
    /// Oldest first.
    fifo: VecDeque<TlbEntry>,
    /// Set by release: nothing is inserted any more.
    released: bool,
}

/// The subscriber: the cached entries behind the TLB lock, and the flush generation.
/// The subscription list holds it; the [`SvaTlb`] handle holds it and the registration.
struct DeviceTlb {
    lock: Mutex<Entries>,
    /// Bumped by every flush (and release), with `lock` held.
    flush_gen: AtomicU64,
    capacity: usize,
    evictions: AtomicU64,
    page_requests: AtomicU64,
    counters: Counters,
}

impl DeviceTlb {
    /// Drops the entries in `[start, end)` and bumps the generation; returns how many.
    fn flush(&self, e: &mut Entries, start: u64, end: u64) -> usize {
        // Release: a fill that reads the new generation without the lock (step 1,
        // Acquire) must see the page-table change this flush follows. The bump is made
        // with the lock held, so fills comparing under the lock see it regardless.
        self.flush_gen.fetch_add(1, Release);
        let before = e.fifo.len();
        e.fifo.retain(|t| t.addr < start || t.addr >= end);
        before - e.fifo.len()
    }

    fn retire(&self) {
        let mut e = self.lock.lock();
        e.released = true;
        self.flush(&mut e, 0, u64::MAX);
    }
}

impl SecondaryTlb for DeviceTlb {
    fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        let mut e = self.lock.lock();
        self.counters.invalidation();
        self.flush(&mut e, start, end);
    }

    fn release(&self) {
        self.retire();
    }
}

impl CheckedSecondary for DeviceTlb {
    fn name(&self) -> &str {
        NAME
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::SharedTables
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        self.lock
            .lock()
            .fifo
            .iter()
            .filter(|t| start <= t.addr && t.addr < end)
            .map(|t| (t.addr, t.frame))
            .collect()
    }
}

/// The result of a page walk ([`SvaTlb::walk`]): a usable entry of the primary's table,
/// and the flush generation read before the walk began. Hand it to [`SvaTlb::insert`],
/// which caches it only if no flush ran since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a walk does nothing until it is inserted"]
pub struct TlbWalk {
    entry: TlbEntry,
    generation: u64,
}

impl TlbWalk {
    /// The translation found.
    pub fn entry(&self) -> TlbEntry {
        self.entry
    }
    /// The flush generation read before the walk.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// A device TLB sharing an address space's page tables (SVA / GRU style). See the
/// [module docs](self) for the protocol.
///
/// [`SvaTlb::new`] registers it (`arch_invalidate_secondary_tlbs` and `release`) and adds
/// it to the address space's checker, if one is attached. It holds the address space
/// weakly (the address space's subscription list holds the TLB, so a strong reference
/// back would be a cycle). Dropping the last handle (or [`shutdown`](SvaTlb::shutdown))
/// unregisters.
///
/// ```
/// use std::num::NonZeroUsize;
/// use std::sync::Arc;
/// use mmu_secondary::{sva::SvaTlb, SecondaryMmu};
/// use mmu_sim::{AddressSpace, Checker, FrameAllocator, Prot, PAGE_SIZE};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
/// let checker = Checker::new(1);
/// mm.attach_checker(checker.clone()).unwrap();
/// let buf = mm.mmap_anon(4 * PAGE_SIZE, Prot::READ_WRITE)?;
/// let tlb = SvaTlb::with_capacity(&mm, NonZeroUsize::new(2).unwrap())?;
/// for i in 0..4 {
///     tlb.access(buf + i * PAGE_SIZE, Some(100 + i))?;
/// }
/// assert_eq!(tlb.len(), 2); // the two oldest were evicted
/// assert_eq!(tlb.evictions(), 2);
/// let child = mm.fork(); // write-protects the pages: the flush drops the entries
/// assert!(tlb.is_empty());
/// tlb.access(buf, Some(7))?; // page request: breaks COW
/// assert_eq!((mm.read(buf)?, child.read(buf)?), (7, 100));
/// assert!(checker.violations().is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SvaTlb {
    tlb: Arc<DeviceTlb>,
    mm: Weak<AddressSpace>,
    registration: Mutex<Option<ListRegistration>>,
    timeout: FaultTimeout,
}

impl std::fmt::Debug for SvaTlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.tlb.lock.lock();
        f.debug_struct("SvaTlb")
            .field("entries", &e.fifo.len())
            .field("capacity", &self.tlb.capacity)
            .field("released", &e.released)
            .field("stats", &self.tlb.counters.snapshot())
            .finish()
    }
}

impl SvaTlb {
    /// A TLB of [`DEFAULT_CAPACITY`] entries over `mm` (see
    /// [`with_capacity`](Self::with_capacity)).
    pub fn new(mm: &Arc<AddressSpace>) -> Result<Arc<SvaTlb>, RegisterError> {
        Self::with_capacity(
            mm,
            NonZeroUsize::new(DEFAULT_CAPACITY).unwrap_or(NonZeroUsize::MIN),
        )
    }

    /// A TLB of `capacity` entries over `mm`: registers it on the address space's
    /// notifier, and adds it to the address space's checker if one is attached.
    ///
    /// Errors: those of [`Subscriptions::register`](mmu_notifier::Subscriptions::register)
    /// (the address space was released, or this is called from inside one of its
    /// notifier callbacks).
    pub fn with_capacity(
        mm: &Arc<AddressSpace>,
        capacity: NonZeroUsize,
    ) -> Result<Arc<SvaTlb>, RegisterError> {
        let tlb = Arc::new(DeviceTlb {
            lock: Mutex::new(Entries {
                fifo: VecDeque::with_capacity(capacity.get().min(4096)),
                released: false,
            }),
            flush_gen: AtomicU64::new(0),
            capacity: capacity.get(),
            evictions: AtomicU64::new(0),
            page_requests: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let registration = mm.notifier().register_tlb(tlb.clone())?;
        if let Some(checker) = mm.checker() {
            let weak: Weak<dyn CheckedSecondary> = Arc::downgrade(&tlb) as _;
            checker.add_secondary(weak);
        }
        Ok(Arc::new(SvaTlb {
            tlb,
            mm: Arc::downgrade(mm),
            registration: Mutex::new(Some(registration)),
            timeout: FaultTimeout::default(),
        }))
    }

    /// The retry policy of a fill starting now (the crate's fill policy; retries are
    /// counted where they are found, in [`insert`](Self::insert)).
    fn start_fault(&self) -> FaultRetry<'static> {
        self.timeout.start(None)
    }

    fn mm(&self) -> Result<Arc<AddressSpace>, SecondaryError> {
        self.mm.upgrade().ok_or(SecondaryError::Gone)
    }

    // ----- the fill path --------------------------------------------------------------

    /// A TLB miss at `addr` (for a write if `write`): walks, issuing page requests as
    /// needed, and inserts, starting again whenever a flush ran since the walk began.
    /// Returns the entry inserted.
    ///
    /// Errors: [`OutOfRange`](SecondaryError::OutOfRange) beyond user space;
    /// [`Primary`](SecondaryError::Primary) if a page request fails (not mapped, not
    /// allowed); [`Timeout`](SecondaryError::Timeout); [`Gone`](SecondaryError::Gone)
    /// after release or shutdown.
    pub fn fill(&self, addr: u64, write: bool) -> Result<TlbEntry, SecondaryError> {
        let mm = self.mm()?;
        self.fill_in(&mm, addr, write, &mut self.start_fault())
    }

    fn fill_in(
        &self,
        mm: &AddressSpace,
        addr: u64,
        write: bool,
        retry: &mut FaultRetry<'_>,
    ) -> Result<TlbEntry, SecondaryError> {
        // The two halves are public (a test can put an operation between them): the
        // schedule point is in `walk`, and `insert` counts the retry it causes.
        mmu_notifier::interval::retry(retry, |retry| {
            let walk = self.walk_in(mm, addr, write, retry)?;
            Ok(self.insert(walk)?.then_some(walk.entry))
        })
    }

    /// Steps 1 and 2 of a fill: reads the flush generation, then walks the primary's
    /// table for `addr`, issuing page requests until the entry is usable for the access.
    ///
    /// With [`insert`](Self::insert), the two halves of [`fill`](Self::fill), exposed so
    /// that a test or a tool can put a primary operation between them. Errors as `fill`.
    pub fn walk(&self, addr: u64, write: bool) -> Result<TlbWalk, SecondaryError> {
        let mm = self.mm()?;
        self.walk_in(&mm, addr, write, &self.start_fault())
    }

    fn walk_in(
        &self,
        mm: &AddressSpace,
        addr: u64,
        write: bool,
        retry: &FaultRetry<'_>,
    ) -> Result<TlbWalk, SecondaryError> {
        if addr >= TASK_SIZE {
            return Err(SecondaryError::OutOfRange(addr));
        }
        let page = addr & !(P - 1);
        loop {
            // Step 1. Acquire: pairs with the Release bump of a flush. If we read a
            // generation a flush wrote, the page-table change that flush followed is
            // visible to the walk below. It also keeps the walk from moving before this
            // read: a walk that in effect ran first could read an entry, lose it to a
            // flush, and still see that flush's generation here.
            let generation = self.tlb.flush_gen.load(Acquire);
            // Step 2: the hardware walk (takes only the page-table lock).
            let pte = mm.pte(page);
            // A hardware walker sets the accessed bit (and dirty, for a write) of the entry
            // it uses. The simulated primary offers no way to do that but a fault, so an
            // entry without them is treated as unusable: the page request sets them. (The
            // dirty bit matters: a write the primary does not know of could be dropped by
            // reclaim of a lazily freed page.)
            let usable = pte.accessed() && (!write || (pte.writable() && pte.dirty()));
            match pte.pfn().filter(|_| usable) {
                Some(pfn) => {
                    let entry = TlbEntry {
                        addr: page,
                        frame: mm.frames().frame_ref(pfn),
                        writable: pte.writable() && pte.dirty(),
                    };
                    // The race window: a flush here must make the insert retry.
                    crate::sched::point();
                    return Ok(TlbWalk { entry, generation });
                }
                None => {
                    // A page request (ATS/PRI): fault the page in, then walk again. No
                    // lock of ours is held: the fault may flush, which takes it.
                    self.tlb.page_requests.fetch_add(1, Relaxed);
                    if self.tlb.lock.lock().released {
                        return Err(SecondaryError::Gone);
                    }
                    mm.fault(page, write)?;
                    retry.check()?;
                }
            }
        }
    }

    /// Step 3 of a fill: under the TLB lock, caches the walked entry unless a flush ran
    /// since the walk began; then returns `false` and counts a retry. See
    /// [`walk`](Self::walk).
    ///
    /// Errors: [`Gone`](SecondaryError::Gone) after release or shutdown.
    pub fn insert(&self, walk: TlbWalk) -> Result<bool, SecondaryError> {
        let mut e = self.tlb.lock.lock();
        if e.released {
            return Err(SecondaryError::Gone);
        }
        // Relaxed: every bump is made with the lock we hold.
        if self.tlb.flush_gen.load(Relaxed) != walk.generation {
            drop(e);
            self.tlb.counters.retry();
            return Ok(false);
        }
        e.fifo.retain(|t| t.addr != walk.entry.addr);
        if e.fifo.len() >= self.tlb.capacity {
            e.fifo.pop_front();
            self.tlb.evictions.fetch_add(1, Relaxed);
        }
        e.fifo.push_back(walk.entry);
        self.tlb.counters.fill();
        Ok(true)
    }

    // ----- device accesses ------------------------------------------------------------

    /// A device access at `addr`: reads (`None`) or writes `Some(value)` through the
    /// cached entry, with the TLB lock held, filling first on a miss (or on a read-only
    /// entry for a write). Returns the data read, or the data written. Errors as
    /// [`fill`](Self::fill).
    pub fn device_access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        let mm = self.mm()?;
        let mut retry = self.start_fault();
        let page = addr & !(P - 1);
        let mut filled = false;
        loop {
            if filled {
                retry.check()?;
            }
            {
                let e = self.tlb.lock.lock();
                if e.released {
                    return Err(SecondaryError::Gone);
                }
                let hit = e
                    .fifo
                    .iter()
                    .find(|t| t.addr == page && (t.writable || write.is_none()));
                if let Some(t) = hit {
                    let v = device_access(&mm, &*self.tlb, page, t.frame, write);
                    self.tlb.counters.access();
                    return Ok(v);
                }
            }
            // A miss. A flush may drop the new entry before we retake the lock: loop.
            self.fill_in(&mm, page, write.is_some(), &mut retry)?;
            filled = true;
        }
    }

    /// A device read at `addr` (see [`device_access`](Self::device_access)).
    pub fn read(&self, addr: u64) -> Result<u64, SecondaryError> {
        self.device_access(addr, None)
    }

    /// A device write of `value` at `addr` (see [`device_access`](Self::device_access)).
    pub fn write(&self, addr: u64, value: u64) -> Result<u64, SecondaryError> {
        self.device_access(addr, Some(value))
    }

    // ----- inspection and teardown ----------------------------------------------------

    /// The cached entry for the page containing `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<TlbEntry> {
        let page = addr & !(P - 1);
        self.tlb
            .lock
            .lock()
            .fifo
            .iter()
            .find(|t| t.addr == page)
            .copied()
    }

    /// The cached entries, oldest first.
    pub fn entries(&self) -> Vec<TlbEntry> {
        self.tlb.lock.lock().fifo.iter().copied().collect()
    }

    /// How many entries are cached.
    pub fn len(&self) -> usize {
        self.tlb.lock.lock().fifo.len()
    }

    /// Whether no entry is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries it caches.
    pub fn capacity(&self) -> usize {
        self.tlb.capacity
    }

    /// The flush generation: flushes (and releases) so far.
    pub fn flush_generation(&self) -> u64 {
        self.tlb.flush_gen.load(Relaxed)
    }

    /// Entries evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.tlb.evictions.load(Relaxed)
    }

    /// Page requests issued (walks that found the entry unusable).
    pub fn page_requests(&self) -> u64 {
        self.tlb.page_requests.load(Relaxed)
    }

    /// Whether the TLB is still subscribed to its address space (not shut down).
    pub fn is_registered(&self) -> bool {
        self.registration.lock().is_some()
    }

    /// Tears the TLB down: drops every entry, refuses every later fill with
    /// [`SecondaryError::Gone`], and unregisters from the address space, waiting until
    /// none of its callbacks runs. Idempotent; dropping the last handle does it too.
    ///
    /// Called from inside a notifier callback of the same address space (where waiting
    /// for its callbacks would wait for itself), the entries are dropped at once and the
    /// unregistration is handed to a helper thread.
    pub fn shutdown(&self) {
        self.tlb.retire();
        if let Some(reg) = self.registration.lock().take() {
            crate::unregister_outside_callbacks(reg, "sva-unregister");
        }
    }
}

impl Drop for SvaTlb {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl CheckedSecondary for SvaTlb {
    fn name(&self) -> &str {
        NAME
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::SharedTables
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        self.tlb.translations_in(start, end)
    }
}

impl SecondaryMmu for SvaTlb {
    /// A TLB miss at `addr`: [`fill`](SvaTlb::fill).
    fn fault(&self, addr: u64, write: bool) -> Result<(), SecondaryError> {
        self.fill(addr, write).map(drop)
    }

    /// [`device_access`](SvaTlb::device_access).
    fn access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        self.device_access(addr, write)
    }

    fn stats(&self) -> SecondaryStats {
        self.tlb.counters.snapshot()
    }

    fn timeout_setting(&self) -> &FaultTimeout {
        &self.timeout
    }
}
