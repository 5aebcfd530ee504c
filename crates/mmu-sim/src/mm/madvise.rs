//! `madvise`, under the mmap lock held for reading.
//!
//! # What Linux does
//! `MADV_DONTNEED` zaps the advised part of each mapping in turn, each inside its own
//! `Clear` invalidation over that part: private memory reads back as zeroes (or the
//! file's data), shared memory keeps its data in the page cache. `MADV_FREE` (private
//! anonymous memory only) walks each mapping inside a `Clear` over its advised part,
//! marking the pages clean and lazily freeable and dropping swap entries; reclaim may
//! then drop a lazy-free page without writing it out unless it is written again first.
//! `MADV_PAGEOUT` hands the pages to reclaim at once, referenced or not, and reclaim
//! unmaps each inside a `Clear` of the page, leaving alone pages that another owner maps
//! too.
//!
//! # What the simulation follows
//! The same calls, per mapping and per page. A hole in the range is ENOMEM after the
//! mapped parts were advised, as in Linux. Not simulated: the per-CPU batch in which
//! `MADV_FREE` keeps a reference on its pages for a while (reclaim skips them meanwhile).

use mmu_notifier::{Event, Range};

use super::reclaim::mapped;
use super::{advised_range, AddressSpace, Invalidation};
use crate::addr::{Len, VirtAddr};
use crate::error::SimError;
use crate::frame::FrameAllocator;
use crate::op::SimOp;
use crate::pagetable::{Pte, PteKind, PAGE_SIZE};
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

impl AddressSpace {
    /// Linux's `madvise` with `MADV_DONTNEED` or `MADV_FREE` over `[addr, addr + len)`:
    /// one `Clear` invalidation per mapping, over the advised part of it; with
    /// `MADV_PAGEOUT`, one `Clear` per page reclaimed.
    ///
    /// A zero length does nothing (as Linux). Errors: EINVAL for an unaligned or
    /// overflowing range, or `Free` on a shared or file mapping; ENOMEM if part of the
    /// range is not mapped (the mapped parts are still advised, as Linux does).
    pub fn madvise(
        &self,
        addr: impl Into<VirtAddr>,
        len: impl Into<Len>,
        advice: Advice,
    ) -> Result<(), SimError> {
        let (addr, len) = (addr.into(), len.into());
        // As Linux: a length that overflows when rounded, or a wrapping end, is EINVAL;
        // a range reaching beyond user space just has no mapping there (ENOMEM below).
        let Some(end) = advised_range(addr, len, SimError::InvalidArgument("range overflows"))?
        else {
            return Ok(());
        };
        let addr = addr.get();
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
}
