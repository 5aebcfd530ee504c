//! The KVM-style shadow MMU and the SVA-style TLB over the simulated primary, with the
//! coherence checker attached: every primary operation, the collision-retry paths made
//! deterministic, aging, memslot errors, teardown, and a concurrent run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use mmu_notifier::{ListSubscriber, OwnerToken, Range, RegisterError, SecondaryTlb, WouldBlock};
use mmu_secondary::kvm::{Gfn, Hva, Kvm, MemslotError, Pages};
use mmu_secondary::sva::{SvaTlb, DEFAULT_CAPACITY};
use mmu_secondary::{SecondaryError, SecondaryMmu};
use mmu_sim::{
    AddressSpace, Advice, Checker, FrameAllocator, MapKind, Prot, SimError, PAGE_SIZE, TASK_SIZE,
};

const P: u64 = PAGE_SIZE;

fn space(seed: u64) -> (Arc<AddressSpace>, Arc<Checker>) {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(4096)));
    let checker = Checker::new(seed);
    mm.attach_checker(checker.clone()).unwrap();
    (mm, checker)
}

/// Waits (a bounded time) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

// ----- memslots -------------------------------------------------------------------------

#[test]
fn memslot_errors_are_reported_and_slots_translate_both_ways() {
    let (mm, checker) = space(1);
    let a = mm.mmap_anon(8 * P, Prot::READ_WRITE).unwrap();
    let b = mm.mmap_anon(4 * P, Prot::READ_WRITE).unwrap();
    assert!(
        mm.vmas().iter().all(|v| v.end <= b + 4 * P),
        "nothing mapped after b"
    );
    let kvm = Kvm::new(&mm).unwrap();

    assert_eq!(kvm.add_memslot(0, 0, a), Err(MemslotError::Empty));
    assert_eq!(
        kvm.add_memslot(0, 1, a + 1),
        Err(MemslotError::Unaligned(Hva(a + 1)))
    );
    assert_eq!(kvm.add_memslot(u64::MAX, 2, a), Err(MemslotError::Overflow));
    assert_eq!(kvm.add_memslot(0, u64::MAX, a), Err(MemslotError::Overflow));
    assert_eq!(
        kvm.add_memslot(0, 2, TASK_SIZE - P),
        Err(MemslotError::Overflow)
    );
    assert_eq!(
        kvm.add_memslot(0, 8, b),
        Err(MemslotError::Unmapped(Hva(b + 4 * P)))
    );

    let slot = kvm.add_memslot(0x10, 8, a).unwrap();
    assert_eq!(
        (slot.gfn_base(), slot.npages(), slot.hva()),
        (Gfn(0x10), Pages(8), Hva(a))
    );
    assert_eq!(
        (slot.gfn_end(), slot.hva_end()),
        (Gfn(0x18), Hva(a + 8 * P))
    );
    assert_eq!(
        kvm.add_memslot(0x14, 8, b),
        Err(MemslotError::GfnOverlap {
            existing: Gfn(0x10)
        })
    );
    assert_eq!(
        kvm.add_memslot(0x100, 2, a + 6 * P),
        Err(MemslotError::HvaOverlap {
            existing: Gfn(0x10)
        })
    );
    kvm.add_memslot(0x100, 4, b).unwrap();
    assert_eq!(
        kvm.memslots()
            .iter()
            .map(|s| s.gfn_base())
            .collect::<Vec<_>>(),
        [Gfn(0x10), Gfn(0x100)]
    );
    assert_eq!(kvm.gfn_to_hva(0x11), Some(Hva(a + P)));
    assert_eq!(kvm.gfn_to_hva(0x18), None);
    assert_eq!(kvm.hva_to_gfn(b + P + 5), Some(Gfn(0x101)));
    assert_eq!(kvm.hva_to_gfn(b + 4 * P), None);

    // Outside every slot: by guest frame (guest-physical address) and by host address.
    assert_eq!(
        kvm.fault_gfn(0x18, false),
        Err(SecondaryError::OutOfRange(0x18 * P))
    );
    assert_eq!(
        kvm.guest_read(u64::MAX),
        Err(SecondaryError::OutOfRange(u64::MAX))
    );
    assert_eq!(
        SecondaryMmu::fault(&*kvm, b + 4 * P, false),
        Err(SecondaryError::OutOfRange(b + 4 * P))
    );

    // Removing a slot drops its entries; a prefetch in flight fails at its install.
    kvm.guest_write(0x101, 11).unwrap();
    kvm.guest_write(0x102, 12).unwrap();
    let p = kvm
        .prefetch(0x103, false)
        .unwrap()
        .expect("nothing in progress");
    let flushes = kvm.tlb_flushes();
    assert_eq!(kvm.remove_memslot(0x100).unwrap().gfn_base(), Gfn(0x100));
    assert_eq!(kvm.tlb_flushes(), flushes + 1);
    assert_eq!(kvm.spte(0x101), None);
    assert_eq!(kvm.install(p), Err(SecondaryError::OutOfRange(0x103 * P)));
    assert_eq!(
        kvm.remove_memslot(0x100),
        Err(MemslotError::NoSuchSlot(Gfn(0x100)))
    );
    assert_eq!(mm.read(b + P).unwrap(), 11, "the data stays in the process");

    // A slot whose memory is unmapped later: the guest fault fails as the primary's does.
    kvm.guest_write(0x10, 1).unwrap();
    mm.munmap(a, P).unwrap();
    assert_eq!(
        kvm.guest_read(0x10),
        Err(SecondaryError::Primary(SimError::Fault(a)))
    );

    kvm.shutdown();
    assert!(!kvm.is_registered());
    assert_eq!(kvm.add_memslot(0x200, 1, b), Err(MemslotError::Gone));
    assert_eq!(kvm.guest_read(0x11), Err(SecondaryError::Gone));
    assert_eq!(checker.violations(), []);
}

