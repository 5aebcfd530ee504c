//! The fault + munmap cycle of the simulated primary MMU, shared by `mmn bench` and the
//! criterion bench `crates/mmu-sim/benches/fault_munmap.rs` (which includes this file).
//!
//! A cycle: `mmap_anon` of [`PAGES`] pages read-write, a write fault on each page, `munmap`
//! of the whole range (one `Unmap` invalidation and one TLB flush).

use std::hint::black_box;

use mmu_notifier::{ListSubscriber, Range, WouldBlock};
use mmu_sim::{AddressSpace, Prot, PAGE_SIZE};

/// Pages mapped, faulted and unmapped per cycle.
pub const PAGES: u64 = 16;
/// Frames in each variant's pool (the same for all; a cycle frees all it takes).
pub const FRAMES: u32 = 1024;

/// A list subscriber that does nothing on start and end.
pub struct Nop;

impl ListSubscriber for Nop {
    fn invalidate_range_start(&self, _range: &Range) -> Result<(), WouldBlock> {
        Ok(())
    }
    fn invalidate_range_end(&self, _range: &Range) {}
}

/// One cycle: map, write-fault every page, unmap.
#[inline]
pub fn cycle(mm: &AddressSpace) {
    let len = PAGES * PAGE_SIZE;
    let a = mm
        .mmap_anon(len, Prot::READ_WRITE)
        .expect("frames for the cycle");
    for i in 0..PAGES {
        mm.write(black_box(a + i * PAGE_SIZE), i)
            .expect("a mapped page");
    }
    mm.munmap(black_box(a), len).expect("a mapped range");
}
