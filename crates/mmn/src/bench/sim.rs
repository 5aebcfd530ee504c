//! What the notifier calls cost the simulated primary MMU: the fault + munmap cycle of
//! [`super::fault_munmap`] on an address space that makes them (with no subscriber, and
//! with one list subscriber that does nothing) against the same address space built
//! without them (`AddressSpace::without_notifier`), the three interleaved.

use std::sync::Arc;

use mmu_sim::{AddressSpace, FrameAllocator};

use super::fault_munmap::{cycle, Nop, FRAMES, PAGES};
use super::{batched, interleaved, Plan, Report};

pub(super) fn run(plan: &Plan, report: &mut Report) {
    let bare = AddressSpace::without_notifier(Arc::new(FrameAllocator::new(FRAMES)));
    let none = AddressSpace::new(Arc::new(FrameAllocator::new(FRAMES)));
    let one = AddressSpace::new(Arc::new(FrameAllocator::new(FRAMES)));
    let reg = one
        .notifier()
        .register(Arc::new(Nop))
        .expect("a live address space");
    let st = interleaved(
        plan.rounds,
        &mut [
            batched(plan.batch, || cycle(&bare)),
            batched(plan.batch, || cycle(&none)),
            batched(plan.batch, || cycle(&one)),
        ],
    );
    drop(reg);
    let baseline = format!("{PAGES}-page cycle, no notifier");
    report.pair(
        "sim",
        "fault_munmap_notifier_no_subscribers",
        format!("{PAGES}-page fault+munmap, notifier, 0 subscribers"),
        st[1],
        baseline.clone(),
        st[0],
    );
    report.pair(
        "sim",
        "fault_munmap_notifier_1_list_subscriber",
        format!("{PAGES}-page fault+munmap, notifier, 1 subscriber"),
        st[2],
        baseline,
        st[0],
    );
}
