//! The address space: layout (VMAs) under the mmap lock, translations in the page table
//! under page-table locks, frames from a shared pool, and the notifier subscriptions that
//! every change of a translation is announced to.
//!
//! # Locking (as in Linux)
//! - `mmap`: a read/write lock over the VMA layout. Faults, get-user-pages, snapshots,
//!   `madvise`, reclaim, migration, soft-dirty reset and device-exclusive access take it
//!   for reading, so they run in parallel; layout changes (`mmap`, `munmap`, `mprotect`,
//!   `mremap`, `fork`, exit) take it for writing. The OOM reaper only tries to take it.
//! - page-table locks: one per last-level table; taken to read or change its entries.
//! - Notifier callbacks run with the mmap lock held as Linux holds it, but never with a
//!   page-table lock held. So a callback may read entries ([`AddressSpace::pte`]), and a
//!   secondary may take its own lock and then a page-table lock (install and access
//!   checks do); it must not take the mmap lock inside a callback (Linux's rule too: a
//!   callback under `munmap` would deadlock on it). Secondaries fault pages in from their
//!   own threads.
//!
//! # Ordering of an invalidation
//! Every operation that changes or drops a translation brackets the change with an
//! invalidation: `invalidate_range_start` returns before any entry in the range changes
//! and before any frame in it is freed; the TLB flush (which calls
//! `arch_invalidate_secondary_tlbs`) follows the clearing or downgrading of the entries;
//! frames are freed after the flush, before `invalidate_range_end` (the spec allows either
//! side of `end`).
//!
//! # Busy entries
//! An operation that must copy a page's data while no one writes it (COW break,
//! migration, swap-out) turns the entry *busy* under the page-table lock, flushes, copies,
//! and installs the result under the lock again. A fault that meets a busy entry waits
//! for it (Linux waits on a migration entry or the page lock). The busy entry's frame
//! reference belongs to the operation that set it: a concurrent zap (`madvise`) just
//! clears the entry, and the owner, finding its entry gone when it comes back, drops the
//! frames it holds.

mod exclusive;
mod layout;
mod madvise;
mod migrate;
mod oom;
mod reclaim;
mod soft_dirty;

use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, OnceLock};

use mmu_notifier::{Event, InvalidateGuard, Range, Subscriptions, WouldBlock};
use parking_lot::RwLock;

use crate::addr::{Len, VirtAddr};
use crate::checker::Checker;
use crate::error::SimError;
use crate::frame::{FrameAllocator, FrameRef, Pfn};
use crate::op::SimOp;
use crate::pagetable::{
    pte_index, Leaf, LeafGuard, PageOrder, PageTable, Pte, PteKind, PAGE_SIZE, TASK_SIZE,
};
use crate::vma::{Vma, VmaMap};

pub use layout::{MapKind, MremapFlags};
pub use madvise::Advice;
pub use oom::OomReap;
pub use reclaim::ReclaimStats;

/// Lowest address `mmap` hands out without a hint (like `mmap_min_addr`).
pub const MMAP_MIN_ADDR: u64 = 0x10000;

/// One simulated process address space.
pub struct AddressSpace {
    mmap: RwLock<VmaMap>,
    pt: PageTable,
    frames: Arc<FrameAllocator>,
    notifier: Subscriptions,
    /// False only to measure the cost of the notifier calls: then none is made.
    notify: bool,
    checker: OnceLock<Arc<Checker>>,
    exited: AtomicBool,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("vmas", &self.mmap.read().len())
            .field("notifier", &self.notifier)
            .finish()
    }
}

/// What [`AddressSpace::snapshot`] reports for one page (as `hmm_range_fault` does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// No frame mapped (never touched, swapped out, or device-exclusive).
    None,
    /// The shared zero page, read-only.
    Zero(FrameRef),
    /// A frame.
    Present {
        /// The frame as it is now.
        frame: FrameRef,
        /// Whether the primary allows writes through its entry.
        writable: bool,
    },
}

