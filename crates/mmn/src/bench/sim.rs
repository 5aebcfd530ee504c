//! What the notifier calls cost the simulated primary MMU: the fault + munmap cycle of
//! [`super::fault_munmap`] on an address space that makes them (with no subscriber, and
//! with one list subscriber that does nothing) against the same address space built
//! without them (`AddressSpace::without_notifier`).
//!
//! The difference sought is a few percent of a cycle, less than what the order of the
//! measurements, the allocator's state or the frequency of the CPU can move a figure by.
//! So the three variants alternate many times in short batches (600 rounds, the order
//! rotating each round, every variant first as often as the others), and each round gives
//! a ratio: a notifier variant's batch over the bare batch of the same round. The figure's
//! paired ratio is the median of those ratios, its spread their quartiles; whatever
//! disturbs a round disturbs both sides of its ratio alike. The heap layout, which moves
//! a cycle by as much as the notifier costs, is varied too: every 50 rounds the three
//! address spaces are built afresh, in a rotating order.

use std::sync::Arc;

use mmu_sim::{AddressSpace, FrameAllocator};

use super::fault_munmap::{cycle, Nop, FRAMES, PAGES};
use super::{batched, Plan, Report, Stat};

/// Epochs (fresh address spaces each) and rounds per epoch (each round: one batch of
/// every variant).
fn epochs(plan: &Plan) -> (usize, usize) {
    if plan.quick {
        (3, 20)
    } else {
        (12, 50)
    }
}

pub(super) fn run(plan: &Plan, report: &mut Report) {
    // Short batches, many of them: a quarter of the plan's batch each.
    let batch = plan.batch / 4;
    let (epochs, rounds) = epochs(plan);
    let k = 3;
    let mut samples: Vec<Vec<f64>> = (0..k)
        .map(|_| Vec::with_capacity(epochs * rounds))
        .collect();
    for e in 0..epochs {
        // Where the allocator places a variant's page tables and mappings moves its cycle by
        // a few percent (one unrelated allocation made before the cycles does it), so each
        // epoch builds the three address spaces afresh, in an order rotating per epoch.
        let mut spaces: [Option<Arc<AddressSpace>>; 3] = [None, None, None];
        for j in 0..k {
            let i = (e + j) % k;
            let frames = Arc::new(FrameAllocator::new(FRAMES));
            spaces[i] = Some(if i == 0 {
                AddressSpace::without_notifier(frames)
            } else {
                AddressSpace::new(frames)
            });
        }
        let [Some(bare), Some(none), Some(one)] = spaces else {
            unreachable!("every variant was built")
        };
        let reg = one
            .notifier()
            .register(Arc::new(Nop))
            .expect("a live address space");
        let mut variants = [
            batched(batch, || cycle(&bare)),
            batched(batch, || cycle(&none)),
            batched(batch, || cycle(&one)),
        ];
        for v in variants.iter_mut() {
            v();
        }
        for r in 0..rounds {
            for j in 0..k {
                let i = (r + j) % k;
                samples[i].push(variants[i]());
            }
        }
        drop(variants);
        drop(reg);
    }
    let (r_none, r_one) = (
        paired(&samples[1], &samples[0]),
        paired(&samples[2], &samples[0]),
    );
    let st: Vec<Stat> = samples.iter_mut().map(|s| Stat::of(s)).collect();
    let baseline = format!("{PAGES}-page cycle, no notifier");
    report.pair(
        "sim",
        "fault_munmap_notifier_no_subscribers",
        format!("{PAGES}-page fault+munmap, notifier, 0 subscribers"),
        st[1],
        baseline.clone(),
        st[0],
    );
    report.paired_ratio("fault_munmap_notifier_no_subscribers", r_none);
    report.pair(
        "sim",
        "fault_munmap_notifier_1_list_subscriber",
        format!("{PAGES}-page fault+munmap, notifier, 1 subscriber"),
        st[2],
        baseline,
        st[0],
    );
    report.paired_ratio("fault_munmap_notifier_1_list_subscriber", r_one);
}

/// The statistics of the round-by-round ratios `samples[r] / baseline[r]`.
fn paired(samples: &[f64], baseline: &[f64]) -> Stat {
    let mut rs: Vec<f64> = samples.iter().zip(baseline).map(|(a, b)| a / b).collect();
    Stat::of(&mut rs)
}

#[cfg(test)]
mod tests {
    use super::paired;

    #[test]
    fn a_paired_ratio_follows_the_rounds_not_the_medians() {
        // A drift that moves both sides of each round alike: the medians of the two sides
        // differ by the drift's distribution, the paired ratio is exactly 1.02 every round.
        let base: Vec<f64> = (0..9).map(|r| 100.0 * (1.0 + r as f64 / 10.0)).collect();
        let ours: Vec<f64> = base.iter().map(|b| b * 1.02).collect();
        let st = paired(&ours, &base);
        assert!((st.median - 1.02).abs() < 1e-12, "{st:?}");
        assert!((st.p25 - 1.02).abs() < 1e-12 && (st.p75 - 1.02).abs() < 1e-12);
        // Ratios in another order than the samples: quartiles of the ratios themselves.
        let st = paired(&[1.0, 3.0, 2.0, 5.0, 4.0], &[1.0; 5]);
        assert_eq!((st.p25, st.median, st.p75), (2.0, 3.0, 4.0));
    }
}
