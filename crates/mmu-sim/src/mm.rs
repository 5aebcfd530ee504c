//! The address space: layout (VMAs) under the mmap lock, translations in the page table
//! under page-table locks, frames from a shared pool, and the notifier subscriptions that
//! every change of a translation is announced to.
//!
//! # Locking (as in Linux)
//! - `mmap`: a read/write lock over the VMA layout. Faults take it for reading (so they
//!   run in parallel); layout changes (`mmap`, `munmap`, exit) take it for writing.
//! - page-table locks: one per last-level table; taken to read or change entries.
//! - Notifier callbacks run with the mmap lock held as Linux holds it, but never with a
//!   page-table lock held: a subscriber may fault pages in through [`AddressSpace::fault`]
//!   from its own threads, and may read entries with [`AddressSpace::pte`].
//!
//! # Ordering of an invalidation
//! `invalidate_range_start` returns before any entry in the range changes and before any
//! frame in it is freed; the TLB flush (which calls `arch_invalidate_secondary_tlbs`)
//! follows the clearing of the entries; frames are freed after the flush, before
//! `invalidate_range_end` (the spec allows either side of `end`).

use std::sync::Arc;

use mmu_notifier::{Event, Range, Subscriptions};
use parking_lot::RwLock;

use crate::error::SimError;
use crate::frame::{FrameAllocator, FrameRef, Pfn};
use crate::pagetable::{pte_index, PageTable, Pte, PAGE_SIZE, TASK_SIZE};
use crate::vma::{Prot, Vma, VmaMap};

/// Lowest address `mmap` hands out without a hint (like `mmap_min_addr`).
pub const MMAP_MIN_ADDR: u64 = 0x10000;

/// One simulated process address space.
pub struct AddressSpace {
    mmap: RwLock<VmaMap>,
    pt: PageTable,
    frames: Arc<FrameAllocator>,
    notifier: Subscriptions,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("vmas", &self.mmap.read().len())
            .field("notifier", &self.notifier)
            .finish()
    }
}

fn check_range(addr: u64, len: u64) -> Result<u64, SimError> {
    if addr % PAGE_SIZE != 0 {
        return Err(SimError::InvalidArgument("address not page aligned"));
    }
    if len == 0 {
        return Err(SimError::InvalidArgument("zero length"));
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(SimError::InvalidArgument("length overflows"))?;
    let end = addr
        .checked_add(len)
        .ok_or(SimError::InvalidArgument("range overflows"))?;
    if end > TASK_SIZE {
        return Err(SimError::InvalidArgument("range beyond user space"));
    }
    Ok(end)
}

impl AddressSpace {
    /// An empty address space drawing frames from `frames`.
    pub fn new(frames: Arc<FrameAllocator>) -> Arc<Self> {
        Arc::new(Self {
            mmap: RwLock::new(VmaMap::default()),
            pt: PageTable::new(),
            frames,
            notifier: Subscriptions::new(),
        })
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
    pub fn pte(&self, addr: u64) -> Pte {
        self.pt.pte(addr)
    }

    /// A snapshot of the mappings.
    pub fn vmas(&self) -> Vec<Vma> {
        self.mmap.read().iter().copied().collect()
    }

    /// Maps `len` bytes of anonymous private memory with `prot`, at the lowest free
    /// address. Returns its start.
    pub fn mmap_anon(&self, len: u64, prot: Prot) -> Result<u64, SimError> {
        if len == 0 {
            return Err(SimError::InvalidArgument("zero length"));
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(SimError::InvalidArgument("length overflows"))?;
        let mut vmas = self.mmap.write();
        let start = vmas
            .find_gap(len, MMAP_MIN_ADDR, TASK_SIZE)
            .ok_or(SimError::OutOfMemory)?;
        vmas.insert(Vma {
            start,
            end: start + len,
            prot,
        });
        Ok(start)
    }

    /// Unmaps `[addr, addr + len)` (Linux's `munmap`): one `Unmap` invalidation over the
    /// whole range, across every mapping in it. Unmapping nothing is not an error.
    pub fn munmap(&self, addr: u64, len: u64) -> Result<(), SimError> {
        let end = check_range(addr, len)?;
        let mut vmas = self.mmap.write();
        if vmas.overlapping(addr, end).next().is_none() {
            return Ok(());
        }
        vmas.remove_range(addr, end);
        let range = Range::new(addr, end, Event::Unmap).expect("checked non-empty");
        self.zap(range);
        Ok(())
    }

    /// Clears every entry in `range` inside an invalidation of it, flushes, and frees the
    /// frames. The caller holds the mmap lock for writing.
    fn zap(&self, range: Range) {
        let inv = self.notifier.invalidate_range_start(range);
        let mut freed: Vec<Pfn> = Vec::new();
        self.pt
            .for_each_leaf(range.start(), range.end(), |_, leaf, idx| {
                for pte in &mut leaf[idx] {
                    if let Some(pfn) = pte.pfn() {
                        freed.push(pfn);
                    }
                    *pte = Pte::default();
                }
            });
        // The TLB flush after clearing entries.
        if !freed.is_empty() {
            self.notifier
                .arch_invalidate_secondary_tlbs(range.start(), range.end());
        }
        for pfn in freed {
            self.frames.put(pfn);
        }
        drop(inv);
    }

    /// A page fault at `addr` (a CPU access, or get-user-pages for a secondary): maps a
    /// frame if none is mapped, marks the entry accessed (and dirty on a write), and
    /// returns the frame without pinning it.
    pub fn fault(&self, addr: u64, write: bool) -> Result<FrameRef, SimError> {
        let vmas = self.mmap.read();
        let vma = vmas.find(addr).ok_or(SimError::Fault(addr))?;
        if !vma.prot.read || (write && !vma.prot.write) {
            return Err(SimError::Permission(addr));
        }
        let leaf = self.pt.leaf_or_alloc(addr);
        let mut ptes = leaf.lock();
        let pte = &mut ptes[pte_index(addr)];
        if !pte.present() {
            let pfn = self.frames.alloc(0)?;
            *pte = Pte::new(pfn, vma.prot.write);
        } else if write && !pte.writable() {
            return Err(SimError::Permission(addr));
        }
        pte.touch(write);
        let pfn = pte.pfn().expect("present");
        Ok(self.frames.frame_ref(pfn))
    }

    /// Reads the data word of the page at `addr` as the CPU would (faulting it in).
    pub fn read(&self, addr: u64) -> Result<u64, SimError> {
        let r = self.fault(addr, false)?;
        Ok(self.frames.read(r.pfn))
    }

    /// Writes the data word of the page at `addr` as the CPU would (faulting it in).
    pub fn write(&self, addr: u64, value: u64) -> Result<(), SimError> {
        let r = self.fault(addr, true)?;
        self.frames.write(r.pfn, value);
        Ok(())
    }

    /// Process exit (Linux's `exit_mmap`): the notifier release first, then one `Unmap`
    /// invalidation over all of user space, freeing every frame.
    pub fn exit(&self) {
        self.notifier.release();
        let mut vmas = self.mmap.write();
        let all: Vec<Vma> = vmas.iter().copied().collect();
        for v in all {
            vmas.remove_range(v.start, v.end);
        }
        self.zap(Range::new(0, TASK_SIZE, Event::Unmap).expect("non-empty"));
    }
}
