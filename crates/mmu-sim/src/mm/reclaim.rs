//! Operations on pages that keep the layout, under the mmap lock held for reading:
//! `madvise`, reclaim and aging, migration, soft-dirty reset, device-exclusive access, and
//! the OOM reaper.

use std::time::Duration;

use mmu_notifier::{Event, OwnerToken, Range};

use super::{advised_range, check_range, page, AddressSpace, Invalidation};
use crate::error::SimError;
use crate::frame::{FrameAllocator, FrameRef, Pfn};
use crate::op::SimOp;
use crate::pagetable::{pte_index, Pte, PteKind, PAGE_SIZE, TASK_SIZE};
use crate::vma::Vma;

/// The advice of [`AddressSpace::madvise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages now; private memory reads back as zeroes (or the
    /// file's data), shared memory keeps its data in the page cache.
    DontNeed,
    /// `MADV_FREE` (private anonymous memory only): the pages may be dropped by reclaim
    /// unless written again first.
    Free,
    /// `MADV_PAGEOUT`: reclaim the pages now, used or not, each inside a `Clear`
    /// invalidation of the page (as [`AddressSpace::reclaim`] does with pages it does not
    /// keep). Pages mapped by another owner too (shared with a forked copy, or a file
    /// page another mapping maps) and the zero page are left alone, as Linux does.
    PageOut,
}

/// The frame an entry maps for reclaim and migration: present, or inaccessible
/// (`PROT_NONE`), which Linux's reverse map unmaps like any mapped page.
fn mapped(pte: Pte) -> Option<Pfn> {
    match pte.kind() {
        PteKind::Present(p) | PteKind::ProtNone(p) => Some(p),
        _ => None,
    }
}

/// What [`AddressSpace::reclaim`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimStats {
    /// Pages kept because the CPU or a secondary had used them since the last scan.
    pub referenced: usize,
    /// Pages swapped out (or dropped: lazy-free, or file pages left in the page cache).
    pub reclaimed: usize,
}

/// What one pass of the OOM reaper did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomReap {
    /// Private mappings whose pages were freed.
    pub reaped: usize,
    /// Private mappings skipped because a subscriber would have had to sleep.
    pub skipped: usize,
    /// The mmap lock was taken by someone else: nothing was tried.
    pub lock_contended: bool,
}

impl OomReap {
    /// Whether the pass reaped everything it could (no retry needed).
    pub fn is_complete(&self) -> bool {
        self.skipped == 0 && !self.lock_contended
    }
}

impl AddressSpace {
    /// Linux's `madvise` with `MADV_DONTNEED` or `MADV_FREE` over `[addr, addr + len)`:
    /// one `Clear` invalidation per mapping, over the advised part of it; with
    /// `MADV_PAGEOUT`, one `Clear` per page reclaimed.
    ///
    /// A zero length does nothing (as Linux). Errors: EINVAL for an unaligned or
    /// overflowing range, or `Free` on a shared or file mapping; ENOMEM if part of the
    /// range is not mapped (the mapped parts are still advised, as Linux does).
    pub fn madvise(&self, addr: u64, len: u64, advice: Advice) -> Result<(), SimError> {
        // As Linux: a length that overflows when rounded, or a wrapping end, is EINVAL;
        // a range reaching beyond user space just has no mapping there (ENOMEM below).
        let Some(end) = advised_range(addr, len, SimError::InvalidArgument("range overflows"))?
        else {
            return Ok(());
        };
        let vmas = self.mmap.read();
        let holes = !vmas.covers(addr, end);
        for vma in vmas.overlapping(addr, end) {
            let (s, e) = (vma.start.max(addr), vma.end.min(end));
            if advice == Advice::Free && (vma.shared || vma.file_page(s).is_some()) {
                return Err(SimError::InvalidArgument(
                    "MADV_FREE on a shared or file mapping",
                ));
            }
            let range = Range::new(s, e, Event::Clear).expect("non-empty");
            match advice {
                Advice::DontNeed => {
                    let inv = self.invalidate(range, SimOp::MadviseDontNeed);
                    self.zap(&inv, s, e);
                }
                Advice::Free => {
                    let inv = self.invalidate(range, SimOp::MadviseFree);
                    self.mark_lazyfree(&inv, s, e);
                }
                Advice::PageOut => self.page_out(vma, s, e),
            }
        }
        if holes {
            return Err(SimError::OutOfMemory);
        }
        Ok(())
    }

