//! The coverage map's fast paths (a lease that is exactly one segment) under a workload
//! that hits them often (few distinct ranges, leased again and again), against a per-page
//! model.
#![allow(dead_code)]

#[path = "../src/coverage.rs"]
mod coverage;
#[path = "../src/ranges.rs"]
mod ranges;

use coverage::CoverageMap;
use proptest::prelude::*;
use std::collections::BTreeMap;

const P: u64 = 4096;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]
    #[test]
    fn review_fast_paths_match_a_page_model(
        ranges in proptest::collection::vec((0u64..10, 1u64..5), 1..5),
        ops in proptest::collection::vec((any::<bool>(), 0usize..5), 0..80),
    ) {
        let ranges: Vec<(u64, u64)> = ranges.iter().map(|&(s, l)| (s * P, (s + l) * P)).collect();
        let mut m = CoverageMap::default();
        let mut model: BTreeMap<u64, u32> = BTreeMap::new();
        // Only release what is held (as leases do): a multiset of held range indexes.
        let mut held: Vec<usize> = Vec::new();
        for (acq, i) in ops {
            let i = i % ranges.len();
            let (s, e) = ranges[i];
            if acq || !held.contains(&i) {
                m.acquire(s, e);
                held.push(i);
                for pg in s / P..e / P { *model.entry(pg).or_insert(0) += 1; }
            } else {
                let pos = held.iter().position(|&h| h == i).unwrap();
                held.swap_remove(pos);
                let mut freed = Vec::new();
                prop_assert_eq!(m.release(s, e, &mut freed), 0);
                let mut want: Vec<(u64, u64)> = Vec::new();
                for pg in s / P..e / P {
                    let c = model.get_mut(&pg).unwrap();
                    *c -= 1;
                    if *c == 0 {
                        model.remove(&pg);
                        match want.last_mut() { Some(l) if l.1 == pg * P => l.1 += P, _ => want.push((pg * P, pg * P + P)) }
                    }
                }
                prop_assert_eq!(freed, want);
            }
            // Canonical: every count matches; no two adjacent equal segments.
            let mut gaps: Vec<(u64, u64)> = Vec::new();
            for pg in 0..16u64 {
                if !model.contains_key(&pg) {
                    match gaps.last_mut() { Some(g) if g.1 == pg * P => g.1 += P, _ => gaps.push((pg * P, pg * P + P)) }
                }
            }
            prop_assert_eq!(m.uncovered(0, 16 * P), gaps);
            let segs: Vec<_> = m.clone().into_segments();
            for w in segs.windows(2) {
                prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2), "unmerged {:?}", segs);
            }
        }
    }
}

trait Segs {
    fn into_segments(self) -> Vec<(u64, u64, u32)>;
}
impl Segs for CoverageMap {
    fn into_segments(self) -> Vec<(u64, u64, u32)> {
        // Debug output is the only public view outside cfg(test): parse it.
        let s = format!("{:?}", self);
        let mut out = Vec::new();
        let body = s
            .split('{')
            .nth(2)
            .unwrap_or("")
            .trim_end_matches(['}', ' ']);
        for item in body.split("), ") {
            let nums: Vec<u64> = item
                .split(|c: char| !c.is_ascii_digit())
                .filter(|x| !x.is_empty())
                .map(|x| x.parse().unwrap())
                .collect();
            if nums.len() == 3 {
                out.push((nums[0], nums[1], nums[2] as u32));
            }
        }
        out
    }
}