// ----- every primary operation ------------------------------------------------------------

#[test]
fn both_secondaries_stay_coherent_through_every_primary_operation() {
    let (mm, checker) = space(2);
    let a = mm.mmap_anon(16 * P, Prot::READ_WRITE).unwrap();
    let hva = |i: u64| a + i * P;
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 16, a).unwrap();
    let sva = SvaTlb::new(&mm).unwrap();

    // The guest owns pages 0..8, the device 8..16; each sees the other's writes.
    for i in 0..8 {
        assert_eq!(kvm.guest_write(i, 100 + i).unwrap(), 100 + i);
        assert_eq!(sva.write(hva(8 + i), 208 + i).unwrap(), 208 + i);
    }
    for i in 0..8 {
        assert_eq!(mm.read(hva(i)).unwrap(), 100 + i);
        assert_eq!(mm.read(hva(8 + i)).unwrap(), 208 + i);
    }
    assert_eq!(kvm.guest_read(9).unwrap(), 209);
    assert_eq!(sva.read(hva(1)).unwrap(), 101);
    assert_eq!(kvm.spte_count(), 9);

    // munmap: both copies go; faults fail; a new mapping in the hole is fresh memory.
    mm.munmap(hva(2), P).unwrap();
    assert_eq!(kvm.spte(2), None);
    assert_eq!(sva.lookup(hva(2)), None);
    let unmapped = Err(SecondaryError::Primary(SimError::Fault(hva(2))));
    assert_eq!(kvm.guest_read(2), unmapped);
    assert_eq!(sva.read(hva(2)), unmapped);
    mm.mmap(P, Prot::READ_WRITE, MapKind::AnonPrivate, Some(hva(2)))
        .unwrap();
    assert_eq!(kvm.guest_read(2).unwrap(), 0);
    assert_eq!(sva.read(hva(2)).unwrap(), 0);

    // mprotect read-only: writes are refused by the primary, reads still work.
    mm.mprotect(a, 16 * P, Prot::READ).unwrap();
    assert_eq!(kvm.spte_count(), 0, "the whole range was zapped");
    assert!(sva.entries().iter().all(|e| !e.writable));
    assert_eq!(
        kvm.guest_write(0, 1),
        Err(SecondaryError::Primary(SimError::Permission(hva(0))))
    );
    assert_eq!(
        sva.write(hva(9), 1),
        Err(SecondaryError::Primary(SimError::Permission(hva(9))))
    );
    assert_eq!(kvm.guest_read(0).unwrap(), 100);
    assert_eq!(sva.read(hva(9)).unwrap(), 209);
    mm.mprotect(a, 16 * P, Prot::READ_WRITE).unwrap();
    kvm.guest_write(0, 150).unwrap();
    sva.write(hva(9), 259).unwrap();

    // fork: the parent's pages become copy-on-write; a write after it breaks COW, and
    // the child keeps the old data.
    let child = mm.fork();
    assert_eq!(kvm.spte(0), None);
    assert_eq!(sva.lookup(hva(9)).map(|e| e.writable), None);
    kvm.guest_write(0, 555).unwrap();
    sva.write(hva(9), 777).unwrap();
    assert_eq!(
        (mm.read(hva(0)).unwrap(), child.read(hva(0)).unwrap()),
        (555, 150)
    );
    assert_eq!(
        (mm.read(hva(9)).unwrap(), child.read(hva(9)).unwrap()),
        (777, 259)
    );
    child.write(hva(1), 1).unwrap();
    assert_eq!(
        kvm.guest_read(1).unwrap(),
        101,
        "the child's write stays in the child"
    );
    child.exit();

    // Migration: the copies of the old frame go; the data follows to the new frame.
    let old = kvm.spte(3).map(|e| e.frame);
    let new = mm.migrate(hva(3)).unwrap();
    assert_eq!(kvm.spte(3), None);
    assert_eq!(kvm.guest_read(3).unwrap(), 103);
    assert_eq!(kvm.spte(3).map(|e| e.frame), Some(new));
    assert_ne!(old, Some(new));
    sva.read(hva(10)).unwrap();
    let new = mm.migrate(hva(10)).unwrap();
    assert_eq!(sva.lookup(hva(10)), None);
    assert_eq!(sva.read(hva(10)).unwrap(), 210);
    assert_eq!(sva.lookup(hva(10)).map(|e| e.frame), Some(new));

    // Reclaim: two passes swap everything out (the first only ages); data comes back.
    mm.reclaim(a, a + 16 * P).unwrap();
    let r = mm.reclaim(a, a + 16 * P).unwrap();
    assert!(r.reclaimed >= 14, "{r:?}");
    assert_eq!(kvm.spte_count(), 0);
    assert!(sva.is_empty());
    assert_eq!(kvm.guest_read(0).unwrap(), 555);
    assert_eq!(sva.read(hva(9)).unwrap(), 777);

    // madvise(DONTNEED): private memory reads back as zeroes.
    mm.madvise(a, 4 * P, Advice::DontNeed).unwrap();
    assert_eq!(kvm.guest_read(0).unwrap(), 0);
    assert_eq!(sva.read(hva(1)).unwrap(), 0);

    // madvise(FREE), then a secondary's write, then reclaim: the write is not dropped
    // with the lazily freed page (the write re-dirties the page through the primary).
    mm.madvise(hva(12), 2 * P, Advice::Free).unwrap();
    sva.write(hva(12), 4242).unwrap();
    kvm.guest_write(13, 4343).unwrap();
    mm.reclaim(hva(12), hva(14)).unwrap();
    mm.reclaim(hva(12), hva(14)).unwrap();
    assert_eq!(mm.read(hva(12)).unwrap(), 4242);
    assert_eq!(mm.read(hva(13)).unwrap(), 4343);

    // Soft-dirty reset: everything is write-protected; the next writes fault again.
    kvm.guest_write(5, 5).unwrap();
    sva.write(hva(11), 11).unwrap();
    let kvm_fills = kvm.stats().fills;
    mm.clear_soft_dirty();
    assert_eq!(kvm.spte_count(), 0);
    assert!(sva.is_empty());
    kvm.guest_write(5, 6).unwrap();
    sva.write(hva(11), 12).unwrap();
    assert_eq!(kvm.stats().fills, kvm_fills + 1);
    assert_eq!(
        (mm.read(hva(5)).unwrap(), mm.read(hva(11)).unwrap()),
        (6, 12)
    );

    // Device-exclusive access taken by someone else, then restored by our faults.
    kvm.guest_read(6).unwrap();
    sva.read(hva(7)).unwrap();
    mm.make_exclusive(hva(6), OwnerToken(9)).unwrap();
    mm.make_exclusive(hva(7), OwnerToken(9)).unwrap();
    assert_eq!(kvm.spte(6), None);
    assert_eq!(sva.lookup(hva(7)), None);
    assert_eq!(kvm.guest_read(6).unwrap(), 106);
    assert_eq!(sva.read(hva(7)).unwrap(), 107);

    let (k, s) = (kvm.stats(), sva.stats());
    assert!(
        k.fills >= 20 && k.invalidations >= 10 && k.accesses >= 20,
        "{k:?}"
    );
    assert!(
        s.fills >= 20 && s.invalidations >= 10 && s.accesses >= 20,
        "{s:?}"
    );
    assert!(kvm.tlb_flushes() > 0 && kvm.mmu_invalidate_seq() >= k.invalidations);
    assert_eq!(kvm.invalidations_in_progress(), 0);
    assert!(sva.page_requests() > 0 && sva.flush_generation() > 0);
    assert_eq!(checker.violations(), []);
    assert!(
        checker.checks() > 100,
        "the checker ran: {}",
        checker.checks()
    );
}

