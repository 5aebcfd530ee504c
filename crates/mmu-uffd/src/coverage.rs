//! A counted range map: how many cache entries need each address watched.
//!
//! The monitor registers memory with userfaultfd so that its unmaps, moves and madvise are
//! reported; a registered range makes every madvise on it wait for the monitor to read its
//! event (the cache bench's madvise part: an order of magnitude slower). The cache
//! therefore keeps memory watched only while some entry needs it: every entry
//! [`acquire`](CoverageMap::acquire)s its range when it is filled and
//! [`release`](CoverageMap::release)s it when it goes, and `release` reports the ranges
//! whose count dropped to zero, the ones to unregister. A range stays registered while any
//! entry needs it, is unregistered when the last one goes, and never while another still
//! needs it, however the entries' ranges overlap.
//!
//! The map only counts: registering and unregistering are the caller's, under the same
//! lock as the map update (else an unregister for a count that reached zero could undo a
//! register made meanwhile for a new count of one). It allocates, so it is for user threads,
//! not the monitor thread.
//!
//! # Invariants
//!
//! The map holds disjoint `[start, end)` segments keyed by start, each non-empty with a
//! nonzero count; addresses outside every segment have count zero. Two adjacent segments
//! (one ends where the next starts) never have the same count: they are merged, so the
//! map has as few segments as the counts allow. A call touching `k` segments costs
//! `O((k + 1) log n)`.
//!
//! Ranges are meant to be page-aligned, but any `u64` range works; an empty range
//! (`start >= end`) is a no-op. Releasing addresses whose count is already zero (a caller's
//! mistake) changes nothing for them: they are skipped and counted in `release`'s result.
//! A count that reaches `u32::MAX` stays there (the range is never reported freed: watched
//! too long is safe, unwatched too early is not).

use std::collections::BTreeMap;

/// Disjoint segments `start -> (end, count)`, count > 0, adjacent equal counts merged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct CoverageMap {
    map: BTreeMap<u64, (u64, u32)>,
}

impl CoverageMap {
    /// Adds one to the count of every address of `[start, end)`.
    pub(crate) fn acquire(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Fast path: a segment that is exactly the range (a buffer leased again). Only its
        // two boundaries can become mergeable.
        if let Some((e, c)) = self.map.get_mut(&start) {
            if *e == end {
                *c = c.saturating_add(1);
                self.merge_at(start);
                self.merge_at(end);
                return;
            }
        }
        // Fast path: no address of the range is counted yet (memory leased for the first
        // time, the common miss). The last segment starting before `end` is the only one
        // that could overlap the range: if it ends by `start`, none does. The range becomes
        // one segment of count 1, merged with a neighbour of count 1 that touches it on
        // either side (the merge invariant: no other boundary changed). A few map
        // operations and no allocation, where the general path splits, collects the gaps
        // and merges in a second pass.
        let before = self.map.range(..end).next_back().map(|(&s, &v)| (s, v));
        if before.map_or(true, |(_, (e, _))| e <= start) {
            let mut seg = (start, end);
            if let Some((s, (e, 1))) = before {
                if e == start {
                    seg.0 = s; // extends the neighbour below (replaced by the insert)
                }
            }
            if let Some(&(e, 1)) = self.map.get(&end) {
                self.map.remove(&end);
                seg.1 = e;
            }
            self.map.insert(seg.0, (seg.1, 1));
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let mut gaps = Vec::new();
        let mut cur = start;
        for (&s, (e, c)) in self.map.range_mut(start..end) {
            if cur < s {
                gaps.push((cur, s));
            }
            *c = c.saturating_add(1);
            cur = *e;
        }
        if cur < end {
            gaps.push((cur, end));
        }
        for (s, e) in gaps {
            self.map.insert(s, (e, 1));
        }
        self.merge_within(start, end);
    }

    /// Every range with a nonzero count, in order.
    pub(crate) fn segments(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(&s, &(e, _))| (s, e)).collect()
    }

