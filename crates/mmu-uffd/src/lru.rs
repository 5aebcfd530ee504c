//! The cache's index: disjoint ranges by start address, with an exact LRU order.
//!
//! A slab of slots threaded on an intrusive doubly linked list (most recently used at the
//! head) plus a vector of `(start, slot)` sorted by start. Ranges never overlap, so the only
//! candidate to cover `[s, e)` is the range with the greatest start `<= s`: a lookup is one
//! binary search, a touch is four index writes, eviction pops the tail. Everything runs
//! under the cache's lock.
//!
//! Why a sorted vector and not a `BTreeMap`: lookups are the hot path (a cache hit) and a
//! binary search over a contiguous array beats the tree's node walk (measured in
//! `benches/cache.rs`); inserts and removals (misses) move at most `capacity` 16-byte
//! pairs, which is small next to the registration a miss performs anyway.

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Slot<V> {
    start: u64,
    end: u64,
    value: Option<V>,
    prev: u32,
    next: u32,
}

/// Disjoint `[start, end)` ranges with values, in LRU order.
#[derive(Debug)]
pub(crate) struct LruIndex<V> {
    by_start: Vec<(u64, u32)>,
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
}

impl<V> Default for LruIndex<V> {
    fn default() -> Self {
        LruIndex {
            by_start: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

/// A slot number, valid until the slot is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotId(u32);

impl<V> LruIndex<V> {
    pub(crate) fn len(&self) -> usize {
        self.by_start.len()
    }

    /// The range covering `[start, end)`, if any.
    #[inline]
    pub(crate) fn find_covering(&self, start: u64, end: u64) -> Option<SlotId> {
        let i = self.by_start.partition_point(|&(s, _)| s <= start);
        let (_, slot) = *self.by_start.get(i.checked_sub(1)?)?;
        (self.slots[slot as usize].end >= end).then_some(SlotId(slot))
    }

    /// Position in `by_start` of the first range starting at or after `start`.
    fn position(&self, start: u64) -> usize {
        self.by_start.partition_point(|&(s, _)| s < start)
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

    /// Ranges overlapping `[start, end)`.
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Vec<SlotId> {
        let mut out = Vec::new();
        let below_end = self.by_start.partition_point(|&(s, _)| s < end);
        for &(_, slot) in self.by_start[..below_end].iter().rev() {
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
        let at = self.position(self.slots[id.0 as usize].start);
        self.by_start.remove(at);
        let s = &mut self.slots[id.0 as usize];
        self.free.push(id.0);
        s.value
            .take()
            .expect("slot ids are only handed out for occupied slots")
    }

    /// Inserts `[start, end)` as most recently used, removing (and returning) every range
    /// that overlaps it.
    pub(crate) fn insert(&mut self, start: u64, end: u64, value: V) -> Vec<V> {
        debug_assert!(start < end);
        let removed: Vec<V> = self
            .overlapping(start, end)
            .into_iter()
            .map(|id| self.remove(id))
            .collect();
        let slot = Slot {
            start,
            end,
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
        let at = self.position(start);
        self.by_start.insert(at, (start, i));
        self.push_front(i);
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
            .by_start
            .iter()
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
    fn order(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = self.head;
        while i != NIL {
            let s = &self.slots[i as usize];
            out.push((s.start, s.end));
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
        Insert(u64, u64),
        Get(u64, u64),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..100, 1u64..20).prop_map(|(s, l)| Op::Insert(s, s + l)),
            (0u64..100, 1u64..10).prop_map(|(s, l)| Op::Get(s, s + l)),
            Just(Op::Pop),
        ]
    }

    proptest! {
        /// Against a model: a Vec in MRU order of disjoint ranges.
        #[test]
        fn matches_a_vector_model(ops in proptest::collection::vec(op(), 0..80)) {
            let mut idx = LruIndex::default();
            let mut model: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(s, e) => {
                        let mut removed: Vec<(u64, u64)> = idx.insert(s, e, (s, e));
                        let mut want: Vec<(u64, u64)> = model.iter().copied().filter(|&(a, b)| a < e && b > s).collect();
                        model.retain(|&(a, b)| !(a < e && b > s));
                        model.insert(0, (s, e));
                        removed.sort();
                        want.sort();
                        prop_assert_eq!(removed, want);
                    }
                    Op::Get(s, e) => {
                        let got = idx.find_covering(s, e);
                        let want = model.iter().position(|&(a, b)| a <= s && b >= e);
                        prop_assert_eq!(got.is_some(), want.is_some());
                        if let (Some(id), Some(pos)) = (got, want) {
                            prop_assert_eq!(*idx.value(id), model[pos]);
                            prop_assert_eq!(idx.range(id), model[pos]);
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
            }
        }
    }
}