    /// `MADV_PAGEOUT` over `[start, end)` inside `vma`: every page only this entry maps
    /// is reclaimed, referenced or not.
    fn page_out(&self, vma: &Vma, start: u64, end: u64) {
        for a in (start..end).step_by(PAGE_SIZE as usize) {
            let pte = self.pt.pte(a);
            let Some(p) = mapped(pte) else {
                continue;
            };
            if FrameAllocator::is_zero_page(p) {
                continue;
            }
            // Mappings of the frame: its references less the page cache's own.
            let cache = vma
                .file_page(a)
                .is_some_and(|(file, index)| file.cached(index) == Some(p));
            if self.frames.refs(p) - u32::from(cache) > 1 {
                continue;
            }
            self.reclaim_page(vma, a, pte);
        }
    }

    fn mark_lazyfree(&self, inv: &Invalidation<'_>, start: u64, end: u64) {
        let mut slots = Vec::new();
        self.pt.for_each_leaf(start, end, |_, leaf, idx| {
            for pte in &mut leaf[idx] {
                match pte.kind() {
                    PteKind::Present(p) | PteKind::ProtNone(p)
                        if !FrameAllocator::is_zero_page(p) && self.frames.refs(p) == 1 =>
                    {
                        *pte = pte.to_lazyfree();
                    }
                    PteKind::Swap(s) => {
                        slots.push(s);
                        *pte = Pte::default();
                    }
                    _ => {}
                }
            }
        });
        inv.flush(start, end);
        for s in slots {
            self.frames.swap_put(s);
        }
    }

    // ----- aging and reclaim --------------------------------------------------------

    /// Clears the accessed bit of the entry at `addr`; returns whether it was set.
    fn clear_accessed(&self, addr: u64) -> bool {
        let Some(leaf) = self.pt.leaf(addr) else {
            return false;
        };
        let mut ptes = leaf.lock();
        let i = pte_index(addr);
        let young = mapped(ptes[i]).is_some() && ptes[i].accessed();
        if young {
            ptes[i] = ptes[i].old();
        }
        young
    }

    /// Reclaim of `[start, end)`, as kswapd would: each present page the CPU or a
    /// secondary used since the last scan (its accessed bit, and `clear_flush_young` on
    /// the notifier) is kept and aged; the others are reclaimed, each inside a `Clear`
    /// invalidation of the page: private anonymous pages are swapped out (or dropped if
    /// lazy-free and clean), file pages are unmapped and stay in the page cache.
    pub fn reclaim(&self, start: u64, end: u64) -> Result<ReclaimStats, SimError> {
        if end <= start {
            return Err(SimError::InvalidArgument("empty range"));
        }
        check_range(start, end - start)?;
        let vmas = self.mmap.read();
        let mut stats = ReclaimStats::default();
        for vma in vmas.overlapping(start, end) {
            for a in (vma.start.max(start)..vma.end.min(end)).step_by(PAGE_SIZE as usize) {
                let pte = self.pt.pte(a);
                match mapped(pte) {
                    Some(p) if !FrameAllocator::is_zero_page(p) => {}
                    _ => continue,
                }
                let cpu = self.clear_accessed(a);
                let secondary = self.notify && self.notifier.clear_flush_young(a, a + PAGE_SIZE);
                if cpu || secondary {
                    stats.referenced += 1;
                } else if self.reclaim_page(vma, a, pte) {
                    stats.reclaimed += 1;
                }
            }
        }
        Ok(stats)
    }

    fn reclaim_page(&self, vma: &Vma, addr: u64, seen: Pte) -> bool {
        let Some(pfn) = mapped(seen) else {
            return false;
        };
        let inv = self.invalidate(page(addr), SimOp::Reclaim);
        let leaf = self.pt.leaf(addr).expect("had an entry");
        let i = pte_index(addr);
        let mut ptes = leaf.lock();
        if mapped(ptes[i]) != Some(pfn) {
            return false;
        }
        if vma
            .file_page(addr)
            .is_some_and(|(file, index)| file.cached(index) == Some(pfn))
        {
            // The page cache's own page, clean there: just unmap. (A private copy of a
            // file page is anonymous memory and is swapped like any other.)
            ptes[i] = Pte::default();
            drop(ptes);
            inv.flush(addr, addr + PAGE_SIZE);
            self.frames.put(pfn);
            return true;
        }
        let busy = ptes[i].to_busy();
        ptes[i] = busy;
        drop(ptes);
        inv.flush(addr, addr + PAGE_SIZE);
        let data = self.frames.read(pfn);
        let mut ptes = leaf.lock();
        if ptes[i] == busy {
            ptes[i] = if busy.lazyfree() && !busy.dirty() {
                Pte::default()
            } else {
                busy.to_swap(self.frames.swap_store(data))
            };
        }
        drop(ptes);
        self.frames.put(pfn);
        true
    }

