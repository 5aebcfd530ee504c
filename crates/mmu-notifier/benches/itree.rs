//! `itree::IntervalTree` against the `iset` crate's `IntervalMap` (an arena red-black
//! interval tree), at 10^3, 10^5 and 10^6 entries.
//!
//! Workload (`crates/mmn/src/bench/workload.rs`, shared with `mmn bench`): ranges of
//! 1..=64 pages (4 KiB) at random page-aligned starts in a 1 TiB space, fixed seeds. Every
//! reported time is per operation:
//!
//! - `insert`: build a tree of n entries from empty (time / n);
//! - `query`: count the entries overlapping a random 2 MiB range in a tree of n entries
//!   (every query is drawn fresh, so no query's path is warm in the cache from before);
//! - `remove`: remove all n entries of a tree in random order (time / n).
//!
//! - `invalidate_miss`: `invalidate_range_start` + end of a one-page range that overlaps
//!   none of 10^6 disjoint interval subscriptions (each in its own even 64-page block;
//!   every miss is a fresh random odd block, so the descent walks to the bottom of the tree
//!   through memory that is mostly not in the cache), next to the tree lookup alone.
//!
//! `iset` has no handles: it inserts with `force_insert` (duplicates allowed) and removes
//! by interval, which is its native form of the same operation.
//!
//! The reference line is Linux's own interval tree (`include/linux/interval_tree_generic.h`
//! over `lib/rbtree.c`, compiled in user space with `gcc -O2`, nodes preallocated, fed
//! exactly this workload: the same generator, seeds, sizes, query length and removal
//! order), measured on the 2-core development machine; the bench prints those figures
//! next to its own, since the kernel code cannot be linked in here. Compare ratios from
//! one machine only.
#![cfg(not(loom))]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use iset::IntervalMap;
use mmu_notifier::itree::IntervalTree;
use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, Subscriptions, WouldBlock};

/// The workload generator, shared with `mmn bench` (one file, so both measure the same
/// trees).
#[path = "../../mmn/src/bench/workload.rs"]
#[allow(dead_code)]
mod workload;

use workload::{disjoint_ranges, miss_range, permutation, query_range, ranges, Rng};

const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];
/// Queries per timed batch.
const QUERY_BATCH: usize = 1024;

fn build_ours(rs: &[(u64, u64)]) -> (IntervalTree<u64>, Vec<mmu_notifier::itree::NodeKey>) {
    let mut t = IntervalTree::new();
    let keys = rs
        .iter()
        .enumerate()
        .map(|(i, &(s, l))| t.insert(s, l, i as u64).unwrap())
        .collect();
    (t, keys)
}

fn build_iset(rs: &[(u64, u64)]) -> IntervalMap<u64, u64> {
    let mut m = IntervalMap::new();
    for (i, &(s, l)) in rs.iter().enumerate() {
        m.force_insert(s..l + 1, i as u64);
    }
    m
}

fn count_ours(t: &IntervalTree<u64>, s: u64, l: u64) -> usize {
    let mut k = 0;
    t.for_each_overlap(s, l, |_, _, _, _| k += 1);
    k
}

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, n: usize) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(if n >= 1_000_000 { 10 } else { 300 }))
        .measurement_time(Duration::from_secs(if n >= 1_000_000 { 4 } else { 1 }))
        .sampling_mode(SamplingMode::Flat);
}

fn insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("itree/insert");
    for n in SIZES {
        configure(&mut g, n);
        let rs = ranges(n, workload::ranges_seed(n));
        g.bench_with_input(BenchmarkId::new("ours", n), &rs, |b, rs| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut t = IntervalTree::new();
                    let t0 = Instant::now();
                    for (i, &(s, l)) in rs.iter().enumerate() {
                        black_box(t.insert(s, l, i as u64).unwrap());
                    }
                    total += t0.elapsed();
                    drop(black_box(t));
                }
                total.div_f64(rs.len() as f64)
            })
        });
        g.bench_with_input(BenchmarkId::new("iset", n), &rs, |b, rs| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut m = IntervalMap::new();
                    let t0 = Instant::now();
                    for (i, &(s, l)) in rs.iter().enumerate() {
                        m.force_insert(s..l + 1, i as u64);
                    }
                    total += t0.elapsed();
                    drop(black_box(m));
                }
                total.div_f64(rs.len() as f64)
            })
        });
    }
    g.finish();
}

