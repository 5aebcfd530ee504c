//! The cache's index: for each key (the caller's registration attributes), disjoint ranges
//! by start address; one exact LRU order across all keys; the total bytes indexed.
//!
//! A slab of slots threaded on an intrusive doubly linked list (most recently used at the
//! head) plus, per key, a *group*: a double-ended vector of `(start, slot)` sorted by
//! start. Ranges of one key never overlap, so the only candidate to cover `[s, e)` is the
//! range with the greatest start `<= s` in that key's group: a lookup is one group search
//! (a comparison per distinct key while there are at most [`LINEAR_GROUPS`], a hash lookup
//! beyond) and one binary search, a touch is four index writes, eviction pops the tail.
//! Ranges of different keys may overlap. Everything runs under the cache's lock.
//!
//! Why a sorted vector and not a `BTreeMap`: lookups are the hot path (a cache hit) and a
//! binary search over a contiguous array beats the tree's node walk (measured in
//! `benches/cache.rs`). Why double-ended (`VecDeque`): an insert or a removal moves the
//! pairs on its shorter side, so ranges arriving in either address order cost nothing to
//! place. `mmap` hands out addresses top-down, so with a plain vector every new buffer's
//! range went to the front and moved all the others: half a microsecond per miss with
//! 2000 entries.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

const NIL: u32 = u32::MAX;

/// Up to this many distinct keys, a key's group is found by comparing keys (the common
/// case: `()`, or a few access-flag and device combinations); beyond, through a hash map.
pub(crate) const LINEAR_GROUPS: usize = 8;

#[derive(Debug)]
struct Slot<V> {
    start: u64,
    end: u64,
    /// The slot's group (an index into `groups`).
    group: u32,
    value: Option<V>,
    prev: u32,
    next: u32,
}

/// The ranges of one key, sorted by start.
#[derive(Debug)]
struct Group<K> {
    key: K,
    by_start: VecDeque<(u64, u32)>,
}

/// Per key, disjoint `[start, end)` ranges with values, in one LRU order.
#[derive(Debug)]
pub(crate) struct LruIndex<K, V> {
    groups: Vec<Group<K>>,
    /// Key to group index, kept for every group (consulted past `LINEAR_GROUPS`).
    by_key: HashMap<K, u32>,
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
    bytes: u64,
}

impl<K, V> Default for LruIndex<K, V> {
    fn default() -> Self {
        LruIndex {
            groups: Vec::new(),
            by_key: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
            bytes: 0,
        }
    }
}

/// A slot number, valid until the slot is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotId(u32);