/// Whether [`AddressSpace::snapshot`] faults pages in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SnapshotMode {
    /// Report what is there; fault nothing.
    Peek,
    /// Fault in pages that are not present (as `HMM_PFN_REQ_FAULT`).
    Fault,
    /// Fault in pages that are not present or not writable (as `HMM_PFN_REQ_WRITE`).
    FaultWrite,
}

/// Checks an address and length as `munmap` does (EINVAL for unaligned, empty,
/// overflowing or beyond user space); returns the page-aligned end.
pub(crate) fn check_range(addr: VirtAddr, len: Len) -> Result<u64, SimError> {
    if !addr.is_page_aligned() {
        return Err(SimError::InvalidArgument("address not page aligned"));
    }
    if len.is_zero() {
        return Err(SimError::InvalidArgument("zero length"));
    }
    let len = len
        .page_up()
        .ok_or(SimError::InvalidArgument("length overflows"))?;
    let end = addr
        .checked_add(len)
        .ok_or(SimError::InvalidArgument("range overflows"))?;
    if end.get() > TASK_SIZE {
        return Err(SimError::InvalidArgument("range beyond user space"));
    }
    Ok(end.get())
}

/// Checks a start and an end as the calls taking both do: EINVAL for an empty or
/// reversed range, then [`check_range`]'s checks.
pub(crate) fn check_span(start: VirtAddr, end: VirtAddr) -> Result<(), SimError> {
    match end.checked_since(start) {
        Some(len) if !len.is_zero() => check_range(start, len).map(|_| ()),
        _ => Err(SimError::InvalidArgument("empty range")),
    }
}

/// The argument checks `mprotect` and `madvise` share (Linux's): EINVAL for an unaligned
/// start; `None` for a zero length (nothing to do, not an error); else the end of the
/// page-rounded range, or `wrapped` if it wraps.
pub(crate) fn advised_range(
    addr: VirtAddr,
    len: Len,
    wrapped: SimError,
) -> Result<Option<u64>, SimError> {
    if !addr.is_page_aligned() {
        return Err(SimError::InvalidArgument("address not page aligned"));
    }
    if len.is_zero() {
        return Ok(None);
    }
    len.page_up()
        .and_then(|l| addr.checked_add(l))
        .map(|end| Some(end.get()))
        .ok_or(wrapped)
}

/// A `Clear` of the mapping of size `order` containing `addr` (the extent of the entry
/// that maps `addr`).
pub(crate) fn clear_of(addr: u64, order: PageOrder) -> Range {
    let (start, end) = order.span(addr);
    Range::new(start, end, Event::Clear).expect("a whole mapping")
}

/// One invalidation in progress, made by the primary: the notifier's guard (its drop is
/// `invalidate_range_end`) and the checker's window.
pub(crate) struct Invalidation<'a> {
    mm: &'a AddressSpace,
    op: SimOp,
    window: Option<u64>,
    // Declared last: dropped after the window closes.
    guard: Option<InvalidateGuard<'a>>,
}

impl Invalidation<'_> {
    /// The TLB flush of what one entry of size `order` maps at `addr`, after it was
    /// cleared or downgraded.
    pub(crate) fn flush_mapping(&self, addr: u64, order: PageOrder) {
        let (start, end) = order.span(addr);
        self.flush(start, end);
    }

    /// The TLB flush of `[start, end)` after entries in it were cleared or downgraded.
    pub(crate) fn flush(&self, start: u64, end: u64) {
        // Through the invalidation's own guard (set exactly when the notifier is on): the
        // flush reuses its snapshot and read-side section instead of entering another.
        if let Some(guard) = &self.guard {
            guard.arch_invalidate_secondary_tlbs(start, end.min(TASK_SIZE));
        }
        if let Some(c) = self.mm.checker.get() {
            c.flushed(self.mm, start, end.min(TASK_SIZE), self.op);
        }
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        if let (Some(c), Some(id)) = (self.mm.checker.get(), self.window) {
            c.closing(id);
        }
        // `guard` drops next: invalidate_range_end.
    }
}

