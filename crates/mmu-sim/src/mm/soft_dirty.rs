//! Soft-dirty reset, under the mmap lock held for reading.
//!
//! # What Linux does
//! Writing 4 to `/proc/PID/clear_refs` clears the soft-dirty bit of every entry and
//! write-protects the present ones, inside one `SoftDirty` invalidation over the whole
//! address space, so the next write to each page faults and marks it again. Swap entries
//! and inaccessible entries lose the bit too.
//!
//! # What the simulation follows
//! The same, one invalidation over everything and a flush over everything.

use mmu_notifier::{Event, Range};

use super::AddressSpace;
use crate::op::SimOp;
use crate::pagetable::{PteKind, TASK_SIZE};

impl AddressSpace {
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
}