// ----- the collision-retry paths, made deterministic ---------------------------------------

#[test]
fn a_write_fault_that_breaks_cow_of_the_zero_page_retries_exactly_once() {
    let (mm, checker) = space(3);
    let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 1, a).unwrap();

    assert_eq!(kvm.guest_read(0).unwrap(), 0);
    let zero = kvm.spte(0).unwrap();
    assert_eq!(zero.frame.pfn, FrameAllocator::ZERO_PAGE);
    assert!(!zero.writable);
    let seq = kvm.mmu_invalidate_seq();

    // The write fault reads seq, then the primary's fault breaks COW of the zero page:
    // an invalidation of the page, so seq moves under the fault's feet. Step 4 sees it,
    // throws the frame away and retries; the second attempt installs.
    assert_eq!(kvm.guest_write(0, 5).unwrap(), 5);
    let st = kvm.stats();
    assert_eq!((st.fills, st.retries, st.invalidations), (2, 1, 1));
    assert_eq!(kvm.mmu_invalidate_seq(), seq + 1);
    let spte = kvm.spte(0).unwrap();
    assert!(spte.writable && spte.frame.pfn != FrameAllocator::ZERO_PAGE);
    assert_eq!(mm.read(a).unwrap(), 5);

    // The TLB restarts its walk after the page request, so the same COW break costs it
    // a page request, not a retry.
    let b = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    let sva = SvaTlb::new(&mm).unwrap();
    sva.read(b).unwrap();
    let generation = sva.flush_generation();
    sva.write(b, 6).unwrap();
    assert_eq!(
        sva.flush_generation(),
        generation + 1,
        "the COW break flushed"
    );
    assert_eq!((sva.stats().fills, sva.stats().retries), (2, 0));
    assert_eq!(sva.page_requests(), 2);
    assert_eq!(checker.violations(), []);
}

