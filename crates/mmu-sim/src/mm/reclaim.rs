//! Reclaim and aging, under the mmap lock held for reading.
//!
//! # What Linux does
//! Reclaim (kswapd, direct reclaim, `MADV_PAGEOUT`) asks of each page whether it was used
//! since the last scan: its accessed bit in every entry mapping it, and through the
//! notifier `clear_flush_young` for the secondaries. A used page is kept and aged; an
//! unused one is unmapped from every entry inside a `Clear` invalidation of the page,
//! then written to swap (a private anonymous page; a clean lazy-free page is just
//! dropped) or left in the page cache (a file page). Aging without reclaim (idle page
//! tracking, the multi-generational LRU's walk) clears the accessed state with
//! `clear_young`, which need not flush; `test_young` asks without clearing.
//!
//! # What the simulation follows
//! The same questions and the same `Clear` per page reclaimed, with the entry busy while
//! the page's data is written out. Not simulated: the reverse-map walk that starts a
//! one-page `Clear` in every other mapping linked to the page's `anon_vma` before
//! looking for the page there.

use super::{check_span, clear_of, AddressSpace};
use crate::addr::VirtAddr;
use crate::error::SimError;
use crate::frame::{FrameAllocator, Pfn};
use crate::op::SimOp;
use crate::pagetable::{pte_index, Pte, PteKind, PAGE_SIZE};
use crate::vma::Vma;

/// The frame an entry maps for reclaim and migration: present, or inaccessible
/// (`PROT_NONE`), which Linux's reverse map unmaps like any mapped page.
pub(super) fn mapped(pte: Pte) -> Option<Pfn> {
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

impl AddressSpace {
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
    pub fn reclaim(
        &self,
        start: impl Into<VirtAddr>,
        end: impl Into<VirtAddr>,
    ) -> Result<ReclaimStats, SimError> {
        let (start, end) = (start.into(), end.into());
        check_span(start, end)?;
        let (start, end) = (start.get(), end.get());
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
                let (s, e) = pte.order().span(a);
                let secondary = self.notify && self.notifier.clear_flush_young(s, e);
                if cpu || secondary {
                    stats.referenced += 1;
                } else if self.reclaim_page(vma, a, pte) {
                    stats.reclaimed += 1;
                }
            }
        }
        Ok(stats)
    }

    pub(super) fn reclaim_page(&self, vma: &Vma, addr: u64, seen: Pte) -> bool {
        let Some(pfn) = mapped(seen) else {
            return false;
        };
        let inv = self.invalidate(clear_of(addr, seen.order()), SimOp::Reclaim);
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
            inv.flush_mapping(addr, seen.order());
            self.frames.put(pfn);
            return true;
        }
        let busy = ptes[i].to_busy();
        ptes[i] = busy;
        drop(ptes);
        inv.flush_mapping(addr, busy.order());
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
    pub fn age(
        &self,
        start: impl Into<VirtAddr>,
        end: impl Into<VirtAddr>,
    ) -> Result<usize, SimError> {
        let (start, end) = (start.into(), end.into());
        check_span(start, end)?;
        let (start, end) = (start.get(), end.get());
        let vmas = self.mmap.read();
        let mut young = 0;
        for vma in vmas.overlapping(start, end) {
            for a in (vma.start.max(start)..vma.end.min(end)).step_by(PAGE_SIZE as usize) {
                let pte = self.pt.pte(a);
                if !pte.present() {
                    continue;
                }
                let cpu = self.clear_accessed(a);
                let (s, e) = pte.order().span(a);
                let secondary = self.notify && self.notifier.clear_young(s, e);
                young += usize::from(cpu || secondary);
            }
        }
        Ok(young)
    }

    /// Whether the page at `addr` was used since it was last aged, by the CPU or a
    /// secondary (`test_young`); clears nothing.
    pub fn test_young(&self, addr: impl Into<VirtAddr>) -> bool {
        let addr = addr.into().get();
        let vmas = self.mmap.read();
        if vmas.find(addr).is_none() {
            return false;
        }
        let pte = self.pt.pte(addr);
        pte.present()
            && (pte.accessed()
                || (self.notify && self.notifier.test_young(pte.order().align_down(addr))))
    }
}