    /// The parts of `[start, end)` whose count is zero, in order.
    pub(crate) fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let before = self.map.range(..start).next_back().map(|(_, &(e, _))| e);
        let inside = self.map.range(start..end).map(|(&s, &(e, _))| (s, e));
        crate::ranges::gaps(start, end, before, inside)
    }

    /// Subtracts one from the count of every address of `[start, end)` and appends to
    /// `freed` the ranges whose count dropped to zero (sorted, adjacent ones merged; what
    /// `freed` held before is left alone). Addresses whose count was already zero are
    /// skipped; returns how many there were (0 unless the caller releases what it never
    /// acquired).
    pub(crate) fn release(&mut self, start: u64, end: u64, freed: &mut Vec<(u64, u64)>) -> u64 {
        if start >= end {
            return 0;
        }
        // Fast path: a segment that is exactly the range.
        if let Some(&(e, c)) = self.map.get(&start) {
            if e == end {
                match c {
                    u32::MAX => {}
                    1 => {
                        // A gap appears: no boundary becomes mergeable.
                        self.map.remove(&start);
                        freed.push((start, end));
                    }
                    _ => {
                        self.map.insert(start, (end, c - 1));
                        self.merge_at(start);
                        self.merge_at(end);
                    }
                }
                return 0;
            }
        }
        self.split_at(start);
        self.split_at(end);
        let base = freed.len();
        let mut unheld = 0;
        let mut cur = start;
        let mut zeroed = Vec::new();
        for (&s, (e, c)) in self.map.range_mut(start..end) {
            unheld += s - cur;
            cur = *e;
            match *c {
                u32::MAX => {} // saturated: kept for good
                1 => {
                    zeroed.push(s);
                    let ours = freed.len() > base;
                    match freed.last_mut() {
                        Some(last) if ours && last.1 == s => last.1 = *e,
                        _ => freed.push((s, *e)),
                    }
                }
                _ => *c -= 1,
            }
        }
        unheld += end.saturating_sub(cur);
        for s in zeroed {
            self.map.remove(&s);
        }
        self.merge_within(start, end);
        unheld
    }

    /// The count of the address `addr`.
    #[cfg(test)]
    pub(crate) fn count_at(&self, addr: u64) -> u32 {
        match self.map.range(..=addr).next_back() {
            Some((_, &(e, c))) if addr < e => c,
            _ => 0,
        }
    }

    /// Whether every count is zero.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The number of segments.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The segments `(start, end, count)`, in order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.map.iter().map(|(&s, &(e, c))| (s, e, c))
    }

    /// Cuts the segment that contains `at` strictly inside into two with the same count.
    fn split_at(&mut self, at: u64) {
        if let Some((&s, &(e, c))) = self.map.range(..at).next_back() {
            if e > at {
                self.map.insert(s, (at, c));
                self.map.insert(at, (e, c));
            }
        }
    }

    /// Merges the segment ending at `at` with the one starting there if their counts are
    /// equal. After a change of every count in `[start, end)` by the same amount, only the
    /// boundaries `start` and `end` can need this (inside, both sides changed alike).
    fn merge_at(&mut self, at: u64) {
        let Some((&s, &(e, c))) = self.map.range(..at).next_back() else {
            return;
        };
        if e != at {
            return;
        }
        if let Some(&(next_end, next_count)) = self.map.get(&at) {
            if next_count == c {
                self.map.remove(&at);
                self.map.insert(s, (next_end, c));
            }
        }
    }

    /// Restores the merge invariant after a change inside `[start, end)`: only boundaries
    /// in `[start, end]` can have changed, so only the segments from the one before `start`
    /// to the one at `end` are looked at.
    fn merge_within(&mut self, start: u64, end: u64) {
        let first = self
            .map
            .range(..start)
            .next_back()
            .or_else(|| self.map.range(start..).next())
            .map(|(&s, _)| s);
        let Some(mut key) = first else {
            return;
        };
        loop {
            let Some(&(e, c)) = self.map.get(&key) else {
                return;
            };
            if let Some(&(next_end, next_count)) = self.map.get(&e) {
                if next_count == c {
                    self.map.remove(&e);
                    self.map.insert(key, (next_end, c));
                    continue;
                }
            }
            match self.map.range(e..).next() {
                Some((&s, _)) if s < end => key = s,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CoverageMap;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const PAGE: u64 = 4096;
    const PAGES: u64 = 24;

    /// Disjoint, sorted, non-empty, nonzero, no two adjacent segments with equal counts.
    fn check_invariants(m: &CoverageMap) -> Result<(), String> {
        let v: Vec<(u64, u64, u32)> = m.iter().collect();
        for &(s, e, c) in &v {
            if s >= e || c == 0 {
                return Err(format!("bad segment ({s:#x}, {e:#x}, {c}) in {v:x?}"));
            }
        }
        for w in v.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!("overlap in {v:x?}"));
            }
            if w[0].1 == w[1].0 && w[0].2 == w[1].2 {
                return Err(format!("unmerged in {v:x?}"));
            }
        }
        if m.len() != v.len() || m.is_empty() != v.is_empty() {
            return Err("len/is_empty disagree with iter".into());
        }
        Ok(())
    }

    fn segs(m: &CoverageMap) -> Vec<(u64, u64, u32)> {
        m.iter().collect()
    }

    #[test]
    fn nested_overlaps_free_only_when_last_goes() {
        let mut m = CoverageMap::default();
        let mut freed = Vec::new();
        m.acquire(0x1000, 0x5000);
        m.acquire(0x2000, 0x3000);
        assert_eq!(
            segs(&m),
            [
                (0x1000, 0x2000, 1),
                (0x2000, 0x3000, 2),
                (0x3000, 0x5000, 1)
            ]
        );
        assert_eq!(m.release(0x2000, 0x3000, &mut freed), 0);
        assert!(freed.is_empty());
        assert_eq!(segs(&m), [(0x1000, 0x5000, 1)], "merged back into one");
        assert_eq!(m.release(0x1000, 0x5000, &mut freed), 0);
        assert_eq!(freed, [(0x1000, 0x5000)]);
        assert!(m.is_empty());
    }

    #[test]
    fn release_reports_the_pieces_that_reach_zero_merged() {
        let mut m = CoverageMap::default();
        let mut freed = vec![(0x100, 0x200)]; // what the caller had is left alone
        m.acquire(0x1000, 0x4000);
        m.acquire(0x4000, 0x6000);
        m.acquire(0x3000, 0x5000);
        assert_eq!(
            segs(&m),
            [
                (0x1000, 0x3000, 1),
                (0x3000, 0x5000, 2),
                (0x5000, 0x6000, 1)
            ]
        );
        assert_eq!(m.release(0x1000, 0x6000, &mut freed), 0);
        assert_eq!(freed, [(0x100, 0x200), (0x1000, 0x3000), (0x5000, 0x6000)]);
        assert_eq!(segs(&m), [(0x3000, 0x5000, 1)]);
        freed.clear();
        // Two separately acquired, adjacent ranges with equal counts are one segment, and
        // freeing both reports one range.
        m.acquire(0x5000, 0x7000);
        assert_eq!(segs(&m), [(0x3000, 0x7000, 1)]);
        m.release(0x3000, 0x7000, &mut freed);
        assert_eq!(freed, [(0x3000, 0x7000)]);
        assert!(m.is_empty());
    }

    #[test]
    fn fresh_neighbours_merge_in_either_address_order() {
        // Buffers leased for the first time, top-down (mmap's order) and bottom-up: each
        // joins the touching segment of count 1; a segment of another count stays apart.
        let mut m = CoverageMap::default();
        for i in (1..5u64).rev() {
            m.acquire(i * PAGE, (i + 1) * PAGE);
        }
        assert_eq!(segs(&m), [(PAGE, 5 * PAGE, 1)]);
        m.acquire(5 * PAGE, 6 * PAGE);
        m.acquire(6 * PAGE, 7 * PAGE);
        assert_eq!(segs(&m), [(PAGE, 7 * PAGE, 1)]);
        m.acquire(8 * PAGE, 9 * PAGE);
        m.acquire(8 * PAGE, 9 * PAGE);
        m.acquire(7 * PAGE, 8 * PAGE); // between a count of 1 and one of 2
        assert_eq!(segs(&m), [(PAGE, 8 * PAGE, 1), (8 * PAGE, 9 * PAGE, 2)]);
        m.acquire(0, PAGE); // the address space's first page, below a count of 1
        assert_eq!(segs(&m), [(0, 8 * PAGE, 1), (8 * PAGE, 9 * PAGE, 2)]);
        let mut freed = Vec::new();
        m.release(3 * PAGE, 4 * PAGE, &mut freed);
        assert_eq!(freed, [(3 * PAGE, 4 * PAGE)]);
        m.acquire(3 * PAGE, 4 * PAGE); // the hole again: both sides merge back
        assert_eq!(segs(&m), [(0, 8 * PAGE, 1), (8 * PAGE, 9 * PAGE, 2)]);
    }

    #[test]
    fn releasing_what_is_not_held_is_skipped_and_counted() {
        let mut m = CoverageMap::default();
        let mut freed = Vec::new();
        assert_eq!(m.release(0x1000, 0x3000, &mut freed), 0x2000);
        assert!(freed.is_empty() && m.is_empty());
        m.acquire(0x2000, 0x3000);
        assert_eq!(m.release(0x1000, 0x5000, &mut freed), 0x3000);
        assert_eq!(freed, [(0x2000, 0x3000)]);
        assert!(m.is_empty());
        // A double release does not underflow or free again.
        m.acquire(0x1000, 0x2000);
        freed.clear();
        m.release(0x1000, 0x2000, &mut freed);
        assert_eq!(m.release(0x1000, 0x2000, &mut freed), 0x1000);
        assert_eq!(freed, [(0x1000, 0x2000)]);
        assert_eq!(m.count_at(0x1000), 0);
    }

    #[test]
    fn empty_and_inverted_ranges_are_no_ops() {
        let mut m = CoverageMap::default();
        let mut freed = Vec::new();
        m.acquire(0x2000, 0x2000);
        m.acquire(0x3000, 0x1000);
        assert!(m.is_empty());
        m.acquire(0x1000, 0x3000);
        assert_eq!(m.release(0x2000, 0x2000, &mut freed), 0);
        assert_eq!(m.release(0x3000, 0x1000, &mut freed), 0);
        assert_eq!(segs(&m), [(0x1000, 0x3000, 1)]);
        assert!(freed.is_empty());
    }

    #[test]
    fn the_ends_of_the_address_space() {
        let mut m = CoverageMap::default();
        let mut freed = Vec::new();
        let top = !(PAGE - 1); // the last page
        m.acquire(0, PAGE);
        m.acquire(top - PAGE, u64::MAX);
        assert_eq!(m.count_at(0), 1);
        assert_eq!(m.count_at(u64::MAX - 1), 1);
        assert_eq!(m.count_at(u64::MAX), 0, "the end is excluded");
        assert_eq!(
            m.release(0, u64::MAX, &mut freed),
            u64::MAX - PAGE - (PAGE + 0xfff)
        );
        assert_eq!(freed, [(0, PAGE), (top - PAGE, u64::MAX)]);
        assert!(m.is_empty());
    }

    #[test]
    fn a_saturated_count_is_never_freed() {
        let mut m = CoverageMap::default();
        m.map.insert(0x1000, (0x2000, u32::MAX - 1));
        m.acquire(0x1000, 0x3000);
        assert_eq!(m.count_at(0x1000), u32::MAX);
        m.acquire(0x1000, 0x2000);
        assert_eq!(m.count_at(0x1000), u32::MAX);
        let mut freed = Vec::new();
        for _ in 0..3 {
            m.release(0x1000, 0x3000, &mut freed);
        }
        assert_eq!(freed, [(0x2000, 0x3000)]);
        assert_eq!(segs(&m), [(0x1000, 0x2000, u32::MAX)]);
    }

    /// Page-aligned `[start, end)` in a space of `PAGES` pages, possibly empty.
    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..=PAGES, 0..=PAGES).prop_map(|(a, b)| (a.min(b) * PAGE, a.max(b) * PAGE))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn behaves_like_per_page_counts(
            ops in proptest::collection::vec((any::<bool>(), range()), 0..60)
        ) {
            let mut m = CoverageMap::default();
            // The reference: page -> count, zero counts absent.
            let mut model: BTreeMap<u64, u32> = BTreeMap::new();
            for &(acquire, (s, e)) in &ops {
                let mut freed = Vec::new();
                let mut want_freed: Vec<(u64, u64)> = Vec::new();
                let mut want_unheld = 0;
                for page in s / PAGE..e / PAGE {
                    if acquire {
                        *model.entry(page).or_insert(0) += 1;
                        continue;
                    }
                    match model.get_mut(&page) {
                        None => want_unheld += PAGE,
                        Some(1) => {
                            model.remove(&page);
                            let (ps, pe) = (page * PAGE, (page + 1) * PAGE);
                            match want_freed.last_mut() {
                                Some(last) if last.1 == ps => last.1 = pe,
                                _ => want_freed.push((ps, pe)),
                            }
                        }
                        Some(c) => *c -= 1,
                    }
                }
                if acquire {
                    m.acquire(s, e);
                } else {
                    let unheld = m.release(s, e, &mut freed);
                    prop_assert_eq!(unheld, want_unheld, "release({:#x}, {:#x})", s, e);
                }
                prop_assert_eq!(&freed, &want_freed, "{} ({:#x}, {:#x})", acquire, s, e);
                if let Err(msg) = check_invariants(&m) {
                    prop_assert!(false, "{}", msg);
                }
                for page in 0..=PAGES {
                    let want = model.get(&page).copied().unwrap_or(0);
                    prop_assert_eq!(m.count_at(page * PAGE), want);
                    prop_assert_eq!(m.count_at(page * PAGE + PAGE - 1), want);
                }
                // `uncovered` of the whole space: exactly the zero-count pages, merged.
                let mut want_gaps: Vec<(u64, u64)> = Vec::new();
                for page in 0..=PAGES {
                    if model.get(&page).copied().unwrap_or(0) == 0 {
                        match want_gaps.last_mut() {
                            Some(g) if g.1 == page * PAGE => g.1 += PAGE,
                            _ => want_gaps.push((page * PAGE, page * PAGE + PAGE)),
                        }
                    }
                }
                prop_assert_eq!(m.uncovered(0, (PAGES + 1) * PAGE), want_gaps);
            }
        }
    }
}