#[test]
fn an_install_after_a_colliding_invalidation_is_refused() {
    let (mm, checker) = space(4);
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    mm.write(a, 1).unwrap();
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 2, a).unwrap();
    let sva = SvaTlb::new(&mm).unwrap();

    // KVM: the page moves between the prefetch and the install.
    let p = kvm.prefetch(0, true).unwrap().unwrap();
    assert_eq!((p.gfn(), p.hva()), (Gfn(0), Hva(a)));
    let moved = mm.migrate(a).unwrap();
    assert_ne!(p.frame(), moved);
    assert_eq!(
        kvm.install(p),
        Ok(false),
        "seq moved: the stale frame is refused"
    );
    assert_eq!(kvm.spte(0), None);
    let p = kvm.prefetch(0, true).unwrap().unwrap();
    assert_eq!(p.frame(), moved);
    assert_eq!(kvm.install(p), Ok(true));
    assert_eq!(kvm.guest_read(0).unwrap(), 1);
    assert_eq!((kvm.stats().fills, kvm.stats().retries), (1, 1));

    // KVM: the page is unmapped in between; the next fault fails in the primary.
    let p = kvm.prefetch(1, false).unwrap().unwrap();
    mm.munmap(a + P, P).unwrap();
    assert_eq!(kvm.install(p), Ok(false));
    assert_eq!(
        kvm.fault_gfn(1, false),
        Err(SecondaryError::Primary(SimError::Fault(a + P)))
    );

    // SVA: the page moves between the walk and the insert.
    let w = sva.walk(a, false).unwrap();
    assert_eq!(w.entry().frame, moved);
    let moved_again = mm.migrate(a).unwrap();
    assert_eq!(sva.insert(w), Ok(false), "a flush ran since the walk began");
    assert!(sva.is_empty());
    assert_eq!(sva.stats().retries, 1);
    let w = sva.walk(a, false).unwrap();
    assert_eq!(w.entry().frame, moved_again);
    assert_eq!(sva.insert(w), Ok(true));
    assert_eq!(sva.read(a).unwrap(), 1);
    assert_eq!(sva.stats().fills, 1);
    assert_eq!(checker.violations(), []);
}

