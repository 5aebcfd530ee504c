//! Page migration, under the mmap lock held for reading.
//!
//! # What Linux does
//! Migrating a page (compaction, NUMA balancing, `move_pages`) replaces each entry mapping
//! it with a migration entry inside a `Clear` invalidation of the page, copies the data to
//! the new page, and maps the new page in its place; a fault meeting the migration entry
//! waits for it. A device driver migrating a range to its own memory
//! (`migrate_vma_setup`) makes one `Migrate` invalidation over the whole range carrying
//! its owner token, so that the driver can recognise its own migration in its callback
//! and keep its translations through it.
//!
//! # What the simulation follows
//! The same invalidations; the busy entry plays the migration entry. Only pages mapped
//! once can move: the simulation has no reverse map to find another owner's entry, so a
//! page shared with a forked copy, the zero page and page-cache pages are EBUSY.

use mmu_notifier::{Event, OwnerToken, Range};

use super::reclaim::mapped;
use super::{check_span, clear_of, AddressSpace, Invalidation};
use crate::addr::VirtAddr;
use crate::error::SimError;
use crate::frame::{FrameAllocator, FrameRef, Pfn};
use crate::op::SimOp;
use crate::pagetable::{pte_index, PageOrder, PteKind, PAGE_SIZE};

impl AddressSpace {
    /// Migrates the page at `addr` to a new frame (compaction or NUMA balancing): a
    /// `Clear` invalidation of the page; the data follows. Returns the new frame.
    ///
    /// Errors: EFAULT if not mapped; EBUSY if the page is not present, is the zero page,
    /// is in the page cache, or is shared with a forked copy (the simulation has no reverse
    /// map to find the other owner's entry).
    pub fn migrate(&self, addr: impl Into<VirtAddr>) -> Result<FrameRef, SimError> {
        let addr = addr.into().get();
        let vmas = self.mmap.read();
        vmas.find(addr).ok_or(SimError::Fault(addr))?;
        let (old, order) = self.migratable(addr)?;
        let new = self.frames.alloc(0)?;
        let inv = self.invalidate(clear_of(addr, order), SimOp::Migrate);
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
        start: impl Into<VirtAddr>,
        end: impl Into<VirtAddr>,
        owner: OwnerToken,
    ) -> Result<Vec<(u64, FrameRef)>, SimError> {
        let (start, end) = (start.into(), end.into());
        check_span(start, end)?;
        let (start, end) = (start.get(), end.get());
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
                let Ok((old, _)) = self.migratable(a) else {
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

    /// The frame at `addr` if it can move, with the size of its entry.
    fn migratable(&self, addr: u64) -> Result<(Pfn, PageOrder), SimError> {
        let pte = self.pt.pte(addr);
        match mapped(pte) {
            Some(p)
                // One reference: only this entry has it (a page-cache page also has
                // the cache's reference, a forked page the other entry's).
                if !FrameAllocator::is_zero_page(p) && self.frames.refs(p) == 1 =>
            {
                Ok((p, pte.order()))
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
        inv.flush_mapping(addr, busy.order());
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
}
