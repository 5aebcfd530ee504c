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
//!
//! The group also measures `invalidate_range_start` + end of a one-page range that misses
//! every one of n disjoint interval subscriptions ([`workload::disjoint_ranges`], a fresh
//! random [`workload::miss_range`] each time), next to the tree lookup alone, against
//! Linux's path for it (spinlock, count the invalidation, `interval_tree_iter_first`
//! missing, unlock; lock, uncount, unlock) at 10^6.
//!
//! # The reference column is only as good as the machine's state
//!
//! From 10^5 entries on the trees outgrow the private caches, and each operation is a
//! chain of dependent loads that miss them: its time is the latency of the shared cache
//! and of memory, which other processes' traffic raises. On this 2-core machine under a
//! load of 15 (other builds), Linux's own tree, timed on the thread CPU clock exactly as
//! this group times ours, took 1.4-1.7 us per insert, 1.9-2.7 us per query and
//! 0.35-0.45 us per removal at 10^6, two to three times its quiet-machine figures below.
//! A ratio against the fixed figures then charges the load to our tree (that is how this
//! group once reported 2.4x at 10^6 while a side-by-side run of the two trees, alternating
//! in one period, found them close). So for a ratio, measure Linux's tree in the same
//! period and hand its figures in: `MMN_LINUX_ITREE=FILE` names a file of lines
//! `linux n=N insert I [..] query Q [..] remove R ns` and
//! `linux start+end missing 1e6: M ns` (what the user-space build of Linux's tree prints);
//! the figures found there replace the fixed ones, and the report says so.

use std::hint::black_box;
use std::time::Duration;

use iset::IntervalMap;
use mmu_notifier::itree::{IntervalTree, NodeKey};
use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, Subscriptions, WouldBlock};

use super::workload::{self, Rng};
use super::{batched, interleaved, Clock, Curve, Figure, Plan, Report, Sampler};

/// Linux's interval tree at 10^3, 10^5 and 10^6 entries, ns per operation: insert, 2 MiB
/// query, remove.
const LINUX: LinuxTable = [
    (1_000, [16.4, 43.8, 9.0]),
    (100_000, [154.0, 204.0, 54.9]),
    (1_000_000, [650.0, 971.0, 204.0]),
];

/// Linux's invalidation path missing all of 10^6 disjoint subscriptions, ns (measured on
/// a quiet machine with 4096 misses in rotation, which keeps more of the tree cached than
/// this workload's fresh misses: a floor, not an equal).
const LINUX_MISS_1E6: f64 = 389.0;

/// Linux's tree figures: (n, [insert, query, remove]) in ns.
type LinuxTable = [(usize, [f64; 3]); 3];

/// Linux's figures: the fixed ones, or those of the file `MMN_LINUX_ITREE` names (see the
/// module docs). Returns them, the 10^6 miss figure, and where they came from.
fn linux_reference() -> Result<(LinuxTable, f64, String), String> {
    let Some(path) = std::env::var_os("MMN_LINUX_ITREE") else {
        return Ok((LINUX, LINUX_MISS_1E6, "fixed quiet-machine figures".into()));
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("MMN_LINUX_ITREE={}: {e}", path.to_string_lossy()))?;
    let (mut table, mut miss) = (LINUX, LINUX_MISS_1E6);
    let mut found = 0;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<f64>().ok());
        if let ["linux", "start+end", "missing", "1e6:", ..] = w.as_slice() {
            miss = num(4).ok_or_else(|| format!("MMN_LINUX_ITREE: bad line {line:?}"))?;
            found += 1;
            continue;
        }
        let Some(n) = w.get(1).and_then(|x| x.strip_prefix("n=")) else {
            continue;
        };
        let (Ok(n), Some(i), Some(q), Some(r)) = (n.parse::<usize>(), num(3), num(6), num(9))
        else {
            return Err(format!("MMN_LINUX_ITREE: bad line {line:?}"));
        };
        if let Some(row) = table.iter_mut().find(|(size, _)| *size == n) {
            row.1 = [i, q, r];
            found += 1;
        }
    }
    if found == 0 {
        return Err(format!(
            "MMN_LINUX_ITREE={}: no figures found",
            path.to_string_lossy()
        ));
    }
    Ok((
        table,
        miss,
        format!("{found} lines of {}", path.to_string_lossy()),
    ))
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

/// `invalidate_range_start` + end missing all of `n` disjoint interval subscriptions,
/// against the tree lookup alone.
fn invalidate_miss(plan: &Plan, report: &mut Report, n: usize, linux_ns: Option<f64>) {
    let seed = workload::disjoint_seed(n);
    let rs = workload::disjoint_ranges(n, seed);
    let mm = Subscriptions::new();
    let subs: Vec<_> = rs
        .iter()
        .map(|&(s, l)| {
            mm.insert_interval(s..l + 1, Empty)
                .expect("a valid interval")
        })
        .collect();
    let (tree, _) = build_ours(&rs);
    let (mut r1, mut r2) = (Rng(seed), Rng(seed));
    let st = interleaved(
        plan.rounds,
        &mut [
            batched(plan.batch, || {
                let (s, l) = workload::miss_range(&mut r1);
                let r = Range::new(s, l + 1, Event::Unmap).expect("a valid range");
                drop(black_box(mm.invalidate_range_start(black_box(r))))
            }),
            batched(plan.batch, || {
                let (s, l) = workload::miss_range(&mut r2);
                assert_eq!(count_ours(&tree, black_box(s), l), 0);
            }),
        ],
    );
    drop(subs);
    report.figures.push(Figure {
        group: "itree",
        id: format!("start_end_miss_{n}"),
        label: format!("start+end missing {n} intervals"),
        value: st[0],
        baseline: Some(("tree lookup alone".into(), st[1])),
        linux_ns,
    });
}

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
    let (linux_table, linux_miss, source) = match linux_reference() {
        Ok(r) => r,
        Err(e) => {
            report.failures.push(e);
            return;
        }
    };
    eprintln!("mmn bench: itree: the Linux column is {source}");
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
        let linux = linux_table
            .iter()
            .find(|(size, _)| *size == n)
            .map(|(_, v)| *v);
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
            points: linux_table.iter().map(|&(n, v)| (n as f64, v[k])).collect(),
        });
    }
    if plan.quick {
        invalidate_miss(plan, report, 100_000, None);
    } else {
        invalidate_miss(plan, report, 1_000_000, Some(linux_miss));
    }
}