/// A list subscriber, registered after the secondaries, whose start blocks when armed:
/// it holds an invalidation open after the secondaries' starts have run.
#[derive(Default)]
struct Blocker {
    state: Mutex<(bool, bool, bool)>, // (armed, entered, go)
    cv: Condvar,
}

impl Blocker {
    fn arm(&self) {
        *self.state.lock().unwrap() = (true, false, false);
    }
    fn wait_entered(&self) {
        let s = self.state.lock().unwrap();
        let (s, t) = self
            .cv
            .wait_timeout_while(s, Duration::from_secs(10), |s| !s.1)
            .unwrap();
        assert!(!t.timed_out() && s.1, "the invalidation never started");
    }
    fn go(&self) {
        self.state.lock().unwrap().2 = true;
        self.cv.notify_all();
    }
}

impl ListSubscriber for Blocker {
    fn invalidate_range_start(&self, _: &Range) -> Result<(), WouldBlock> {
        let mut s = self.state.lock().unwrap();
        if !s.0 {
            return Ok(());
        }
        s.0 = false;
        s.1 = true;
        self.cv.notify_all();
        let _ = self
            .cv
            .wait_timeout_while(s, Duration::from_secs(10), |s| !s.2)
            .unwrap();
        Ok(())
    }
}

#[test]
fn a_guest_fault_retries_while_an_invalidation_covers_its_page() {
    let (mm, checker) = space(5);
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    mm.write(a, 3).unwrap();
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 2, a).unwrap();
    let blocker = Arc::new(Blocker::default());
    let _reg = mm.notifier().register(blocker.clone()).unwrap();

    for give_up in [false, true] {
        if give_up {
            kvm.set_fault_timeout(Duration::from_millis(30));
        }
        let retries = kvm.stats().retries;
        blocker.arm();
        thread::scope(|s| {
            let primary = s.spawn(|| mm.madvise(a, P, Advice::DontNeed));
            blocker.wait_entered();
            // KVM's start has run: the page is covered until the end.
            assert_eq!(kvm.invalidations_in_progress(), 1);
            let guest = s.spawn(|| kvm.guest_write(0, 9));
            let mut guest = Some(guest);
            if give_up {
                let g = guest.take().unwrap();
                assert_eq!(g.join().unwrap(), Err(SecondaryError::Timeout));
            } else {
                wait_until("the guest retried", || kvm.stats().retries >= retries + 3);
                assert_eq!(
                    kvm.spte(0),
                    None,
                    "nothing installed inside the invalidation"
                );
                // The other page is not covered: its faults go through at once.
                assert_eq!(kvm.guest_write(1, 4).unwrap(), 4);
            }
            blocker.go();
            primary.join().unwrap().unwrap();
            if let Some(g) = guest {
                assert_eq!(g.join().unwrap(), Ok(9));
            }
        });
        // The guest's write landed after the invalidation (round 1); in round 2 it gave
        // up, and the page is the fresh one the madvise left.
        assert_eq!(kvm.guest_read(0).unwrap(), if give_up { 0 } else { 9 });
        assert!(kvm.stats().retries > retries);
        assert_eq!(kvm.invalidations_in_progress(), 0);
    }
    assert_eq!(mm.read(a + P).unwrap(), 4);
    assert_eq!(checker.violations(), []);
}

