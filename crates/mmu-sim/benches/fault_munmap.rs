//! What the notifier calls cost the primary when nobody subscribes: fault + munmap cycles
//! on an address space that makes the calls (no subscribers) against one that makes none
//! (`AddressSpace::without_notifier`), with one trivial list subscriber for context.
//!
//! A cycle: `mmap_anon` of 16 pages read-write, a write fault on each page, `munmap` of
//! the whole range (one `Unmap` invalidation and one TLB flush). The target is under 2%
//! between `notifier_no_subscribers` and `without_notifier`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mmu_notifier::{ListSubscriber, Range, WouldBlock};
use mmu_sim::{AddressSpace, FrameAllocator, Prot, PAGE_SIZE};

/// Pages mapped, faulted and unmapped per cycle.
const PAGES: u64 = 16;
/// Frames in each variant's pool (the same for all; a cycle frees all it takes).
const FRAMES: u32 = 1024;

/// A list subscriber that does nothing on start and end.
struct Nop;

impl ListSubscriber for Nop {
    fn invalidate_range_start(&self, _range: &Range) -> Result<(), WouldBlock> {
        Ok(())
    }
    fn invalidate_range_end(&self, _range: &Range) {}
}

/// One cycle: map, write-fault every page, unmap.
#[inline]
fn cycle(mm: &AddressSpace) {
    let len = PAGES * PAGE_SIZE;
    let a = mm.mmap_anon(len, Prot::READ_WRITE).unwrap();
    for i in 0..PAGES {
        mm.write(black_box(a + i * PAGE_SIZE), i).unwrap();
    }
    mm.munmap(black_box(a), len).unwrap();
}

fn fault_munmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_munmap_16_pages");
    // One element = one cycle, so the report's rate is cycles per second.
    g.throughput(Throughput::Elements(1));

    let mm = AddressSpace::without_notifier(Arc::new(FrameAllocator::new(FRAMES)));
    g.bench_function("without_notifier", |b| b.iter(|| cycle(&mm)));
    drop(mm);

    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(FRAMES)));
    g.bench_function("notifier_no_subscribers", |b| b.iter(|| cycle(&mm)));
    drop(mm);

    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(FRAMES)));
    let reg = mm.notifier().register(Arc::new(Nop)).unwrap();
    g.bench_function("notifier_1_list_subscriber", |b| b.iter(|| cycle(&mm)));
    drop(reg);
    drop(mm);

    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = fault_munmap
}
criterion_main!(benches);