impl<K: Clone + Eq + Hash, V> LruIndex<K, V> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The sum of the lengths of the indexed ranges.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    #[inline]
    fn group_of(&self, key: &K) -> Option<u32> {
        if self.groups.len() <= LINEAR_GROUPS {
            self.groups
                .iter()
                .position(|g| g.key == *key)
                .map(|i| i as u32)
        } else {
            self.by_key.get(key).copied()
        }
    }

    /// The range of `key` covering `[start, end)`, if any.
    #[inline]
    pub(crate) fn find_covering(&self, key: &K, start: u64, end: u64) -> Option<SlotId> {
        let by_start = &self.groups[self.group_of(key)? as usize].by_start;
        let i = by_start.partition_point(|&(s, _)| s <= start);
        let (_, slot) = *by_start.get(i.checked_sub(1)?)?;
        (self.slots[slot as usize].end >= end).then_some(SlotId(slot))
    }

    pub(crate) fn value(&self, id: SlotId) -> &V {
        self.slots[id.0 as usize]
            .value
            .as_ref()
            .expect("slot ids are only handed out for occupied slots")
    }

    pub(crate) fn range(&self, id: SlotId) -> (u64, u64) {
        let s = &self.slots[id.0 as usize];
        (s.start, s.end)
    }

    /// Ranges of `key` overlapping `[start, end)`.
    pub(crate) fn overlapping(&self, key: &K, start: u64, end: u64) -> Vec<SlotId> {
        let mut out = Vec::new();
        let Some(g) = self.group_of(key) else {
            return out;
        };
        let by_start = &self.groups[g as usize].by_start;
        let below_end = by_start.partition_point(|&(s, _)| s < end);
        for &(_, slot) in by_start.range(..below_end).rev() {
            if self.slots[slot as usize].end <= start {
                break;
            }
            out.push(SlotId(slot));
        }
        out
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }

    /// Marks `id` most recently used.
    #[inline]
    pub(crate) fn touch(&mut self, id: SlotId) {
        if self.head != id.0 {
            self.unlink(id.0);
            self.push_front(id.0);
        }
    }

    /// Removes `id` and returns its value.
    pub(crate) fn remove(&mut self, id: SlotId) -> V {
        self.unlink(id.0);
        let (start, end, g) = {
            let s = &self.slots[id.0 as usize];
            (s.start, s.end, s.group)
        };
        let by_start = &mut self.groups[g as usize].by_start;
        let at = by_start.partition_point(|&(s, _)| s < start);
        by_start.remove(at);
        if by_start.is_empty() {
            self.drop_group(g);
        }
        self.len -= 1;
        self.bytes -= end - start;
        self.free.push(id.0);
        self.slots[id.0 as usize]
            .value
            .take()
            .expect("slot ids are only handed out for occupied slots")
    }

    /// Removes the empty group `g`; the last group takes its index.
    fn drop_group(&mut self, g: u32) {
        let gone = self.groups.swap_remove(g as usize);
        self.by_key.remove(&gone.key);
        if let Some(moved) = self.groups.get(g as usize) {
            for &(_, slot) in &moved.by_start {
                self.slots[slot as usize].group = g;
            }
            self.by_key.insert(moved.key.clone(), g);
        }
    }

    /// The group of `key`, created if missing.
    fn group_for(&mut self, key: K) -> u32 {
        if let Some(g) = self.group_of(&key) {
            return g;
        }
        let g = self.groups.len() as u32;
        self.by_key.insert(key.clone(), g);
        self.groups.push(Group {
            key,
            by_start: VecDeque::new(),
        });
        g
    }

    /// Inserts `[start, end)` of `key` as most recently used, removing (and returning)
    /// every range of `key` that overlaps it.
    pub(crate) fn insert(&mut self, key: K, start: u64, end: u64, value: V) -> Vec<V> {
        debug_assert!(start < end);
        // One search finds both the overlaps and, when there are none (the common case:
        // a miss on memory no entry of the key covers), the insertion point: the ranges
        // starting before `end` then all end by `start` (they are sorted and disjoint),
        // so they are exactly those starting before `start`.
        let mut at = None;
        let mut removed = Vec::new();
        if let Some(g) = self.group_of(&key) {
            let by_start = &self.groups[g as usize].by_start;
            let below_end = by_start.partition_point(|&(s, _)| s < end);
            let overlaps = below_end
                .checked_sub(1)
                .is_some_and(|last| self.slots[by_start[last].1 as usize].end > start);
            if overlaps {
                removed = self
                    .overlapping(&key, start, end)
                    .into_iter()
                    .map(|id| self.remove(id))
                    .collect();
            } else {
                at = Some(below_end);
            }
        }
        let group = self.group_for(key);
        let slot = Slot {
            start,
            end,
            group,
            value: Some(value),
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let by_start = &mut self.groups[group as usize].by_start;
        let at = at.unwrap_or_else(|| by_start.partition_point(|&(s, _)| s < start));
        by_start.insert(at, (start, i));
        self.push_front(i);
        self.len += 1;
        self.bytes += end - start;
        removed
    }

    /// Removes the least recently used range.
    pub(crate) fn pop_lru(&mut self) -> Option<V> {
        match self.tail {
            NIL => None,
            t => Some(self.remove(SlotId(t))),
        }
    }

    /// Removes (and returns) every value for which `dead` holds.
    pub(crate) fn remove_where(&mut self, mut dead: impl FnMut(&V) -> bool) -> Vec<V> {
        let ids: Vec<SlotId> = self
            .groups
            .iter()
            .flat_map(|g| g.by_start.iter())
            .filter(|&&(_, i)| {
                dead(
                    self.slots[i as usize]
                        .value
                        .as_ref()
                        .expect("indexed slots are occupied"),
                )
            })
            .map(|&(_, i)| SlotId(i))
            .collect();
        ids.into_iter().map(|id| self.remove(id)).collect()
    }

    /// Removes everything.
    pub(crate) fn drain(&mut self) -> Vec<V> {
        let mut out = Vec::with_capacity(self.len());
        while let Some(v) = self.pop_lru() {
            out.push(v);
        }
        out
    }

    /// Values from most to least recently used (tests).
    #[cfg(test)]
    fn order(&self) -> Vec<V>
    where
        V: Clone,
    {
        let mut out = Vec::new();
        let mut i = self.head;
        while i != NIL {
            let s = &self.slots[i as usize];
            out.push(s.value.clone().expect("linked slots are occupied"));
            i = s.next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u64, u64),
        Get(u8, u64, u64),
        Pop,
    }

    /// Keys below `keys`: 3 stays on the linear group search, 20 crosses
    /// `LINEAR_GROUPS` both ways (groups are created and dropped as ranges come and go).
    fn op(keys: u8) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..keys, 0u64..100, 1u64..20).prop_map(|(k, s, l)| Op::Insert(k, s, s + l)),
            (0..keys, 0u64..100, 1u64..10).prop_map(|(k, s, l)| Op::Get(k, s, s + l)),
            Just(Op::Pop),
        ]
    }

    /// Against a model: a Vec in MRU order of `(key, start, end)`, disjoint per key.
    fn check(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut idx = LruIndex::default();
        let mut model: Vec<(u8, u64, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Insert(k, s, e) => {
                    let mut removed = idx.insert(k, s, e, (k, s, e));
                    let overlaps = |&(b, x, y): &(u8, u64, u64)| b == k && x < e && y > s;
                    let mut want: Vec<_> = model.iter().copied().filter(overlaps).collect();
                    model.retain(|r| !overlaps(r));
                    model.insert(0, (k, s, e));
                    removed.sort();
                    want.sort();
                    prop_assert_eq!(removed, want);
                }
                Op::Get(k, s, e) => {
                    let got = idx.find_covering(&k, s, e);
                    let want = model
                        .iter()
                        .position(|&(b, x, y)| b == k && x <= s && y >= e);
                    prop_assert_eq!(got.is_some(), want.is_some());
                    if let (Some(id), Some(pos)) = (got, want) {
                        prop_assert_eq!(*idx.value(id), model[pos]);
                        prop_assert_eq!(idx.range(id), (model[pos].1, model[pos].2));
                        idx.touch(id);
                        let r = model.remove(pos);
                        model.insert(0, r);
                    }
                }
                Op::Pop => {
                    prop_assert_eq!(idx.pop_lru(), model.pop());
                }
            }
            prop_assert_eq!(idx.order(), model.clone());
            prop_assert_eq!(idx.len(), model.len());
            let bytes: u64 = model.iter().map(|&(_, s, e)| e - s).sum();
            prop_assert_eq!(idx.bytes(), bytes);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_a_vector_model_with_few_keys(ops in proptest::collection::vec(op(3), 0..80)) {
            check(ops)?;
        }

        #[test]
        fn matches_a_vector_model_with_many_keys(ops in proptest::collection::vec(op(20), 0..200)) {
            check(ops)?;
        }
    }

    #[test]
    fn remove_where_and_drain_empty_every_group() {
        let mut idx = LruIndex::default();
        for k in 0..12u8 {
            idx.insert(k, 0, 10, k);
            idx.insert(k, 20, 30, k + 100);
        }
        let odd = idx.remove_where(|v| v % 2 == 1);
        assert_eq!(odd.len(), 12);
        assert_eq!(idx.len(), 12);
        assert_eq!(idx.bytes(), 120);
        for k in 0..12u8 {
            assert_eq!(idx.find_covering(&k, 0, 10).is_some(), k % 2 == 0);
        }
        assert_eq!(idx.drain().len(), 12);
        assert_eq!((idx.len(), idx.bytes(), idx.groups.len()), (0, 0, 0));
        assert!(idx.by_key.is_empty());
    }
}
