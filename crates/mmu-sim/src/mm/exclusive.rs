//! Device-exclusive access, under the mmap lock held for reading.
//!
//! # What Linux does
//! A device that needs atomic access to a page (`make_device_exclusive`) faults it in for
//! writing, breaking COW, then replaces its entry with a device-exclusive entry inside an
//! `Exclusive` invalidation of the page carrying the device's owner token (so the device
//! can tell its own request from a loss). The CPU can no longer use the page: its next
//! access faults, and the fault restores the entry inside an `Exclusive` invalidation of
//! the page without owner, which tells the device it lost the page.
//!
//! # What the simulation follows
//! The same two invalidations. `make_exclusive` retries its fault if the entry changed
//! between the fault and the invalidation.

use mmu_notifier::{Event, OwnerToken, Range};

use super::AddressSpace;
use crate::addr::VirtAddr;
use crate::error::SimError;
use crate::frame::FrameRef;
use crate::op::SimOp;
use crate::pagetable::{pte_index, PteKind, PAGE_SIZE};

impl AddressSpace {
    /// Gives a device exclusive access to the page at `addr` (Linux's
    /// `make_device_exclusive_range`): faults it in for writing (breaking COW), then an
    /// `Exclusive` invalidation of the page carrying the device's `owner` replaces the
    /// entry with a device-exclusive one. The next CPU access restores it with an
    /// `Exclusive` invalidation without owner. Returns the frame the device may use.
    ///
    /// Errors: EFAULT if not mapped, permission if not writable.
    pub fn make_exclusive(
        &self,
        addr: impl Into<VirtAddr>,
        owner: OwnerToken,
    ) -> Result<FrameRef, SimError> {
        let addr = addr.into().get();
        let vmas = self.mmap.read();
        let addr = addr & !(PAGE_SIZE - 1);
        loop {
            let (ptes, i) = self.fault_locked(&vmas, addr, true)?;
            let seen = ptes[i];
            drop(ptes);
            let (start, end) = seen.order().span(addr);
            let range = Range::new(start, end, Event::Exclusive)
                .expect("a whole mapping")
                .with_owner(owner);
            let inv = self.invalidate(range, SimOp::MakeExclusive);
            let leaf = self.pt.leaf(addr).expect("faulted");
            let mut ptes = leaf.lock();
            if ptes[i].same_mapping(seen) {
                ptes[i] = ptes[i].to_exclusive();
                drop(ptes);
                inv.flush_mapping(addr, seen.order());
                let pfn = seen.pfn().expect("present");
                return Ok(self.frames.frame_ref(pfn));
            }
        }
    }

    /// CPU access to a device-exclusive page: an `Exclusive` invalidation without an
    /// owner tells the device it lost the page, then the entry is restored.
    pub(super) fn restore_exclusive(&self, addr: u64) {
        let (start, end) = self.pt.pte(addr).order().span(addr);
        let range = Range::new(start, end, Event::Exclusive).expect("a whole mapping");
        let inv = self.invalidate(range, SimOp::ExclusiveRestore);
        if let Some(leaf) = self.pt.leaf(addr) {
            let mut ptes = leaf.lock();
            let i = pte_index(addr);
            if let PteKind::Exclusive(pfn) = ptes[i].kind() {
                ptes[i] = ptes[i].to_present(pfn);
            }
        }
        drop(inv);
    }
}