// ----- aging ----------------------------------------------------------------------------

#[test]
fn reclaim_keeps_a_page_the_guest_used_and_takes_it_on_the_next_pass() {
    let (mm, checker) = space(6);
    let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 1, a).unwrap();

    kvm.guest_write(0, 42).unwrap();
    assert!(kvm.spte(0).unwrap().accessed);
    // Pass 1: the CPU's bit (set by the fault) and the guest's are both set; both clear.
    let r = mm.reclaim(a, a + P).unwrap();
    assert_eq!((r.referenced, r.reclaimed), (1, 0));
    assert!(!kvm.spte(0).unwrap().accessed);
    assert!(!mm.test_young(a));

    // The guest uses the page through its shadow entry: the primary sees nothing...
    assert_eq!(kvm.guest_read(0).unwrap(), 42);
    assert_eq!(kvm.stats().fills, 1, "no fault: through the existing entry");
    assert!(!mm.pte(a).accessed());
    // ...but asks: test_young answers for the guest.
    assert!(mm.test_young(a));
    // Pass 2 keeps it because clear_flush_young answered true (and flushed).
    let flushes = kvm.tlb_flushes();
    let r = mm.reclaim(a, a + P).unwrap();
    assert_eq!((r.referenced, r.reclaimed), (1, 0));
    assert_eq!(kvm.tlb_flushes(), flushes + 1);
    // Pass 3: nobody used it since: it goes, and the shadow entry with it.
    let r = mm.reclaim(a, a + P).unwrap();
    assert_eq!((r.referenced, r.reclaimed), (0, 1));
    assert_eq!(kvm.spte(0), None);
    assert_eq!(kvm.guest_read(0).unwrap(), 42, "swapped back in");
    assert_eq!(kvm.stats().fills, 2);

    // Idle-page aging clears the guest's bit without a flush.
    let flushes = kvm.tlb_flushes();
    assert_eq!(mm.age(a, a + P).unwrap(), 1);
    assert!(!kvm.spte(0).unwrap().accessed);
    assert_eq!(mm.age(a, a + P).unwrap(), 0);
    assert_eq!(kvm.tlb_flushes(), flushes);
    assert_eq!(checker.violations(), []);
}

// ----- capacity and teardown ------------------------------------------------------------

#[test]
fn the_tlb_is_bounded_and_evicts_its_oldest_entry() {
    let (mm, checker) = space(7);
    let a = mm.mmap_anon(80 * P, Prot::READ_WRITE).unwrap();
    let small = SvaTlb::with_capacity(&mm, std::num::NonZeroUsize::new(4).unwrap()).unwrap();
    for i in 0..6 {
        small.fill(a + i * P, false).unwrap();
    }
    let addrs = |t: &SvaTlb| t.entries().iter().map(|e| e.addr).collect::<Vec<_>>();
    assert_eq!(addrs(&small), (2..6).map(|i| a + i * P).collect::<Vec<_>>());
    assert_eq!(
        (small.len(), small.capacity(), small.evictions()),
        (4, 4, 2)
    );
    // Refilling a cached page replaces its entry (now the newest): no eviction.
    small.fill(a + 3 * P, true).unwrap();
    assert_eq!(small.evictions(), 2);
    assert_eq!(addrs(&small).last(), Some(&(a + 3 * P)));
    assert!(small.lookup(a + 3 * P + 8).unwrap().writable);

    let big = SvaTlb::new(&mm).unwrap();
    for i in 0..80 {
        big.write(a + i * P, i).unwrap();
    }
    assert_eq!(big.len(), DEFAULT_CAPACITY);
    assert_eq!(big.evictions(), 80 - DEFAULT_CAPACITY as u64);
    for i in 0..80 {
        assert_eq!(big.read(a + i * P).unwrap(), i);
    }
    assert_eq!(
        big.read(TASK_SIZE),
        Err(SecondaryError::OutOfRange(TASK_SIZE))
    );
    assert_eq!(checker.violations(), []);
}

