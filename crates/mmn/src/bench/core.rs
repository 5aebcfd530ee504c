//! The core paths of `mmu_notifier`:
//!
//! - an invalidation pair (`invalidate_range_start`, guard dropped) with n list
//!   subscribers that count their calls, against calling the same subscribers'
//!   `invalidate_range_start` and `invalidate_range_end` directly through the trait object
//!   (the subscribers' own work: what is left is the notifier's bookkeeping). With no
//!   subscriber the baseline is the timed loop alone;
//! - the fixed cost of that pair with one subscriber against two anchors, interleaved in
//!   the same rounds: Linux's construction of the same path (each of start and end takes
//!   its own sleepable-RCU read-side section, whose lock and unlock each increment a
//!   per-CPU counter and execute a full barrier, `smp_mb()`, which on x86-64 is a locked
//!   add) and the least any read-side section can cost (a thread-local counter
//!   incremented on entry and exit, with compiler-only barriers, around the same calls);
//! - `read_begin` + `read_retry` of an uncontended interval subscription (user lock held,
//!   the protocol steps alone), against a bare sequence count read twice;
//! - an invalidation hitting exactly one of n non-overlapping interval subscriptions
//!   (1-64 pages each at the start of distinct even 64-page blocks of a 1 TiB space; the
//!   invalidation is the first page of a random subscription), against the lookup it needs
//!   done on a bare `itree::IntervalTree` of the same ranges.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mmu_notifier::itree::IntervalTree;
use mmu_notifier::{
    Event, IntervalContext, IntervalSubscriber, ListSubscriber, Range, Subscriptions, WouldBlock,
};

use super::workload::Rng;
use super::{batched, interleaved, Curve, Plan, Report};

/// A list subscriber that counts its starts and ends.
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

/// Numbers of list subscribers on the curve (0, 1 and 8 are also table figures).
const LIST_COUNTS: [usize; 8] = [0, 1, 2, 4, 8, 16, 32, 64];

pub(super) fn run(plan: &Plan, report: &mut Report) {
    list_subscribers(plan, report);
    read_begin_retry(plan, report);
    interval_curve(plan, report);
}

fn list_subscribers(plan: &Plan, report: &mut Report) {
    let range = Range::new(0x1000, 0x2000, Event::Clear).expect("a valid range");
    let mut ours = Vec::new();
    let mut direct = Vec::new();
    for n in LIST_COUNTS {
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
        let mut variants = vec![
            batched(plan.batch, || {
                drop(black_box(mm.invalidate_range_start(black_box(range))))
            }),
            batched(plan.batch, || {
                for s in black_box(&dyns) {
                    let _ = black_box(s.invalidate_range_start(black_box(&range)));
                    s.invalidate_range_end(black_box(&range));
                }
            }),
        ];
        if n == 1 {
            // The fixed cost's anchors, in the same rounds.
            variants.push(batched(plan.batch, || {
                // Linux: start walks the list in one section, end in another.
                linux_section(|| {
                    for s in black_box(&dyns) {
                        let _ = black_box(s.invalidate_range_start(black_box(&range)));
                    }
                });
                linux_section(|| {
                    for s in black_box(&dyns) {
                        s.invalidate_range_end(black_box(&range));
                    }
                });
            }));
            variants.push(batched(plan.batch, || {
                minimal_section(|| {
                    for s in black_box(&dyns) {
                        let _ = black_box(s.invalidate_range_start(black_box(&range)));
                        s.invalidate_range_end(black_box(&range));
                    }
                })
            }));
        }
        let st = interleaved(plan.rounds, &mut variants);
        drop(variants);
        // The notifier called every subscriber as often as the baseline did (both ran at
        // least once), or the comparison would be meaningless.
        for s in &subs {
            let (a, b) = (
                s.starts.load(Ordering::Relaxed),
                s.ends.load(Ordering::Relaxed),
            );
            assert!(a > 0 && a == b, "subscriber called {a} starts, {b} ends");
        }
        drop(regs);
        ours.push((n as f64, st[0].median));
        direct.push((n as f64, st[1].median));
        if matches!(n, 0 | 1 | 8) {
            report.pair(
                "core",
                format!("start_end_list_{n}"),
                format!(
                    "start+end, {n} list subscriber{}",
                    if n == 1 { "" } else { "s" }
                ),
                st[0],
                if n == 0 {
                    "empty loop".to_string()
                } else {
                    format!("{n} direct start+end call{}", if n == 1 { "" } else { "s" })
                },
                st[1],
            );
        }
        if n == 1 {
            report.pair(
                "core",
                "start_end_list_1_vs_linux",
                "start+end, 1 list subscriber",
                st[0],
                "Linux's construction (2 sections, 4 full barriers)",
                st[2],
            );
            report.pair(
                "core",
                "least_section_list_1",
                "least read-side section around the calls",
                st[3],
                "1 direct start+end call",
                st[1],
            );
        }
    }
    report.curves.push(Curve {
        id: "invalidate_list_subscribers".into(),
        label: "start+end, n list subscribers".into(),
        x: "list subscribers",
        points: ours,
    });
    report.curves.push(Curve {
        id: "invalidate_list_direct_calls".into(),
        label: "the subscribers' callbacks called directly".into(),
        x: "list subscribers",
        points: direct,
    });
}

