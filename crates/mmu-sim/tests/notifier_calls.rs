//! Each operation calls the notifier with Linux's event, range and blockable flag, and in
//! Linux's order against page-table changes and frees.

use std::sync::{Arc, Mutex, Weak};

use mmu_notifier::{Event, ListSubscriber, Range, WouldBlock};
use mmu_sim::{AddressSpace, FrameAllocator, Prot, SimError, PAGE_SIZE, TASK_SIZE};

const P: u64 = PAGE_SIZE;

/// Records every callback, and at each start checks that the range's translations and
/// frames are all still there (nothing changed or freed before start returned).
struct Witness {
    mm: Weak<AddressSpace>,
    /// Pages the test mapped, to check at start.
    watched: Mutex<Vec<u64>>,
    log: Mutex<Vec<String>>,
    violations: Mutex<Vec<String>>,
}

impl Witness {
    fn new(mm: &Arc<AddressSpace>) -> Arc<Self> {
        Arc::new(Witness {
            mm: Arc::downgrade(mm),
            watched: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
        })
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl ListSubscriber for Witness {
    fn release(&self) {
        self.log.lock().unwrap().push("release".into());
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        self.log.lock().unwrap().push(format!(
            "start {:?} {:#x}..{:#x} {}",
            r.event(),
            r.start(),
            r.end(),
            if r.blockable() {
                "blockable"
            } else {
                "non-blockable"
            }
        ));
        if let Some(mm) = self.mm.upgrade() {
            for &page in self.watched.lock().unwrap().iter() {
                if r.overlaps(page, page + P) {
                    let pte = mm.pte(page);
                    match pte.pfn() {
                        None => self
                            .violations
                            .lock()
                            .unwrap()
                            .push(format!("{page:#x} cleared before start returned")),
                        Some(pfn) if mm.frames().refs(pfn) == 0 => self
                            .violations
                            .lock()
                            .unwrap()
                            .push(format!("{page:#x} freed before start returned")),
                        Some(_) => {}
                    }
                }
            }
        }
        Ok(())
    }
    fn invalidate_range_end(&self, r: &Range) {
        self.log.lock().unwrap().push(format!(
            "end {:?} {:#x}..{:#x}",
            r.event(),
            r.start(),
            r.end()
        ));
    }
}

fn setup() -> (
    Arc<AddressSpace>,
    Arc<Witness>,
    mmu_notifier::ListRegistration,
) {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(4096)));
    let w = Witness::new(&mm);
    let reg = mm.notifier().register(w.clone()).unwrap();
    (mm, w, reg)
}

#[test]
fn munmap_is_one_blockable_unmap_pair_across_all_vmas_before_any_change() {
    let (mm, w, _reg) = setup();
    let a = mm.mmap_anon(4 * P, Prot::READ_WRITE).unwrap();
    let b = mm.mmap_anon(4 * P, Prot::READ).unwrap();
    assert_eq!(b, a + 4 * P, "adjacent mappings");
    for i in 0..4 {
        mm.write(a + i * P, i).unwrap();
        mm.read(b + i * P).unwrap();
        w.watched.lock().unwrap().extend([a + i * P, b + i * P]);
    }
    let free_before = mm.frames().free_frames();
    mm.munmap(a + 2 * P, 4 * P).unwrap(); // the last two pages of a, the first two of b
    assert_eq!(
        w.take(),
        [
            format!("start Unmap {:#x}..{:#x} blockable", a + 2 * P, a + 6 * P),
            format!("end Unmap {:#x}..{:#x}", a + 2 * P, a + 6 * P),
        ]
    );
    assert!(
        w.violations.lock().unwrap().is_empty(),
        "{:?}",
        w.violations
    );
    assert_eq!(
        mm.frames().free_frames(),
        free_before + 2,
        "the two written frames were freed (the read pages mapped the zero page)"
    );
    assert_eq!(mm.read(a + 2 * P), Err(SimError::Fault(a + 2 * P)));
    assert_eq!(mm.read(a + P).unwrap(), 1, "the rest is intact");
    assert_eq!(mm.vmas().len(), 2);
}

#[test]
fn munmap_of_nothing_is_silent_and_faults_fire_nothing() {
    let (mm, w, _reg) = setup();
    mm.munmap(0x4000_0000, P).unwrap();
    let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    mm.write(a, 7).unwrap();
    assert!(w.take().is_empty());
}