/// A list subscriber that runs a closure from inside the TLB flush of an invalidation.
struct InsideCallback(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl SecondaryTlb for InsideCallback {
    fn arch_invalidate_secondary_tlbs(&self, _: u64, _: u64) {
        let f = self.0.lock().unwrap().take();
        if let Some(f) = f {
            f();
        }
    }
}

#[test]
fn teardown_leaks_nothing_and_never_deadlocks() {
    // Dropping the handles unregisters and frees them; the address space is freed too.
    let (mm, checker) = space(8);
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 2, a).unwrap();
    let sva = SvaTlb::new(&mm).unwrap();
    kvm.guest_write(0, 1).unwrap();
    sva.write(a + P, 2).unwrap();
    assert_eq!(mm.notifier().stats().list_subscribers, 2);
    let (wk, ws): (Weak<Kvm>, Weak<SvaTlb>) = (Arc::downgrade(&kvm), Arc::downgrade(&sva));
    drop((kvm, sva));
    assert!(wk.upgrade().is_none() && ws.upgrade().is_none());
    assert_eq!(mm.notifier().stats().list_subscribers, 0);
    let wm = Arc::downgrade(&mm);
    drop(mm);
    assert!(
        wm.upgrade().is_none(),
        "no reference cycle keeps the address space"
    );
    assert_eq!(checker.violations(), []);

    // The address space goes first: release drops every copy (the TLB's too: exit's own
    // flush never reaches it), and the secondaries answer Gone.
    let (mm, checker) = space(9);
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 2, a).unwrap();
    let sva = SvaTlb::new(&mm).unwrap();
    kvm.guest_write(0, 1).unwrap();
    sva.write(a + P, 2).unwrap();
    let wm = Arc::downgrade(&mm);
    drop(mm); // exit: release, then an Unmap over everything
    assert!(wm.upgrade().is_none());
    assert_eq!((kvm.spte_count(), sva.len()), (0, 0));
    assert_eq!(kvm.guest_read(0), Err(SecondaryError::Gone));
    assert_eq!(sva.read(a), Err(SecondaryError::Gone));
    assert_eq!(kvm.add_memslot(4, 1, a), Err(MemslotError::Gone));
    drop((kvm, sva));
    assert_eq!(checker.violations(), [], "nothing stale at exit's flush");

    // Nothing can subscribe to a released address space.
    let (mm, _) = space(10);
    mm.exit();
    assert!(matches!(Kvm::new(&mm), Err(RegisterError::Released)));
    assert!(matches!(SvaTlb::new(&mm), Err(RegisterError::Released)));

    // Shut down, or dropped for the last time, from inside a callback of the same
    // address space: the unregistration is handed off instead of waiting for itself.
    let (mm, checker) = space(11);
    let a = mm.mmap_anon(2 * P, Prot::READ_WRITE).unwrap();
    let kvm = Kvm::new(&mm).unwrap();
    kvm.add_memslot(0, 2, a).unwrap();
    let sva = SvaTlb::new(&mm).unwrap();
    let hook = Arc::new(InsideCallback(Mutex::new(None)));
    let _hook_reg = mm.notifier().register_tlb(hook.clone()).unwrap();
    kvm.guest_write(0, 1).unwrap();
    sva.write(a + P, 2).unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let (k, r) = (kvm.clone(), ran.clone());
    *hook.0.lock().unwrap() = Some(Box::new(move || {
        k.shutdown(); // and `k`, a second handle, drops here too
        drop(sva); // the last handle of the TLB
        r.store(true, SeqCst);
    }));
    mm.madvise(a, 2 * P, Advice::DontNeed).unwrap();
    assert!(ran.load(SeqCst));
    wait_until("the handed-off unregistrations ran", || {
        mm.notifier().stats().list_subscribers == 1
    });
    assert_eq!(kvm.guest_read(0), Err(SecondaryError::Gone));
    assert!(!kvm.is_registered());
    assert_eq!(mm.read(a + P).unwrap(), 0);
    assert_eq!(checker.violations(), []);
}

// ----- concurrency ----------------------------------------------------------------------

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const PAGES: u64 = 32;

