//! `mmu_notifier::itree::IntervalTree` against the `iset` crate's `IntervalMap` (an
//! arena red-black interval tree), on the workload of [`super::workload`], the same as the
//! criterion bench's. Every figure is per operation:
//!
//! - insert: build a tree of n entries from empty (time / n);
//! - query: count the entries overlapping a random 2 MiB range in a tree of n entries
//!   (each query drawn fresh, so no path is warm from the query before);
//! - remove: remove all n entries of a freshly built tree in the workload's random order
//!   (time / n; the build is not timed).
//!
//! `iset` has no handles: it inserts with `force_insert` (duplicates allowed) and removes
//! by interval, its native form of the same operation. It is the baseline because it is a
//! balanced dynamic tree with an overlap query that visits only what overlaps; of the
//! other dynamic interval trees on crates.io, `interavl` (an AVL tree) answers this
//! workload's 2 MiB query in about 10 ms at 10^5 entries (its overlap iterator walks far
//! more of the tree than overlaps), so it would be no yardstick. Linux's own interval tree
//! (the kernel's generic interval tree compiled in user space, measured once on this
//! machine kind with the same workload) is a fixed reference column.

use std::hint::black_box;
use std::time::Duration;

use iset::IntervalMap;
use mmu_notifier::itree::{IntervalTree, NodeKey};

use super::workload::{self, Rng};
use super::{batched, interleaved, Clock, Curve, Figure, Plan, Report, Sampler};

/// Linux's interval tree at 10^3, 10^5 and 10^6 entries, ns per operation: insert, 2 MiB
/// query, remove.
const LINUX: [(usize, [f64; 3]); 3] = [
    (1_000, [16.4, 43.8, 9.0]),
    (100_000, [154.0, 204.0, 54.9]),
    (1_000_000, [650.0, 971.0, 204.0]),
];

const OPS: [&str; 3] = ["insert", "query_2mib", "remove"];
const OP_LABELS: [&str; 3] = ["insert", "2 MiB query", "remove"];

/// Queries per query sample batch step.
const QUERY_BATCH: usize = 64;

fn build_ours(rs: &[(u64, u64)]) -> (IntervalTree<u64>, Vec<NodeKey>) {
    let mut t = IntervalTree::new();
    let keys = rs
        .iter()
        .enumerate()
        .map(|(i, &(s, l))| t.insert(s, l, i as u64).expect("a valid interval"))
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

/// A sampler for a whole-tree operation: `once` does it once and returns the thread CPU
/// time it timed (ns); a sample repeats it until `target` of CPU time has passed and
/// returns the time per entry.
fn whole<'a>(target: Duration, n: usize, mut once: impl FnMut() -> u64 + 'a) -> Sampler<'a> {
    let target = target.as_nanos() as u64;
    Box::new(move || {
        let (mut timed, mut reps) = (0u64, 0u32);
        let t0 = Clock::Cpu.now();
        while reps == 0 || Clock::Cpu.now() - t0 < target {
            timed += once();
            reps += 1;
        }
        timed as f64 / (reps as f64 * n as f64)
    })
}