impl AddressSpace {
    /// An empty address space drawing frames from `frames`.
    pub fn new(frames: Arc<FrameAllocator>) -> Arc<Self> {
        Self::build(frames, true)
    }

    /// An address space that makes no notifier call at all, to measure what the calls
    /// cost (the `fault_munmap` benchmark). Nothing can subscribe to it usefully.
    pub fn without_notifier(frames: Arc<FrameAllocator>) -> Arc<Self> {
        Self::build(frames, false)
    }

    fn build(frames: Arc<FrameAllocator>, notify: bool) -> Arc<Self> {
        Arc::new(Self {
            mmap: RwLock::new(VmaMap::default()),
            pt: PageTable::new(),
            frames,
            notifier: Subscriptions::new(),
            notify,
            checker: OnceLock::new(),
            exited: AtomicBool::new(false),
        })
    }

    /// Attaches the coherence checker (once); it is told of every invalidation and flush
    /// from now on. Returns the checker back if one is already attached.
    pub fn attach_checker(&self, checker: Arc<Checker>) -> Result<(), Arc<Checker>> {
        self.checker.set(checker)
    }

    /// The attached checker.
    pub fn checker(&self) -> Option<&Arc<Checker>> {
        self.checker.get()
    }

    /// The notifier subscriptions of this address space (for secondaries to subscribe).
    pub fn notifier(&self) -> &Subscriptions {
        &self.notifier
    }

    /// The frame pool.
    pub fn frames(&self) -> &Arc<FrameAllocator> {
        &self.frames
    }

    /// The page-table entry for `addr` (takes only its page-table lock).
    pub fn pte(&self, addr: impl Into<VirtAddr>) -> Pte {
        self.pt.pte(addr.into().get())
    }

    /// Runs `f` on the entry that maps `addr` with its page-table lock held (an absent
    /// table reads as an empty entry).
    pub(crate) fn with_pte_locked<R>(&self, addr: u64, f: impl FnOnce(Pte) -> R) -> R {
        match self.pt.leaf(addr) {
            Some(leaf) => f(Leaf::entry(&leaf.lock(), addr)),
            None => f(Pte::default()),
        }
    }

    /// A snapshot of the mappings.
    pub fn vmas(&self) -> Vec<Vma> {
        self.mmap.read().iter().cloned().collect()
    }

    // ----- invalidations ------------------------------------------------------------

