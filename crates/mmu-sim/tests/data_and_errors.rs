//! Data follows the pages (a per-page stamp survives COW, swap, migration, mremap,
//! madvise and device-exclusive access, and a secondary's write through a valid
//! translation reaches the primary), and bad input gets the errors Linux would give, as
//! typed errors, never a panic, without leaking a frame or a swap slot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

mod common;

use common::{Rng, P};
use mmu_notifier::{ListRegistration, ListSubscriber, OwnerToken, Range, WouldBlock};
use mmu_sim::{
    AddressSpace, Advice, CheckedSecondary, Checker, File, FrameAllocator, FrameRef, MapKind,
    MremapFlags, PageState, Pfn, Prot, PteKind, ReclaimStats, SecondaryKind, SimError,
    SnapshotMode, ViolationKind, MMAP_MIN_ADDR, TASK_SIZE,
};

const RW: Prot = Prot::READ_WRITE;
const MOVE: MremapFlags = MremapFlags {
    may_move: true,
    fixed: None,
};
const IN_PLACE: MremapFlags = MremapFlags {
    may_move: false,
    fixed: None,
};

fn moved_to(addr: u64) -> MremapFlags {
    MremapFlags {
        may_move: true,
        fixed: Some(addr),
    }
}

/// The data word each test page starts with.
fn stamp(addr: u64) -> u64 {
    addr ^ 0xABCD
}

fn space(frames: u32) -> Arc<AddressSpace> {
    AddressSpace::new(Arc::new(FrameAllocator::new(frames)))
}

/// Maps `n` private anonymous read-write pages and writes each one's stamp.
fn stamped(mm: &AddressSpace, n: u64) -> u64 {
    let a = mm.mmap_anon(n * P, RW).unwrap();
    for i in 0..n {
        mm.write(a + i * P, stamp(a + i * P)).unwrap();
    }
    a
}

/// The frame mapped at `addr` (which must be present).
fn pfn(mm: &AddressSpace, addr: u64) -> Pfn {
    mm.pte(addr)
        .pfn()
        .unwrap_or_else(|| panic!("{addr:#x} is not present: {:?}", mm.pte(addr)))
}

fn is_swap(mm: &AddressSpace, addr: u64) -> bool {
    matches!(mm.pte(addr).kind(), PteKind::Swap(_))
}

/// Every frame back in the pool and no swap slot in use.
fn assert_nothing_leaked(frames: &FrameAllocator) {
    assert_eq!(
        frames.free_frames(),
        frames.capacity(),
        "frames leaked: {frames:?}"
    );
    assert_eq!(frames.swap_used(), 0, "swap slots leaked");
}

macro_rules! assert_einval {
    ($e:expr) => {{
        let r = $e;
        assert!(
            matches!(r, Err(SimError::InvalidArgument(_))),
            "{} = {r:?}, want InvalidArgument (EINVAL)",
            stringify!($e)
        );
    }};
}

// ----- a tiny correct secondary MMU ------------------------------------------------------

#[derive(Default)]
struct ShadowState {
    /// Page address -> frame, as installed.
    map: BTreeMap<u64, FrameRef>,
    /// Invalidations between start and end (KVM's `mmu_invalidate_in_progress`).
    in_progress: u32,
    /// Bumped at each end (KVM's `mmu_invalidate_seq`).
    seq: u64,
}

/// A KVM-style shadow table: drops translations in `invalidate_range_start`, refuses to
/// install while an invalidation is in progress or one ended since the fault began.
/// (Its start never fails: the tests that use it run the primary from one thread, so the
/// lock is never contended.)
#[derive(Default)]
struct Shadow {
    state: Mutex<ShadowState>,
    starts: AtomicUsize,
}

impl CheckedSecondary for Shadow {
    fn name(&self) -> &str {
        "test-shadow"
    }
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        let st = self.state.lock().unwrap();
        st.map.range(start..end).map(|(a, f)| (*a, *f)).collect()
    }
}

impl ListSubscriber for Shadow {
    fn release(&self) {
        self.state.lock().unwrap().map.clear();
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        self.starts.fetch_add(1, Relaxed);
        let mut st = self.state.lock().unwrap();
        st.in_progress += 1;
        let doomed: Vec<u64> = st.map.range(r.start()..r.end()).map(|(a, _)| *a).collect();
        for a in doomed {
            st.map.remove(&a);
        }
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Range) {
        let mut st = self.state.lock().unwrap();
        st.in_progress -= 1;
        st.seq += 1;
    }
}

impl Shadow {
    /// A shadow secondary subscribed to `mm`, with a checker attached to `mm` watching it.
    fn attach(mm: &Arc<AddressSpace>, seed: u64) -> (Arc<Shadow>, Arc<Checker>, ListRegistration) {
        let checker = Checker::new(seed);
        mm.attach_checker(checker.clone()).unwrap();
        let sec = Arc::new(Shadow::default());
        let weak: Weak<Shadow> = Arc::downgrade(&sec);
        checker.add_secondary(weak);
        let reg = mm.notifier().register(sec.clone()).unwrap();
        (sec, checker, reg)
    }

    /// The secondary's fault: read the sequence, fault the page in (no pin, no lock of
    /// ours held), take our lock, retry if an invalidation ran meanwhile, else install.
    fn map(
        &self,
        mm: &AddressSpace,
        checker: &Checker,
        addr: u64,
        write: bool,
    ) -> Result<FrameRef, SimError> {
        let page = addr & !(P - 1);
        loop {
            let seq = self.state.lock().unwrap().seq;
            let frame = mm.fault(page, write)?;
            let mut st = self.state.lock().unwrap();
            if st.in_progress > 0 || st.seq != seq {
                continue;
            }
            assert!(
                checker.check_install(mm, self, page, frame, write),
                "install of {page:#x} refused: {:?}",
                checker.violations()
            );
            st.map.insert(page, frame);
            return Ok(frame);
        }
    }

    /// Writes through the translation of `addr` under our lock; `None` if there is none.
    fn write(&self, mm: &AddressSpace, checker: &Checker, addr: u64, v: u64) -> Option<bool> {
        let page = addr & !(P - 1);
        let st = self.state.lock().unwrap();
        let f = *st.map.get(&page)?;
        Some(checker.write(mm, self, page, f, v))
    }

    fn translation(&self, addr: u64) -> Option<FrameRef> {
        self.state.lock().unwrap().map.get(&addr).copied()
    }
}

fn assert_coherent(checker: &Checker) {
    assert_eq!(
        checker.violation_count(),
        0,
        "coherence violations: {:#?}",
        checker.violations()
    );
}

// ----- data follows the pages ------------------------------------------------------------

