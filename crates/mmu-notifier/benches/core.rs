//! Core costs: an invalidation pair with 0/1/8 list subscribers, register+unregister, and a
//! grace-period read-side section on one thread and on two threads at once.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mmu_notifier::{
    Event, IntervalContext, IntervalSubscriber, ListSubscriber, Range, Srcu, Subscriptions,
    WouldBlock,
};

/// A trivial subscriber: counts starts and ends.
#[derive(Default)]
struct Trivial {
    starts: AtomicU64,
    ends: AtomicU64,
}

impl ListSubscriber for Trivial {
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

/// An interval subscriber with no state of its own.
struct Empty;

impl IntervalSubscriber for Empty {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        Ok(())
    }
}

fn intervals(c: &mut Criterion) {
    let mut g = c.benchmark_group("interval");
    // read_begin + read_retry, uncontended: with the user lock already held (the protocol
    // steps themselves), and the whole fill cycle including taking the user lock.
    let mm = Subscriptions::new();
    let sub = mm.insert_interval(0x1000..0x2000, Empty).unwrap();
    {
        let held = sub.lock();
        g.bench_function("read_begin+read_retry", |b| {
            b.iter(|| {
                let s = sub.read_begin();
                black_box(held.read_retry(black_box(s)))
            })
        });
    }
    g.bench_function("read_begin+lock+read_retry+unlock", |b| {
        b.iter(|| {
            let s = sub.read_begin();
            black_box(sub.lock().read_retry(black_box(s)))
        })
    });
    drop(sub);
    // An invalidation that overlaps none of 10^6 subscriptions (random 1-64-page ranges in
    // a 1 TiB space, placed in even 64-page blocks; each invalidation is one page at the
    // start of a random odd block, so the descent really walks the tree).
    let mm = Subscriptions::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    const BLOCKS: u64 = (1 << 40) / (64 << 12); // 64-page blocks in 1 TiB
    let subs: Vec<_> = (0..1_000_000)
        .map(|_| {
            let block = (next() % (BLOCKS / 2)) * 2;
            let pages = 1 + next() % 64;
            mm.insert_interval(
                block * (64 << 12)..block * (64 << 12) + (pages << 12),
                Empty,
            )
            .unwrap()
        })
        .collect();
    let misses: Vec<Range> = (0..4096)
        .map(|_| {
            let block = (next() % (BLOCKS / 2)) * 2 + 1;
            let start = block * (64 << 12);
            Range::new(start, start + 4096, Event::Unmap).unwrap()
        })
        .collect();
    let mut i = 0;
    g.bench_function("start+end_missing_1e6_subscriptions", |b| {
        b.iter(|| {
            i = (i + 1) % misses.len();
            drop(black_box(mm.invalidate_range_start(black_box(misses[i]))))
        })
    });
    drop(subs);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = invalidate_pair, register_unregister, srcu_read, intervals
}
criterion_main!(benches);
