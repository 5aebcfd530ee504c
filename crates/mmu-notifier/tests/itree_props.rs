//! State-machine property test of `itree::IntervalTree` against a naive `Vec` model:
//! random sequences of insertions, removals (live and stale keys), lookups and overlap
//! queries, with the tree's structural invariants checked after every step.
#![cfg(not(loom))]

use std::collections::{HashMap, HashSet};

use mmu_notifier::itree::{IntervalTree, InvalidInterval, NodeKey};
use proptest::prelude::*;

/// One step of a run. Indices pick from the live (or removed) keys modulo their count.
#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64),
    Remove(usize),
    RemoveStale(usize),
    Get(usize),
    Query(u64, u64),
    Any(u64, u64),
}

/// Intervals mostly in a small space (so that overlaps and duplicates are common), some
/// at the top of the `u64` range, and some spanning everything; `start > last` included.
fn interval() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        8 => (0u64..256, 0u64..24).prop_map(|(s, len)| (s, s + len)),
        1 => (0u64..16, 0u64..16).prop_map(|(a, b)| (u64::MAX - a, u64::MAX - b)),
        1 => (0u64..4, 0u64..4).prop_map(|(a, b)| (a, u64::MAX - b)),
        1 => (0u64..300, 0u64..300),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => interval().prop_map(|(s, l)| Op::Insert(s, l)),
        3 => any::<usize>().prop_map(Op::Remove),
        1 => any::<usize>().prop_map(Op::RemoveStale),
        1 => any::<usize>().prop_map(Op::Get),
        3 => interval().prop_map(|(s, l)| Op::Query(s, l)),
        2 => interval().prop_map(|(s, l)| Op::Any(s, l)),
    ]
}

fn overlaps(s: u64, l: u64, qs: u64, ql: u64) -> bool {
    qs <= ql && s <= ql && qs <= l
}

/// The naive model: every live entry as (key, start, last, value), and when each live
/// key was inserted (entries with equal starts must come in that order).
#[derive(Default)]
struct Model {
    live: Vec<(NodeKey, u64, u64, u32)>,
    removed: Vec<NodeKey>,
    next_value: u32,
    inserted: HashMap<NodeKey, u32>,
}

impl Model {
    /// Whether `entries` (key, start, ..) are ascending by start, equal starts in
    /// insertion order, each entry once.
    fn in_order(&self, entries: &[(NodeKey, u64, u64, u32)]) -> bool {
        entries
            .windows(2)
            .all(|w| (w[0].1, self.inserted[&w[0].0]) < (w[1].1, self.inserted[&w[1].0]))
    }
}

