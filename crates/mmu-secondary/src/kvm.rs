//! KVM-style shadow page table.
//!
//! A hypervisor maps *guest frames* (gfns) to host memory through *memslots* (a run of
//! guest frames backed by a run of host virtual addresses of the VM process), and keeps
//! its own page table, the *shadow* table, from guest frame to host frame. The hardware
//! walks only the shadow table, so every shadow entry is a copy of a primary translation
//! that the primary knows nothing about: the hypervisor subscribes to the address space's
//! MMU notifier and tears its copies down when the primary changes the originals. No
//! page is ever pinned.
//!
//! # The protocol
//!
//! One lock, `mmu_lock` (KVM's `kvm->mmu_lock`), guards everything below. It is held only
//! for short sections that never sleep and never call into the primary's mmap lock, like
//! the spinlock it models, so the invalidation callbacks may take it even in a
//! non-blockable range: `invalidate_range_start` never fails, which is what allows it to
//! have an `invalidate_range_end` at all.
//!
//! The state:
//! - the memslots and the shadow table (gfn → frame, writable, accessed);
//! - `in_progress`: invalidations whose start has run and whose end has not;
//! - `range`: the union of the host ranges of those invalidations (it only grows while
//!   `in_progress > 0`, and is forgotten when `in_progress` drops back to 0);
//! - `seq` (`mmu_invalidate_seq`): bumped by every end.
//!
//! Who does what, and when:
//! - **`invalidate_range_start`** (primary's thread, before it touches its entries): under
//!   the lock, counts itself in `in_progress`, widens `range` over its range, drops every
//!   shadow entry whose host address is in its range, and flushes the guest TLB if it
//!   dropped any. From its return until the matching end nothing may be installed in that
//!   range, and nothing is: the fault path checks `in_progress`/`range` under the same lock.
//! - **`invalidate_range_end`** (after the primary changed its entries, maybe freed the
//!   pages): under the lock, bumps `seq`, then drops out of `in_progress`.
//! - **A guest fault** (a vCPU thread; [`Kvm::fault_gfn`], split in two as
//!   [`Kvm::prefetch`] and [`Kvm::install`]):
//!   1. read `seq` without the lock → `s`;
//!   2. if an invalidation in progress covers the page, give up at once and retry (a
//!      lock-free hint, to save the primary fault; not relied upon);
//!   3. fault the page in through the primary, without the lock and without a pin (this
//!      may sleep, and may itself cause invalidations, e.g. a COW break);
//!   4. take the lock; if an invalidation in progress covers the page, or `seq != s`,
//!      throw the frame away and retry; else report the install and install.
//! - **A guest access**: with the lock held, through a shadow entry (read through any,
//!   write only through a writable one), setting its accessed bit; if there is none, fault
//!   first, then try again.
//! - **Aging** (`clear_flush_young`, `clear_young`, `test_young`, from reclaim): under the
//!   lock, test and clear the accessed bits of the entries in the range; the flushing
//!   variant flushes the guest TLB if one was set, so the guest's next access is seen.
//! - **Release** (address-space exit, or [`Kvm::shutdown`]): under the lock, drops every
//!   entry and refuses every later install.
//!
//! Why the install in step 4 is safe. The frame from step 3 is stale at step 4 only if
//! step 3 missed a change of the page's entry by the primary, and every such change is
//! made after the start, and before the end, of an invalidation covering the page. Where
//! can that invalidation fall?
//! - Its start takes the lock after step 4: the change comes after the install, and the
//!   start drops the entry first.
//! - Its start ran before step 4, its end has not: `in_progress` covers the page: retry.
//! - Its end ran before step 4 but after step 1 read `seq`: `seq` moved: retry.
//! - Its end ran before step 1 read `seq`: then step 3 saw the change (see the
//!   orderings), so missed nothing.
//!
//! Memslot changes are covered the same way: step 4 translates the gfn again and retries
//! if the slot moved.
//!
//! # Memory orderings
//!
//! `seq`, `in_progress` and `range` are atomics so that steps 1 and 2 can read them
//! without the lock; they are written only with the lock held, and every read made with
//! the lock held may be `Relaxed` (the lock orders it after every earlier write). The
//! orderings of the lock-free reads are justified where they are made.
//!
//! ```
//! use std::sync::Arc;
//! use mmu_secondary::kvm::Kvm;
//! use mmu_sim::{AddressSpace, FrameAllocator, Prot, PAGE_SIZE};
//!
//! let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
//! let ram = mm.mmap_anon(4 * PAGE_SIZE, Prot::READ_WRITE)?;
//! let kvm = Kvm::new(&mm)?;
//! kvm.add_memslot(0x100, 4, ram)?; // guest frames 0x100..0x104 are `ram`
//! kvm.guest_write(0x101, 7)?; // faults the page in, installs, writes through it
//! assert_eq!(mm.read(ram + PAGE_SIZE)?, 7); // the process sees the guest's write
//! mm.madvise(ram, 4 * PAGE_SIZE, mmu_sim::Advice::DontNeed)?; // zaps the shadow entry
//! assert_eq!(kvm.spte(0x101), None);
//! assert_eq!(kvm.guest_read(0x101)?, 0); // refaulted: a fresh zero page
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Weak};