thread_local! {
    /// The anchors' read-side counters: lock and unlock counts of one thread (as a
    /// per-CPU counter pair is, in Linux).
    static SECTION: [std::cell::Cell<u64>; 2] = const { [std::cell::Cell::new(0), std::cell::Cell::new(0)] };
}

/// Linux's `smp_mb()` on x86-64 is a locked add to a stack word; a locked read-modify-write
/// of a local is the same instruction class on any target that has one.
#[inline(always)]
fn full_barrier() {
    let word = AtomicU64::new(0);
    black_box(&word).fetch_add(0, Ordering::SeqCst);
}

/// A read-side section as Linux's sleepable RCU enters and leaves one: counter increment
/// then a full barrier; a full barrier then the unlock counter's increment.
#[inline(always)]
fn linux_section(f: impl FnOnce()) {
    SECTION.with(|c| c[0].set(c[0].get().wrapping_add(1)));
    full_barrier();
    f();
    full_barrier();
    SECTION.with(|c| c[1].set(c[1].get().wrapping_add(1)));
}

/// The least a read-side section costs: the two increments, compiler barriers only (what
/// our asymmetric barrier leaves a reader to do).
#[inline(always)]
fn minimal_section(f: impl FnOnce()) {
    SECTION.with(|c| c[0].set(c[0].get().wrapping_add(1)));
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    f();
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    SECTION.with(|c| c[1].set(c[1].get().wrapping_add(1)));
}

fn read_begin_retry(plan: &Plan, report: &mut Report) {
    let mm = Subscriptions::new();
    let sub = mm
        .insert_interval(0x1000..0x2000, Empty)
        .expect("a valid interval");
    let held = sub.lock();
    let seq = AtomicU64::new(2);
    let st = interleaved(
        plan.rounds,
        &mut [
            batched(plan.batch, || {
                let s = sub.read_begin();
                black_box(held.read_retry(black_box(s)));
            }),
            batched(plan.batch, || {
                // What a bare sequence count costs a reader: the load at the start, the
                // recheck at the end (Acquire both, as a seqcount reader does).
                let s = black_box(&seq).load(Ordering::Acquire);
                black_box(black_box(&seq).load(Ordering::Acquire) != s);
            }),
        ],
    );
    drop(held);
    report.pair(
        "core",
        "read_begin_read_retry",
        "read_begin+read_retry (interval)",
        st[0],
        "bare sequence count read",
        st[1],
    );
}

/// Even 64-page blocks of the 1 TiB space hold the subscriptions (odd ones stay empty).
const BLOCK: u64 = 64 << 12;
const HALF_BLOCKS: u64 = (1 << 40) / BLOCK / 2;

fn interval_curve(plan: &Plan, report: &mut Report) {
    let sizes: &[usize] = if plan.quick {
        &[100, 1_000, 10_000]
    } else {
        &[100, 1_000, 10_000, 100_000, 1_000_000]
    };
    let mut ours = Vec::new();
    let mut tree_only = Vec::new();
    for &n in sizes {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ n as u64);
        // k -> (k * odd) mod 2^21 is a bijection: distinct blocks, hence no overlaps.
        let ranges: Vec<(u64, u64)> = (0..n as u64)
            .map(|k| {
                let block = (k.wrapping_mul(0x9E37_79B9) % HALF_BLOCKS) * 2;
                (block * BLOCK, (1 + rng.below(64)) << 12)
            })
            .collect();
        let mm = Subscriptions::new();
        let subs: Vec<_> = ranges
            .iter()
            .map(|&(s, len)| {
                mm.insert_interval(s..s + len, Empty)
                    .expect("a valid interval")
            })
            .collect();
        let mut tree = IntervalTree::new();
        for (i, &(s, len)) in ranges.iter().enumerate() {
            tree.insert(s, s + len - 1, i).expect("a valid interval");
        }
        let hits: Vec<Range> = (0..4096)
            .map(|_| {
                let s = ranges[rng.below(n as u64) as usize].0;
                Range::new(s, s + 4096, Event::Unmap).expect("a valid range")
            })
            .collect();
        let (mut i, mut j) = (0, 0);
        let st = interleaved(
            plan.rounds,
            &mut [
                batched(plan.batch, || {
                    i = (i + 1) % hits.len();
                    drop(black_box(mm.invalidate_range_start(black_box(hits[i]))))
                }),
                batched(plan.batch, || {
                    j = (j + 1) % hits.len();
                    let r = black_box(&hits[j]);
                    let mut found = 0;
                    tree.for_each_overlap(r.start(), r.end() - 1, |_, _, _, _| found += 1);
                    assert_eq!(found, 1);
                }),
            ],
        );
        drop(subs);
        ours.push((n as f64, st[0].median));
        tree_only.push((n as f64, st[1].median));
        report.pair(
            "core",
            format!("start_end_interval_{n}"),
            format!("start+end hitting 1 of {n} intervals"),
            st[0],
            "tree lookup alone",
            st[1],
        );
    }
    report.curves.push(Curve {
        id: "invalidate_interval_subscriptions".into(),
        label: "start+end hitting 1 of n interval subscriptions".into(),
        x: "interval subscriptions",
        points: ours,
    });
    report.curves.push(Curve {
        id: "invalidate_interval_tree_lookup".into(),
        label: "the tree lookup alone".into(),
        x: "interval subscriptions",
        points: tree_only,
    });
}