#[test]
fn fork_shares_pages_and_a_write_copies_only_the_written_page() {
    let mm = space(64);
    let a = stamped(&mm, 4);
    let free = mm.frames().free_frames();
    let child = mm.fork();
    assert_eq!(mm.frames().free_frames(), free, "fork copies no page");
    for i in 0..4 {
        let x = a + i * P;
        assert_eq!(pfn(&mm, x), pfn(&child, x), "page {i} shared after fork");
        assert!(!mm.pte(x).writable(), "parent's page {i} write-protected");
        assert!(!child.pte(x).writable(), "child's page {i} write-protected");
        assert_eq!(child.read(x), Ok(stamp(x)));
    }

    // Parent writes page 0: it gets a copy, the child keeps the old frame and stamp.
    let shared = pfn(&mm, a);
    mm.write(a, 1).unwrap();
    assert_eq!(mm.frames().free_frames(), free - 1, "one page copied");
    assert_ne!(pfn(&mm, a), shared);
    assert_eq!(pfn(&child, a), shared);
    assert_eq!(mm.read(a), Ok(1));
    assert_eq!(child.read(a), Ok(stamp(a)));

    // Child writes page 1: it gets a copy, the parent keeps the stamp.
    child.write(a + P, 2).unwrap();
    assert_eq!(mm.frames().free_frames(), free - 2, "one more page copied");
    assert_eq!(child.read(a + P), Ok(2));
    assert_eq!(mm.read(a + P), Ok(stamp(a + P)));

    // Page 0 now has one owner (the child): its write reuses the frame, no copy.
    let only = pfn(&child, a);
    child.write(a, 3).unwrap();
    assert_eq!(mm.frames().free_frames(), free - 2, "the last owner reuses");
    assert_eq!(pfn(&child, a), only);
    assert_eq!((mm.read(a), child.read(a)), (Ok(1), Ok(3)));

    // Untouched pages are still shared and stamped.
    for i in 2..4 {
        let x = a + i * P;
        assert_eq!(pfn(&mm, x), pfn(&child, x));
        assert_eq!((mm.read(x), child.read(x)), (Ok(stamp(x)), Ok(stamp(x))));
    }
    child.exit();
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn swap_out_keeps_each_stamp_and_swap_in_on_read_write_and_gup_restores_it() {
    let mm = space(64);
    let n = 8;
    let a = stamped(&mm, n);
    assert_eq!(
        mm.reclaim(a, a + n * P),
        Ok(ReclaimStats {
            referenced: 8,
            reclaimed: 0
        }),
        "recently used pages are only aged on the first pass"
    );
    assert_eq!(
        mm.reclaim(a, a + n * P),
        Ok(ReclaimStats {
            referenced: 0,
            reclaimed: 8
        })
    );
    for i in 0..n {
        assert!(is_swap(&mm, a + i * P), "page {i}: {:?}", mm.pte(a + i * P));
    }
    assert_eq!(mm.frames().swap_used(), 8);
    assert_eq!(mm.frames().free_frames(), mm.frames().capacity());

    // Swap-in on read.
    for i in 0..4 {
        let x = a + i * P;
        assert_eq!(mm.read(x), Ok(stamp(x)));
        assert!(matches!(mm.pte(x).kind(), PteKind::Present(_)));
    }
    // Swap-in on write.
    for i in 4..n {
        let x = a + i * P;
        mm.write(x, !stamp(x)).unwrap();
        assert_eq!(mm.read(x), Ok(!stamp(x)));
    }
    assert_eq!(mm.frames().swap_used(), 0, "swap-in frees the slots");
    assert_eq!(mm.frames().free_frames(), mm.frames().capacity() - 8);

    // Out again, then in through get-user-pages (a secondary's fault).
    mm.reclaim(a, a + n * P).unwrap();
    assert_eq!(mm.reclaim(a, a + n * P).unwrap().reclaimed, 8);
    let frames = mm.get_user_pages(a, n, false).unwrap();
    for (i, f) in (0..n).zip(frames) {
        let x = a + i * P;
        let want = if i < 4 { stamp(x) } else { !stamp(x) };
        assert_eq!(mm.frames().read(f.pfn), want, "page {i}");
        assert_eq!(pfn(&mm, x), f.pfn);
    }
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn swapped_pages_are_shared_by_fork_and_come_apart_on_write() {
    let mm = space(64);
    let a = stamped(&mm, 2);
    mm.reclaim(a, a + 2 * P).unwrap();
    mm.reclaim(a, a + 2 * P).unwrap();
    let child = mm.fork();
    assert!(is_swap(&child, a) && is_swap(&child, a + P));
    assert_eq!(mm.frames().swap_used(), 2, "fork shares the slots");
    assert_eq!(child.read(a), Ok(stamp(a)));
    mm.write(a, 5).unwrap();
    assert_eq!((mm.read(a), child.read(a)), (Ok(5), Ok(stamp(a))));
    assert_eq!(mm.read(a + P), Ok(stamp(a + P)));
    child.write(a + P, 6).unwrap();
    assert_eq!(
        mm.read(a + P),
        Ok(stamp(a + P)),
        "the child's write is its own"
    );
    assert_eq!(child.read(a + P), Ok(6));
    assert_eq!(mm.frames().swap_used(), 0);
    child.exit();
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn migration_moves_pages_to_new_frames_and_the_data_follows() {
    let mm = space(64);
    let a = stamped(&mm, 4);
    let old = pfn(&mm, a);
    let free = mm.frames().free_frames();
    let new = mm.migrate(a).unwrap();
    assert_ne!(new.pfn, old);
    assert_eq!(pfn(&mm, a), new.pfn);
    assert_eq!(mm.frames().refs(old), 0, "the old frame is freed");
    assert_eq!(mm.frames().free_frames(), free);
    assert_eq!(mm.read(a), Ok(stamp(a)));
    assert!(mm.pte(a).writable(), "migration keeps the write permission");
    mm.write(a, 9).unwrap();
    assert_eq!(pfn(&mm, a), new.pfn, "no copy on the next write");

    // A device migration of the whole range moves every page.
    let before: Vec<Pfn> = (0..4).map(|i| pfn(&mm, a + i * P)).collect();
    let moved = mm.migrate_range(a, a + 4 * P, OwnerToken(7)).unwrap();
    let addrs: Vec<u64> = moved.iter().map(|(x, _)| *x).collect();
    assert_eq!(addrs, (0..4).map(|i| a + i * P).collect::<Vec<_>>());
    for (i, (x, f)) in moved.iter().enumerate() {
        assert_ne!(f.pfn, before[i]);
        assert_eq!(pfn(&mm, *x), f.pfn);
        assert_eq!(
            mm.read(*x),
            Ok(if i == 0 { 9 } else { stamp(*x) }),
            "page {i}"
        );
    }

    // Pages that cannot move are skipped: the zero page and a page never touched.
    let b = mm.mmap_anon(3 * P, RW).unwrap();
    mm.write(b, stamp(b)).unwrap();
    mm.read(b + P).unwrap();
    let moved = mm.migrate_range(b, b + 3 * P, OwnerToken(7)).unwrap();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].0, b);
    assert_eq!(mm.read(b), Ok(stamp(b)));
    assert_eq!(mm.read(b + P), Ok(0));
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn mremap_carries_the_data_when_moving_growing_and_shrinking() {
    let mm = space(64);
    let a = stamped(&mm, 4);
    // Something right after it: growing must move.
    mm.mmap(P, Prot::READ, MapKind::AnonPrivate, Some(a + 4 * P))
        .unwrap();
    let free = mm.frames().free_frames();
    let b = mm.mremap(a, 4 * P, 8 * P, MOVE).unwrap();
    assert_ne!(b, a);
    for i in 0..4 {
        assert_eq!(mm.read(b + i * P), Ok(stamp(a + i * P)), "page {i} moved");
    }
    for i in 4..8 {
        assert_eq!(mm.read(b + i * P), Ok(0), "grown page {i} is new");
    }
    assert_eq!(mm.read(a), Err(SimError::Fault(a)), "the old range is gone");
    assert_eq!(mm.frames().free_frames(), free, "a move copies nothing");

    // Grow in place (nothing after it now).
    assert_eq!(mm.mremap(b, 8 * P, 10 * P, IN_PLACE), Ok(b));
    assert_eq!(mm.read(b + 3 * P), Ok(stamp(a + 3 * P)));
    assert_eq!(mm.read(b + 9 * P), Ok(0));

    // Shrink: the tail's frames are freed, the head keeps its data.
    let free = mm.frames().free_frames();
    assert_eq!(mm.mremap(b, 10 * P, 2 * P, IN_PLACE), Ok(b));
    assert_eq!(mm.frames().free_frames(), free + 2);
    assert_eq!(mm.read(b + 2 * P), Err(SimError::Fault(b + 2 * P)));
    assert_eq!(mm.read(b + P), Ok(stamp(a + P)));

    // Move to a fixed address.
    let c = 0x4000_0000;
    assert_eq!(mm.mremap(b, 2 * P, 2 * P, moved_to(c)), Ok(c));
    assert_eq!(mm.read(c), Ok(stamp(a)));
    assert_eq!(mm.read(c + P), Ok(stamp(a + P)));
    assert_eq!(mm.read(b), Err(SimError::Fault(b)));

    // Move one page out of the middle of a mapping, and grow it while moving.
    assert_eq!(
        mm.mremap(c + P, P, 3 * P, moved_to(c + 8 * P)),
        Ok(c + 8 * P)
    );
    assert_eq!(mm.read(c + 8 * P), Ok(stamp(a + P)));
    assert_eq!(mm.read(c + 10 * P), Ok(0));
    assert_eq!(mm.read(c), Ok(stamp(a)));
    assert_eq!(mm.read(c + P), Err(SimError::Fault(c + P)));
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn dontneed_zeroes_private_anonymous_memory_but_shared_and_file_pages_keep_their_data() {
    let mm = space(64);
    // Private anonymous: zero afterwards, frames freed.
    let free = mm.frames().free_frames();
    let a = stamped(&mm, 2);
    mm.madvise(a, 2 * P, Advice::DontNeed).unwrap();
    assert_eq!(mm.frames().free_frames(), free);
    assert_eq!((mm.read(a), mm.read(a + P)), (Ok(0), Ok(0)));

    // Shared anonymous: the data stays in the (shmem) page cache.
    let s = mm.mmap(2 * P, RW, MapKind::AnonShared, None).unwrap();
    mm.write(s, stamp(s)).unwrap();
    mm.write(s + P, stamp(s + P)).unwrap();
    mm.madvise(s, 2 * P, Advice::DontNeed).unwrap();
    assert_eq!(mm.pte(s).kind(), PteKind::None, "unmapped all the same");
    assert_eq!(
        (mm.read(s), mm.read(s + P)),
        (Ok(stamp(s)), Ok(stamp(s + P)))
    );

    // Shared file: the data is in the file.
    let file = File::new(mm.frames().clone());
    let f = mm
        .mmap(
            P,
            RW,
            MapKind::File {
                file: file.clone(),
                offset: 0,
                shared: true,
            },
            None,
        )
        .unwrap();
    mm.write(f, stamp(f)).unwrap();
    mm.madvise(f, P, Advice::DontNeed).unwrap();
    assert_eq!(mm.read(f), Ok(stamp(f)));
    assert_eq!(file.read(0), Ok(stamp(f)));

    // Private file: the private copy is dropped, the file's data shows again.
    file.write(P, 22).unwrap();
    let p = mm
        .mmap(
            2 * P,
            RW,
            MapKind::File {
                file: file.clone(),
                offset: 0,
                shared: false,
            },
            None,
        )
        .unwrap();
    mm.write(p + P, 99).unwrap();
    assert_eq!(
        file.read(P),
        Ok(22),
        "a private write does not reach the file"
    );
    mm.madvise(p, 2 * P, Advice::DontNeed).unwrap();
    assert_eq!(mm.read(p + P), Ok(22));
    assert_eq!(mm.read(p), Ok(stamp(f)));
    mm.exit();
    drop(file);
    assert_nothing_leaked(mm.frames());
}

#[test]
fn madv_free_lets_reclaim_drop_clean_pages_and_keeps_pages_written_again() {
    let mm = space(64);
    let a = stamped(&mm, 3);
    mm.madvise(a, 3 * P, Advice::Free).unwrap();
    assert_eq!(
        mm.read(a + 2 * P),
        Ok(stamp(a + 2 * P)),
        "the data is there until reclaim"
    );
    mm.write(a + P, 0x77).unwrap(); // written again: must be kept
    mm.reclaim(a, a + 3 * P).unwrap();
    mm.reclaim(a, a + 3 * P).unwrap();
    assert_eq!(mm.pte(a).kind(), PteKind::None, "clean page dropped");
    assert_eq!(
        mm.pte(a + 2 * P).kind(),
        PteKind::None,
        "read only: still clean"
    );
    assert!(
        is_swap(&mm, a + P),
        "dirty page swapped: {:?}",
        mm.pte(a + P)
    );
    assert_eq!(mm.frames().swap_used(), 1);
    assert_eq!(mm.read(a), Ok(0));
    assert_eq!(mm.read(a + 2 * P), Ok(0));
    assert_eq!(mm.read(a + P), Ok(0x77));

    // MADV_FREE of a swapped-out page frees its slot: the page reads as zero.
    let b = stamped(&mm, 1);
    mm.reclaim(b, b + P).unwrap();
    mm.reclaim(b, b + P).unwrap();
    assert!(is_swap(&mm, b));
    mm.madvise(b, P, Advice::Free).unwrap();
    assert_eq!(mm.frames().swap_used(), 0);
    assert_eq!(mm.read(b), Ok(0));

    // A page shared with a forked child is not made lazy-free: reclaim swaps it.
    let c = stamped(&mm, 1);
    let child = mm.fork();
    mm.madvise(c, P, Advice::Free).unwrap();
    mm.reclaim(c, c + P).unwrap();
    mm.reclaim(c, c + P).unwrap();
    assert_eq!(mm.read(c), Ok(stamp(c)));
    assert_eq!(child.read(c), Ok(stamp(c)));
    child.exit();
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn shared_anonymous_memory_is_shared_with_a_forked_child() {
    let mm = space(64);
    let s = mm.mmap(2 * P, RW, MapKind::AnonShared, None).unwrap();
    let private = stamped(&mm, 1);
    mm.write(s, stamp(s)).unwrap();
    let child = mm.fork();
    assert_eq!(child.read(s), Ok(stamp(s)));
    child.write(s + P, 0x51).unwrap();
    assert_eq!(
        mm.read(s + P),
        Ok(0x51),
        "the parent sees the child's write"
    );
    mm.write(s, 0x52).unwrap();
    assert_eq!(child.read(s), Ok(0x52), "the child sees the parent's write");
    assert_eq!(pfn(&mm, s), pfn(&child, s));
    // The private mapping beside it is not shared.
    child.write(private, 0x53).unwrap();
    assert_eq!(mm.read(private), Ok(stamp(private)));
    child.exit();
    assert_eq!(mm.read(s + P), Ok(0x51), "the data outlives the child");
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn file_mappings_share_with_the_file_or_copy_on_write() {
    let mm = space(64);
    let file = File::new(mm.frames().clone());
    file.write(0, 5).unwrap();
    file.write(P, 6).unwrap();
    let shared = |offset| MapKind::File {
        file: file.clone(),
        offset,
        shared: true,
    };
    let s = mm.mmap(2 * P, RW, shared(0), None).unwrap();
    assert_eq!((mm.read(s), mm.read(s + P)), (Ok(5), Ok(6)));
    mm.write(s + P, 60).unwrap();
    assert_eq!(file.read(P), Ok(60), "a shared write reaches the file");
    file.write(0, 50).unwrap();
    assert_eq!(mm.read(s), Ok(50), "a file write reaches the mapping");
    let o = mm.mmap(P, Prot::READ, shared(P), None).unwrap();
    assert_eq!(mm.read(o), Ok(60), "a mapping at an offset");

    let p = mm
        .mmap(
            P,
            RW,
            MapKind::File {
                file: file.clone(),
                offset: 0,
                shared: false,
            },
            None,
        )
        .unwrap();
    assert_eq!(mm.read(p), Ok(50));
    file.write(0, 51).unwrap();
    assert_eq!(mm.read(p), Ok(51), "not yet copied: the file's page");
    mm.write(p, 77).unwrap();
    assert_eq!(
        file.read(0),
        Ok(51),
        "a private write does not reach the file"
    );
    assert_eq!(mm.read(s), Ok(51));
    file.write(0, 52).unwrap();
    assert_eq!(
        mm.read(p),
        Ok(77),
        "the private copy no longer follows the file"
    );

    // Reclaim unmaps shared file pages; the data stays in the page cache.
    let cached = file.cached_pages();
    mm.reclaim(s, s + 2 * P).unwrap();
    assert_eq!(mm.reclaim(s, s + 2 * P).unwrap().reclaimed, 2);
    assert_eq!(mm.pte(s + P).kind(), PteKind::None);
    assert_eq!(file.cached_pages(), cached);
    assert_eq!((mm.read(s), mm.read(s + P)), (Ok(52), Ok(60)));
    mm.exit();
    drop(file);
    assert_nothing_leaked(mm.frames());
}

#[test]
fn reclaim_keeps_what_was_written_to_a_private_file_mapping() {
    let mm = space(64);
    let file = File::new(mm.frames().clone());
    file.write(0, 5).unwrap();
    let p = mm
        .mmap(
            P,
            RW,
            MapKind::File {
                file: file.clone(),
                offset: 0,
                shared: false,
            },
            None,
        )
        .unwrap();
    mm.write(p, 77).unwrap();
    mm.reclaim(p, p + P).unwrap();
    mm.reclaim(p, p + P).unwrap();
    assert_eq!(
        mm.read(p),
        Ok(77),
        "the private copy must be swapped, not dropped"
    );
    assert_eq!(file.read(0), Ok(5));
    mm.exit();
    drop(file);
    assert_nothing_leaked(mm.frames());
}

#[test]
fn device_exclusive_access_then_a_cpu_access_restores_the_page_with_its_data() {
    let mm = space(64);
    let a = stamped(&mm, 2);
    let f = mm.make_exclusive(a, OwnerToken(3)).unwrap();
    assert_eq!(mm.pte(a).kind(), PteKind::Exclusive(f.pfn));
    assert_eq!(mm.frames().read(f.pfn), stamp(a));
    mm.frames().write(f.pfn, 0xD0); // the device writes its page
    assert_eq!(mm.read(a), Ok(0xD0), "restored, with the device's data");
    assert_eq!(mm.pte(a).kind(), PteKind::Present(f.pfn), "same frame");
    mm.write(a, 0xD1).unwrap();
    assert_eq!(mm.read(a), Ok(0xD1));

    // On a page shared with a child, it breaks COW first: the child keeps the stamp.
    let child = mm.fork();
    let f = mm.make_exclusive(a + P, OwnerToken(3)).unwrap();
    assert_ne!(Some(f.pfn), child.pte(a + P).pfn());
    assert_eq!(mm.read(a + P), Ok(stamp(a + P)));
    assert_eq!(child.read(a + P), Ok(stamp(a + P)));

    // On untouched memory it allocates a zeroed page.
    let b = mm.mmap_anon(P, RW).unwrap();
    mm.read(b).unwrap(); // the zero page
    let f = mm.make_exclusive(b, OwnerToken(3)).unwrap();
    assert!(!FrameAllocator::is_zero_page(f.pfn));
    mm.write(b, 4).unwrap();
    assert_eq!(mm.read(b), Ok(4));
    child.exit();
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn soft_dirty_reset_write_protects_and_the_next_write_marks_only_that_page() {
    let mm = space(64);
    let a = stamped(&mm, 3);
    assert!((0..3).all(|i| mm.pte(a + i * P).soft_dirty()));
    mm.clear_soft_dirty();
    for i in 0..3 {
        let pte = mm.pte(a + i * P);
        assert!(!pte.soft_dirty() && !pte.writable(), "page {i}: {pte:?}");
        assert_eq!(mm.read(a + i * P), Ok(stamp(a + i * P)));
    }
    let free = mm.frames().free_frames();
    let before = pfn(&mm, a + P);
    mm.write(a + P, 0x5D).unwrap();
    assert_eq!(pfn(&mm, a + P), before, "not a copy");
    assert_eq!(mm.frames().free_frames(), free);
    assert!(mm.pte(a + P).soft_dirty() && mm.pte(a + P).writable());
    assert!(!mm.pte(a).soft_dirty() && !mm.pte(a + 2 * P).soft_dirty());
    assert_eq!(mm.read(a + P), Ok(0x5D));
    assert_eq!(mm.read(a), Ok(stamp(a)));
    assert_eq!(mm.read(a + 2 * P), Ok(stamp(a + 2 * P)));
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

// ----- a secondary's writes reach the primary --------------------------------------------

#[test]
fn a_secondary_write_through_a_valid_translation_is_seen_by_the_primary() {
    let mm = space(64);
    let (sec, checker, _reg) = Shadow::attach(&mm, 1);
    let a = stamped(&mm, 2);
    let f = mm.get_user_pages(a, 1, true).unwrap()[0];
    {
        let mut st = sec.state.lock().unwrap();
        assert!(checker.check_install(&mm, &*sec, a, f, true));
        st.map.insert(a, f);
        assert!(checker.write(&mm, &*sec, a, f, 0x1111));
    }
    assert_eq!(mm.read(a), Ok(0x1111));
    assert_eq!(checker.read(&mm, &*sec, a, f), 0x1111);
    assert_eq!(mm.read(a + P), Ok(stamp(a + P)));

    sec.map(&mm, &checker, a + P, true).unwrap();
    assert_eq!(sec.write(&mm, &checker, a + P, 0x2222), Some(true));
    assert_eq!(mm.read(a + P), Ok(0x2222));
    assert_coherent(&checker);
    assert!(checker.checks() >= 4);
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn after_migration_the_secondary_refaults_and_its_writes_reach_the_primary() {
    let mm = space(64);
    let (sec, checker, _reg) = Shadow::attach(&mm, 2);
    let a = stamped(&mm, 1);
    let old = sec.map(&mm, &checker, a, true).unwrap();
    let starts = sec.starts.load(Relaxed);
    let new = mm.migrate(a).unwrap();
    assert!(sec.starts.load(Relaxed) > starts);
    assert_eq!(
        sec.translation(a),
        None,
        "migration's invalidation dropped it"
    );
    assert!(!mm.frames().is_current(old), "the old frame was freed");
    let f = sec.map(&mm, &checker, a, true).unwrap();
    assert_eq!(f, new);
    assert_eq!(sec.write(&mm, &checker, a, 0x3333), Some(true));
    assert_eq!(mm.read(a), Ok(0x3333));
    assert_coherent(&checker);

    // The checker is not blind: a write through the dropped translation is caught and
    // not performed.
    assert!(!checker.write(&mm, &*sec, a, old, 0xDEAD));
    assert_eq!(checker.violation_count(), 1);
    assert_eq!(checker.violations()[0].kind, ViolationKind::UseAfterFree);
    assert_eq!(mm.read(a), Ok(0x3333));
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn after_fork_and_swap_the_secondarys_writes_still_reach_the_primary() {
    let mm = space(64);
    let (sec, checker, _reg) = Shadow::attach(&mm, 3);
    let a = stamped(&mm, 1);
    sec.map(&mm, &checker, a, true).unwrap();
    let child = mm.fork();
    assert_eq!(sec.translation(a), None, "fork write-protected the page");
    let f = sec.map(&mm, &checker, a, true).unwrap(); // breaks COW in the parent
    assert_ne!(Some(f.pfn), child.pte(a).pfn());
    assert_eq!(sec.write(&mm, &checker, a, 0x4444), Some(true));
    assert_eq!(mm.read(a), Ok(0x4444));
    assert_eq!(child.read(a), Ok(stamp(a)), "the child keeps the old data");

    mm.reclaim(a, a + P).unwrap();
    mm.reclaim(a, a + P).unwrap();
    assert!(is_swap(&mm, a));
    assert_eq!(sec.translation(a), None, "swap-out dropped it");
    sec.map(&mm, &checker, a, true).unwrap(); // swaps in
    assert_eq!(mm.frames().read(pfn(&mm, a)), 0x4444);
    assert_eq!(sec.write(&mm, &checker, a, 0x5555), Some(true));
    assert_eq!(mm.read(a), Ok(0x5555));

    // And after mremap moved it away, the old address is gone for the secondary too.
    let b = mm.mremap(a, P, P, moved_to(0x4000_0000)).unwrap();
    assert_eq!(sec.translation(a), None);
    sec.map(&mm, &checker, b, true).unwrap();
    assert_eq!(sec.write(&mm, &checker, b, 0x6666), Some(true));
    assert_eq!(mm.read(b), Ok(0x6666));
    assert_coherent(&checker);
    child.exit();
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

// ----- bad input --------------------------------------------------------------------------

#[test]
fn munmap_rejects_unaligned_empty_and_overflowing_ranges() {
    let mm = space(16);
    let a = stamped(&mm, 2);
    assert_einval!(mm.munmap(a + 1, P));
    assert_einval!(mm.munmap(a, 0));
    assert_einval!(mm.munmap(u64::MAX - P + 1, 2 * P));
    assert_einval!(mm.munmap(a, u64::MAX));
    assert_einval!(mm.munmap(a, u64::MAX - P + 2)); // rounds up past the end
    assert_einval!(mm.munmap(TASK_SIZE, P));
    assert_einval!(mm.munmap(TASK_SIZE - P, 2 * P));
    assert_eq!(
        mm.munmap(TASK_SIZE - P, P),
        Ok(()),
        "the last page is user space"
    );
    assert_eq!(
        mm.munmap(0x7000_0000, P),
        Ok(()),
        "unmapping nothing is fine"
    );
    assert_eq!(
        (mm.read(a), mm.read(a + P)),
        (Ok(stamp(a)), Ok(stamp(a + P)))
    );
    // An unaligned length rounds up to a page.
    mm.munmap(a, 1).unwrap();
    assert_eq!(mm.read(a), Err(SimError::Fault(a)));
    assert_eq!(mm.read(a + P), Ok(stamp(a + P)));
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn mprotect_errors_and_permissions() {
    let mm = space(16);
    let a = stamped(&mm, 2);
    assert_einval!(mm.mprotect(a + 1, P, Prot::READ));
    assert_einval!(mm.mprotect(a + 1, 0, Prot::READ));
    assert_eq!(
        mm.mprotect(a, 0, Prot::NONE),
        Ok(()),
        "zero length does nothing"
    );
    assert_eq!(mm.mprotect(0x7000_0000, 0, Prot::NONE), Ok(()));
    assert_eq!(
        mm.write(a, stamp(a)),
        Ok(()),
        "unchanged by the zero-length call"
    );
    // Unmapped, or partly: ENOMEM, and a hole at the start changes nothing.
    assert_eq!(
        mm.mprotect(0x7000_0000, P, Prot::READ),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(
        mm.mprotect(a - P, 2 * P, Prot::READ),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(mm.write(a, 1), Ok(()));
    assert_eq!(
        mm.mprotect(a, 3 * P, Prot::READ),
        Err(SimError::OutOfMemory)
    );

    // Read-only: reads work, writes are refused, the data is unchanged.
    mm.mprotect(a, 2 * P, Prot::READ).unwrap();
    assert!(!mm.pte(a).writable());
    assert_eq!(mm.read(a), Ok(1));
    assert_eq!(mm.write(a, 2), Err(SimError::Permission(a)));
    assert_eq!(mm.fault(a + P, true), Err(SimError::Permission(a + P)));
    assert_eq!(mm.read(a), Ok(1));
    // PROT_NONE: every access refused, the data kept.
    mm.mprotect(a, 2 * P, Prot::NONE).unwrap();
    assert_eq!(mm.read(a), Err(SimError::Permission(a)));
    assert_eq!(mm.write(a + P, 2), Err(SimError::Permission(a + P)));
    assert_eq!(mm.fault(a, false), Err(SimError::Permission(a)));
    // Back to read-write: the write goes through (the HMM self-test's sequence).
    mm.mprotect(a, 2 * P, RW).unwrap();
    assert_eq!(mm.read(a), Ok(1));
    mm.write(a + P, 3).unwrap();
    assert_eq!(mm.read(a + P), Ok(3));
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn mprotect_of_an_overflowing_range_is_enomem_like_linux() {
    // Linux do_mprotect_pkey: `end = start + PAGE_ALIGN(len); if (end <= start) return
    // -ENOMEM;` and a range past the last mapping finds no VMA: -ENOMEM.
    let mm = space(16);
    let a = stamped(&mm, 1);
    assert_eq!(
        mm.mprotect(u64::MAX - P + 1, 2 * P, Prot::READ),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(
        mm.mprotect(a, u64::MAX, Prot::READ),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(
        mm.mprotect(TASK_SIZE - P, 2 * P, Prot::READ),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(
        mm.mprotect(TASK_SIZE, P, Prot::READ),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(mm.write(a, 1), Ok(()));
}

#[test]
fn madvise_errors() {
    let mm = space(16);
    let a = stamped(&mm, 3);
    assert_einval!(mm.madvise(a + 1, P, Advice::DontNeed));
    assert_einval!(mm.madvise(a + 1, 0, Advice::DontNeed));
    assert_eq!(
        mm.madvise(a, 0, Advice::DontNeed),
        Ok(()),
        "zero length: nothing"
    );
    assert_eq!(mm.madvise(0x7000_0000, 0, Advice::Free), Ok(()));
    assert_eq!(mm.read(a), Ok(stamp(a)));
    assert_einval!(mm.madvise(a, u64::MAX, Advice::DontNeed)); // rounds to zero
    assert_einval!(mm.madvise(u64::MAX - P + 1, 2 * P, Advice::DontNeed));
    assert_eq!(mm.read(a), Ok(stamp(a)));
    // Unmapped: ENOMEM; partly unmapped: ENOMEM, and the mapped parts are advised.
    assert_eq!(
        mm.madvise(0x7000_0000, P, Advice::DontNeed),
        Err(SimError::OutOfMemory)
    );
    mm.munmap(a + P, P).unwrap();
    assert_eq!(
        mm.madvise(a, 3 * P, Advice::DontNeed),
        Err(SimError::OutOfMemory)
    );
    assert_eq!((mm.read(a), mm.read(a + 2 * P)), (Ok(0), Ok(0)));
    // MADV_FREE only on private anonymous memory.
    let s = mm.mmap(P, RW, MapKind::AnonShared, None).unwrap();
    mm.write(s, 5).unwrap();
    assert_einval!(mm.madvise(s, P, Advice::Free));
    let file = File::new(mm.frames().clone());
    let f = mm
        .mmap(
            P,
            RW,
            MapKind::File {
                file: file.clone(),
                offset: 0,
                shared: false,
            },
            None,
        )
        .unwrap();
    assert_einval!(mm.madvise(f, P, Advice::Free));
    assert_eq!(mm.read(s), Ok(5));
    mm.exit();
    drop(file);
    assert_nothing_leaked(mm.frames());
}

#[test]
fn madvise_beyond_user_space_is_enomem_like_linux() {
    // Linux do_madvise rejects only unaligned starts, lengths that round to zero and
    // wrapping ends (EINVAL); the walk then finds no VMA: -ENOMEM.
    let mm = space(16);
    assert_eq!(
        mm.madvise(TASK_SIZE, P, Advice::DontNeed),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(
        mm.madvise(TASK_SIZE - P, 2 * P, Advice::DontNeed),
        Err(SimError::OutOfMemory)
    );
}

#[test]
fn mremap_errors() {
    let mm = space(16);
    let a = stamped(&mm, 2);
    assert_einval!(mm.mremap(a + 1, P, 2 * P, MOVE));
    assert_einval!(mm.mremap(a, 0, 2 * P, MOVE)); // old_len 0 of a private mapping
    assert_einval!(mm.mremap(a, P, 0, MOVE));
    assert_einval!(mm.mremap(a, P, u64::MAX, MOVE)); // rounds to zero
    assert_einval!(mm.mremap(
        a,
        P,
        P,
        MremapFlags {
            may_move: false,
            fixed: Some(0x4000_0000)
        }
    ));
    assert_einval!(mm.mremap(a, 2 * P, 2 * P, moved_to(a + P))); // overlapping
    assert_einval!(mm.mremap(a, 2 * P, 2 * P, moved_to(a)));
    assert_einval!(mm.mremap(a, P, P, moved_to(0x4000_0001)));
    assert_einval!(mm.mremap(a, P, 2 * P, moved_to(TASK_SIZE - P)));
    assert_eq!(
        mm.mremap(0x7000_0000, P, 2 * P, MOVE),
        Err(SimError::Fault(0x7000_0000)),
        "EFAULT: nothing mapped there"
    );
    assert!(
        matches!(mm.mremap(a, 3 * P, 4 * P, MOVE), Err(SimError::Fault(_))),
        "EFAULT: the old range runs past its mapping"
    );
    mm.mmap(P, Prot::READ, MapKind::AnonPrivate, Some(a + 2 * P))
        .unwrap();
    assert_eq!(
        mm.mremap(a, 2 * P, 4 * P, IN_PLACE),
        Err(SimError::OutOfMemory),
        "ENOMEM: cannot grow in place and may not move"
    );
    assert_eq!(
        (mm.read(a), mm.read(a + P)),
        (Ok(stamp(a)), Ok(stamp(a + P)))
    );
    assert_eq!(mm.vmas().len(), 2, "nothing changed");
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn mremap_of_nothing_mapped_is_efault_whatever_the_old_length_like_linux() {
    // Linux's mremap checks only the start's alignment and the new length before
    // vma_lookup(addr), which fails with EFAULT when nothing is mapped there.
    let mm = space(16);
    let hole = 0x7000_0000;
    assert_eq!(mm.mremap(hole, 0, P, MOVE), Err(SimError::Fault(hole)));
    assert_eq!(
        mm.mremap(hole, u64::MAX - hole, P, MOVE),
        Err(SimError::Fault(hole))
    );
    let top = u64::MAX - P + 1;
    assert_eq!(mm.mremap(top, 2 * P, P, MOVE), Err(SimError::Fault(top)));
    assert_eq!(
        mm.mremap(TASK_SIZE, P, 2 * P, MOVE),
        Err(SimError::Fault(TASK_SIZE))
    );
}

#[test]
fn mremap_after_an_mprotect_round_trip_sees_one_mapping_like_linux() {
    let mm = space(16);
    let a = stamped(&mm, 4);
    mm.mprotect(a, P, Prot::READ).unwrap();
    mm.mprotect(a, P, RW).unwrap();
    let b = mm.mremap(a, 4 * P, 8 * P, MOVE).unwrap();
    for i in 0..4 {
        assert_eq!(mm.read(b + i * P), Ok(stamp(a + i * P)));
    }
}

#[test]
fn mremap_of_a_file_mapping_whose_offset_would_overflow_is_einval() {
    let mm = space(16);
    let file = File::new(mm.frames().clone());
    let offset = !(P - 1) - P; // the last two pages of the file's offsets
    let f = mm
        .mmap(
            P,
            RW,
            MapKind::File {
                file: file.clone(),
                offset,
                shared: true,
            },
            None,
        )
        .unwrap();
    let r = mm.mremap(f, P, 4 * P, MOVE);
    assert_einval!(r);
    // If it was allowed anyway, touching the grown part must not panic.
    if let Ok(g) = r {
        let _ = mm.read(g + 2 * P);
    }
}

#[test]
fn mmap_errors() {
    let mm = space(16);
    assert_einval!(mm.mmap_anon(0, RW));
    assert_eq!(mm.mmap_anon(u64::MAX, RW), Err(SimError::OutOfMemory));
    assert_eq!(mm.mmap_anon(TASK_SIZE + P, RW), Err(SimError::OutOfMemory));
    assert_einval!(mm.mmap(P, RW, MapKind::AnonPrivate, Some(0x4000_0001)));
    assert_eq!(
        mm.mmap(2 * P, RW, MapKind::AnonPrivate, Some(u64::MAX - P + 1)),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(
        mm.mmap(2 * P, RW, MapKind::AnonPrivate, Some(TASK_SIZE - P)),
        Err(SimError::OutOfMemory)
    );
    let file = File::new(mm.frames().clone());
    assert_einval!(mm.mmap(
        P,
        RW,
        MapKind::File {
            file: file.clone(),
            offset: 3,
            shared: true
        },
        None
    ));
    assert!(mm.vmas().is_empty(), "no failed call left a mapping");
    // No room left.
    let all = mm.mmap_anon(TASK_SIZE - MMAP_MIN_ADDR, RW).unwrap();
    assert_eq!(all, MMAP_MIN_ADDR);
    assert_eq!(mm.mmap_anon(P, RW), Err(SimError::OutOfMemory));
    assert_eq!(
        mm.mremap(all, P, 2 * P, MOVE),
        Err(SimError::OutOfMemory),
        "mremap cannot find room either"
    );
    // MAP_FIXED replaces what is there (the last page of user space).
    let last = mm
        .mmap(P, RW, MapKind::AnonPrivate, Some(TASK_SIZE - P))
        .unwrap();
    mm.write(last, 8).unwrap();
    assert_eq!(mm.read(last), Ok(8));
    mm.exit();
    drop(file);
    assert_nothing_leaked(mm.frames());
}

#[test]
fn faults_on_unmapped_or_forbidden_memory_are_typed_errors() {
    let mm = space(16);
    assert_eq!(mm.read(0x7000_0000), Err(SimError::Fault(0x7000_0000)));
    assert_eq!(mm.write(0x7000_0123, 1), Err(SimError::Fault(0x7000_0000)));
    assert_eq!(mm.fault(0, false), Err(SimError::Fault(0)));
    assert_eq!(mm.fault(u64::MAX, true), Err(SimError::Fault(!(P - 1))));
    assert!(matches!(mm.read(TASK_SIZE + 5), Err(SimError::Fault(_))));
    let a = stamped(&mm, 1);
    mm.munmap(a, P).unwrap();
    assert_eq!(mm.read(a), Err(SimError::Fault(a)));

    let ro = mm.mmap_anon(P, Prot::READ).unwrap();
    assert_eq!(mm.read(ro), Ok(0));
    assert_eq!(mm.write(ro, 1), Err(SimError::Permission(ro)));
    assert_eq!(mm.fault(ro + 7, true), Err(SimError::Permission(ro)));
    let none = mm.mmap_anon(P, Prot::NONE).unwrap();
    assert_eq!(mm.read(none), Err(SimError::Permission(none)));
    assert_eq!(mm.write(none, 1), Err(SimError::Permission(none)));
    assert_eq!(mm.pte(none).kind(), PteKind::None, "nothing was mapped");

    // A read-only shared file mapping cannot write the file.
    let file = File::new(mm.frames().clone());
    file.write(0, 4).unwrap();
    let f = mm
        .mmap(
            P,
            Prot::READ,
            MapKind::File {
                file: file.clone(),
                offset: 0,
                shared: true,
            },
            None,
        )
        .unwrap();
    assert_eq!(mm.write(f, 5), Err(SimError::Permission(f)));
    assert_eq!(file.read(0), Ok(4));
    // The file's own offsets must be page aligned.
    assert_einval!(file.read(1));
    assert_einval!(file.write(P + 1, 1));
    mm.exit();
    drop(file);
    assert_nothing_leaked(mm.frames());
}

#[test]
fn snapshot_and_get_user_pages_errors() {
    let mm = space(16);
    let a = stamped(&mm, 2);
    let peek = SnapshotMode::Peek;
    assert_einval!(mm.snapshot(a, a, peek));
    assert_einval!(mm.snapshot(a + P, a, peek));
    assert_einval!(mm.snapshot(a + 1, a + P, peek));
    // Past user space: the test_hmm driver would pass it to hmm_range_fault, which finds
    // no VMA (EFAULT); refusing it up front (EINVAL) is as good.
    assert!(matches!(
        mm.snapshot(TASK_SIZE - P, TASK_SIZE + P, peek),
        Err(SimError::InvalidArgument(_) | SimError::Fault(_))
    ));
    assert_einval!(mm.snapshot(a, u64::MAX, peek));
    assert_eq!(
        mm.snapshot(a, a + 3 * P, peek),
        Err(SimError::Fault(a + 2 * P)),
        "EFAULT at the first unmapped page"
    );
    let none = mm.mmap_anon(P, Prot::NONE).unwrap();
    assert_eq!(
        mm.snapshot(none, none + P, SnapshotMode::Fault),
        Err(SimError::Permission(none))
    );
    assert_eq!(mm.snapshot(none, none + P, peek), Ok(vec![PageState::None]));
    let ro = mm.mmap_anon(P, Prot::READ).unwrap();
    assert_eq!(
        mm.snapshot(ro, ro + P, SnapshotMode::FaultWrite),
        Err(SimError::Permission(ro))
    );
    assert!(matches!(
        mm.snapshot(ro, ro + P, SnapshotMode::Fault).as_deref(),
        Ok([PageState::Zero(_)])
    ));

    assert_einval!(mm.get_user_pages(a, u64::MAX, false));
    assert!(matches!(
        mm.get_user_pages(TASK_SIZE - P, 2, false),
        Err(SimError::InvalidArgument(_) | SimError::Fault(_))
    ));
    assert_einval!(mm.get_user_pages(u64::MAX - P + 1, 2, false));
    assert_eq!(
        mm.get_user_pages(0x7000_0000, 1, false),
        Err(SimError::Fault(0x7000_0000))
    );
    assert_eq!(
        mm.get_user_pages(none, 1, false),
        Err(SimError::Permission(none))
    );
    assert_eq!(
        mm.get_user_pages(ro, 1, true),
        Err(SimError::Permission(ro))
    );
    assert_eq!(
        (mm.read(a), mm.read(a + P)),
        (Ok(stamp(a)), Ok(stamp(a + P)))
    );
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn get_user_pages_of_zero_pages_or_an_unaligned_start_is_like_linux() {
    let mm = space(16);
    let a = stamped(&mm, 1);
    assert_eq!(mm.get_user_pages(a, 0, false), Ok(vec![]));
    let f = mm.get_user_pages(a + 12, 1, false).unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].pfn, pfn(&mm, a));
}

#[test]
fn reclaim_age_and_migrate_errors() {
    let mm = space(16);
    let a = stamped(&mm, 2);
    for (s, e) in [
        (a, a),
        (a + P, a),
        (a + 1, a + P),
        (TASK_SIZE - P, TASK_SIZE + P),
        (a, u64::MAX),
    ] {
        assert_einval!(mm.reclaim(s, e));
        assert_einval!(mm.age(s, e));
        assert_einval!(mm.migrate_range(s, e, OwnerToken(1)));
    }
    assert_eq!(
        mm.reclaim(0x7000_0000, 0x7000_0000 + 4 * P),
        Ok(ReclaimStats::default()),
        "nothing mapped: nothing to do"
    );
    assert_eq!(mm.age(0x7000_0000, 0x7000_0000 + 4 * P), Ok(0));
    assert!(
        matches!(
            mm.migrate_range(a, a + 3 * P, OwnerToken(1)),
            Err(SimError::Fault(_) | SimError::InvalidArgument(_))
        ),
        "a hole in the range is refused"
    );
    assert!(!mm.test_young(0x7000_0000));
    assert_eq!(mm.age(a, a + 2 * P), Ok(2), "both pages were young");
    assert_eq!(mm.age(a, a + 2 * P), Ok(0), "aging cleared them");

    // migrate: EFAULT if unmapped, EBUSY if there is nothing it can move.
    assert_eq!(mm.migrate(0x7000_0000), Err(SimError::Fault(0x7000_0000)));
    let b = mm.mmap_anon(4 * P, RW).unwrap();
    assert_eq!(mm.migrate(b), Err(SimError::Busy(b)), "never touched");
    mm.read(b).unwrap();
    assert_eq!(mm.migrate(b), Err(SimError::Busy(b)), "the zero page");
    mm.write(b + P, 1).unwrap();
    let child = mm.fork();
    assert_eq!(
        mm.migrate(b + P),
        Err(SimError::Busy(b + P)),
        "shared with a child"
    );
    child.exit();
    mm.write(b + 2 * P, 2).unwrap();
    mm.reclaim(b + 2 * P, b + 3 * P).unwrap();
    mm.reclaim(b + 2 * P, b + 3 * P).unwrap();
    assert!(is_swap(&mm, b + 2 * P));
    assert_eq!(
        mm.migrate(b + 2 * P),
        Err(SimError::Busy(b + 2 * P)),
        "swapped out"
    );
    mm.make_exclusive(b + 3 * P, OwnerToken(2)).unwrap();
    assert_eq!(
        mm.migrate(b + 3 * P),
        Err(SimError::Busy(b + 3 * P)),
        "device-exclusive"
    );
    let s = mm.mmap(P, RW, MapKind::AnonShared, None).unwrap();
    mm.write(s, 3).unwrap();
    assert_eq!(mm.migrate(s), Err(SimError::Busy(s)), "a page-cache page");
    assert_eq!(mm.read(b + 2 * P), Ok(2));
    assert_eq!(mm.read(s), Ok(3));

    // make_exclusive: EFAULT, permission; an unaligned address means its page.
    assert_eq!(
        mm.make_exclusive(0x7000_0000, OwnerToken(2)),
        Err(SimError::Fault(0x7000_0000))
    );
    let ro = mm.mmap_anon(P, Prot::READ).unwrap();
    let none = mm.mmap_anon(P, Prot::NONE).unwrap();
    assert_eq!(
        mm.make_exclusive(ro, OwnerToken(2)),
        Err(SimError::Permission(ro))
    );
    assert_eq!(
        mm.make_exclusive(none, OwnerToken(2)),
        Err(SimError::Permission(none))
    );
    let f = mm.make_exclusive(a + 100, OwnerToken(2)).unwrap();
    assert_eq!(mm.pte(a).kind(), PteKind::Exclusive(f.pfn));
    assert_eq!(mm.read(a), Ok(stamp(a)));
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn test_young_of_an_address_outside_user_space_is_false() {
    let mm = space(16);
    let a = stamped(&mm, 1);
    assert!(mm.test_young(a));
    assert!(!mm.test_young(a | (1 << 48)));
}

#[test]
fn out_of_frames_is_enomem_and_loses_nothing() {
    let mm = space(4);
    let a = stamped(&mm, 4);
    let b = mm.mmap_anon(P, RW).unwrap();
    assert_eq!(mm.frames().free_frames(), 0);
    assert_eq!(mm.write(b, 1), Err(SimError::OutOfMemory), "a new page");
    assert_eq!(mm.get_user_pages(b, 1, true), Err(SimError::OutOfMemory));
    assert_eq!(
        mm.snapshot(b, b + P, SnapshotMode::FaultWrite),
        Err(SimError::OutOfMemory)
    );
    assert_eq!(
        mm.migrate(a),
        Err(SimError::OutOfMemory),
        "no frame to move to"
    );
    assert_eq!(
        mm.migrate_range(a, a + P, OwnerToken(1)),
        Err(SimError::OutOfMemory)
    );
    mm.read(b).unwrap(); // the zero page costs nothing
    assert_eq!(
        mm.make_exclusive(b, OwnerToken(1)),
        Err(SimError::OutOfMemory)
    );

    // COW break without a frame: refused, both sides keep their data.
    let child = mm.fork();
    assert_eq!(mm.write(a, 9), Err(SimError::OutOfMemory));
    assert_eq!(child.write(a, 9), Err(SimError::OutOfMemory));
    assert_eq!((mm.read(a), child.read(a)), (Ok(stamp(a)), Ok(stamp(a))));
    child.exit();

    // Swap-in without a frame: refused, the page stays in swap, intact.
    mm.reclaim(a, a + 4 * P).unwrap();
    assert_eq!(mm.reclaim(a, a + 4 * P).unwrap().reclaimed, 4);
    let file = File::new(mm.frames().clone());
    for i in 0..4 {
        file.write(i * P, i).unwrap(); // the page cache takes every frame
    }
    assert_eq!(file.write(4 * P, 4), Err(SimError::OutOfMemory));
    assert_eq!(mm.read(a), Err(SimError::OutOfMemory));
    assert!(is_swap(&mm, a));
    let f = mm
        .mmap(
            P,
            RW,
            MapKind::File {
                file: file.clone(),
                offset: 8 * P,
                shared: true,
            },
            None,
        )
        .unwrap();
    assert_eq!(mm.read(f), Err(SimError::OutOfMemory), "no page-cache page");
    mm.munmap(f, P).unwrap();
    drop(file);
    for i in 0..4 {
        assert_eq!(mm.read(a + i * P), Ok(stamp(a + i * P)));
    }
    mm.exit();
    assert_nothing_leaked(mm.frames());
}

#[test]
fn nothing_mapped_after_exit_can_leak() {
    let frames = Arc::new(FrameAllocator::new(8));
    let mm = AddressSpace::new(frames.clone());
    mm.exit();
    if let Ok(a) = mm.mmap_anon(P, RW) {
        let _ = mm.write(a, 1);
    }
    drop(mm);
    assert_nothing_leaked(&frames);
}

// ----- random calls: no panic, no leak ----------------------------------------------------

/// Pages of the region the random calls mostly aim at (where `mmap` without a hint puts
/// things too).
const ARENA: u64 = 192;

fn any_addr(r: &mut Rng) -> u64 {
    match r.below(16) {
        0..=10 => MMAP_MIN_ADDR + r.below(ARENA) * P,
        11 => MMAP_MIN_ADDR + r.below(ARENA * P),
        12 => r.pick(&[
            0,
            P,
            MMAP_MIN_ADDR - P,
            TASK_SIZE - P,
            TASK_SIZE,
            TASK_SIZE + P,
            (1 << 48) | MMAP_MIN_ADDR,
            u64::MAX - P + 1,
            u64::MAX,
        ]),
        13 => r.next() & !(P - 1),
        _ => r.next(),
    }
}

fn any_len(r: &mut Rng) -> u64 {
    match r.below(16) {
        0..=10 => (1 + r.below(12)) * P,
        11 => r.below(3 * P),
        12 => r.pick(&[
            0,
            1,
            P - 1,
            TASK_SIZE,
            TASK_SIZE - MMAP_MIN_ADDR,
            1 << 40,
            u64::MAX,
            u64::MAX - P + 1,
        ]),
        _ => r.next(),
    }
}

/// A range for the calls that walk it page by page: short, or invalid.
fn short_span(r: &mut Rng) -> (u64, u64) {
    let s = any_addr(r);
    let e = match r.below(8) {
        0..=5 => s.wrapping_add(r.below(16) * P),
        6 => s.wrapping_add(r.below(4 * P)),
        _ => r.pick(&[0, u64::MAX, TASK_SIZE + P, s.wrapping_sub(P)]),
    };
    (s, e)
}

fn any_prot(r: &mut Rng) -> Prot {
    r.pick(&[Prot::NONE, Prot::READ, RW, RW])
}

#[test]
fn twenty_thousand_random_calls_neither_panic_nor_leak() {
    let frames = Arc::new(FrameAllocator::new(160));
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let root = AddressSpace::new(frames.clone());
    let (sec, checker, reg) = Shadow::attach(&root, 0x9E37);
    let file = File::new(frames.clone());
    let mut mms: Vec<Arc<AddressSpace>> = vec![root.clone()];
    // The page last written by anyone: calls aim at it half the time, so that migration,
    // reclaim, mremap and device access meet pages that have frames.
    let mut hot = MMAP_MIN_ADDR;
    let mut ok = 0u32;
    for step in 0..20_000u32 {
        let mm = mms[r.below(mms.len() as u64) as usize].clone();
        let addr = |r: &mut Rng| if r.below(2) == 0 { hot } else { any_addr(r) };
        let res: Result<(), SimError> = match r.below(26) {
            0 | 1 => {
                let kind = match r.below(4) {
                    0 | 1 => MapKind::AnonPrivate,
                    2 => MapKind::AnonShared,
                    _ => MapKind::File {
                        file: file.clone(),
                        offset: r.pick(&[0, P, 5 * P, 3, 1 << 40]),
                        shared: r.below(2) == 0,
                    },
                };
                let len = match r.below(4) {
                    0 => any_len(&mut r),
                    _ => (1 + r.below(8)) * P,
                };
                // Any length: the calls that walk a range page by page get short spans.
                let fixed = (r.below(2) == 0).then(|| any_addr(&mut r));
                mm.mmap(len, any_prot(&mut r), kind, fixed).map(drop)
            }
            2 => mm.munmap(any_addr(&mut r), any_len(&mut r)),
            3 => mm.mprotect(addr(&mut r), any_len(&mut r), any_prot(&mut r)),
            4 => {
                let advice = r.pick(&[Advice::DontNeed, Advice::Free]);
                mm.madvise(addr(&mut r), any_len(&mut r), advice)
            }
            5 => {
                let flags = MremapFlags {
                    may_move: r.below(3) != 0,
                    fixed: (r.below(3) == 0).then(|| any_addr(&mut r)),
                };
                let a = addr(&mut r);
                let old = match r.below(2) {
                    0 => P,
                    _ => any_len(&mut r),
                };
                let new = any_len(&mut r);
                mm.mremap(a, old, new, flags).map(drop)
            }
            6 => {
                if mms.len() < 4 {
                    mms.push(mm.fork());
                } else {
                    let gone = mms.remove(1 + r.below(3) as usize);
                    gone.exit();
                }
                Ok(())
            }
            7..=9 => mm.read(addr(&mut r)).map(drop),
            10..=12 => {
                let a = any_addr(&mut r);
                let res = mm.write(a, r.next());
                if res.is_ok() {
                    hot = a & !(P - 1);
                }
                res
            }
            13 => mm.fault(addr(&mut r), r.below(2) == 0).map(drop),
            14 => {
                let n = match r.below(5) {
                    0 => r.pick(&[1 << 36, u64::MAX, 1 << 60]),
                    _ => r.below(9),
                };
                mm.get_user_pages(addr(&mut r), n, r.below(2) == 0)
                    .map(drop)
            }
            15 => {
                let (s, e) = short_span(&mut r);
                let mode = r.pick(&[
                    SnapshotMode::Peek,
                    SnapshotMode::Fault,
                    SnapshotMode::FaultWrite,
                ]);
                mm.snapshot(s, e, mode).map(drop)
            }
            16 => {
                // Two passes, as kswapd would make: the first ages, the second reclaims.
                let (s, e) = match r.below(2) {
                    0 => (hot, hot + P),
                    _ => short_span(&mut r),
                };
                mm.reclaim(s, e).and_then(|_| mm.reclaim(s, e)).map(drop)
            }
            17 => {
                let (s, e) = short_span(&mut r);
                mm.age(s, e).map(drop)
            }
            18 => {
                mm.test_young(any_addr(&mut r));
                Ok(())
            }
            19 => mm.migrate(addr(&mut r)).map(drop),
            20 => {
                let (s, e) = match r.below(2) {
                    0 => (hot, hot + P),
                    _ => short_span(&mut r),
                };
                mm.migrate_range(s, e, OwnerToken(r.below(3))).map(drop)
            }
            21 => mm
                .make_exclusive(addr(&mut r), OwnerToken(r.below(3)))
                .map(drop),
            22 => {
                match r.below(8) {
                    0 => mm.clear_soft_dirty(),
                    1 => drop(mm.oom_reap()),
                    _ => {
                        // Keep the region above the arena from filling up.
                        mm.munmap(MMAP_MIN_ADDR + ARENA * P, 1 << 36).unwrap();
                    }
                }
                Ok(())
            }
            23 => {
                let off = match r.below(8) {
                    0 => r.below(16 * P),
                    1 => r.pick(&[u64::MAX - P + 1, u64::MAX, 1 << 40]),
                    _ => r.below(16) * P,
                };
                if r.below(2) == 0 {
                    file.write(off, r.next())
                } else {
                    file.read(off).map(drop)
                }
            }
            _ => {
                // The secondary on the first address space: fault, install, write; the
                // primary must see the write.
                let a = addr(&mut r) & !(P - 1);
                let v = r.next();
                sec.map(&root, &checker, a, true).map(|_| {
                    assert_eq!(sec.write(&root, &checker, a, v), Some(true), "step {step}");
                    assert_eq!(root.read(a), Ok(v), "step {step}: the secondary's write");
                })
            }
        };
        ok += u32::from(res.is_ok());
    }
    assert!(ok > 4_000, "too few calls succeeded to mean much: {ok}");
    assert!(ok < 16_000, "too few calls failed to mean much: {ok}");
    assert_coherent(&checker);
    for mm in &mms {
        mm.exit();
    }
    drop(reg);
    drop(mms);
    drop(root);
    drop(file);
    assert_nothing_leaked(&frames);
}