use mmu_notifier::{ListRegistration, ListSubscriber, Range, RegisterError, WouldBlock};
use mmu_sim::{AddressSpace, CheckedSecondary, FrameRef, SecondaryKind, PAGE_SIZE, TASK_SIZE};
use parking_lot::Mutex;

use crate::{
    device_access, report_install, Counters, FaultRetry, FaultTimeout, SecondaryError,
    SecondaryMmu, SecondaryStats,
};

const P: u64 = PAGE_SIZE;

/// The name the checker reports for this secondary.
const NAME: &str = "kvm";

// ----- guest frames, host addresses, lengths ---------------------------------------------

/// A guest frame number: a page of the guest's physical memory. Not an address of the
/// process: a guest frame reaches host memory only through a memslot
/// ([`Kvm::gfn_to_hva`]). The three kinds of number of this module are three types, so
/// that passing one for another does not compile:
///
/// ```compile_fail
/// # use std::sync::Arc;
/// # use mmu_secondary::kvm::{Gfn, Kvm};
/// # use mmu_sim::{AddressSpace, FrameAllocator, Prot, PAGE_SIZE};
/// # let mm = AddressSpace::new(Arc::new(FrameAllocator::new(16)));
/// # let ram = mm.mmap_anon(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
/// # let kvm = Kvm::new(&mm).unwrap();
/// kvm.add_memslot(0x100, 4, ram).unwrap();
/// let hva = kvm.gfn_to_hva(Gfn(0x101)).unwrap();
/// kvm.guest_read(hva); // a host address where a guest frame is expected
/// ```
///
/// A bare `u64` converts to each ([`From`]), for literals.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gfn(pub u64);

/// A host virtual address: an address of the VM process, the primary's kind of address.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hva(pub u64);

/// A length in pages: of a run of guest frames, and of the host range backing it.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pages(pub u64);

macro_rules! number {
    ($t:ident, $hex:literal) => {
        impl From<u64> for $t {
            fn from(v: u64) -> Self {
                $t(v)
            }
        }
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                if $hex {
                    write!(f, concat!(stringify!($t), "({:#x})"), self.0)
                } else {
                    write!(f, concat!(stringify!($t), "({})"), self.0)
                }
            }
        }
        impl std::fmt::LowerHex for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}
number!(Gfn, true);
number!(Hva, true);
number!(Pages, false);

impl Gfn {
    /// The guest-physical address of the frame (saturating), for error reports.
    fn guest_address(self) -> u64 {
        self.0.saturating_mul(P)
    }
}

// ----- memslots -----------------------------------------------------------------------

/// A memory slot: `npages` guest frames from `gfn_base`, backed by the host pages from
/// `hva`. Made by [`Kvm::add_memslot`], which validates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Memslot {
    gfn_base: Gfn,
    npages: Pages,
    hva: Hva,
}

impl Memslot {
    /// The first guest frame.
    pub fn gfn_base(&self) -> Gfn {
        self.gfn_base
    }
    /// How many guest frames.
    pub fn npages(&self) -> Pages {
        self.npages
    }
    /// The host address backing the first guest frame.
    pub fn hva(&self) -> Hva {
        self.hva
    }
    /// One past the last guest frame.
    pub fn gfn_end(&self) -> Gfn {
        // `add_memslot` checked that this does not overflow.
        Gfn(self.gfn_base.0 + self.npages.0)
    }
    /// One past the last host byte.
    pub fn hva_end(&self) -> Hva {
        // `add_memslot` checked that this does not overflow.
        Hva(self.hva.0 + self.npages.0 * P)
    }
    /// The host address of guest frame `gfn`, if this slot holds it.
    pub fn hva_of(&self, gfn: Gfn) -> Option<Hva> {
        (self.gfn_base..self.gfn_end())
            .contains(&gfn)
            .then(|| Hva(self.hva.0 + (gfn.0 - self.gfn_base.0) * P))
    }
    /// The guest frame backed by the page containing `hva`, if this slot holds it.
    pub fn gfn_of(&self, hva: Hva) -> Option<Gfn> {
        (self.hva..self.hva_end())
            .contains(&hva)
            .then(|| Gfn(self.gfn_base.0 + (hva.0 - self.hva.0) / P))
    }
    /// The guest frames whose host pages overlap the host range `[start, end)`.
    fn gfns_overlapping(&self, start: Hva, end: Hva) -> Option<std::ops::Range<Gfn>> {
        let (s, e) = (start.max(self.hva).0, end.min(self.hva_end()).0);
        let (base, hva) = (self.gfn_base.0, self.hva.0);
        (s < e).then(|| {
            // `e - hva <= npages * P`, so the rounding cannot overflow.
            Gfn(base + (s - hva) / P)..Gfn(base + (e - hva).div_ceil(P))
        })
    }
}

