//! What the notifier calls cost the primary when nobody subscribes: fault + munmap cycles
//! on an address space that makes the calls (no subscribers) against one that makes none
//! (`AddressSpace::without_notifier`), with one trivial list subscriber for context.
//!
//! A cycle (`crates/mmn/src/bench/fault_munmap.rs`, shared with `mmn bench`): `mmap_anon`
//! of 16 pages read-write, a write fault on each page, `munmap` of the whole range (one
//! `Unmap` invalidation and one TLB flush). The target is under 2% between
//! `notifier_no_subscribers` and `without_notifier`.
//!
//! Criterion runs the variants one after the other, so a ratio of its figures also carries
//! the order and the heap layout (one unrelated allocation before the cycles moves a cycle
//! by about 3%, as much as the notifier costs). The overhead itself is measured by
//! `mmn bench --only sim`: the variants alternate over 600 short rounds, in address spaces
//! rebuilt in a rotating order every 50 rounds, and the reported `paired ratio` is the
//! median of the per-round ratios.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mmu_sim::{AddressSpace, FrameAllocator};

/// The cycle, shared with `mmn bench` (one file, so both measure the same thing).
#[path = "../../mmn/src/bench/fault_munmap.rs"]
mod fault_munmap_cycle;

use fault_munmap_cycle::{cycle, Nop, FRAMES};

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