    /// Idle-page tracking / multi-generational LRU aging of `[start, end)`: clears the
    /// accessed state in the primary and in every secondary (`clear_young`, no flush).
    /// Returns how many pages were young.
    pub fn age(&self, start: u64, end: u64) -> Result<usize, SimError> {
        if end <= start {
            return Err(SimError::InvalidArgument("empty range"));
        }
        check_range(start, end - start)?;
        let vmas = self.mmap.read();
        let mut young = 0;
        for vma in vmas.overlapping(start, end) {
            for a in (vma.start.max(start)..vma.end.min(end)).step_by(PAGE_SIZE as usize) {
                if !self.pt.pte(a).present() {
                    continue;
                }
                let cpu = self.clear_accessed(a);
                let secondary = self.notify && self.notifier.clear_young(a, a + PAGE_SIZE);
                young += usize::from(cpu || secondary);
            }
        }
        Ok(young)
    }

    /// Whether the page at `addr` was used since it was last aged, by the CPU or a
    /// secondary (`test_young`); clears nothing.
    pub fn test_young(&self, addr: u64) -> bool {
        let vmas = self.mmap.read();
        if vmas.find(addr).is_none() {
            return false;
        }
        let pte = self.pt.pte(addr);
        pte.present()
            && (pte.accessed()
                || (self.notify && self.notifier.test_young(addr & !(PAGE_SIZE - 1))))
    }

    // ----- migration ----------------------------------------------------------------

    /// Migrates the page at `addr` to a new frame (compaction or NUMA balancing): a
    /// `Clear` invalidation of the page; the data follows. Returns the new frame.
    ///
    /// Errors: EFAULT if not mapped; EBUSY if the page is not present, is the zero page,
    /// is in the page cache, or is shared with a forked copy (the simulation has no reverse
    /// map to find the other owner's entry).
    pub fn migrate(&self, addr: u64) -> Result<FrameRef, SimError> {
        let vmas = self.mmap.read();
        vmas.find(addr).ok_or(SimError::Fault(addr))?;
        let old = self.migratable(addr)?;
        let new = self.frames.alloc(0)?;
        let inv = self.invalidate(page(addr), SimOp::Migrate);
        let moved = self.move_page(&inv, addr, old, new);
        drop(inv);
        if moved {
            Ok(self.frames.frame_ref(new))
        } else {
            Err(SimError::Busy(addr))
        }
    }

    /// Migrates every movable page of `[start, end)` to new frames for a device
    /// (`migrate_vma_setup`): one `Migrate` invalidation over the range carrying the
    /// device's `owner` token, so the device can recognise its own migration. Returns the
    /// pages moved with their new frames.
    pub fn migrate_range(
        &self,
        start: u64,
        end: u64,
        owner: OwnerToken,
    ) -> Result<Vec<(u64, FrameRef)>, SimError> {
        if end <= start {
            return Err(SimError::InvalidArgument("empty range"));
        }
        check_range(start, end - start)?;
        let vmas = self.mmap.read();
        if !vmas.covers(start, end) {
            return Err(SimError::Fault(start));
        }
        let range = Range::new(start, end, Event::Migrate)
            .expect("non-empty")
            .with_owner(owner);
        let inv = self.invalidate(range, SimOp::MigrateRange);
        let mut moved = Vec::new();
        for vma in vmas.overlapping(start, end) {
            for a in (vma.start.max(start)..vma.end.min(end)).step_by(PAGE_SIZE as usize) {
                let Ok(old) = self.migratable(a) else {
                    continue;
                };
                let new = self.frames.alloc(0)?;
                if self.move_page(&inv, a, old, new) {
                    moved.push((a, self.frames.frame_ref(new)));
                }
            }
        }
        drop(inv);
        Ok(moved)
    }

    fn migratable(&self, addr: u64) -> Result<Pfn, SimError> {
        match mapped(self.pt.pte(addr)) {
            Some(p)
                // One reference: only this entry has it (a page-cache page also has
                // the cache's reference, a forked page the other entry's).
                if !FrameAllocator::is_zero_page(p) && self.frames.refs(p) == 1 =>
            {
                Ok(p)
            }
            _ => Err(SimError::Busy(addr)),
        }
    }