/// Why a memslot could not be added or removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemslotError {
    /// A slot of zero pages.
    #[error("a memslot needs at least one page")]
    Empty,
    /// The host address is not page aligned.
    #[error("host address {0:#x} is not page aligned")]
    Unaligned(Hva),
    /// The guest frames or the host range wrap, or the host range leaves user space.
    #[error("the memslot overflows the guest frame numbers or leaves user space")]
    Overflow,
    /// The guest frames overlap those of the slot at `existing`.
    #[error("guest frames overlap the memslot at guest frame {existing:#x}")]
    GfnOverlap {
        /// The first guest frame of the slot in the way.
        existing: Gfn,
    },
    /// The host range overlaps that of the slot at guest frame `existing` (this model
    /// keeps host → guest a function; Linux allows such aliases).
    #[error("host range overlaps the memslot at guest frame {existing:#x}")]
    HvaOverlap {
        /// The first guest frame of the slot in the way.
        existing: Gfn,
    },
    /// Part of the host range is not mapped in the address space (the first such page).
    #[error("host address {0:#x} is not mapped")]
    Unmapped(Hva),
    /// No slot starts at this guest frame.
    #[error("no memslot starts at guest frame {0:#x}")]
    NoSuchSlot(Gfn),
    /// The VM was shut down or its address space released.
    #[error("the VM is gone")]
    Gone,
}

// ----- the shadow MMU: state and notifier callbacks -----------------------------------

/// One shadow page-table entry, as [`Kvm::spte`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spte {
    /// The host address it was faulted from.
    pub hva: Hva,
    /// The frame, as the fault saw it (not pinned).
    pub frame: FrameRef,
    /// Whether the guest may write through it.
    pub writable: bool,
    /// Whether the guest used it since aging last cleared the bit.
    pub accessed: bool,
}

/// What `mmu_lock` guards (besides the writes to the atomics of [`ShadowMmu`]).
#[derive(Default)]
struct Shadow {
    memslots: Vec<Memslot>,
    sptes: BTreeMap<Gfn, Spte>,
    /// Set by release: nothing is installed any more.
    released: bool,
}

impl Shadow {
    fn gfn_to_hva(&self, gfn: Gfn) -> Option<Hva> {
        self.memslots.iter().find_map(|s| s.hva_of(gfn))
    }
    fn hva_to_gfn(&self, hva: Hva) -> Option<Gfn> {
        self.memslots.iter().find_map(|s| s.gfn_of(hva))
    }

    /// Whether `slot` may be added: not after release, overlapping no other slot.
    fn check_new_slot(&self, slot: &Memslot) -> Result<(), MemslotError> {
        if self.released {
            return Err(MemslotError::Gone);
        }
        for o in &self.memslots {
            if o.gfn_base < slot.gfn_end() && slot.gfn_base < o.gfn_end() {
                return Err(MemslotError::GfnOverlap {
                    existing: o.gfn_base,
                });
            }
            if o.hva < slot.hva_end() && slot.hva < o.hva_end() {
                return Err(MemslotError::HvaOverlap {
                    existing: o.gfn_base,
                });
            }
        }
        Ok(())
    }

    /// Every gfn of a shadow entry whose host page overlaps `[start, end)`.
    fn gfns_in(&self, start: Hva, end: Hva) -> Vec<Gfn> {
        self.memslots
            .iter()
            .filter_map(|s| s.gfns_overlapping(start, end))
            .flat_map(|r| self.sptes.range(r).map(|(&g, _)| g))
            .collect()
    }

    /// Drops the entries whose host page overlaps `[start, end)`; returns how many.
    fn zap(&mut self, start: Hva, end: Hva) -> usize {
        let gone = self.gfns_in(start, end);
        for g in &gone {
            self.sptes.remove(g);
        }
        gone.len()
    }

    /// Clears the accessed bits in `[start, end)`; returns whether one was set.
    fn clear_young(&mut self, start: Hva, end: Hva) -> bool {
        let mut young = false;
        for g in self.gfns_in(start, end) {
            if let Some(e) = self.sptes.get_mut(&g) {
                young |= std::mem::replace(&mut e.accessed, false);
            }
        }
        young
    }
}

/// The subscriber: the shadow table behind `mmu_lock`, and the invalidation bookkeeping.
/// The address space's subscription list holds it; the [`Kvm`] handle holds it and the
/// registration, never the other way round, so nothing here keeps anything alive.
struct ShadowMmu {
    /// `kvm->mmu_lock`.
    lock: Mutex<Shadow>,
    /// `mmu_invalidate_seq`. Written only under `lock`.
    seq: AtomicU64,
    /// `mmu_invalidate_in_progress`. Written only under `lock`.
    in_progress: AtomicU64,
    /// `mmu_invalidate_range_start` / `_end`: the union of the ranges in progress.
    /// Written only under `lock`; meaningless while `in_progress` is 0.
    range_start: AtomicU64,
    range_end: AtomicU64,
    tlb_flushes: AtomicU64,
    counters: Counters,
}

