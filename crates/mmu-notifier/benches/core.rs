//! Core costs: an invalidation pair with 0/1/8 list subscribers, register+unregister, and a
//! grace-period read-side section on one thread and on two threads at once.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mmu_notifier::{Event, ListSubscriber, Ops, Range, Srcu, Subscriptions, WouldBlock};

/// A trivial subscriber: counts starts and ends.
#[derive(Default)]
struct Trivial {
    starts: AtomicU64,
    ends: AtomicU64,
}

impl ListSubscriber for Trivial {
    fn ops(&self) -> Ops {
        Ops::INVALIDATE_RANGE_START | Ops::INVALIDATE_RANGE_END
    }
    fn invalidate_range_start(&self, _range: &Range) -> Result<(), WouldBlock> {
        self.starts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn invalidate_range_end(&self, _range: &Range) {
        self.ends.fetch_add(1, Ordering::Relaxed);
    }
}

fn invalidate_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("invalidate_range_start+end");
    let range = Range::new(0x1000, 0x2000, Event::Clear).unwrap();
    for n in [0usize, 1, 8] {
        let mm = Subscriptions::new();
        let regs: Vec<_> = (0..n)
            .map(|_| mm.register(Arc::new(Trivial::default())).unwrap())
            .collect();
        g.bench_with_input(BenchmarkId::new("list_subscribers", n), &n, |b, _| {
            b.iter(|| drop(black_box(mm.invalidate_range_start(black_box(range)))))
        });
        drop(regs);
    }
    g.finish();
}

fn register_unregister(c: &mut Criterion) {
    let mm = Subscriptions::new();
    let sub = Arc::new(Trivial::default());
    c.bench_function("register+unregister", |b| {
        b.iter(|| mm.register(sub.clone()).unwrap().unregister())
    });
}

fn srcu_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("srcu_read_lock+unlock");
    let srcu = Srcu::new();
    g.bench_function("one_thread", |b| {
        b.iter(|| drop(black_box(srcu.read_lock())))
    });
    g.bench_function("two_threads", |b| {
        b.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let (srcu, stop) = (srcu.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..1024 {
                            drop(black_box(srcu.read_lock()));
                        }
                    }
                })
            };
            // Let the other thread get going before timing.
            std::thread::sleep(Duration::from_millis(1));
            let t = Instant::now();
            for _ in 0..iters {
                drop(black_box(srcu.read_lock()));
            }
            let elapsed = t.elapsed();
            stop.store(true, Ordering::Relaxed);
            other.join().unwrap();
            elapsed
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = invalidate_pair, register_unregister, srcu_read
}
criterion_main!(benches);