    /// Moves the page at `addr` from `old` to `new` inside `inv`: busy, flush, copy,
    /// install. Consumes both frame references either way.
    fn move_page(&self, inv: &Invalidation<'_>, addr: u64, old: Pfn, new: Pfn) -> bool {
        let leaf = self.pt.leaf(addr).expect("had an entry");
        let i = pte_index(addr);
        let mut ptes = leaf.lock();
        if mapped(ptes[i]) != Some(old) {
            drop(ptes);
            self.frames.put(new);
            return false;
        }
        let inaccessible = matches!(ptes[i].kind(), PteKind::ProtNone(_));
        let busy = ptes[i].to_busy();
        ptes[i] = busy;
        drop(ptes);
        inv.flush(addr, addr + PAGE_SIZE);
        self.frames.write(new, self.frames.read(old));
        let mut ptes = leaf.lock();
        let moved = ptes[i] == busy;
        if moved {
            ptes[i] = busy.to_present(new);
            if inaccessible {
                ptes[i] = ptes[i].to_prot_none();
            }
        }
        drop(ptes);
        if !moved {
            // Zapped while busy: the page is gone; drop the copy too.
            self.frames.put(new);
        }
        self.frames.put(old);
        moved
    }

    // ----- soft-dirty and device-exclusive ------------------------------------------

    /// Soft-dirty reset (`echo 4 > /proc/PID/clear_refs`): one `SoftDirty` invalidation
    /// over the whole address space while every entry loses its soft-dirty bit and is
    /// write-protected, so the next write faults and marks it again.
    pub fn clear_soft_dirty(&self) {
        let vmas = self.mmap.read();
        let inv = self.invalidate(Range::everything(Event::SoftDirty), SimOp::SoftDirtyReset);
        for vma in vmas.iter() {
            self.pt.for_each_leaf(vma.start, vma.end, |_, leaf, idx| {
                for pte in &mut leaf[idx] {
                    match pte.kind() {
                        PteKind::Present(_) => *pte = pte.soft_clean().with_writable(false),
                        PteKind::Swap(_) | PteKind::ProtNone(_) => *pte = pte.soft_clean(),
                        _ => {}
                    }
                }
            });
        }
        inv.flush(0, TASK_SIZE);
    }

    /// Gives a device exclusive access to the page at `addr` (Linux's
    /// `make_device_exclusive_range`): faults it in for writing (breaking COW), then an
    /// `Exclusive` invalidation of the page carrying the device's `owner` replaces the
    /// entry with a device-exclusive one. The next CPU access restores it with an
    /// `Exclusive` invalidation without owner. Returns the frame the device may use.
    ///
    /// Errors: EFAULT if not mapped, permission if not writable.
    pub fn make_exclusive(&self, addr: u64, owner: OwnerToken) -> Result<FrameRef, SimError> {
        let vmas = self.mmap.read();
        let addr = addr & !(PAGE_SIZE - 1);
        loop {
            let (ptes, i) = self.fault_locked(&vmas, addr, true)?;
            let seen = ptes[i];
            drop(ptes);
            let range = Range::new(addr, addr + PAGE_SIZE, Event::Exclusive)
                .expect("one page")
                .with_owner(owner);
            let inv = self.invalidate(range, SimOp::MakeExclusive);
            let leaf = self.pt.leaf(addr).expect("faulted");
            let mut ptes = leaf.lock();
            if ptes[i].same_mapping(seen) {
                ptes[i] = ptes[i].to_exclusive();
                drop(ptes);
                inv.flush(addr, addr + PAGE_SIZE);
                let pfn = seen.pfn().expect("present");
                return Ok(self.frames.frame_ref(pfn));
            }
        }
    }

    // ----- OOM reaper ---------------------------------------------------------------

    /// One pass of the OOM reaper (Linux's `__oom_reap_task_mm`): without waiting for the
    /// mmap lock, frees the pages of every private mapping, each inside a non-blockable
    /// `Unmap` invalidation of the mapping. A mapping whose invalidation would block
    /// (a subscriber answered `WouldBlock`) is skipped for a later pass.
    pub fn oom_reap(&self) -> OomReap {
        let Some(vmas) = self.mmap.try_read() else {
            return OomReap {
                lock_contended: true,
                ..OomReap::default()
            };
        };
        let mut r = OomReap::default();
        for vma in vmas.iter().filter(|v| !v.shared) {
            let range = Range::new(vma.start, vma.end, Event::Unmap).expect("non-empty");
            match self.try_invalidate(range, SimOp::OomReap) {
                Ok(inv) => {
                    self.zap(&inv, vma.start, vma.end);
                    r.reaped += 1;
                }
                Err(_) => r.skipped += 1,
            }
        }
        r
    }

    /// The OOM reaper's retry loop: passes until one is complete, at most `attempts`,
    /// sleeping `delay` between them (Linux: 10 attempts, 100 ms apart). Returns the last
    /// pass.
    pub fn oom_reap_with_retries(&self, attempts: u32, delay: Duration) -> OomReap {
        let mut last = OomReap::default();
        for n in 0..attempts.max(1) {
            if n > 0 {
                std::thread::sleep(delay);
            }
            last = self.oom_reap();
            if last.is_complete() {
                break;
            }
        }
        last
    }
}
