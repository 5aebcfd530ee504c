//! The one retry policy of every secondary's fault (`FaultRetry`) and the one timeout
//! setter (`SecondaryMmu::set_fault_timeout`): a lost attempt is counted, the deadline
//! gives `Timeout` (ignored under a scheduler, unless the fault holds a lock), the race
//! window and the wait between attempts are schedule points only when the fault may hand
//! over.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use mmu_notifier::{OwnerToken, RetryPolicy};
use mmu_secondary::broken::{Broken, BrokenSecondary};
use mmu_secondary::hmm::HmmMirror;
use mmu_secondary::kvm::Kvm;
use mmu_secondary::odp::OdpRegion;
use mmu_secondary::sched::{self, Scheduler, Task};
use mmu_secondary::sva::SvaTlb;
use mmu_secondary::xpmem::Xpmem;
use mmu_secondary::{Counters, FaultTimeout, SecondaryError, SecondaryMmu, DEFAULT_FAULT_TIMEOUT};
use mmu_sim::{AddressSpace, FrameAllocator, PAGE_SIZE};

/// Counts the points it is called at.
#[derive(Default)]
struct Points(AtomicU64);

impl Scheduler for Points {
    fn point(&self, _task: usize) {
        self.0.fetch_add(1, SeqCst);
    }
}

#[test]
fn a_lost_attempt_is_counted_and_a_passed_deadline_is_a_timeout() {
    let counters = Counters::default();
    let timeout = FaultTimeout::new(Duration::from_secs(3600));
    let mut retry = timeout.start(Some(&counters));
    assert_eq!(retry.again(), Ok(()));
    assert_eq!(retry.again(), Ok(()));
    assert_eq!(counters.snapshot().retries, 2);

    let expired = FaultTimeout::new(Duration::ZERO);
    let mut retry = expired.start(Some(&counters));
    assert_eq!(retry.again(), Err(SecondaryError::Timeout));
    assert_eq!(
        counters.snapshot().retries,
        3,
        "the lost attempt is counted too"
    );
    assert_eq!(retry.check(), Err(SecondaryError::Timeout));

    // Uncounted: the secondaries that count where they detect the collision.
    let mut retry = expired.start(None);
    assert_eq!(retry.again(), Err(SecondaryError::Timeout));
    assert_eq!(counters.snapshot().retries, 3);
}

#[test]
fn under_a_scheduler_the_deadline_is_ignored_and_the_fault_hands_over() {
    let points = Arc::new(Points::default());
    let _task = sched::enter(Task::new(points.clone(), 1));
    let expired = FaultTimeout::new(Duration::ZERO);
    let mut retry = expired.start(None);
    retry.window();
    assert_eq!(points.0.load(SeqCst), 1, "the race window is a point");
    assert_eq!(
        retry.again(),
        Ok(()),
        "time means nothing under a scheduler"
    );
    assert_eq!(points.0.load(SeqCst), 2, "between attempts: a handover");

    // Holding a lock another task may need: no point, and the deadline in force.
    let mut held = retry.holding_lock();
    held.window();
    assert_eq!(held.again(), Err(SecondaryError::Timeout));
    assert_eq!(points.0.load(SeqCst), 2, "no point while holding the lock");
}

#[test]
fn every_secondary_has_the_one_timeout_setter_with_the_one_default() {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(16)));
    let all: Vec<Arc<dyn SecondaryMmu>> = vec![
        HmmMirror::new(&mm, OwnerToken(1)).unwrap(),
        Kvm::new(&mm).unwrap(),
        SvaTlb::new(&mm).unwrap(),
        OdpRegion::new(&mm, 0, 16 * PAGE_SIZE).unwrap(),
        Xpmem::new(&mm).unwrap(),
        BrokenSecondary::new(&mm, Broken::NeverTearsDown, 0, 16 * PAGE_SIZE).unwrap(),
        BrokenSecondary::new(&mm, Broken::NeverFlushes, 0, 16 * PAGE_SIZE).unwrap(),
    ];
    for (i, s) in all.iter().enumerate() {
        assert_eq!(s.fault_timeout(), DEFAULT_FAULT_TIMEOUT, "{}", s.name());
        let t = Duration::from_millis(10 + i as u64);
        s.set_fault_timeout(t);
        assert_eq!(s.fault_timeout(), t, "{}", s.name());
    }
    assert_saturates(&*all[0]);
}

/// A timeout too long for nanoseconds in a `u64` saturates instead of wrapping.
fn assert_saturates(s: &dyn SecondaryMmu) {
    s.set_fault_timeout(Duration::MAX);
    assert_eq!(s.fault_timeout(), Duration::from_nanos(u64::MAX));
}