    /// Starts a blockable invalidation of `range` for the primary operation `op`.
    pub(crate) fn invalidate(&self, range: Range, op: SimOp) -> Invalidation<'_> {
        let guard = self
            .notify
            .then(|| self.notifier.invalidate_range_start(range));
        Invalidation {
            mm: self,
            op,
            window: self.checker.get().map(|c| c.opened(&range, op)),
            guard,
        }
    }

    /// Starts a non-blockable invalidation; `Err` if a subscriber would have to sleep.
    pub(crate) fn try_invalidate(
        &self,
        range: Range,
        op: SimOp,
    ) -> Result<Invalidation<'_>, WouldBlock> {
        let guard = if self.notify {
            Some(self.notifier.try_invalidate_range_start(range)?)
        } else {
            None
        };
        Ok(Invalidation {
            mm: self,
            op,
            window: self.checker.get().map(|c| c.opened(&range, op)),
            guard,
        })
    }

    // ----- faults -------------------------------------------------------------------

    /// A page fault at `addr` (a CPU access, or get-user-pages for a secondary): maps a
    /// frame if none is mapped (the zero page for a read of untouched anonymous private
    /// memory), breaks COW on a write to a shared or zero page, swaps in, restores a
    /// device-exclusive page, marks the entry accessed (and dirty on a write), and returns
    /// the frame without pinning it.
    pub fn fault(&self, addr: impl Into<VirtAddr>, write: bool) -> Result<FrameRef, SimError> {
        let addr = addr.into().get();
        let vmas = self.mmap.read();
        let (ptes, i) = self.fault_locked(&vmas, addr, write)?;
        let pfn = ptes[i].pfn().expect("fault leaves the entry present");
        Ok(self.frames.frame_ref(pfn))
    }

    /// Reads the data word of the page at `addr` as the CPU would (faulting it in).
    pub fn read(&self, addr: impl Into<VirtAddr>) -> Result<u64, SimError> {
        let addr = addr.into().get();
        let vmas = self.mmap.read();
        let (ptes, i) = self.fault_locked(&vmas, addr, false)?;
        Ok(self.frames.read(ptes[i].pfn().expect("present")))
    }

    /// Writes the data word of the page at `addr` as the CPU would (faulting it in).
    pub fn write(&self, addr: impl Into<VirtAddr>, value: u64) -> Result<(), SimError> {
        let addr = addr.into().get();
        let vmas = self.mmap.read();
        let (ptes, i) = self.fault_locked(&vmas, addr, true)?;
        self.frames.write(ptes[i].pfn().expect("present"), value);
        Ok(())
    }

    /// Get-user-pages without pinning: faults in `n` pages from `start` (for writing if
    /// `write`, breaking COW) and returns their frames. Nothing keeps them mapped: a
    /// secondary that keeps one must be subscribed to hear when it goes.
    pub fn get_user_pages(
        &self,
        start: impl Into<VirtAddr>,
        n: u64,
        write: bool,
    ) -> Result<Vec<FrameRef>, SimError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        // The page containing an unaligned start, as Linux.
        let start = start.into().page_down();
        let end = check_range(start, Len::new(n.saturating_mul(PAGE_SIZE)))?;
        let start = start.get();
        let vmas = self.mmap.read();
        (start..end)
            .step_by(PAGE_SIZE as usize)
            .map(|a| {
                let (ptes, i) = self.fault_locked(&vmas, a, write)?;
                Ok(self.frames.frame_ref(ptes[i].pfn().expect("present")))
            })
            .collect()
    }

    /// A per-page snapshot of `[start, end)` as `hmm_range_fault` reports it, faulting
    /// pages in first as `mode` asks. Unmapped addresses are `Fault` (EFAULT); faulting
    /// where the mapping forbids the access is `Permission`.
    pub fn snapshot(
        &self,
        start: impl Into<VirtAddr>,
        end: impl Into<VirtAddr>,
        mode: SnapshotMode,
    ) -> Result<Vec<PageState>, SimError> {
        let (start, end) = (start.into(), end.into());
        check_span(start, end)?;
        let (start, end) = (start.get(), end.get());
        let vmas = self.mmap.read();
        let mut out = Vec::with_capacity(((end - start) / PAGE_SIZE) as usize);
        for a in (start..end).step_by(PAGE_SIZE as usize) {
            let vma = vmas.find(a).ok_or(SimError::Fault(a))?;
            let pte = self.pt.pte(a);
            let want_write = mode == SnapshotMode::FaultWrite;
            let must_fault =
                mode != SnapshotMode::Peek && (!pte.present() || (want_write && !pte.writable()));
            let pte = if must_fault {
                let (ptes, i) = self.fault_locked(&vmas, a, want_write)?;
                ptes[i]
            } else if !vma.prot.read {
                Pte::default()
            } else {
                pte
            };
            out.push(match pte.pfn() {
                None => PageState::None,
                Some(p) if FrameAllocator::is_zero_page(p) => {
                    PageState::Zero(self.frames.frame_ref(p))
                }
                Some(p) => PageState::Present {
                    frame: self.frames.frame_ref(p),
                    writable: pte.writable() && vma.prot.write,
                },
            });
        }
        Ok(out)
    }

    /// The fault handler: returns with the entry for `addr` present (and writable if
    /// `write`) and its page-table lock held. The caller holds the mmap lock for reading.
    fn fault_locked<'a>(
        &'a self,
        vmas: &VmaMap,
        addr: u64,
        write: bool,
    ) -> Result<(LeafGuard<'a>, usize), SimError> {
        let addr = addr & !(PAGE_SIZE - 1);
        let vma = vmas.find(addr).ok_or(SimError::Fault(addr))?;
        if !vma.prot.read || (write && !vma.prot.write) {
            return Err(SimError::Permission(addr));
        }
        if write && !vma.shared {
            vma.prepare_anon(vmas);
        }
        let leaf = self.pt.leaf_or_alloc(addr);
        let i = pte_index(addr);
        loop {
            let mut ptes = leaf.lock();
            let pte = ptes[i];
            match pte.kind() {
                PteKind::None => {
                    ptes[i] = self.new_page(vma, addr, write)?;
                }
                PteKind::Present(pfn) => {
                    if write && !pte.writable() {
                        // Upgrading needs no invalidation (nothing stale can exist); a
                        // page shared with another owner must be copied first.
                        let reuse = vma.shared
                            || (!FrameAllocator::is_zero_page(pfn) && self.frames.refs(pfn) == 1);
                        if !reuse {
                            drop(ptes);
                            self.break_cow(vma, addr, pte)?;
                            continue;
                        }
                        ptes[i] = pte.with_writable(true);
                    }
                }
                PteKind::Busy(_) => {
                    drop(ptes);
                    std::thread::yield_now();
                    continue;
                }
                PteKind::Swap(slot) => {
                    drop(ptes);
                    self.swap_in(vma, addr, pte, slot)?;
                    continue;
                }
                PteKind::Exclusive(_) => {
                    drop(ptes);
                    self.restore_exclusive(addr);
                    continue;
                }
                // Only while an mprotect away from PROT_NONE is between the VMA and the
                // entries (it holds the mmap lock for writing, so never seen here); made
                // readable as that mprotect would.
                PteKind::ProtNone(p) => {
                    ptes[i] = pte.to_present(p);
                    continue;
                }
            }
            ptes[i].touch(write);
            return Ok((ptes, i));
        }
    }

    /// The entry for a first touch of `addr` (called under its page-table lock).
    fn new_page(&self, vma: &Vma, addr: u64, write: bool) -> Result<Pte, SimError> {
        if let Some((file, index)) = vma.file_page(addr) {
            if !file.contains_page(index) {
                return Err(SimError::Bus(addr));
            }
        }
        Ok(match (vma.file_page(addr), vma.shared) {
            (Some((file, index)), true) => Pte::new(file.get_page(index)?, vma.prot.write),
            (Some((file, index)), false) if !write => Pte::new(file.get_page(index)?, false),
            (Some((file, index)), false) => {
                vma.mark_anon();
                let cached = file.get_page(index)?;
                let copy = self.frames.alloc(self.frames.read(cached));
                self.frames.put(cached);
                Pte::new(copy?, true)
            }
            (None, _) if !write => Pte::new(FrameAllocator::ZERO_PAGE, false),
            (None, _) => {
                vma.mark_anon();
                Pte::new(self.frames.alloc(0)?, true)
            }
        })
    }

    /// Write fault on a page shared with another owner (Linux's `wp_page_copy`): copy it
    /// to a new frame inside a `Clear` invalidation of the page.
    fn break_cow(&self, vma: &Vma, addr: u64, seen: Pte) -> Result<(), SimError> {
        let old = seen.pfn().expect("present");
        let new = self.frames.alloc(self.frames.read(old))?;
        vma.mark_anon();
        let inv = self.invalidate(clear_of(addr, seen.order()), SimOp::CowBreak);
        let leaf = self.pt.leaf(addr).expect("faulted");
        let i = pte_index(addr);
        let mut ptes = leaf.lock();
        // Someone else may have broken it, or zapped it, since.
        if ptes[i].pfn() != Some(old) || ptes[i].writable() {
            drop(ptes);
            self.frames.put(new);
            return Ok(());
        }
        let busy = ptes[i].to_busy();
        ptes[i] = busy;
        drop(ptes);
        inv.flush_mapping(addr, busy.order());
        // Copy again now that no one can write the old frame (a shared-table TLB could
        // until the flush).
        self.frames.write(new, self.frames.read(old));
        let mut ptes = leaf.lock();
        if ptes[i] == busy {
            ptes[i] = busy.to_present(new).with_writable(vma.prot.write);
            drop(ptes);
        } else {
            // Zapped while busy: the page is gone; drop our copy.
            drop(ptes);
            self.frames.put(new);
        }
        self.frames.put(old);
        drop(inv);
        Ok(())
    }

    /// Fault on a swap entry (Linux's `do_swap_page`; no invalidation: nothing was
    /// mapped). The slot's page comes through the swap cache: a slot still referenced by
    /// another entry (a forked copy) keeps the page cached, so every owner maps the same
    /// frame and it is mapped read-only while it is shared; a write then copies it (a COW
    /// break with its `Clear`), as Linux does. The last owner to swap in frees the slot
    /// and its page becomes private (writable, no copy on write).
    fn swap_in(&self, vma: &Vma, addr: u64, seen: Pte, slot: u32) -> Result<(), SimError> {
        let pfn = self.frames.swap_in_frame(slot)?;
        let leaf = self.pt.leaf(addr).expect("has a swap entry");
        let mut ptes = leaf.lock();
        let i = pte_index(addr);
        if ptes[i] == seen {
            self.frames.swap_put(slot);
            // Writable only if this entry is the page's only owner now.
            let exclusive = self.frames.refs(pfn) == 1;
            ptes[i] = seen
                .to_present(pfn)
                .with_writable(vma.prot.write && exclusive);
            drop(ptes);
        } else {
            drop(ptes);
            self.frames.put(pfn);
        }
        Ok(())
    }

    // ----- teardown -------------------------------------------------------------------

    /// Clears every entry of `[start, end)` (the caller has started an invalidation of
    /// it), flushes, and frees what the entries held. Busy entries are cleared without
    /// touching their frame: it belongs to the operation that made them busy.
    pub(crate) fn zap(&self, inv: &Invalidation<'_>, start: u64, end: u64) {
        let mut frames: Vec<Pfn> = Vec::new();
        let mut slots: Vec<u32> = Vec::new();
        self.pt.for_each_leaf(start, end, |_, leaf, idx| {
            for pte in &mut leaf[idx] {
                match pte.kind() {
                    PteKind::None => continue,
                    PteKind::Present(p) | PteKind::Exclusive(p) | PteKind::ProtNone(p) => {
                        frames.push(p)
                    }
                    PteKind::Swap(s) => slots.push(s),
                    PteKind::Busy(_) => {}
                }
                *pte = Pte::default();
            }
        });
        if !frames.is_empty() {
            inv.flush(start, end);
        }
        for p in frames {
            self.frames.put(p);
        }
        for s in slots {
            self.frames.swap_put(s);
        }
    }

    /// Process exit (Linux's `exit_mmap`): the notifier release first, then one `Unmap`
    /// invalidation over the whole address space, freeing every frame. Dropping the last
    /// handle exits too. Release happens once; a later call (or the drop) unmaps whatever
    /// was mapped since, so nothing leaks.
    pub fn exit(&self) {
        let again = self.exited.swap(true, AcqRel);
        if self.notify && !again {
            self.notifier.release();
        }
        let mut vmas = self.mmap.write();
        if again && vmas.is_empty() {
            return;
        }
        *vmas = VmaMap::default();
        let inv = self.invalidate(Range::everything(Event::Unmap), SimOp::Exit);
        self.zap(&inv, 0, TASK_SIZE);
        drop(inv);
    }

    /// Whether [`exit`](Self::exit) has run.
    pub fn has_exited(&self) -> bool {
        self.exited.load(Acquire)
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        self.exit();
    }
}
