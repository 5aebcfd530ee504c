//! Schedule points: each secondary's fault calls one in its race window, with no lock
//! held, so a scheduler that changes the page right there makes the fault retry (and the
//! result stays coherent), while the broken mirror that skips its retry check is caught.
//! XPMEM's point is on its fault server thread, which runs as the requesting task.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use mmu_notifier::OwnerToken;
use mmu_secondary::broken::{Broken, BrokenSecondary};
use mmu_secondary::hmm::HmmMirror;
use mmu_secondary::kvm::Kvm;
use mmu_secondary::odp::OdpRegion;
use mmu_secondary::sched::{self, Scheduler, Task};
use mmu_secondary::sva::SvaTlb;
use mmu_secondary::xpmem::Xpmem;
use mmu_secondary::SecondaryMmu;
use mmu_sim::{AddressSpace, Advice, Checker, FrameAllocator, Prot, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
const PAGES: u64 = 8;

/// At its first point, replaces the page under the fault: drops it and writes 99 to a
/// fresh one (an invalidation of the page, then a new frame). Records which threads
/// reached points.
struct ChangeAtFirstPoint {
    mm: Mutex<Option<Arc<AddressSpace>>>,
    page: u64,
    fired: AtomicBool,
    points: AtomicU64,
    threads: Mutex<Vec<std::thread::ThreadId>>,
}

impl Scheduler for ChangeAtFirstPoint {
    fn point(&self, task: usize) {
        assert_eq!(task, 3);
        self.points.fetch_add(1, SeqCst);
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        if !self.fired.swap(true, SeqCst) {
            let mm = self.mm.lock().unwrap().clone().unwrap();
            // Runs on the faulting thread: if the secondary held a lock here that its
            // invalidation takes, this would deadlock.
            mm.madvise(self.page, P, Advice::DontNeed).unwrap();
            mm.write(self.page, 99).unwrap();
        }
    }
}

fn run(
    name: &str,
    make: impl FnOnce(&Arc<AddressSpace>, u64) -> Arc<dyn SecondaryMmu>,
) -> (u64, u64, u64, bool) {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(256)));
    let checker = Checker::new(1);
    mm.attach_checker(checker.clone()).unwrap();
    let base = mm.mmap_anon(PAGES * P, Prot::READ_WRITE).unwrap();
    let page = base + 2 * P;
    mm.write(page, 1).unwrap();
    let d = make(&mm, base);
    let s = Arc::new(ChangeAtFirstPoint {
        mm: Mutex::new(Some(mm.clone())),
        page,
        fired: AtomicBool::new(false),
        points: AtomicU64::new(0),
        threads: Mutex::new(Vec::new()),
    });
    let value = {
        let _task = sched::enter(Task::new(s.clone(), 3));
        assert!(sched::active());
        d.access(page, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert!(!sched::active(), "the guard leaves the task");
    assert!(s.fired.load(SeqCst), "{name}: no schedule point reached");
    assert_eq!(value, 99, "{name} read the old page");
    let on_caller = s
        .threads
        .lock()
        .unwrap()
        .iter()
        .all(|t| *t == std::thread::current().id());
    let stats = d.stats();
    let violations = checker.violation_count();
    drop(d);
    s.mm.lock().unwrap().take();
    mm.exit();
    (stats.retries, violations, s.points.load(SeqCst), on_caller)
}

#[test]
fn an_invalidation_at_the_point_makes_every_secondary_retry_coherently() {
    type Make = fn(&Arc<AddressSpace>, u64) -> Arc<dyn SecondaryMmu>;
    let cases: [(&str, Make); 5] = [
        ("kvm", |mm, base| {
            let k = Kvm::new(mm).unwrap();
            k.add_memslot(0, PAGES, base).unwrap();
            k
        }),
        ("sva", |mm, _| SvaTlb::new(mm).unwrap()),
        ("hmm", |mm, base| {
            HmmMirror::with_range(mm, OwnerToken(0xD1), base, PAGES * P).unwrap()
        }),
        ("xpmem", |mm, base| {
            let x = Xpmem::new(mm).unwrap();
            x.export(base, PAGES * P).unwrap();
            x
        }),
        ("odp", |mm, base| {
            OdpRegion::new(mm, base, PAGES * P).unwrap()
        }),
    ];
    for (name, make) in cases {
        let (retries, violations, points, on_caller) = run(name, make);
        assert!(retries >= 1, "{name} did not retry");
        assert!(
            points >= 2,
            "{name}: the retry has its own point ({points})"
        );
        assert_eq!(violations, 0, "{name}");
        // XPMEM faults on its fault server, which runs as the caller's task.
        assert_eq!(
            on_caller,
            name != "xpmem",
            "{name}: points on the wrong thread"
        );
    }
}

#[test]
fn the_mirror_that_ignores_retry_is_caught_at_the_point() {
    // The mirror that never tears down does check `read_retry`: it retries, and the race
    // at the point alone does not catch it (its bug needs a later invalidation).
    for (kind, caught) in [
        (Broken::IgnoresRetry, true),
        (Broken::NeverTearsDown, false),
    ] {
        let mm = AddressSpace::new(Arc::new(FrameAllocator::new(256)));
        let checker = Checker::new(1);
        mm.attach_checker(checker.clone()).unwrap();
        let base = mm.mmap_anon(PAGES * P, Prot::READ_WRITE).unwrap();
        let page = base + 2 * P;
        mm.write(page, 1).unwrap();
        let d = BrokenSecondary::new(&mm, kind, base, PAGES * P).unwrap();
        let s = Arc::new(ChangeAtFirstPoint {
            mm: Mutex::new(Some(mm.clone())),
            page,
            fired: AtomicBool::new(false),
            points: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        });
        {
            let _task = sched::enter(Task::new(s.clone(), 3));
            let _ = d.access(page, None);
        }
        assert_eq!(checker.violation_count() > 0, caught, "{kind:?}");
        assert_eq!(d.stats().retries == 0, caught, "{kind:?} retries");
        assert!(d.stats().invalidations > 0, "{kind:?} counts invalidations");
        drop(d);
        s.mm.lock().unwrap().take();
        mm.exit();
    }
}

#[test]
fn without_a_scheduler_points_do_nothing() {
    assert!(!sched::active());
    assert!(sched::current().is_none());
    sched::point();
    let past = std::time::Instant::now();
    assert!(sched::expired(past));
}
