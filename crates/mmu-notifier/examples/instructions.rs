//! The invalidation pair in a loop, for counting instructions with callgrind (the stable
//! signal on a loaded machine): `pairs` runs `invalidate_range_start` + end with N list
//! subscribers that count their calls, `direct` calls the same subscribers' start and end
//! directly (their own work). Instructions per pair beyond the subscribers' own work are
//! `(Ir(pairs) - Ir(direct)) / ITERS`:
//!
//! ```text
//! cargo build --release -p mmu-notifier --example instructions
//! valgrind --tool=callgrind --callgrind-out-file=cg.pairs \
//!     target/release/examples/instructions 1 100000 pairs
//! callgrind_annotate --inclusive=yes cg.pairs | grep 'instructions::run'
//! ```
//!
//! Without valgrind it prints the time per iteration.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mmu_notifier::{Event, ListSubscriber, Range, Subscriptions, WouldBlock};

/// A list subscriber that counts its starts and ends (as the benchmarks' does).
#[derive(Default)]
struct Counting {
    starts: AtomicU64,
    ends: AtomicU64,
}

impl ListSubscriber for Counting {
    fn invalidate_range_start(&self, _range: &Range) -> Result<(), WouldBlock> {
        self.starts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn invalidate_range_end(&self, _range: &Range) {
        self.ends.fetch_add(1, Ordering::Relaxed);
    }
}

#[inline(never)]
fn run_pairs(mm: &Subscriptions, range: Range, iters: u64) {
    for _ in 0..iters {
        drop(black_box(mm.invalidate_range_start(black_box(range))));
    }
}

#[inline(never)]
fn run_direct(subs: &[Arc<dyn ListSubscriber>], range: Range, iters: u64) {
    for _ in 0..iters {
        for s in black_box(subs) {
            let _ = black_box(s.invalidate_range_start(black_box(&range)));
            s.invalidate_range_end(black_box(&range));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: instructions SUBSCRIBERS ITERATIONS pairs|direct";
    let (Some(n), Some(iters), Some(mode)) = (
        args.get(1).and_then(|a| a.parse::<usize>().ok()),
        args.get(2).and_then(|a| a.parse::<u64>().ok()),
        args.get(3),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let mm = Subscriptions::new();
    let subs: Vec<Arc<Counting>> = (0..n).map(|_| Arc::new(Counting::default())).collect();
    let regs: Vec<_> = subs
        .iter()
        .map(|s| mm.register(s.clone()).expect("a live address space"))
        .collect();
    let dyns: Vec<Arc<dyn ListSubscriber>> = subs
        .iter()
        .map(|s| s.clone() as Arc<dyn ListSubscriber>)
        .collect();
    let range = Range::new(0x1000, 0x2000, Event::Clear).expect("a valid range");
    let t = std::time::Instant::now();
    match mode.as_str() {
        "pairs" => run_pairs(&mm, range, iters),
        "direct" => run_direct(&dyns, range, iters),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
    println!(
        "{:.2} ns per iteration",
        t.elapsed().as_secs_f64() * 1e9 / iters.max(1) as f64
    );
    drop(regs);
}