impl ShadowMmu {
    fn new() -> Self {
        Self {
            lock: Mutex::new(Shadow::default()),
            seq: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            range_start: AtomicU64::new(u64::MAX),
            range_end: AtomicU64::new(0),
            tlb_flushes: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// The guest TLB flush after entries were dropped or aged (a model: just counted).
    fn flush_guest_tlb(&self) {
        self.tlb_flushes.fetch_add(1, Relaxed);
    }

    /// Whether an invalidation in progress covers `hva`. With the lock held this is exact;
    /// without it, a hint (see `prefetch`).
    fn in_progress_covers(&self, hva: u64) -> bool {
        self.in_progress.load(Relaxed) > 0
            && self.range_start.load(Relaxed) <= hva
            && hva < self.range_end.load(Relaxed)
    }

    /// KVM's `mmu_invalidate_retry_gfn`: called with the lock held (`_held` proves it).
    fn must_retry(&self, _held: &Shadow, hva: u64, seq: u64) -> bool {
        // Relaxed: every write of these happened under the lock we hold.
        self.in_progress_covers(hva) || self.seq.load(Relaxed) != seq
    }

    /// Drops every entry and refuses every later install (release, shutdown).
    fn retire(&self) {
        let mut s = self.lock.lock();
        s.released = true;
        if !s.sptes.is_empty() {
            s.sptes.clear();
            self.flush_guest_tlb();
        }
    }
}

impl ListSubscriber for ShadowMmu {
    fn release(&self) {
        self.retire();
    }

    fn invalidate_range_start(&self, range: &Range) -> Result<(), WouldBlock> {
        // Taken even in a non-blockable range: the lock is never held across anything
        // that sleeps (see the module docs), so waiting for it is a spinlock's wait.
        let mut s = self.lock.lock();
        self.counters.invalidation();
        // Relaxed loads and stores: all under the lock. A lock-free reader (the fault's
        // hint) may see these three out of step; it only ever uses them as a hint.
        let first = self.in_progress.load(Relaxed) == 0;
        self.in_progress.fetch_add(1, Relaxed);
        let (old_start, old_end) = if first {
            (u64::MAX, 0)
        } else {
            (self.range_start.load(Relaxed), self.range_end.load(Relaxed))
        };
        self.range_start
            .store(old_start.min(range.start()), Relaxed);
        self.range_end.store(old_end.max(range.end()), Relaxed);
        if s.zap(Hva(range.start()), Hva(range.end())) > 0 {
            self.flush_guest_tlb();
        }
        Ok(())
    }

    fn invalidate_range_end(&self, _range: &Range) {
        let _s = self.lock.lock();
        // Release: a fault that reads this value (or a later one) without the lock
        // (step 1, Acquire) must also see the primary's change this end closes, made
        // before it on the primary's thread; else it could fault in the old page and,
        // with a `seq` from after the change, install it. A read-modify-write, so that a
        // later bump continues this one's release sequence: reading the later value
        // still synchronizes with this bump.
        self.seq.fetch_add(1, Release);
        let n = self.in_progress.load(Relaxed);
        debug_assert!(n > 0, "invalidate_range_end without a start");
        self.in_progress.store(n.saturating_sub(1), Relaxed);
        if n <= 1 {
            self.range_start.store(u64::MAX, Relaxed);
            self.range_end.store(0, Relaxed);
        }
    }

    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        let young = self.lock.lock().clear_young(Hva(start), Hva(end));
        if young {
            // The guest's TLB may still hold the entry with its accessed bit set, and then
            // the next access would not set it again: flush.
            self.flush_guest_tlb();
        }
        young
    }

    fn clear_young(&self, start: u64, end: u64) -> bool {
        self.lock.lock().clear_young(Hva(start), Hva(end))
    }

    fn test_young(&self, addr: u64) -> bool {
        let s = self.lock.lock();
        s.hva_to_gfn(Hva(addr))
            .and_then(|g| s.sptes.get(&g))
            .is_some_and(|e| e.accessed)
    }
}

impl CheckedSecondary for ShadowMmu {
    fn name(&self) -> &str {
        NAME
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        let s = self.lock.lock();
        s.gfns_in(Hva(start), Hva(end))
            .into_iter()
            .filter_map(|g| s.sptes.get(&g))
            .map(|e| (e.hva.0, e.frame))
            .collect()
    }
}

// ----- the VM handle ------------------------------------------------------------------

/// The first half of a guest fault ([`Kvm::prefetch`]): the frame the primary gave for a
/// guest frame, and the `mmu_invalidate_seq` read before asking. Hand it to
/// [`Kvm::install`], which installs it only if no invalidation collided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a prefetch does nothing until it is installed"]
pub struct Prefetch {
    gfn: Gfn,
    hva: Hva,
    frame: FrameRef,
    write: bool,
    seq: u64,
}

impl Prefetch {
    /// The guest frame.
    pub fn gfn(&self) -> Gfn {
        self.gfn
    }
    /// Its host address when the prefetch translated it.
    pub fn hva(&self) -> Hva {
        self.hva
    }
    /// The frame the primary returned (not pinned: it may be gone by now).
    pub fn frame(&self) -> FrameRef {
        self.frame
    }
    /// The `mmu_invalidate_seq` read before the primary was asked.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A virtual machine's shadow MMU over one address space (the VM process's): memslots,
/// a shadow page table filled by guest faults, and a list subscription that keeps it
/// coherent with the primary. See the [module docs](self) for the protocol.
///
/// [`Kvm::new`] registers it and adds it to the address space's checker, if one is
/// attached. It holds the address space weakly (the address space's subscription list
/// holds the shadow MMU, so a strong reference back would be a cycle): when the address
/// space goes away, the release callback drops every entry and faults fail with
/// [`SecondaryError::Gone`]. Dropping the last handle (or [`shutdown`](Kvm::shutdown))
/// unregisters.
///
/// ```
/// use std::sync::Arc;
/// use mmu_secondary::{kvm::Kvm, SecondaryMmu};
/// use mmu_sim::{AddressSpace, Checker, FrameAllocator, Prot, PAGE_SIZE};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
/// let checker = Checker::new(1);
/// mm.attach_checker(checker.clone()).unwrap();
/// let ram = mm.mmap_anon(2 * PAGE_SIZE, Prot::READ_WRITE)?;
/// let kvm = Kvm::new(&mm)?;
/// kvm.add_memslot(0, 2, ram)?;
/// kvm.guest_write(1, 5)?;
/// mm.migrate(ram + PAGE_SIZE)?; // zaps the entry; the data moves
/// assert_eq!(kvm.access(ram + PAGE_SIZE, None)?, 5); // by host address: refaults
/// assert_eq!(kvm.stats().fills, 2);
/// assert!(checker.violations().is_empty());
/// kvm.shutdown(); // unregisters (dropping the handle does too)
/// assert_eq!(kvm.guest_read(1), Err(mmu_secondary::SecondaryError::Gone));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Kvm {
    mmu: Arc<ShadowMmu>,
    mm: Weak<AddressSpace>,
    registration: Mutex<Option<ListRegistration>>,
    timeout: FaultTimeout,
}

impl std::fmt::Debug for Kvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.mmu.lock.lock();
        f.debug_struct("Kvm")
            .field("memslots", &s.memslots)
            .field("sptes", &s.sptes.len())
            .field("released", &s.released)
            .field("stats", &self.mmu.counters.snapshot())
            .finish()
    }
}

