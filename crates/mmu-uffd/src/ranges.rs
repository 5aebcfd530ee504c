//! A set of disjoint half-open address ranges: the memory watched explicitly with
//! `Monitor::watch` (never unwatched because cache entries went).

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};

/// Disjoint, non-adjacent `[start, end)` ranges keyed by start (adjacent ranges merge).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Whether `[start, end)` is entirely inside the set (an empty range always is). Ranges
    /// are merged when they touch, so one range of the set must hold all of it: one lookup.
    pub(crate) fn covers(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        match self.map.range(..=start).next_back() {
            Some((_, &e)) => e >= end,
            None => false,
        }
    }

    /// Adds `[start, end)`, merging with overlapping and adjacent ranges.
    pub(crate) fn add(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= end {
                return; // covered already
            }
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Absorb every range that starts inside `(start, end]`, one at a time (no
        // allocation: usually none or one, the neighbour a fresh buffer touches); one
        // starting at `start` is the one found above, which the insert below replaces.
        // Ranges are disjoint, so none can start past `end` once `end` grows to a removed
        // one's.
        while let Some((&s, &e)) = self.map.range((Excluded(start), Included(end))).next() {
            self.map.remove(&s);
            end = end.max(e);
        }
        self.map.insert(start, end);
    }

    /// Removes `[start, end)`, cutting ranges that stick out of it.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, start);
                if e > end {
                    self.map.insert(end, e);
                }
            }
        }
        // One range at a time (no allocation: the monitor's applier calls this).
        while let Some((&s, &e)) = self.map.range(start..end).next() {
            self.map.remove(&s);
            if e > end {
                self.map.insert(end, e);
            }
        }
    }

    /// The parts of `[start, end)` outside the set, in order.
    pub(crate) fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let before = self.map.range(..start).next_back().map(|(_, &e)| e);
        gaps(
            start,
            end,
            before,
            self.map.range(start..end).map(|(&s, &e)| (s, e)),
        )
    }

    /// The ranges, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }
}

/// The parts of `[start, end)` that none of `segments` covers, in order: `segments` are
/// the disjoint ranges that start inside `[start, end)`, in order, and `before_end` is the
/// end of the one that starts before `start`, if any.
pub(crate) fn gaps(
    start: u64,
    end: u64,
    before_end: Option<u64>,
    segments: impl Iterator<Item = (u64, u64)>,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if start >= end {
        return out;
    }
    let mut cur = before_end.map_or(start, |e| e.max(start));
    for (s, e) in segments {
        if cur < s {
            out.push((cur, s));
        }
        cur = cur.max(e);
    }
    if cur < end {
        out.push((cur, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::RangeSet;
    use proptest::prelude::*;

    /// The reference: one bit per unit of a small space.
    fn model_bits(ops: &[(bool, u64, u64)]) -> Vec<bool> {
        let mut bits = vec![false; 64];
        for &(add, s, e) in ops {
            for b in bits.iter_mut().take(e as usize).skip(s as usize) {
                *b = add;
            }
        }
        bits
    }

    proptest! {
        #[test]
        fn behaves_like_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..64), 0..40)) {
            let ops: Vec<(bool, u64, u64)> = ops.into_iter().map(|(a, x, y)| (a, x.min(y), x.max(y))).collect();
            let mut set = RangeSet::default();
            for &(add, s, e) in &ops {
                if add { set.add(s, e) } else { set.remove(s, e) }
            }
            let bits = model_bits(&ops);
            // Canonical form: disjoint, non-adjacent, non-empty.
            let v: Vec<(u64, u64)> = set.iter().collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "not canonical: {:?}", v);
            }
            for &(s, e) in &v {
                prop_assert!(s < e);
            }
            for s in 0..64u64 {
                for e in s + 1..=64 {
                    let want = bits[s as usize..e as usize].iter().all(|&b| b);
                    prop_assert_eq!(set.covers(s, e), want, "covers({}, {}) in {:?}", s, e, v);
                }
            }
            // `uncovered` is exactly the clear bits of the queried range.
            let (qs, qe) = (ops.len() as u64 % 20, 40 + ops.len() as u64 % 24);
            let mut got = [false; 64];
            let gaps = set.uncovered(qs, qe);
            for w in gaps.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "gaps not disjoint and ordered: {:?}", gaps);
            }
            for (s, e) in gaps {
                prop_assert!(qs <= s && s < e && e <= qe);
                for b in got.iter_mut().take(e as usize).skip(s as usize) {
                    *b = true;
                }
            }
            for i in qs..qe {
                prop_assert_eq!(got[i as usize], !bits[i as usize], "unit {} of {:?}", i, v);
            }
        }
    }
}