fn run(ops: &[Op]) {
    let mut tree = IntervalTree::new();
    let mut m = Model::default();
    for op in ops {
        match *op {
            Op::Insert(s, l) => {
                let v = m.next_value;
                m.next_value += 1;
                match tree.insert(s, l, v) {
                    Ok(k) => {
                        assert!(s <= l, "accepted [{s}, {l}]");
                        assert!(
                            m.live.iter().all(|e| e.0 != k),
                            "key {k:?} handed out twice"
                        );
                        m.live.push((k, s, l, v));
                        m.inserted.insert(k, v);
                    }
                    Err(e) => {
                        assert!(s > l, "refused [{s}, {l}]");
                        assert_eq!(e, InvalidInterval { start: s, last: l });
                    }
                }
            }
            Op::Remove(i) if !m.live.is_empty() => {
                let (k, _, _, v) = m.live.swap_remove(i % m.live.len());
                assert_eq!(tree.remove(k), Some(v));
                m.removed.push(k);
            }
            Op::Remove(_) => {}
            Op::RemoveStale(i) if !m.removed.is_empty() => {
                let k = m.removed[i % m.removed.len()];
                assert_eq!(tree.remove(k), None);
                assert_eq!(tree.get(k), None);
            }
            Op::RemoveStale(_) => {}
            Op::Get(i) if !m.live.is_empty() => {
                let j = i % m.live.len();
                let (k, s, l, mut v) = m.live[j];
                assert_eq!(tree.get(k), Some((s, l, &v)));
                let slot = tree.get_mut(k).expect("live key");
                *slot += 1_000_000;
                v += 1_000_000;
                m.live[j].3 = v;
                assert_eq!(tree.get(k), Some((s, l, &v)));
            }
            Op::Get(_) => {}
            Op::Query(qs, ql) => {
                let mut got = Vec::new();
                tree.for_each_overlap(qs, ql, |k, s, l, v| got.push((k, s, l, *v)));
                assert!(
                    m.in_order(&got),
                    "not ascending by (start, insertion): {got:?}"
                );
                let want: HashSet<_> = m
                    .live
                    .iter()
                    .filter(|e| overlaps(e.1, e.2, qs, ql))
                    .copied()
                    .collect();
                let got_set: HashSet<_> = got.iter().copied().collect();
                assert_eq!(got.len(), got_set.len(), "an entry reported twice");
                assert_eq!(got_set, want, "query [{qs}, {ql}]");
            }
            Op::Any(qs, ql) => {
                let want = m.live.iter().any(|e| overlaps(e.1, e.2, qs, ql));
                assert_eq!(tree.overlaps_any(qs, ql), want, "overlaps_any [{qs}, {ql}]");
            }
        }
        assert_eq!(tree.len(), m.live.len());
        assert_eq!(tree.is_empty(), m.live.is_empty());
        tree.check_invariants();
    }
    // The full walk: ascending by start, and exactly the model's entries.
    let all: Vec<_> = tree.iter().map(|(k, s, l, v)| (k, s, l, *v)).collect();
    assert!(m.in_order(&all), "walk not in (start, insertion) order");
    let mut want = m.live.clone();
    want.sort_by_key(|e| (e.1, e.3));
    let mut got = all;
    got.sort_by_key(|e| (e.1, e.3));
    assert_eq!(got, want);
    // Drain in model order; every removal keeps the tree valid.
    for (k, _, _, v) in m.live.drain(..) {
        assert_eq!(tree.remove(k), Some(v));
        tree.check_invariants();
    }
    assert!(tree.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn matches_naive_model(ops in prop::collection::vec(op(), 1..160)) {
        run(&ops);
    }
}

/// A long deterministic run with many entries: deep trees, many rotations, slot reuse.
#[test]
fn long_random_run() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rng = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ops = Vec::new();
    for round in 0..3 {
        for _ in 0..1500 {
            let s = rng() % 5000;
            ops.push(Op::Insert(s, s + rng() % 64));
        }
        for _ in 0..(1000 + round * 200) {
            ops.push(Op::Remove(rng() as usize));
            if rng() % 4 == 0 {
                let s = rng() % 5000;
                ops.push(Op::Query(s, s + rng() % 128));
            }
        }
    }
    run_sparse_checks(&ops);
}

/// Like [`run`], but checks the invariants only every 97 steps (the run is long).
fn run_sparse_checks(ops: &[Op]) {
    let mut tree = IntervalTree::new();
    let mut live: Vec<(NodeKey, u64, u64, u32)> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Insert(s, l) => {
                let k = tree.insert(s, l, step as u32).unwrap();
                live.push((k, s, l, step as u32));
            }
            Op::Remove(i) if !live.is_empty() => {
                let (k, _, _, v) = live.swap_remove(i % live.len());
                assert_eq!(tree.remove(k), Some(v));
            }
            Op::Query(qs, ql) => {
                let mut got = Vec::new();
                tree.for_each_overlap(qs, ql, |_, _, _, v| got.push(*v));
                got.sort_unstable();
                let mut want: Vec<_> = live
                    .iter()
                    .filter(|e| overlaps(e.1, e.2, qs, ql))
                    .map(|e| e.3)
                    .collect();
                want.sort_unstable();
                assert_eq!(got, want);
                assert_eq!(tree.overlaps_any(qs, ql), !want.is_empty());
            }
            _ => {}
        }
        if step % 97 == 0 {
            tree.check_invariants();
        }
    }
    tree.check_invariants();
    assert_eq!(tree.len(), live.len());
}