impl Kvm {
    /// A VM on `mm`, with no memslot yet: registers its shadow MMU on the address
    /// space's notifier, and adds it to the address space's checker if one is attached.
    ///
    /// Errors: those of [`Subscriptions::register`](mmu_notifier::Subscriptions::register)
    /// (the address space was released, or this is called from inside one of its
    /// notifier callbacks).
    pub fn new(mm: &Arc<AddressSpace>) -> Result<Arc<Kvm>, RegisterError> {
        let mmu = Arc::new(ShadowMmu::new());
        let registration = mm.notifier().register(mmu.clone())?;
        if let Some(checker) = mm.checker() {
            let weak: Weak<dyn CheckedSecondary> = Arc::downgrade(&mmu) as _;
            checker.add_secondary(weak);
        }
        Ok(Arc::new(Kvm {
            mmu,
            mm: Arc::downgrade(mm),
            registration: Mutex::new(Some(registration)),
            timeout: FaultTimeout::default(),
        }))
    }

    /// The retry policy of a fault starting now (the crate's fill policy; retries are
    /// counted where they are found, in the two halves of a fault).
    fn start_fault(&self) -> FaultRetry<'static> {
        self.timeout.start(None)
    }

    fn mm(&self) -> Result<Arc<AddressSpace>, SecondaryError> {
        self.mm.upgrade().ok_or(SecondaryError::Gone)
    }

    // ----- memslots -------------------------------------------------------------------

    /// Adds a memslot: guest frames `gfn_base..gfn_base + npages` are backed by the host
    /// pages from `hva` (KVM's `KVM_SET_USER_MEMORY_REGION`). Nothing is faulted in.
    ///
    /// Errors: [`Empty`](MemslotError::Empty) for zero pages,
    /// [`Unaligned`](MemslotError::Unaligned), [`Overflow`](MemslotError::Overflow) if the
    /// frames wrap or the host range leaves user space,
    /// [`GfnOverlap`](MemslotError::GfnOverlap) / [`HvaOverlap`](MemslotError::HvaOverlap)
    /// with an existing slot, [`Unmapped`](MemslotError::Unmapped) if part of the host
    /// range is not mapped now, [`Gone`](MemslotError::Gone) after release.
    pub fn add_memslot(
        &self,
        gfn_base: impl Into<Gfn>,
        npages: impl Into<Pages>,
        hva: impl Into<Hva>,
    ) -> Result<Memslot, MemslotError> {
        let (gfn_base, npages, hva) = (gfn_base.into(), npages.into(), hva.into());
        if npages.0 == 0 {
            return Err(MemslotError::Empty);
        }
        if hva.0 % P != 0 {
            return Err(MemslotError::Unaligned(hva));
        }
        gfn_base
            .0
            .checked_add(npages.0)
            .ok_or(MemslotError::Overflow)?;
        let hva_end = npages
            .0
            .checked_mul(P)
            .and_then(|len| hva.0.checked_add(len))
            .filter(|&end| end <= TASK_SIZE)
            .ok_or(MemslotError::Overflow)?;
        let slot = Memslot {
            gfn_base,
            npages,
            hva,
        };
        let mm = self.mm.upgrade().ok_or(MemslotError::Gone)?;
        self.mmu.lock.lock().check_new_slot(&slot)?;
        // Checked against a snapshot of the layout, without `mmu_lock` (the snapshot
        // takes the mmap lock, which is never taken under it). The layout may change
        // right after: a guest fault then fails as the primary's fault does.
        if let Some(hole) = first_unmapped(&mm, hva.0, hva_end) {
            return Err(MemslotError::Unmapped(Hva(hole)));
        }
        let mut s = self.mmu.lock.lock();
        // Again: another slot may have been added meanwhile.
        s.check_new_slot(&slot)?;
        s.memslots.push(slot);
        Ok(slot)
    }

    /// Removes the memslot starting at guest frame `gfn_base`, dropping its shadow
    /// entries (and flushing). A fault in flight for one of its frames fails with
    /// [`SecondaryError::OutOfRange`] at its install.
    pub fn remove_memslot(&self, gfn_base: impl Into<Gfn>) -> Result<Memslot, MemslotError> {
        let gfn_base = gfn_base.into();
        let mut s = self.mmu.lock.lock();
        let i = s
            .memslots
            .iter()
            .position(|o| o.gfn_base == gfn_base)
            .ok_or(MemslotError::NoSuchSlot(gfn_base))?;
        let slot = s.memslots[i];
        let gone: Vec<Gfn> = s
            .sptes
            .range(slot.gfn_base..slot.gfn_end())
            .map(|(&g, _)| g)
            .collect();
        for g in &gone {
            s.sptes.remove(g);
        }
        if !gone.is_empty() {
            self.mmu.flush_guest_tlb();
        }
        s.memslots.swap_remove(i);
        Ok(slot)
    }

    /// The memslots, by guest frame.
    pub fn memslots(&self) -> Vec<Memslot> {
        let mut v = self.mmu.lock.lock().memslots.clone();
        v.sort_by_key(|s| s.gfn_base);
        v
    }

    /// The host address of guest frame `gfn`, if a memslot holds it.
    pub fn gfn_to_hva(&self, gfn: impl Into<Gfn>) -> Option<Hva> {
        self.mmu.lock.lock().gfn_to_hva(gfn.into())
    }

    /// The guest frame backed by the host page containing `hva`, if a memslot holds it.
    pub fn hva_to_gfn(&self, hva: impl Into<Hva>) -> Option<Gfn> {
        self.mmu.lock.lock().hva_to_gfn(hva.into())
    }

    // ----- the fault path -------------------------------------------------------------

    /// A guest fault on frame `gfn` (writable if `write`): the four steps of the module
    /// docs, repeated until an install succeeds or the fault timeout passes. Returns at
    /// once if the shadow entry is already good enough.
    ///
    /// Errors: [`OutOfRange`](SecondaryError::OutOfRange) with the guest-physical address
    /// (`gfn * PAGE_SIZE`) if no memslot holds `gfn`;
    /// [`Primary`](SecondaryError::Primary) if the primary refuses the fault;
    /// [`Timeout`](SecondaryError::Timeout); [`Gone`](SecondaryError::Gone) after the
    /// address space was released or the VM shut down.
    pub fn fault_gfn(&self, gfn: impl Into<Gfn>, write: bool) -> Result<(), SecondaryError> {
        let mm = self.mm()?;
        self.fault_gfn_in(&mm, gfn.into(), write, &mut self.start_fault())
    }

    fn fault_gfn_in(
        &self,
        mm: &AddressSpace,
        gfn: Gfn,
        write: bool,
        retry: &mut FaultRetry<'_>,
    ) -> Result<(), SecondaryError> {
        {
            let s = self.mmu.lock.lock();
            if s.released {
                return Err(SecondaryError::Gone);
            }
            if s.sptes.get(&gfn).is_some_and(|e| e.writable || !write) {
                return Ok(());
            }
        }
        // The two halves are public (a test can put an operation between them): the
        // schedule point is in `prefetch`, and each half counts the retry it causes.
        mmu_notifier::interval::retry(retry, |_| match self.prefetch_in(mm, gfn, write)? {
            Some(p) => Ok(self.install_in(mm, p)?.then_some(())),
            None => Ok(None),
        })
    }

    /// Steps 1 to 3 of a guest fault: reads `mmu_invalidate_seq`, translates `gfn`, and
    /// faults the page in through the primary (no lock held, nothing pinned). `None` (and
    /// a retry counted) if an invalidation in progress covers the page: try again later.
    ///
    /// With [`install`](Self::install), the two halves of [`fault_gfn`](Self::fault_gfn),
    /// exposed so that a test or a tool can put a primary operation between them.
    pub fn prefetch(
        &self,
        gfn: impl Into<Gfn>,
        write: bool,
    ) -> Result<Option<Prefetch>, SecondaryError> {
        let mm = self.mm()?;
        self.prefetch_in(&mm, gfn.into(), write)
    }

    fn prefetch_in(
        &self,
        mm: &AddressSpace,
        gfn: Gfn,
        write: bool,
    ) -> Result<Option<Prefetch>, SecondaryError> {
        // Step 1. Acquire: pairs with the Release bump in `invalidate_range_end`. If we
        // read the value an end wrote, the primary's change that end closed is visible to
        // the fault below. It also keeps the fault's page-table reads from moving before
        // this read: a Relaxed read could in effect happen after the fault, which would
        // then take a stale frame and pair it with a `seq` from after its invalidation.
        let seq = self.mmu.seq.load(Acquire);
        // Memslots change only under the lock: translate under it (install translates
        // again and retries if the slot moved).
        let hva = self
            .mmu
            .lock
            .lock()
            .gfn_to_hva(gfn)
            .ok_or(SecondaryError::OutOfRange(gfn.guest_address()))?;
        // Step 2, a hint: Relaxed reads, possibly of values from different moments (the
        // count of one invalidation with the range of another). A wrong "no" costs a
        // useless primary fault, caught by step 4; a wrong "yes" costs a retry, and the
        // reads see the count drop to 0 soon after it does (coherence), so it cannot
        // spin forever.
        if self.mmu.in_progress_covers(hva.0) {
            self.mmu.counters.retry();
            return Ok(None);
        }
        // Step 3: may sleep, may cause invalidations (a COW break) that call back into
        // us; we hold no lock of ours.
        let frame = mm.fault(hva.0, write)?;
        // The race window: an invalidation here must make step 4 retry.
        crate::sched::point();
        Ok(Some(Prefetch {
            gfn,
            hva,
            frame,
            write,
            seq,
        }))
    }

    /// Step 4 of a guest fault: under the lock, installs the prefetched frame unless an
    /// invalidation collided with it (one covering the page is in progress, or one ended
    /// since the prefetch read `seq`), or the memslot moved; then returns `false` and
    /// counts a retry. See [`prefetch`](Self::prefetch).
    ///
    /// Errors: [`OutOfRange`](SecondaryError::OutOfRange) if the memslot was removed;
    /// [`Gone`](SecondaryError::Gone).
    pub fn install(&self, prefetch: Prefetch) -> Result<bool, SecondaryError> {
        let mm = self.mm()?;
        self.install_in(&mm, prefetch)
    }

    fn install_in(&self, mm: &AddressSpace, p: Prefetch) -> Result<bool, SecondaryError> {
        let mut s = self.mmu.lock.lock();
        if s.released {
            return Err(SecondaryError::Gone);
        }
        let hva = s
            .gfn_to_hva(p.gfn)
            .ok_or(SecondaryError::OutOfRange(p.gfn.guest_address()))?;
        if hva != p.hva || self.mmu.must_retry(&s, p.hva.0, p.seq) {
            drop(s);
            self.mmu.counters.retry();
            return Ok(false);
        }
        report_install(mm, &*self.mmu, p.hva.0, p.frame, p.write);
        s.sptes.insert(
            p.gfn,
            Spte {
                hva: p.hva,
                frame: p.frame,
                writable: p.write,
                // The guest faulted because it is accessing the page.
                accessed: true,
            },
        );
        self.mmu.counters.fill();
        Ok(true)
    }

    // ----- guest accesses -------------------------------------------------------------

    /// A guest access to frame `gfn`: reads it (`None`) or writes `Some(value)` through
    /// the shadow entry, with the lock held, faulting first if there is no entry (or only
    /// a read-only one for a write). Returns the data read, or the data written.
    ///
    /// Errors: those of [`fault_gfn`](Self::fault_gfn).
    pub fn guest_access(
        &self,
        gfn: impl Into<Gfn>,
        write: Option<u64>,
    ) -> Result<u64, SecondaryError> {
        let gfn = gfn.into();
        let mm = self.mm()?;
        let mut retry = self.start_fault();
        let mut faulted = false;
        loop {
            if faulted {
                retry.check()?;
            }
            {
                let mut s = self.mmu.lock.lock();
                if s.released {
                    return Err(SecondaryError::Gone);
                }
                if let Some(e) = s
                    .sptes
                    .get_mut(&gfn)
                    .filter(|e| e.writable || write.is_none())
                {
                    e.accessed = true;
                    let (hva, frame) = (e.hva, e.frame);
                    let v = device_access(&mm, &*self.mmu, hva.0, frame, write);
                    self.mmu.counters.access();
                    return Ok(v);
                }
            }
            // No usable entry. The fault installs one; an invalidation may drop it again
            // before we retake the lock, hence the loop (bounded by the same deadline).
            self.fault_gfn_in(&mm, gfn, write.is_some(), &mut retry)?;
            faulted = true;
        }
    }

    /// A guest read of frame `gfn` (see [`guest_access`](Self::guest_access)).
    pub fn guest_read(&self, gfn: impl Into<Gfn>) -> Result<u64, SecondaryError> {
        self.guest_access(gfn, None)
    }

    /// A guest write of `value` to frame `gfn` (see [`guest_access`](Self::guest_access)).
    pub fn guest_write(&self, gfn: impl Into<Gfn>, value: u64) -> Result<u64, SecondaryError> {
        self.guest_access(gfn, Some(value))
    }

    // ----- inspection and teardown ----------------------------------------------------

    /// The shadow entry of `gfn`, if any.
    pub fn spte(&self, gfn: impl Into<Gfn>) -> Option<Spte> {
        self.mmu.lock.lock().sptes.get(&gfn.into()).copied()
    }

    /// How many shadow entries there are.
    pub fn spte_count(&self) -> usize {
        self.mmu.lock.lock().sptes.len()
    }

    /// `mmu_invalidate_seq`: how many invalidations have ended since the VM was made.
    pub fn mmu_invalidate_seq(&self) -> u64 {
        self.mmu.seq.load(Relaxed)
    }

    /// `mmu_invalidate_in_progress`: invalidations started and not yet ended.
    pub fn invalidations_in_progress(&self) -> u64 {
        self.mmu.in_progress.load(Relaxed)
    }

    /// Guest TLB flushes (after entries were dropped, or accessed bits cleared by
    /// `clear_flush_young`).
    pub fn tlb_flushes(&self) -> u64 {
        self.mmu.tlb_flushes.load(Relaxed)
    }

    /// Whether the VM is still subscribed to its address space (not shut down).
    pub fn is_registered(&self) -> bool {
        self.registration.lock().is_some()
    }

    /// Tears the VM down: drops every shadow entry, refuses every later fault with
    /// [`SecondaryError::Gone`], and unregisters from the address space, waiting until
    /// none of its callbacks runs. Idempotent; dropping the last handle does it too.
    ///
    /// Called from inside a notifier callback of the same address space (where waiting
    /// for its callbacks would wait for itself), the entries are dropped at once and the
    /// unregistration is handed to a helper thread.
    pub fn shutdown(&self) {
        // The entries go first, so a deferred unregistration leaves nothing behind.
        self.mmu.retire();
        if let Some(reg) = self.registration.lock().take() {
            crate::unregister_outside_callbacks(reg, "kvm-unregister");
        }
    }
}

