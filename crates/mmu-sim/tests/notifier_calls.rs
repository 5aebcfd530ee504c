//! Each operation calls the notifier with Linux's event, range and blockable flag, and in
//! Linux's order against page-table changes and frees.

use std::sync::Arc;

mod common;

use common::{Mirror, Rig, P};
use mmu_notifier::Event;
use mmu_sim::{AddressSpace, FrameAllocator, Prot, SimError, TASK_SIZE};

#[test]
fn munmap_is_one_blockable_unmap_pair_across_all_vmas_before_any_change() {
    let rig = Rig::list_only();
    let mm = &rig.mm;
    let a = mm.mmap_anon(4 * P, Prot::READ_WRITE).unwrap();
    let b = mm.mmap_anon(4 * P, Prot::READ).unwrap();
    assert_eq!(b, a + 4 * P, "adjacent mappings");
    for i in 0..4 {
        mm.write(a + i * P, i).unwrap();
        mm.read(b + i * P).unwrap();
    }
    rig.watch((0..4).flat_map(|i| [a + i * P, b + i * P]));
    let free_before = mm.frames().free_frames();
    mm.munmap(a + 2 * P, 4 * P).unwrap(); // the last two pages of a, the first two of b
    let log = rig.take();
    assert_eq!(
        log.lines(),
        [
            format!("start Unmap {:#x}..{:#x} blockable", a + 2 * P, a + 6 * P),
            format!("end Unmap {:#x}..{:#x}", a + 2 * P, a + 6 * P),
        ]
    );
    let violations = log.start_problems();
    assert!(violations.is_empty(), "{violations:?}");
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
    let rig = Rig::list_only();
    let mm = &rig.mm;
    mm.munmap(0x4000_0000, P).unwrap();
    let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    mm.write(a, 7).unwrap();
    assert!(rig.take().lines().is_empty());
}

#[test]
fn exit_releases_first_then_unmaps_everything() {
    let rig = Rig::list_only();
    let mm = &rig.mm;
    // A second subscriber registered after the first sees exit the same way.
    let a = mm.mmap_anon(8 * P, Prot::READ_WRITE).unwrap();
    for i in 0..8 {
        mm.write(a + i * P, i).unwrap();
    }
    let free_before = mm.frames().free_frames();
    mm.exit();
    let log = rig.take().lines();
    assert_eq!(log[0], "release");
    // After release the list subscriber is gone: the Unmap over everything reaches only
    // interval subscribers (none here).
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(mm.frames().free_frames(), free_before + 8);
    assert!(mm.vmas().is_empty());
}

#[test]
fn exit_unmaps_all_of_user_space_for_interval_subscribers() {
    let rig = Rig::list_only();
    let mm = &rig.mm;
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    let sub = mm
        .notifier()
        .insert_interval(a..a + 2 * P, Mirror(rig.s.clone()))
        .unwrap();
    mm.exit();
    assert_eq!(
        rig.take().intervals(),
        [(Event::Release, 0, u64::MAX), (Event::Unmap, 0, u64::MAX)]
    );
    drop(sub);
}

#[test]
fn bad_input_returns_linux_errors() {
    let rig = Rig::list_only();
    let mm = &rig.mm;
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
