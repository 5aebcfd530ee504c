//! `itree::IntervalTree` against the `iset` crate's `IntervalMap` (an arena red-black
//! interval tree), at 10^3, 10^5 and 10^6 entries.
//!
//! Workload: ranges of 1..=64 pages (4 KiB) at random page-aligned starts in a 1 TiB
//! space. Every reported time is per operation:
//!
//! - `insert`: build a tree of n entries from empty (time / n);
//! - `query`: count the entries overlapping a random 2 MiB range in a tree of n entries
//!   (every query is drawn fresh, so no query's path is warm in the cache from before);
//! - `remove`: remove all n entries of a tree in random order (time / n).
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

const PAGE: u64 = 4096;
const SPACE: u64 = 1 << 40;
const QUERY_LEN: u64 = 2 << 20;
const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];
/// Queries per timed batch.
const QUERY_BATCH: usize = 1024;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// n closed ranges `[start, last]` of 1..=64 pages at page-aligned starts.
fn ranges(n: usize, seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let start = rng.below(SPACE / PAGE) * PAGE;
            let pages = 1 + rng.below(64);
            (start, start + pages * PAGE - 1)
        })
        .collect()
}

/// A random 2 MiB query range at a page-aligned start.
fn query_range(rng: &mut Rng) -> (u64, u64) {
    let start = rng.below(SPACE / PAGE) * PAGE;
    (start, start + QUERY_LEN - 1)
}

/// A random permutation of 0..n (Fisher–Yates).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i as u64 + 1) as usize);
    }
    p
}

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
        let rs = ranges(n, 0x9E37_79B9_7F4A_7C15 ^ n as u64);
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
        let rs = ranges(n, 0x9E37_79B9_7F4A_7C15 ^ n as u64);
        let seed = 0xD1B5_4A32_D192_ED03 ^ n as u64;
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
        let rs = ranges(n, 0x9E37_79B9_7F4A_7C15 ^ n as u64);
        let order = permutation(n, 0x94D0_49BB_1331_11EB ^ n as u64);
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
}

criterion_group!(benches, report_reference, insert, query, remove);
criterion_main!(benches);