#[test]
fn exit_releases_first_then_unmaps_everything() {
    let (mm, w, _reg) = setup();
    // A second subscriber registered after the first sees exit the same way.
    let a = mm.mmap_anon(8 * P, Prot::READ_WRITE).unwrap();
    for i in 0..8 {
        mm.write(a + i * P, i).unwrap();
    }
    let free_before = mm.frames().free_frames();
    mm.exit();
    let log = w.take();
    assert_eq!(log[0], "release");
    // After release the list subscriber is gone: the Unmap over everything reaches only
    // interval subscribers (none here).
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(mm.frames().free_frames(), free_before + 8);
    assert!(mm.vmas().is_empty());
}

#[test]
fn exit_unmaps_all_of_user_space_for_interval_subscribers() {
    use mmu_notifier::{IntervalContext, IntervalSubscriber};
    struct Seen(Arc<Mutex<Vec<(Event, u64, u64)>>>);
    impl IntervalSubscriber for Seen {
        fn invalidate(
            &mut self,
            r: &Range,
            _: &mut IntervalContext<'_, Self>,
        ) -> Result<(), WouldBlock> {
            self.0.lock().unwrap().push((r.event(), r.start(), r.end()));
            Ok(())
        }
    }
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sub = mm
        .notifier()
        .insert_interval(a..a + 2 * P, Seen(seen.clone()))
        .unwrap();
    mm.exit();
    assert_eq!(
        *seen.lock().unwrap(),
        [(Event::Release, 0, u64::MAX), (Event::Unmap, 0, u64::MAX)]
    );
    drop(sub);
}

#[test]
fn bad_input_returns_linux_errors() {
    let (mm, _w, _reg) = setup();
    assert!(matches!(
        mm.munmap(0x1001, P),
        Err(SimError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.munmap(0x1000, 0),
        Err(SimError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.munmap(u64::MAX - P + 1, 2 * P),
        Err(SimError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.munmap(TASK_SIZE, P),
        Err(SimError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.mmap_anon(0, Prot::READ),
        Err(SimError::InvalidArgument(_))
    ));
    assert_eq!(
        mm.mmap_anon(u64::MAX, Prot::READ),
        Err(SimError::OutOfMemory),
        "Linux: a length that overflows when page aligned is ENOMEM"
    );
    assert_eq!(
        mm.mmap_anon(TASK_SIZE, Prot::READ),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(mm.read(0x5000_0000), Err(SimError::Fault(0x5000_0000)));
    let ro = mm.mmap_anon(P, Prot::READ).unwrap();
    assert_eq!(mm.write(ro, 1), Err(SimError::Permission(ro)));
    let none = mm.mmap_anon(P, Prot::NONE).unwrap();
    assert_eq!(mm.read(none), Err(SimError::Permission(none)));
}

#[test]
fn out_of_frames_is_enomem_not_a_panic() {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(2)));
    let a = mm.mmap_anon(4 * P, Prot::READ_WRITE).unwrap();
    mm.write(a, 1).unwrap();
    mm.write(a + P, 1).unwrap();
    assert_eq!(mm.write(a + 2 * P, 1), Err(SimError::OutOfMemory));
    mm.munmap(a, P).unwrap();
    mm.write(a + 2 * P, 1).unwrap();
}

#[test]
fn a_freed_frame_changes_generation_so_stale_translations_are_detectable() {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(8)));
    let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    let r = mm.fault(a, true).unwrap();
    assert!(mm.frames().is_current(r));
    mm.munmap(a, P).unwrap();
    assert!(!mm.frames().is_current(r));
}

#[test]
fn faults_on_different_regions_run_in_parallel_threads() {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(4096)));
    let a = mm.mmap_anon(1024 * P, Prot::READ_WRITE).unwrap();
    let ts: Vec<_> = (0..2u64)
        .map(|t| {
            let mm = mm.clone();
            std::thread::spawn(move || {
                for i in 0..512 {
                    let addr = a + (t * 512 + i) * P;
                    mm.write(addr, addr).unwrap();
                }
            })
        })
        .collect();
    ts.into_iter().for_each(|t| t.join().unwrap());
    for i in 0..1024 {
        assert_eq!(mm.read(a + i * P).unwrap(), a + i * P);
    }
}