pub(super) fn run(plan: &Plan, report: &mut Report) {
    let sizes: &[usize] = if plan.quick {
        &[1_000, 10_000, 100_000]
    } else {
        &[1_000, 10_000, 100_000, 1_000_000]
    };
    // [op][variant] curves: ours, iset.
    let mut curves: [[Vec<(f64, f64)>; 2]; 3] = Default::default();
    for &n in sizes {
        // The largest trees take up to a second per sample: fewer rounds.
        let rounds = match (n, plan.quick) {
            (1_000_000.., _) => plan.rounds.min(7),
            (100_000.., true) => plan.rounds.min(3),
            _ => plan.rounds,
        };
        let rs = workload::ranges(n, workload::ranges_seed(n));
        let order = workload::permutation(n, workload::order_seed(n));
        let insert = interleaved(
            rounds,
            &mut [
                whole(plan.batch, n, || {
                    let mut t = IntervalTree::new();
                    let t0 = Clock::Cpu.now();
                    for (i, &(s, l)) in rs.iter().enumerate() {
                        black_box(t.insert(s, l, i as u64).expect("a valid interval"));
                    }
                    let e = Clock::Cpu.now() - t0;
                    drop(black_box(t));
                    e
                }),
                whole(plan.batch, n, || {
                    let mut m = IntervalMap::new();
                    let t0 = Clock::Cpu.now();
                    for (i, &(s, l)) in rs.iter().enumerate() {
                        m.force_insert(s..l + 1, i as u64);
                    }
                    let e = Clock::Cpu.now() - t0;
                    drop(black_box(m));
                    e
                }),
            ],
        );
        let query = {
            let (ours, _) = build_ours(&rs);
            let theirs = build_iset(&rs);
            // Both must find the same entries.
            let mut rng = Rng(workload::query_seed(n));
            for _ in 0..1024 {
                let (s, l) = workload::query_range(&mut rng);
                assert_eq!(count_ours(&ours, s, l), theirs.iter(s..l + 1).count());
            }
            let mut r1 = Rng(workload::query_seed(n));
            let mut r2 = Rng(workload::query_seed(n));
            let st = interleaved(
                rounds,
                &mut [
                    batched(plan.batch, || {
                        for _ in 0..QUERY_BATCH {
                            let (s, l) = workload::query_range(&mut r1);
                            black_box(count_ours(&ours, s, l));
                        }
                    }),
                    batched(plan.batch, || {
                        for _ in 0..QUERY_BATCH {
                            let (s, l) = workload::query_range(&mut r2);
                            black_box(theirs.iter(s..l + 1).count());
                        }
                    }),
                ],
            );
            st.into_iter()
                .map(|mut st| {
                    st.median /= QUERY_BATCH as f64;
                    st.p25 /= QUERY_BATCH as f64;
                    st.p75 /= QUERY_BATCH as f64;
                    st
                })
                .collect::<Vec<_>>()
        };
        let remove = interleaved(
            rounds,
            &mut [
                whole(plan.batch, n, || {
                    let (mut t, keys) = build_ours(&rs);
                    let keys: Vec<NodeKey> = order.iter().map(|&i| keys[i]).collect();
                    let t0 = Clock::Cpu.now();
                    for &k in &keys {
                        black_box(t.remove(k));
                    }
                    let e = Clock::Cpu.now() - t0;
                    assert!(t.is_empty());
                    e
                }),
                whole(plan.batch, n, || {
                    let mut m = build_iset(&rs);
                    let t0 = Clock::Cpu.now();
                    for &i in &order {
                        let (s, l) = rs[i];
                        black_box(m.remove(s..l + 1));
                    }
                    let e = Clock::Cpu.now() - t0;
                    assert!(m.is_empty());
                    e
                }),
            ],
        );
        let linux = LINUX.iter().find(|(size, _)| *size == n).map(|(_, v)| *v);
        for (k, st) in [insert, query, remove].into_iter().enumerate() {
            curves[k][0].push((n as f64, st[0].median));
            curves[k][1].push((n as f64, st[1].median));
            report.figures.push(Figure {
                group: "itree",
                id: format!("itree_{}_{n}", OPS[k]),
                label: format!("{} at {n}", OP_LABELS[k]),
                value: st[0],
                baseline: Some((format!("iset {}", OP_LABELS[k]), st[1])),
                linux_ns: linux.map(|v| v[k]),
            });
        }
    }
    for (k, [ours, iset]) in curves.into_iter().enumerate() {
        report.curves.push(Curve {
            id: format!("itree_{}_ours", OPS[k]),
            label: format!("itree {}", OP_LABELS[k]),
            x: "entries",
            points: ours,
        });
        report.curves.push(Curve {
            id: format!("itree_{}_iset", OPS[k]),
            label: format!("iset {}", OP_LABELS[k]),
            x: "entries",
            points: iset,
        });
        report.curves.push(Curve {
            id: format!("itree_{}_linux", OPS[k]),
            label: format!("Linux {} (reference)", OP_LABELS[k]),
            x: "entries",
            points: LINUX.iter().map(|&(n, v)| (n as f64, v[k])).collect(),
        });
    }
}