fn query(c: &mut Criterion) {
    let mut g = c.benchmark_group("itree/query_2MiB");
    for n in SIZES {
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sampling_mode(SamplingMode::Auto);
        let rs = ranges(n, workload::ranges_seed(n));
        let seed = workload::query_seed(n);
        let (ours, _) = build_ours(&rs);
        let theirs = build_iset(&rs);
        // Both must find the same entries.
        let mut rng = Rng(seed);
        for _ in 0..QUERY_BATCH {
            let (s, l) = query_range(&mut rng);
            assert_eq!(count_ours(&ours, s, l), theirs.iter(s..l + 1).count());
        }
        let mut rng = Rng(seed);
        g.bench_function(BenchmarkId::new("ours", n), |b| {
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                for _ in 0..iters {
                    for _ in 0..QUERY_BATCH {
                        let (s, l) = query_range(&mut rng);
                        black_box(count_ours(&ours, s, l));
                    }
                }
                t0.elapsed().div_f64(QUERY_BATCH as f64)
            })
        });
        let mut rng = Rng(seed);
        g.bench_function(BenchmarkId::new("iset", n), |b| {
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                for _ in 0..iters {
                    for _ in 0..QUERY_BATCH {
                        let (s, l) = query_range(&mut rng);
                        black_box(theirs.iter(s..l + 1).count());
                    }
                }
                t0.elapsed().div_f64(QUERY_BATCH as f64)
            })
        });
    }
    g.finish();
}

fn remove(c: &mut Criterion) {
    let mut g = c.benchmark_group("itree/remove");
    for n in SIZES {
        configure(&mut g, n);
        let rs = ranges(n, workload::ranges_seed(n));
        let order = permutation(n, workload::order_seed(n));
        g.bench_with_input(BenchmarkId::new("ours", n), &rs, |b, rs| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut t, keys) = build_ours(rs);
                    let keys: Vec<_> = order.iter().map(|&i| keys[i]).collect();
                    let t0 = Instant::now();
                    for &k in &keys {
                        black_box(t.remove(k));
                    }
                    total += t0.elapsed();
                    assert!(t.is_empty());
                }
                total.div_f64(rs.len() as f64)
            })
        });
        g.bench_with_input(BenchmarkId::new("iset", n), &rs, |b, rs| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut m = build_iset(rs);
                    let t0 = Instant::now();
                    for &i in &order {
                        let (s, l) = rs[i];
                        black_box(m.remove(s..l + 1));
                    }
                    total += t0.elapsed();
                    assert!(m.is_empty());
                }
                total.div_f64(rs.len() as f64)
            })
        });
    }
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

/// Subscriptions in the invalidation bench.
const MISS_N: usize = 1_000_000;

fn invalidate_miss(c: &mut Criterion) {
    let mut g = c.benchmark_group("itree/invalidate_miss");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let seed = workload::disjoint_seed(MISS_N);
    let rs = disjoint_ranges(MISS_N, seed);
    let mm = Subscriptions::new();
    let subs: Vec<_> = rs
        .iter()
        .map(|&(s, l)| mm.insert_interval(s..l + 1, Empty).unwrap())
        .collect();
    let (tree, _) = build_ours(&rs);
    let mut rng = Rng(seed);
    for _ in 0..QUERY_BATCH {
        let (s, l) = miss_range(&mut rng);
        assert_eq!(count_ours(&tree, s, l), 0);
    }
    g.bench_function(BenchmarkId::new("start+end", MISS_N), |b| {
        b.iter(|| {
            let (s, l) = miss_range(&mut rng);
            let r = Range::new(s, l + 1, Event::Unmap).unwrap();
            drop(black_box(mm.invalidate_range_start(black_box(r))))
        })
    });
    g.bench_function(BenchmarkId::new("tree_lookup_alone", MISS_N), |b| {
        b.iter(|| {
            let (s, l) = miss_range(&mut rng);
            black_box(count_ours(&tree, black_box(s), l))
        })
    });
    drop(subs);
    g.finish();
}

/// Linux's interval tree on this workload (ns per operation; see the module docs):
/// (n, insert, 2 MiB query, remove).
const LINUX_REFERENCE_NS: [(usize, f64, f64, f64); 3] = [
    (1_000, 16.4, 43.8, 9.0),
    (100_000, 154.0, 204.0, 54.9),
    (1_000_000, 650.0, 971.0, 204.0),
];

fn report_reference(_: &mut Criterion) {
    println!(
        "itree: {} bytes per entry beyond the value",
        IntervalTree::<u64>::bytes_per_entry()
    );
    println!("reference line, Linux interval_tree_generic.h + lib/rbtree.c, same workload:");
    for (n, ins, q, rm) in LINUX_REFERENCE_NS {
        println!("  linux/{n:<8} insert {ins:7.1} ns   query_2MiB {q:7.1} ns   remove {rm:7.1} ns");
    }
    println!("  linux/{MISS_N:<8} invalidate_miss (start+end) {LINUX_INVALIDATE_MISS_NS:7.1} ns");
}

/// Linux's invalidation path on the `invalidate_miss` workload (spinlock, count the
/// invalidation, `interval_tree_iter_first` missing, unlock; then lock, uncount, unlock),
/// ns; see the module docs. (Measured on a quiet machine with 4096 misses in rotation,
/// which keeps more of the tree cached than this bench's fresh misses: a floor.)
const LINUX_INVALIDATE_MISS_NS: f64 = 389.0;

criterion_group!(
    benches,
    report_reference,
    insert,
    query,
    remove,
    invalidate_miss
);
criterion_main!(benches);