impl Drop for Kvm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl CheckedSecondary for Kvm {
    fn name(&self) -> &str {
        NAME
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        self.mmu.translations_in(start, end)
    }
}

impl SecondaryMmu for Kvm {
    /// A fault by host address: the guest frame is found through the memslots.
    fn fault(&self, addr: u64, write: bool) -> Result<(), SecondaryError> {
        let gfn = self
            .hva_to_gfn(addr)
            .ok_or(SecondaryError::OutOfRange(addr))?;
        self.fault_gfn(gfn, write)
    }

    /// An access by host address: the guest frame is found through the memslots.
    fn access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        let gfn = self
            .hva_to_gfn(addr)
            .ok_or(SecondaryError::OutOfRange(addr))?;
        self.guest_access(gfn, write)
    }

    fn stats(&self) -> SecondaryStats {
        self.mmu.counters.snapshot()
    }

    fn timeout_setting(&self) -> &FaultTimeout {
        &self.timeout
    }
}

// ----- helpers ------------------------------------------------------------------------

/// The first page of `[start, end)` no mapping covers, if any.
fn first_unmapped(mm: &AddressSpace, start: u64, end: u64) -> Option<u64> {
    let mut vmas = mm.vmas();
    vmas.sort_by_key(|v| v.start);
    let mut at = start;
    for v in vmas.iter().filter(|v| v.end > start && v.start < end) {
        if v.start > at {
            return Some(at);
        }
        at = at.max(v.end);
    }
    (at < end).then_some(at)
}
