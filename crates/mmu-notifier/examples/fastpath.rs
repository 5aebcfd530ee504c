//! Times the no-subscriber invalidation fast path in a tight loop (for profiling with
//! `perf record`): `cargo run --release -p mmu-notifier --example fastpath`.
use std::hint::black_box;

use mmu_notifier::{Event, Range, Subscriptions};

fn main() {
    let mm = Subscriptions::new();
    let n = 100_000_000u64;
    let t = std::time::Instant::now();
    for i in 0..n {
        // Build the range in the loop from opaque values, as a primary computes it.
        let start = black_box(0x1000u64) + (i & 0xff) * 0x1000;
        let range = Range::new(start, start + 0x1000, Event::Clear).unwrap();
        drop(mm.invalidate_range_start(range));
    }
    println!(
        "{:.2} ns per start+end",
        t.elapsed().as_secs_f64() * 1e9 / n as f64
    );
}