fn primary_op(mm: &AddressSpace, base: u64, rng: &mut Rng) {
    let p = base + rng.below(PAGES) * P;
    let len = (1 + rng.below(4)).min((base + PAGES * P - p) / P) * P;
    let _ = match rng.below(12) {
        0 => mm
            .munmap(p, len)
            .and_then(|_| mm.mmap(len, Prot::READ_WRITE, MapKind::AnonPrivate, Some(p)))
            .map(drop),
        1 => mm.madvise(p, len, Advice::DontNeed),
        2 => mm
            .mprotect(p, len, Prot::READ)
            .and_then(|_| mm.mprotect(p, len, Prot::READ_WRITE)),
        3 => mm.reclaim(p, p + len).map(drop),
        4 => mm.migrate(p).map(drop),
        5 => {
            let child = mm.fork();
            let _ = child.write(p, 7);
            let _ = mm.write(p, rng.next());
            child.exit();
            Ok(())
        }
        6 => {
            mm.clear_soft_dirty();
            Ok(())
        }
        7 => mm.make_exclusive(p, OwnerToken(1)).map(drop),
        8 => mm.madvise(p, len, Advice::Free),
        9 => mm.age(p, p + len).map(drop),
        10 => mm.read(p).map(drop),
        _ => mm.write(p, rng.next()),
    };
}

#[test]
fn one_primary_thread_and_two_guest_threads_report_nothing() {
    let mut total_retries = (0, 0);
    for seed in [1u64, 2] {
        let (mm, checker) = space(100 + seed);
        let base = mm.mmap_anon(PAGES * P, Prot::READ_WRITE).unwrap();
        let kvm = Kvm::new(&mm).unwrap();
        kvm.add_memslot(0x1000, PAGES, base).unwrap();
        let sva = SvaTlb::with_capacity(&mm, std::num::NonZeroUsize::new(16).unwrap()).unwrap();
        let done = AtomicBool::new(false);
        let guest_ops = AtomicU64::new(0);
        thread::scope(|s| {
            s.spawn(|| {
                // At least 1000 primary operations, interleaved with at least 3000 guest
                // operations (however the threads get scheduled), within a time cap.
                let mut rng = Rng((seed * 0x9e37_79b9) | 1);
                let cap = Instant::now() + Duration::from_millis(1200);
                let mut ops = 0;
                while (ops < 1000 || guest_ops.load(SeqCst) < 3000) && Instant::now() < cap {
                    primary_op(&mm, base, &mut rng);
                    ops += 1;
                    if ops % 4 == 0 {
                        thread::yield_now();
                    }
                }
                done.store(true, SeqCst);
            });
            for g in 0..2u64 {
                let (kvm, sva, done, guest_ops) = (&kvm, &sva, &done, &guest_ops);
                s.spawn(move || {
                    let mut rng = Rng((((seed << 8) | g) * 0x2545_f491) | 1);
                    while !done.load(SeqCst) {
                        let i = rng.below(PAGES);
                        let v = rng.next();
                        // Errors are expected (a page unmapped or read-only for a moment).
                        let _ = match rng.below(6) {
                            0 => kvm.fault_gfn(0x1000 + i, rng.below(2) == 0).map(drop),
                            1 => kvm.guest_read(0x1000 + i).map(drop),
                            2 => kvm.guest_write(0x1000 + i, v).map(drop),
                            3 => sva.fill(base + i * P, rng.below(2) == 0).map(drop),
                            4 => sva.read(base + i * P).map(drop),
                            _ => sva.write(base + i * P, v).map(drop),
                        };
                        guest_ops.fetch_add(1, SeqCst);
                    }
                });
            }
        });
        let (k, t) = (kvm.stats(), sva.stats());
        println!(
            "seed {seed}: {} guest ops; kvm {k:?}; sva {t:?}; {} checks",
            guest_ops.load(SeqCst),
            checker.checks()
        );
        assert_eq!(checker.violations(), [], "seed {seed}");
        assert!(
            k.fills > 0 && k.invalidations > 0 && k.accesses > 0,
            "{k:?}"
        );
        assert!(
            t.fills > 0 && t.invalidations > 0 && t.accesses > 0,
            "{t:?}"
        );
        assert_eq!(kvm.invalidations_in_progress(), 0);
        total_retries.0 += k.retries;
        total_retries.1 += t.retries;
    }
    println!("retries: kvm {}, sva {}", total_retries.0, total_retries.1);
}