/// The start of the i-th inserted interval.
type StartOf = fn(u64) -> u64;
/// Which of the `left` live entries (by insertion rank) removal number `step` takes.
type Pick = fn(usize, usize) -> usize;

/// Insertion and removal orders that drive the rebalancing hard (sorted runs build long
/// spines that must be rotated away; equal starts pile up on one side; removal from the
/// ends, the middle and alternately), each checked against the model and the tree's
/// invariants (order, red-black coloring, maxima, links) after every single step.
#[test]
fn adversarial_orders_keep_every_invariant() {
    const N: u64 = 200;
    let starts: [(&str, StartOf); 5] = [
        ("ascending", |i| i * 3),
        ("descending", |i| (N - i) * 3),
        ("all equal", |_| 7),
        ("zigzag", |i| if i % 2 == 0 { i } else { 10 * N - i }),
        ("inward", |i| if i % 2 == 0 { i / 2 } else { N - i / 2 }),
    ];
    let removals: [(&str, Pick); 5] = [
        ("oldest first", |_, _| 0),
        ("newest first", |left, _| left - 1),
        ("middle", |left, _| left / 2),
        (
            "alternate ends",
            |left, step| if step % 2 == 0 { 0 } else { left - 1 },
        ),
        ("stride", |left, step| (step * 7) % left),
    ];
    for (sname, start) in starts {
        for (rname, pick) in removals {
            let mut ops = Vec::new();
            for i in 0..N {
                let s = start(i);
                ops.push(Op::Insert(s, s + i % 5));
            }
            for i in 0..N {
                ops.push(Op::Query(i * 3, i * 3 + 2));
            }
            let mut order: Vec<usize> = (0..N as usize).collect();
            for step in 0..N as usize {
                let j = pick(order.len(), step);
                ops.push(Op::Remove(order.remove(j)));
            }
            run_by_rank(&ops, sname, rname);
        }
    }
}

/// Like [`run`] for a script whose removals name entries by insertion rank (0 = first
/// inserted), with the invariants checked after every step.
fn run_by_rank(ops: &[Op], sname: &str, rname: &str) {
    let mut tree = IntervalTree::new();
    let mut keys: Vec<Option<(NodeKey, u64, u64)>> = Vec::new();
    for op in ops {
        match *op {
            Op::Insert(s, l) => {
                let k = tree.insert(s, l, keys.len() as u32).unwrap();
                keys.push(Some((k, s, l)));
            }
            Op::Remove(rank) => {
                let (k, _, _) = keys[rank].take().expect("removed twice");
                assert_eq!(tree.remove(k), Some(rank as u32), "{sname}, {rname}");
            }
            Op::Query(qs, ql) => {
                let mut got = Vec::new();
                tree.for_each_overlap(qs, ql, |_, _, _, v| got.push(*v));
                let want: Vec<u32> = keys
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| e.filter(|e| overlaps(e.1, e.2, qs, ql)).map(|_| i as u32))
                    .collect();
                got.sort_unstable();
                assert_eq!(got, want, "{sname}, {rname}: query [{qs}, {ql}]");
            }
            _ => unreachable!(),
        }
        tree.check_invariants();
        assert_eq!(tree.len(), keys.iter().flatten().count());
    }
    assert!(tree.is_empty());
}

/// The in-order iterator knows exactly how many entries it has left.
#[test]
fn the_iterator_counts_down_what_is_left() {
    let mut t = IntervalTree::new();
    for i in 0..5u64 {
        t.insert(i * 10, i * 10 + 5, i).unwrap();
    }
    let mut it = t.iter();
    assert_eq!(it.size_hint(), (5, Some(5)));
    for left in (0..5).rev() {
        assert!(it.next().is_some());
        assert_eq!(it.size_hint(), (left, Some(left)));
    }
    assert!(it.next().is_none());
}
