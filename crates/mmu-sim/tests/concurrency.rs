//! The primary under concurrency: operations that keep data (swap, migration, fork,
//! soft-dirty, mprotect, device-exclusive) race with CPU writers on other threads; every
//! writer always reads back its own last write, and at exit every frame and swap slot is
//! back in the pool (nothing leaked or freed twice by the busy-entry protocol).

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

mod common;

use common::{Rng, P};
use mmu_notifier::OwnerToken;
use mmu_sim::{AddressSpace, Advice, FrameAllocator, Prot, SimError};

const PAGES: u64 = 64;

/// Writes `v` at `a`, retrying while a racing `mprotect` has made it read-only.
fn write_retrying(mm: &AddressSpace, a: u64, v: u64) {
    loop {
        match mm.write(a, v) {
            Ok(()) => return,
            Err(SimError::Permission(_)) => std::thread::yield_now(),
            Err(e) => panic!("write at {a:#x}: {e}"),
        }
    }
}

#[test]
fn data_survives_racing_swap_migration_fork_and_protection_changes() {
    for seed in 1..=4u64 {
        let frames = Arc::new(FrameAllocator::new(4096));
        let mm = AddressSpace::new(frames.clone());
        let base = mm.mmap_anon(PAGES * P, Prot::READ_WRITE).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            // Two writers, each owning alternate pages.
            for w in 0..2u64 {
                let (mm, stop) = (&mm, &stop);
                s.spawn(move || {
                    let mut rng = Rng((seed << 8) | (w + 1));
                    let mut last = vec![0u64; PAGES as usize];
                    while !stop.load(SeqCst) {
                        let i = rng.below(PAGES / 2) * 2 + w;
                        let a = base + i * P;
                        if rng.below(2) == 0 {
                            let v = rng.next();
                            write_retrying(mm, a, v);
                            last[i as usize] = v;
                        } else {
                            assert_eq!(
                                mm.read(a).unwrap(),
                                last[i as usize],
                                "seed {seed}: page {i} lost its data"
                            );
                        }
                    }
                });
            }
            let mut rng = Rng(seed);
            for _ in 0..1500 {
                let p = base + rng.below(PAGES) * P;
                let len = (1 + rng.below(8)).min((base + PAGES * P - p) / P) * P;
                let _ = match rng.below(7) {
                    0 => mm.reclaim(p, p + len).map(drop),
                    1 => mm.migrate(p).map(drop),
                    2 => {
                        let child = mm.fork();
                        let _ = child.write(p, 1);
                        child.exit();
                        Ok(())
                    }
                    3 => {
                        mm.clear_soft_dirty();
                        Ok(())
                    }
                    4 => mm
                        .mprotect(p, len, Prot::READ)
                        .and_then(|_| mm.mprotect(p, len, Prot::READ_WRITE)),
                    5 => mm.make_exclusive(p, OwnerToken(1)).map(drop),
                    _ => mm.age(p, p + len).map(drop),
                };
            }
            stop.store(true, SeqCst);
        });
        mm.exit();
        assert_eq!(
            frames.free_frames(),
            frames.capacity(),
            "seed {seed}: frames leaked"
        );
        assert_eq!(frames.swap_used(), 0, "seed {seed}: swap slots leaked");
    }
}

#[test]
fn zaps_racing_faults_reclaim_and_migration_leak_nothing() {
    for seed in 1..=4u64 {
        let frames = Arc::new(FrameAllocator::new(4096));
        let mm = AddressSpace::new(frames.clone());
        let base = mm.mmap_anon(PAGES * P, Prot::READ_WRITE).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (mm, stop) = (&mm, &stop);
                s.spawn(move || {
                    let mut rng = Rng((seed << 8) | (t + 1));
                    while !stop.load(SeqCst) {
                        let p = base + rng.below(PAGES) * P;
                        let _ = match rng.below(4) {
                            0 => mm.write(p, rng.next()),
                            1 => mm.read(p).map(drop),
                            2 => mm.reclaim(p, p + P).map(drop),
                            _ => mm.migrate(p).map(drop),
                        };
                    }
                });
            }
            let mut rng = Rng(seed);
            for _ in 0..1500 {
                let p = base + rng.below(PAGES) * P;
                let len = (1 + rng.below(8)).min((base + PAGES * P - p) / P) * P;
                let advice = if rng.below(2) == 0 {
                    Advice::DontNeed
                } else {
                    Advice::Free
                };
                mm.madvise(p, len, advice).unwrap();
                if rng.below(8) == 0 {
                    mm.reclaim(base, base + PAGES * P).unwrap();
                }
            }
            stop.store(true, SeqCst);
        });
        mm.exit();
        assert_eq!(
            frames.free_frames(),
            frames.capacity(),
            "seed {seed}: frames leaked"
        );
        assert_eq!(frames.swap_used(), 0, "seed {seed}: swap slots leaked");
    }
}
