//! Property test: random interleavings of insert / remove / update / split / invalidation
//! start and end (several open at once, ended in any order) / read_begin / read_retry /
//! check_retry, checked step by step against a sequential model of the interval protocol: the sequence
//! counts, the deferred tree updates and their collapsing, and which subscriptions each
//! invalidation reaches.
#![cfg(not(loom))]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use mmu_notifier::{
    Event, IntervalContext, IntervalSubscriber, IntervalSubscription, InvalidateGuard, Range,
    ReadSeq, Subscriptions, WouldBlock,
};
use proptest::prelude::*;

const P: u64 = 4096;

/// Records (subscription id) for every invalidate call.
struct Probe {
    id: usize,
    hits: Arc<Mutex<Vec<usize>>>,
}

impl IntervalSubscriber for Probe {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.hits.lock().unwrap().push(self.id);
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert { page: u64, pages: u64 },
    Remove { sub: usize },
    Update { sub: usize, page: u64, pages: u64 },
    Split { sub: usize, cut: u64 },
    Start { page: u64, pages: u64 },
    End { guard: usize },
    ReadBegin { sub: usize },
    ReadRetry { token: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..32u64, 1..6u64).prop_map(|(page, pages)| Op::Insert { page, pages }),
        (0..16usize).prop_map(|sub| Op::Remove { sub }),
        (0..16usize, 0..32u64, 1..6u64).prop_map(|(sub, page, pages)| Op::Update {
            sub,
            page,
            pages
        }),
        (0..16usize, 1..5u64).prop_map(|(sub, cut)| Op::Split { sub, cut }),
        (0..36u64, 1..8u64).prop_map(|(page, pages)| Op::Start { page, pages }),
        (0..4usize).prop_map(|guard| Op::End { guard }),
        (0..16usize).prop_map(|sub| Op::ReadBegin { sub }),
        (0..16usize).prop_map(|token| Op::ReadRetry { token }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pending {
    Insert,
    Update,
    Remove,
}

/// The model of one subscription.
#[derive(Clone, Debug)]
struct MNode {
    /// In the tree: (first, last) closed.
    tree: Option<(u64, u64)>,
    /// Target range (current, or after the pending change).
    target: (u64, u64),
    pending: Option<Pending>,
    seq: u64,
}

#[derive(Default)]
struct Model {
    seq: u64,
    active: usize,
    nodes: BTreeMap<usize, MNode>,
    deferred: Vec<usize>,
}

impl Model {
    fn frozen(&self) -> bool {
        self.seq & 1 == 1
    }
    fn insert(&mut self, id: usize, range: (u64, u64)) {
        let (tree, pending, seq);
        if self.active > 0 {
            if self.frozen() {
                tree = None;
                pending = Some(Pending::Insert);
                self.deferred.push(id);
            } else {
                self.seq |= 1;
                tree = Some(range);
                pending = None;
            }
            seq = self.seq;
        } else {
            tree = Some(range);
            pending = None;
            seq = self.seq - 1;
        }
        self.nodes.insert(
            id,
            MNode {
                tree,
                target: range,
                pending,
                seq,
            },
        );
    }
    fn update(&mut self, id: usize, range: (u64, u64)) -> bool {
        let (frozen, active, cur) = (self.frozen(), self.active > 0, self.seq);
        let Some(n) = self.nodes.get_mut(&id) else {
            return false;
        };
        if n.pending == Some(Pending::Remove) {
            return false;
        }
        n.target = range;
        if frozen {
            if n.pending.is_none() {
                n.pending = Some(Pending::Update);
                self.deferred.push(id);
            }
            n.seq = n.seq.max(cur);
        } else {
            n.tree = Some(range);
            if active {
                self.seq |= 1;
                n.seq = n.seq.max(self.seq);
            }
        }
        true
    }
    fn remove(&mut self, id: usize) {
        let frozen = self.frozen();
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if n.pending == Some(Pending::Remove) {
            return;
        }
        if frozen {
            match n.pending {
                Some(Pending::Insert) => {
                    self.nodes.remove(&id);
                    self.deferred.retain(|&d| d != id);
                }
                Some(Pending::Update) => n.pending = Some(Pending::Remove),
                None => {
                    n.pending = Some(Pending::Remove);
                    self.deferred.push(id);
                }
                Some(Pending::Remove) => unreachable!(),
            }
        } else {
            self.nodes.remove(&id);
        }
    }
    fn start(&mut self, first: u64, last: u64) -> Vec<usize> {
        self.active += 1;
        let hits: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.tree.is_some_and(|(s, l)| s <= last && first <= l))
            .map(|(&id, _)| id)
            .collect();
        if !hits.is_empty() {
            self.seq |= 1;
        }
        for id in &hits {
            let n = self.nodes.get_mut(id).unwrap();
            n.seq = n.seq.max(self.seq);
        }
        hits
    }
    fn end(&mut self) {
        self.active -= 1;
        if self.active > 0 || !self.frozen() {
            return;
        }
        self.seq += 1;
        for id in std::mem::take(&mut self.deferred) {
            let Some(n) = self.nodes.get_mut(&id) else {
                continue;
            };
            match n.pending.take() {
                None => {}
                Some(Pending::Insert) | Some(Pending::Update) => n.tree = Some(n.target),
                Some(Pending::Remove) => {
                    self.nodes.remove(&id);
                }
            }
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mm = Subscriptions::new();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let mut model = Model {
        seq: 2,
        ..Model::default()
    };
    // Subscriptions by id (index into `subs`), live or not. The first one, far away from
    // everything else, is inserted up front: the first insert of an address space may not
    // happen while one of its invalidations is open (it waits for them).
    let mut subs: Vec<Option<IntervalSubscription<Probe>>> = Vec::new();
    let far = Probe {
        id: 0,
        hits: hits.clone(),
    };
    subs.push(Some(
        mm.insert_interval(1 << 40..(1 << 40) + P, far).unwrap(),
    ));
    model.insert(0, (1 << 40, (1 << 40) + P - 1));
    let mut guards: Vec<InvalidateGuard<'_>> = Vec::new();
    let mut tokens: Vec<(usize, ReadSeq, u64)> = Vec::new();
    let live = |subs: &Vec<Option<IntervalSubscription<Probe>>>, k: usize| -> Option<usize> {
        let ids: Vec<usize> = (0..subs.len()).filter(|&i| subs[i].is_some()).collect();
        (!ids.is_empty()).then(|| ids[k % ids.len()])
    };
    for op in ops {
        match op {
            Op::Insert { page, pages } => {
                let id = subs.len();
                let probe = Probe {
                    id,
                    hits: hits.clone(),
                };
                subs.push(Some(
                    mm.insert_interval(page * P..page * P + pages * P, probe)
                        .unwrap(),
                ));
                model.insert(id, (page * P, (page + pages) * P - 1));
            }
            Op::Remove { sub } => {
                if let Some(id) = live(&subs, sub) {
                    subs[id].take().unwrap().remove_nowait(); // never waits: single-threaded
                    model.remove(id);
                }
            }
            Op::Update { sub, page, pages } => {
                if let Some(id) = live(&subs, sub) {
                    let ok = subs[id]
                        .as_ref()
                        .unwrap()
                        .update(page * P..(page + pages) * P)
                        .is_ok();
                    prop_assert_eq!(ok, model.update(id, (page * P, (page + pages) * P - 1)));
                }
            }
            Op::Split { sub, cut } => {
                if let Some(id) = live(&subs, sub) {
                    let Some((first, last)) = model.nodes.get(&id).map(|n| n.target) else {
                        continue;
                    };
                    if model.nodes[&id].pending == Some(Pending::Remove) {
                        continue;
                    }
                    let len = last - first + 1;
                    let cut = cut * P;
                    if cut >= len {
                        continue;
                    }
                    let new_id = subs.len();
                    let probe = Probe {
                        id: new_id,
                        hits: hits.clone(),
                    };
                    let right = subs[id]
                        .as_ref()
                        .unwrap()
                        .split(first..first + cut, first + cut..first + len, probe)
                        .unwrap();
                    subs.push(Some(right));
                    model.update(id, (first, first + cut - 1));
                    model.insert(new_id, (first + cut, last));
                }
            }
            Op::Start { page, pages } => {
                if guards.len() >= 4 {
                    continue;
                }
                let r = Range::new(page * P, (page + pages) * P, Event::Unmap).unwrap();
                guards.push(mm.invalidate_range_start(r));
                let mut got = std::mem::take(&mut *hits.lock().unwrap());
                got.sort_unstable();
                let want = model.start(page * P, (page + pages) * P - 1);
                prop_assert_eq!(got, want, "which subscriptions an invalidation reached");
            }
            Op::End { guard } => {
                if !guards.is_empty() {
                    let g = guards.remove(guard % guards.len());
                    drop(g);
                    model.end();
                }
            }
            Op::ReadBegin { sub } => {
                if let Some(id) = live(&subs, sub) {
                    let n = &model.nodes[&id];
                    if n.seq == model.seq {
                        continue; // would (correctly) wait: nothing can end it here
                    }
                    let s = subs[id].as_ref().unwrap().read_begin();
                    tokens.push((id, s, n.seq));
                }
            }
            Op::ReadRetry { token } => {
                if tokens.is_empty() {
                    continue;
                }
                let (id, s, seq_then) = tokens[token % tokens.len()];
                if let (Some(sub), Some(n)) = (subs[id].as_ref(), model.nodes.get(&id)) {
                    let want = n.seq != seq_then;
                    prop_assert_eq!(sub.check_retry(s), want);
                    prop_assert_eq!(sub.lock().read_retry(s), want);
                }
            }
        }
        let stats = mm.stats();
        prop_assert_eq!(stats.interval_seq, model.seq);
        prop_assert_eq!(stats.interval_subscriptions, model.nodes.len());
        for (id, n) in &model.nodes {
            if let Some(sub) = subs[*id].as_ref() {
                prop_assert_eq!(sub.range(), Some(n.target.0..n.target.1 + 1));
            }
        }
    }
    drop(guards);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn interval_protocol_matches_the_sequential_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

// ----- several threads ---------------------------------------------------------------

/// A mirror of some pages of the primary; drops what an invalidation covers.
struct PageMirror {
    pages: BTreeMap<u64, u64>,
}

impl IntervalSubscriber for PageMirror {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.pages
            .retain(|&page, _| !r.overlaps(page * P, (page + 1) * P));
        Ok(())
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// One primary thread remaps random pages inside invalidations while two secondary threads
/// insert, remove, move and split their subscriptions and fill pages through the
/// collision-retry protocol. At the end (nothing in flight) every copy a secondary holds
/// must equal the primary's page: a fill that lost a race and was installed anyway would
/// still be there, stale.
fn run_threads(seed: u64) -> Result<(), TestCaseError> {
    const PAGES: u64 = 24;
    let mm = Subscriptions::new();
    let primary: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..PAGES).map(std::sync::atomic::AtomicU64::new).collect());
    // Per page: invalidations of it in flight (raised before start, lowered after end).
    let busy: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..PAGES)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
    );
    let go = Arc::new(std::sync::Barrier::new(3));
    // Enable the interval part before the threads start.
    drop(
        mm.insert_interval(
            1 << 40..(1 << 40) + P,
            PageMirror {
                pages: BTreeMap::new(),
            },
        )
        .unwrap(),
    );
    let writer = {
        let (mm, primary, busy, go) = (mm.clone(), primary.clone(), busy.clone(), go.clone());
        std::thread::spawn(move || {
            let mut s = seed | 1;
            go.wait();
            for n in 0..400u64 {
                let page = xorshift(&mut s) % PAGES;
                let pages = 1 + xorshift(&mut s) % 3;
                let end = (page + pages).min(PAGES);
                for p in page..end {
                    busy[p as usize].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let g =
                    mm.invalidate_range_start(Range::new(page * P, end * P, Event::Clear).unwrap());
                for p in page..end {
                    primary[p as usize].store(1000 + n, std::sync::atomic::Ordering::SeqCst);
                }
                drop(g);
                for p in page..end {
                    busy[p as usize].fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::yield_now();
            }
        })
    };
    let secondaries: Vec<_> = (0..2u64)
        .map(|t| {
            let (mm, primary, busy, go) = (mm.clone(), primary.clone(), busy.clone(), go.clone());
            std::thread::spawn(move || {
                let mut s = seed.wrapping_mul(31).wrapping_add(t) | 1;
                let mut stale = 0u64;
                go.wait();
                let mut subs: Vec<(IntervalSubscription<PageMirror>, u64, u64)> = Vec::new();
                let mut filled = 0u64;
                for _ in 0..400 {
                    match xorshift(&mut s) % 6 {
                        0 if subs.len() < 4 => {
                            let first = xorshift(&mut s) % PAGES;
                            let n = 1 + xorshift(&mut s) % (PAGES - first).min(6);
                            let sub = mm
                                .insert_interval(
                                    first * P..(first + n) * P,
                                    PageMirror {
                                        pages: BTreeMap::new(),
                                    },
                                )
                                .unwrap();
                            subs.push((sub, first, n));
                        }
                        1 if !subs.is_empty() => {
                            let i = (xorshift(&mut s) as usize) % subs.len();
                            subs.swap_remove(i).0.remove_nowait();
                        }
                        2 if !subs.is_empty() => {
                            // Move: drop the copies outside the new range under the lock.
                            let i = (xorshift(&mut s) as usize) % subs.len();
                            let first = xorshift(&mut s) % PAGES;
                            let n = 1 + xorshift(&mut s) % (PAGES - first).min(6);
                            let (sub, f, len) = &mut subs[i];
                            let mut m = sub.lock();
                            sub.update(first * P..(first + n) * P).unwrap();
                            m.pages.retain(|&p, _| p >= first && p < first + n);
                            drop(m);
                            (*f, *len) = (first, n);
                        }
                        3 if !subs.is_empty() => {
                            let i = (xorshift(&mut s) as usize) % subs.len();
                            let (f, len) = (subs[i].1, subs[i].2);
                            if len >= 2 {
                                let cut = 1 + xorshift(&mut s) % (len - 1);
                                let mut m = subs[i].0.lock();
                                let right = subs[i]
                                    .0
                                    .split(
                                        f * P..(f + cut) * P,
                                        (f + cut) * P..(f + len) * P,
                                        PageMirror {
                                            pages: m.pages.split_off(&(f + cut)),
                                        },
                                    )
                                    .unwrap();
                                drop(m);
                                subs[i].2 = cut;
                                subs.push((right, f + cut, len - cut));
                            }
                        }
                        _ if !subs.is_empty() => {
                            let i = (xorshift(&mut s) as usize) % subs.len();
                            let (sub, f, len) = &subs[i];
                            let page = f + xorshift(&mut s) % len;
                            for _ in 0..16 {
                                let seq = sub.read_begin();
                                let v = primary[page as usize]
                                    .load(std::sync::atomic::Ordering::SeqCst);
                                std::thread::yield_now();
                                let mut m = sub.lock();
                                if m.read_retry(seq) {
                                    continue;
                                }
                                // The primary only changes a page inside an invalidation of
                                // it; one that changed it since `v` was read and has ended
                                // must have made read_retry fail. (Read the value first.)
                                let now = primary[page as usize]
                                    .load(std::sync::atomic::Ordering::SeqCst);
                                if now != v
                                    && busy[page as usize].load(std::sync::atomic::Ordering::SeqCst)
                                        == 0
                                {
                                    stale += 1;
                                }
                                m.pages.insert(page, v);
                                filled += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                (subs, filled, stale)
            })
        })
        .collect();
    writer.join().unwrap();
    let mut filled = 0;
    for t in secondaries {
        let (subs, f, stale) = t.join().unwrap();
        filled += f;
        prop_assert_eq!(stale, 0, "installs that lost a race (seed {})", seed);
        for (sub, first, n) in subs {
            let m = sub.lock();
            for (&page, &v) in &m.pages {
                prop_assert!(
                    page >= first && page < first + n,
                    "a copy outside the range"
                );
                let now = primary[page as usize].load(std::sync::atomic::Ordering::SeqCst);
                prop_assert_eq!(v, now, "stale copy of page {} (seed {})", page, seed);
            }
        }
    }
    prop_assert!(filled > 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn concurrent_changes_and_fills_leave_no_stale_copy(seed in any::<u64>()) {
        run_threads(seed)?;
    }
}
