//! Linux's notifier calls, operation by operation (the table below, one test per row):
//! each primary operation calls the notifier with the row's event, exactly the row's range,
//! the right blockable flag and owner token, and in Linux's order against the page-table
//! changes and frees:
//!
//! - `invalidate_range_start` is called before any entry in the range changes and before
//!   any frame in it is freed (checked inside the callback, by the `Shadow` subscriber);
//! - `arch_invalidate_secondary_tlbs` comes after the entries were cleared or downgraded
//!   and before their frames are freed (checked inside the callback, by the `Tlb`
//!   subscriber: a subscriber implements either the TLB op or start/end, never both, so
//!   two subscribers, registered in that order, log into one shared log);
//! - `invalidate_range_end` comes after both.

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

mod common;

use common::*;
use mmu_notifier::{Event, IntervalSubscription, OwnerToken};
use mmu_sim::{
    Advice, File, FrameAllocator, MapKind, MremapFlags, OomReap, Pfn, Prot, Pte, PteKind,
    ReclaimStats, SimError, TASK_SIZE,
};

/// What one last-level page table covers.
const TABLE: u64 = 512 * P;
/// A 1 GiB-aligned address with nothing else mapped near it, for fixed mappings.
const B: u64 = 0x4000_0000;

// ----- munmap ---------------------------------------------------------------------------

#[test]
fn munmap_is_one_blockable_unmap_over_the_call_across_vmas_and_holes() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    let b = rig.map_at(B + 4 * P, 4 * P, Prot::READ);
    let c = rig.map_at(B + 12 * P, 4 * P, Prot::READ_WRITE); // a hole of 4 pages before c
    rig.fill(a, 4);
    pages(b, 4).for_each(|p| assert_eq!(rig.mm.read(p).unwrap(), 0));
    rig.fill(c, 4);
    let doomed: Vec<(u64, Pfn)> = [a + 2 * P, a + 3 * P, c, c + P]
        .iter()
        .map(|&p| (p, rig.pfn(p)))
        .collect();
    rig.watch(pages(a, 4).chain(pages(b, 4)).chain(pages(c, 4)));
    rig.take();

    rig.mm.munmap(a + 2 * P, 12 * P).unwrap();

    let r = inv(Event::Unmap, a + 2 * P, a + 14 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(r),
            Call::Flush(a + 2 * P, a + 14 * P),
            Call::End(r)
        ]
    );
    log.starts[0].assert_untouched(8);
    log.flushes[0].assert_all(8, "cleared", Pte::is_none);
    for (p, pfn) in doomed {
        assert_eq!(
            rig.mm.frames().refs(pfn),
            0,
            "frame of {p:#x} freed by the end"
        );
    }
    assert_eq!(
        rig.mm.read(a + P).unwrap(),
        a + P,
        "outside the range: intact"
    );
    assert_eq!(rig.mm.read(c + 2 * P).unwrap(), c + 2 * P);
    assert_eq!(rig.mm.read(b), Err(SimError::Fault(b)));
}

#[test]
fn munmap_of_untouched_memory_brackets_the_range_but_flushes_nothing() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.mm.munmap(a, 4 * P).unwrap();
    let r = inv(Event::Unmap, a, a + 4 * P);
    assert_eq!(rig.take().calls, [Call::Start(r), Call::End(r)]);
}

// ----- madvise ----------------------------------------------------------------------------

/// Two adjacent private mappings with a frame on every page: `a` read-write, `b`
/// read-only (written first, then protected, so Linux would not merge them either).
fn two_populated_vmas(rig: &Rig) -> (u64, u64) {
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    let b = rig.map_at(B + 4 * P, 4 * P, Prot::READ_WRITE);
    rig.fill(a, 4);
    rig.fill(b, 4);
    rig.mm.mprotect(b, 4 * P, Prot::READ).unwrap();
    assert_eq!(rig.mm.vmas().len(), 2);
    rig.take();
    (a, b)
}

#[test]
fn madvise_dontneed_is_one_clear_per_vma_over_the_advised_part() {
    let rig = Rig::new();
    let (a, b) = two_populated_vmas(&rig);
    let gone: Vec<Pfn> = pages(a + P, 6).map(|p| rig.pfn(p)).collect();
    rig.watch(pages(a, 8));

    rig.mm.madvise(a + P, 6 * P, Advice::DontNeed).unwrap();

    let (r1, r2) = (
        inv(Event::Clear, a + P, a + 4 * P),
        inv(Event::Clear, b, b + 3 * P),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(r1),
            Call::Flush(a + P, a + 4 * P),
            Call::End(r1),
            Call::Start(r2),
            Call::Flush(b, b + 3 * P),
            Call::End(r2),
        ]
    );
    log.starts[0].assert_untouched(3);
    log.starts[1].assert_untouched(3);
    log.flushes[0].assert_all(3, "cleared", Pte::is_none);
    log.flushes[1].assert_all(3, "cleared", Pte::is_none);
    assert!(gone.iter().all(|&p| rig.mm.frames().refs(p) == 0));
    assert_eq!(
        rig.mm.read(a + P).unwrap(),
        0,
        "private memory reads back zero"
    );
    assert_eq!(rig.mm.read(a).unwrap(), a, "outside the advice: intact");
    assert_eq!(rig.mm.read(b + 3 * P).unwrap(), b + 3 * P);
}

#[test]
fn madvise_free_is_one_clear_per_vma_leaving_clean_entries_that_reclaim_drops() {
    let rig = Rig::new();
    let (a, b) = two_populated_vmas(&rig);
    rig.watch(pages(a, 8));

    rig.mm.madvise(a + 2 * P, 4 * P, Advice::Free).unwrap();

    let (r1, r2) = (
        inv(Event::Clear, a + 2 * P, a + 4 * P),
        inv(Event::Clear, b, b + 2 * P),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(r1),
            Call::Flush(a + 2 * P, a + 4 * P),
            Call::End(r1),
            Call::Start(r2),
            Call::Flush(b, b + 2 * P),
            Call::End(r2),
        ]
    );
    log.starts[0].assert_untouched(2);
    log.starts[1].assert_untouched(2);
    for f in &log.flushes {
        f.assert_all(2, "clean, old and lazy-free", |p| {
            p.present() && !p.dirty() && !p.accessed() && p.lazyfree()
        });
    }
    // Not written again: the first reclaim pass drops it (no swap), in a Clear of the page.
    let swap = rig.mm.frames().swap_used();
    rig.watch([a + 2 * P]);
    let stats = rig.mm.reclaim(a + 2 * P, a + 3 * P).unwrap();
    assert_eq!(
        stats,
        ReclaimStats {
            referenced: 0,
            reclaimed: 1
        }
    );
    let r = inv(Event::Clear, a + 2 * P, a + 3 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::ClearFlushYoung(a + 2 * P, a + 3 * P),
            Call::Start(r),
            Call::Flush(a + 2 * P, a + 3 * P),
            Call::End(r)
        ]
    );
    log.starts[0].assert_untouched(1);
    assert!(rig.mm.pte(a + 2 * P).is_none());
    assert_eq!(rig.mm.frames().swap_used(), swap);
}

// ----- mprotect -----------------------------------------------------------------------------

#[test]
fn mprotect_is_protection_vma_from_the_first_populated_1gib_entry_to_the_end_of_the_call() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * TABLE, Prot::READ_WRITE);
    // Nothing in the first table; pages in the second and the third. Since Linux 6.12 the
    // range starts at the first populated 1 GiB entry (clipped to the call), not at the
    // first populated 2 MiB entry as in 6.10: here, at the call's start.
    let (p1, p2) = (a + TABLE + 5 * P, a + 2 * TABLE + 3 * P);
    rig.mm.write(p1, 1).unwrap();
    rig.mm.write(p2, 2).unwrap();
    let pfns = (rig.pfn(p1), rig.pfn(p2));
    rig.watch([p1, p2]);

    rig.mm.mprotect(a + P, 3 * TABLE, Prot::READ).unwrap();

    let r = inv(Event::ProtectionVma, a + P, a + P + 3 * TABLE);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(r),
            Call::Flush(a + P, a + P + 3 * TABLE),
            Call::End(r)
        ]
    );
    log.starts[0].assert_untouched(2);
    log.flushes[0].assert_all(2, "read-only", read_only);
    assert_eq!((rig.pfn(p1), rig.pfn(p2)), pfns, "same frames, downgraded");
    assert_eq!(rig.mm.write(p1, 3), Err(SimError::Permission(p1)));
}

#[test]
fn mprotect_range_is_clipped_to_the_call_start_inside_a_populated_table() {
    let rig = Rig::new();
    let a = rig.map_at(B, 16 * P, Prot::READ_WRITE);
    rig.fill(a, 16);
    rig.watch(pages(a, 16));

    rig.mm.mprotect(a + 5 * P, 3 * P, Prot::READ).unwrap();

    let r = inv(Event::ProtectionVma, a + 5 * P, a + 8 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(r),
            Call::Flush(a + 5 * P, a + 8 * P),
            Call::End(r)
        ]
    );
    log.starts[0].assert_untouched(3);
    log.flushes[0].assert_all(3, "read-only", read_only);
    assert!(
        rig.mm.pte(a + 4 * P).writable(),
        "outside the call: still writable"
    );
    assert!(rig.mm.pte(a + 8 * P).writable());
}

#[test]
fn mprotect_is_one_protection_vma_per_vma_whose_protection_changes() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    let b = rig.map_at(B + 4 * P, 4 * P, Prot::READ);
    let c = rig.map_at(B + 8 * P, 4 * P, Prot::READ_WRITE);
    rig.fill(a, 4);
    for p in pages(b, 4) {
        assert_eq!(rig.mm.read(p).unwrap(), 0);
    }
    rig.fill(c, 4);
    rig.watch(pages(a, 12));

    // b already has the new protection: no invalidation for it.
    rig.mm.mprotect(a + 2 * P, 8 * P, Prot::READ).unwrap();

    let (r1, r2) = (
        inv(Event::ProtectionVma, a + 2 * P, a + 4 * P),
        inv(Event::ProtectionVma, c, c + 2 * P),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(r1),
            Call::Flush(a + 2 * P, a + 4 * P),
            Call::End(r1),
            Call::Start(r2),
            Call::Flush(c, c + 2 * P),
            Call::End(r2),
        ]
    );
    log.starts[0].assert_untouched(2);
    log.starts[1].assert_untouched(2);
    log.flushes[0].assert_all(2, "read-only", read_only);
    log.flushes[1].assert_all(2, "read-only", read_only);
}

#[test]
fn mprotect_without_page_tables_or_without_a_change_fires_nothing() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * TABLE, Prot::READ_WRITE);
    rig.mm.mprotect(a, 4 * TABLE, Prot::READ).unwrap();
    assert_eq!(rig.take().calls, [], "no page table in the range");
    assert_eq!(
        rig.mm.write(a, 1),
        Err(SimError::Permission(a)),
        "but applied"
    );

    rig.mm.read(a + TABLE).unwrap(); // now the second table exists
    rig.mm.mprotect(a, 4 * TABLE, Prot::READ).unwrap();
    assert_eq!(rig.take().calls, [], "protection unchanged");

    rig.mm.mprotect(a, 4 * TABLE, Prot::READ_WRITE).unwrap();
    // From the call's start: its 1 GiB entry is populated now (Linux 6.12+).
    let r = inv(Event::ProtectionVma, a, a + 4 * TABLE);
    let calls = rig.take().calls;
    assert_eq!(calls.first(), Some(&Call::Start(r)), "{calls:?}");
    assert_eq!(calls.last(), Some(&Call::End(r)), "{calls:?}");
}

#[test]
fn mprotect_after_munmap_freed_the_tables_fires_nothing() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.fill(a, 4);
    // The only mapping in its 1 GiB region: Linux's munmap frees its page tables.
    rig.mm.munmap(a, 4 * P).unwrap();
    rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.take();
    rig.mm.mprotect(a, 4 * P, Prot::READ).unwrap();
    assert_eq!(
        rig.take().calls,
        [],
        "no populated entry (nor table) in the range"
    );
}

#[test]
fn mprotect_to_none_leaves_no_accessible_entry_at_the_flush() {
    let rig = Rig::new();
    let a = rig.map_at(B, 2 * P, Prot::READ_WRITE);
    rig.fill(a, 2);
    rig.watch(pages(a, 2));
    rig.take();

    rig.mm.mprotect(a, 2 * P, Prot::NONE).unwrap();

    let r = inv(Event::ProtectionVma, a, a + 2 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(a, a + 2 * P), Call::End(r)]
    );
    log.starts[0].assert_untouched(2);
    // Linux: a PROT_NONE entry keeps its page but is not present to any hardware walker.
    log.flushes[0].assert_all(2, "inaccessible", |p| !p.present());
    rig.mm.mprotect(a, 2 * P, Prot::READ_WRITE).unwrap();
    assert_eq!(rig.mm.read(a + P).unwrap(), a + P, "the data was kept");
}

// ----- fork and copy-on-write ---------------------------------------------------------

#[test]
fn fork_is_protection_page_on_the_parent_over_each_touched_private_vma_only() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE); // private, touched
    let s = rig
        .mm
        .mmap(
            4 * P,
            Prot::READ_WRITE,
            MapKind::AnonShared,
            Some(B + 8 * P),
        )
        .unwrap(); // shared, touched
    let u = rig.map_at(B + 16 * P, 4 * P, Prot::READ_WRITE); // private, untouched
    let d = rig.map_at(B + 24 * P, 4 * P, Prot::READ_WRITE); // private, touched
    rig.mm.write(a + P, 11).unwrap();
    rig.mm.write(s, 22).unwrap();
    rig.mm.write(d + 3 * P, 33).unwrap();
    let (pa, pd) = (rig.pfn(a + P), rig.pfn(d + 3 * P));
    rig.watch([a + P, s, u, d + 3 * P]);
    rig.take();

    let child = rig.mm.fork();

    let (ra, rd) = (
        inv(Event::ProtectionPage, a, a + 4 * P),
        inv(Event::ProtectionPage, d, d + 4 * P),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(ra),
            Call::Flush(a, a + 4 * P),
            Call::End(ra),
            Call::Start(rd),
            Call::Flush(d, d + 4 * P),
            Call::End(rd),
        ]
    );
    log.starts[0].assert_untouched(1);
    log.starts[1].assert_untouched(1);
    log.flushes[0].assert_all(1, "read-only", read_only);
    log.flushes[1].assert_all(1, "read-only", read_only);
    assert_eq!((rig.pfn(a + P), rig.pfn(d + 3 * P)), (pa, pd));
    assert_eq!(rig.mm.frames().refs(pa), 2, "shared with the child");
    assert!(rig.mm.pte(s).writable(), "shared mapping: left alone");
    assert_eq!(child.read(a + P).unwrap(), 11);
    assert_eq!(child.read(s).unwrap(), 22);
}

#[test]
fn fork_of_a_private_mapping_with_only_zero_page_entries_fires_nothing() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    assert_eq!(rig.mm.read(a + P).unwrap(), 0);
    assert_eq!(rig.pfn(a + P), FrameAllocator::ZERO_PAGE);
    rig.take();
    let child = rig.mm.fork();
    assert_eq!(
        rig.take().calls,
        [],
        "no anonymous page: nothing to protect"
    );
    assert_eq!(child.read(a + P).unwrap(), 0);
}

#[test]
fn cow_break_after_fork_is_one_clear_of_the_page_flushed_while_busy() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.mm.write(a + P, 11).unwrap();
    let child = rig.mm.fork();
    let old = rig.pfn(a + P);
    rig.watch([a + P]);
    rig.take();

    rig.mm.write(a + P, 22).unwrap();

    let r = inv(Event::Clear, a + P, a + 2 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(a + P, a + 2 * P), Call::End(r)]
    );
    log.starts[0].assert_untouched(1);
    log.flushes[0].assert_all(1, "busy", is_busy);
    let now = rig.mm.pte(a + P);
    assert!(now.writable() && now.pfn() != Some(old), "{now:?}");
    assert_eq!(rig.mm.frames().refs(old), 1, "the child's now");
    assert_eq!((rig.mm.read(a + P), child.read(a + P)), (Ok(22), Ok(11)));
}

#[test]
fn cow_write_to_a_page_no_longer_shared_reuses_it_without_invalidation() {
    let rig = Rig::new();
    let a = rig.map_at(B, P, Prot::READ_WRITE);
    rig.mm.write(a, 1).unwrap();
    let child = rig.mm.fork();
    child.write(a, 2).unwrap(); // the child copies; the parent's frame is its own again
    let pfn = rig.pfn(a);
    assert_eq!(rig.mm.frames().refs(pfn), 1);
    rig.take();
    rig.mm.write(a, 3).unwrap();
    assert_eq!(rig.take().calls, []);
    assert_eq!(rig.pfn(a), pfn);
    assert!(rig.mm.pte(a).writable());
}

#[test]
fn cow_break_of_the_zero_page_after_a_read_fault_is_one_clear_of_the_page() {
    let rig = Rig::new();
    let a = rig.map_at(B, 2 * P, Prot::READ_WRITE);
    assert_eq!(rig.mm.read(a + P).unwrap(), 0);
    assert_eq!(rig.pfn(a + P), FrameAllocator::ZERO_PAGE);
    assert_eq!(
        rig.take().calls,
        [],
        "the read fault itself invalidates nothing"
    );
    rig.watch([a + P]);

    rig.mm.write(a + P, 5).unwrap();

    let r = inv(Event::Clear, a + P, a + 2 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(a + P, a + 2 * P), Call::End(r)]
    );
    log.starts[0].assert_untouched(1);
    log.flushes[0].assert_all(1, "busy", is_busy);
    assert_ne!(rig.pfn(a + P), FrameAllocator::ZERO_PAGE);
    assert_eq!(rig.mm.read(a + P).unwrap(), 5);
}

// ----- reclaim, aging, migration ------------------------------------------------------

#[test]
fn reclaim_first_ages_accessed_pages_then_swaps_each_out_in_a_clear_of_the_page() {
    let rig = Rig::new();
    let a = rig.map_at(B, 2 * P, Prot::READ_WRITE);
    rig.fill(a, 2);
    let pfns = [rig.pfn(a), rig.pfn(a + P)];
    rig.watch(pages(a, 2));
    rig.take();

    let first = rig.mm.reclaim(a, a + 2 * P).unwrap();
    assert_eq!(
        first,
        ReclaimStats {
            referenced: 2,
            reclaimed: 0
        }
    );
    assert_eq!(
        rig.take().calls,
        [
            Call::ClearFlushYoung(a, a + P),
            Call::ClearFlushYoung(a + P, a + 2 * P)
        ]
    );
    assert!(pages(a, 2).all(|p| {
        let e = rig.mm.pte(p);
        e.present() && !e.accessed()
    }));

    rig.watch(pages(a, 2)); // as aged
    let swap = rig.mm.frames().swap_used();
    let second = rig.mm.reclaim(a, a + 2 * P).unwrap();
    assert_eq!(
        second,
        ReclaimStats {
            referenced: 0,
            reclaimed: 2
        }
    );
    let (r1, r2) = (
        inv(Event::Clear, a, a + P),
        inv(Event::Clear, a + P, a + 2 * P),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::ClearFlushYoung(a, a + P),
            Call::Start(r1),
            Call::Flush(a, a + P),
            Call::End(r1),
            Call::ClearFlushYoung(a + P, a + 2 * P),
            Call::Start(r2),
            Call::Flush(a + P, a + 2 * P),
            Call::End(r2),
        ]
    );
    log.starts[0].assert_untouched(1);
    log.starts[1].assert_untouched(1);
    log.flushes[0].assert_all(1, "busy", is_busy);
    log.flushes[1].assert_all(1, "busy", is_busy);
    assert!(pfns.iter().all(|&p| rig.mm.frames().refs(p) == 0));
    assert!(matches!(rig.mm.pte(a).kind(), PteKind::Swap(_)));
    assert_eq!(rig.mm.frames().swap_used(), swap + 2);
    assert_eq!(rig.mm.read(a + P).unwrap(), a + P, "swapped back in");
    assert_eq!(rig.take().calls, [], "swap-in invalidates nothing");
}

#[test]
fn reclaim_of_a_shared_file_page_unmaps_it_and_leaves_it_in_the_page_cache() {
    let rig = Rig::new();
    let file = File::new(rig.mm.frames().clone());
    let kind = MapKind::File {
        file: file.clone(),
        offset: 0,
        shared: true,
    };
    let f = rig.mm.mmap(2 * P, Prot::READ_WRITE, kind, Some(B)).unwrap();
    rig.mm.write(f + P, 77).unwrap();
    rig.mm.reclaim(f, f + 2 * P).unwrap(); // ages it
    rig.watch([f + P]);
    rig.take();

    let stats = rig.mm.reclaim(f, f + 2 * P).unwrap();

    assert_eq!(stats.reclaimed, 1);
    let r = inv(Event::Clear, f + P, f + 2 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::ClearFlushYoung(f + P, f + 2 * P),
            Call::Start(r),
            Call::Flush(f + P, f + 2 * P),
            Call::End(r)
        ]
    );
    log.starts[0].assert_untouched(1);
    log.flushes[0].assert_all(1, "cleared", Pte::is_none);
    assert_eq!(file.read(P).unwrap(), 77);
    assert_eq!(file.cached_pages(), 1);
}

#[test]
fn reclaim_keeps_a_page_a_secondary_reports_young() {
    let rig = Rig::new();
    let a = rig.map_at(B, P, Prot::READ_WRITE);
    rig.mm.write(a, 1).unwrap();
    rig.s.young.store(true, SeqCst);
    for _ in 0..2 {
        let stats = rig.mm.reclaim(a, a + P).unwrap();
        assert_eq!(
            stats,
            ReclaimStats {
                referenced: 1,
                reclaimed: 0
            }
        );
        assert_eq!(rig.take().calls, [Call::ClearFlushYoung(a, a + P)]);
    }
    assert!(
        !rig.mm.pte(a).accessed(),
        "the CPU's bit was cleared by the first pass"
    );
    assert!(rig.mm.pte(a).present());
    rig.s.young.store(false, SeqCst);
    assert_eq!(rig.mm.reclaim(a, a + P).unwrap().reclaimed, 1);
}

#[test]
fn age_calls_clear_young_per_present_page_without_invalidating() {
    let rig = Rig::new();
    let a = rig.map_at(B, 3 * P, Prot::READ_WRITE);
    rig.fill(a, 2); // a + 2P stays untouched
    rig.take();

    assert_eq!(rig.mm.age(a, a + 3 * P).unwrap(), 2, "the CPU used both");
    assert_eq!(
        rig.take().calls,
        [
            Call::ClearYoung(a, a + P),
            Call::ClearYoung(a + P, a + 2 * P)
        ]
    );
    assert!(!rig.mm.pte(a).accessed() && !rig.mm.pte(a + P).accessed());

    assert_eq!(rig.mm.age(a, a + 3 * P).unwrap(), 0, "nobody since");
    rig.take();
    rig.s.young.store(true, SeqCst);
    assert_eq!(rig.mm.age(a, a + 3 * P).unwrap(), 2, "the secondary did");
    assert_eq!(
        rig.take().calls,
        [
            Call::ClearYoung(a, a + P),
            Call::ClearYoung(a + P, a + 2 * P)
        ]
    );
    assert!(
        pages(a, 2).all(|p| rig.mm.pte(p).present()),
        "nothing reclaimed"
    );
}

#[test]
fn test_young_asks_secondaries_about_the_page_and_clears_nothing() {
    let rig = Rig::new();
    let a = rig.map_at(B, 2 * P, Prot::READ_WRITE);
    rig.mm.write(a, 1).unwrap();
    rig.mm.age(a, a + P).unwrap(); // the CPU's accessed bit is now clear
    rig.take();

    assert!(!rig.mm.test_young(a));
    assert_eq!(rig.take().calls, [Call::TestYoung(a)]);
    rig.s.young.store(true, SeqCst);
    assert!(rig.mm.test_young(a));
    assert_eq!(rig.take().calls, [Call::TestYoung(a)]);
    assert!(rig.mm.test_young(a), "test_young clears nothing");
    rig.take();

    assert!(!rig.mm.test_young(a + P), "no entry: not young");
    assert_eq!(rig.take().calls, [], "and no secondary asked");
    assert!(rig.mm.pte(a).present());
}

#[test]
fn migrate_is_one_clear_of_the_page_and_the_data_follows() {
    let rig = Rig::new();
    let a = rig.map_at(B, 2 * P, Prot::READ_WRITE);
    rig.mm.write(a + P, 9).unwrap();
    let old = rig.mm.frames().frame_ref(rig.pfn(a + P));
    rig.watch([a + P]);
    rig.take();

    let new = rig.mm.migrate(a + P).unwrap();

    let r = inv(Event::Clear, a + P, a + 2 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(a + P, a + 2 * P), Call::End(r)]
    );
    log.starts[0].assert_untouched(1);
    log.flushes[0].assert_all(1, "busy", is_busy);
    assert_ne!(new.pfn, old.pfn);
    assert_eq!(rig.mm.pte(a + P).pfn(), Some(new.pfn));
    assert!(!rig.mm.frames().is_current(old), "the old frame was freed");
    assert_eq!(rig.mm.read(a + P).unwrap(), 9);
}

#[test]
fn migrate_range_is_one_migrate_with_the_owner_over_the_whole_range() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    for i in [0, 1, 3] {
        rig.mm.write(a + i * P, 100 + i).unwrap();
    }
    let olds: Vec<_> = [0, 1, 3]
        .iter()
        .map(|i| rig.mm.frames().frame_ref(rig.pfn(a + i * P)))
        .collect();
    rig.watch([a, a + P, a + 3 * P]);
    rig.take();

    let moved = rig.mm.migrate_range(a, a + 4 * P, OwnerToken(3)).unwrap();

    let r = inv(Event::Migrate, a, a + 4 * P).owned_by(3);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(r),
            Call::Flush(a, a + P),
            Call::Flush(a + P, a + 2 * P),
            Call::Flush(a + 3 * P, a + 4 * P),
            Call::End(r),
        ]
    );
    log.starts[0].assert_untouched(3);
    for f in &log.flushes {
        f.assert_all(1, "busy", is_busy);
    }
    assert_eq!(
        moved.iter().map(|(va, _)| *va).collect::<Vec<_>>(),
        [a, a + P, a + 3 * P]
    );
    assert!(
        olds.iter().all(|&f| !rig.mm.frames().is_current(f)),
        "every old frame was freed (maybe reused since)"
    );
    for (va, f) in moved {
        assert_eq!(rig.mm.pte(va).pfn(), Some(f.pfn));
        assert_eq!(rig.mm.read(va).unwrap(), 100 + (va - a) / P);
    }
}

// ----- mremap and MAP_FIXED -----------------------------------------------------------

#[test]
fn mremap_move_is_an_unmap_of_the_old_range_then_a_second_one_from_its_munmap() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.map_at(B + 4 * P, P, Prot::READ); // blocks growing in place
    rig.fill(a, 4);
    let frames: Vec<_> = pages(a, 4)
        .map(|p| rig.mm.frames().frame_ref(rig.pfn(p)))
        .collect();
    rig.watch(pages(a, 4));
    rig.take();

    let flags = MremapFlags {
        may_move: true,
        fixed: None,
    };
    let n = rig.mm.mremap(a, 4 * P, 8 * P, flags).unwrap();

    assert_ne!(n, a);
    let r = inv(Event::Unmap, a, a + 4 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            // move_page_tables: the entries leave the old range.
            Call::Start(r),
            Call::Flush(a, a + 4 * P),
            Call::End(r),
            // do_vmi_munmap of the emptied old mapping: nothing left to clear or flush.
            Call::Start(r),
            Call::End(r),
        ]
    );
    log.starts[0].assert_untouched(4);
    assert_eq!(log.starts[1].pages.len(), 4);
    assert!(
        log.starts[1].pages.iter().all(|(_, p)| p
            .as_deref()
            .is_some_and(|s| s.ends_with("became Pte(none)"))),
        "the second Unmap finds the old range already empty: {:?}",
        log.starts[1]
    );
    log.flushes[0].assert_all(4, "cleared", Pte::is_none);
    for (i, f) in frames.iter().enumerate() {
        let va = n + i as u64 * P;
        assert_eq!(rig.mm.pte(va).pfn(), Some(f.pfn), "the frame moved along");
        assert!(rig.mm.frames().is_current(*f), "and was not freed");
        assert_eq!(rig.mm.read(va).unwrap(), a + i as u64 * P);
    }
    assert_eq!(rig.mm.read(a), Err(SimError::Fault(a)));
}

#[test]
fn mremap_shrink_unmaps_the_tail() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.fill(a, 4);
    rig.watch(pages(a, 4));
    rig.take();

    assert_eq!(
        rig.mm.mremap(a, 4 * P, P, MremapFlags::default()).unwrap(),
        a
    );

    let r = inv(Event::Unmap, a + P, a + 4 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(a + P, a + 4 * P), Call::End(r)]
    );
    log.starts[0].assert_untouched(3);
    log.flushes[0].assert_all(3, "cleared", Pte::is_none);
    assert_eq!(rig.mm.read(a).unwrap(), a);
}

#[test]
fn mremap_grow_in_place_fires_nothing() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.fill(a, 4);
    rig.take();
    assert_eq!(
        rig.mm
            .mremap(a, 4 * P, 8 * P, MremapFlags::default())
            .unwrap(),
        a
    );
    assert_eq!(rig.take().calls, []);
    assert_eq!(rig.mm.vmas()[0].end, a + 8 * P);
    assert_eq!(rig.mm.read(a + 3 * P).unwrap(), a + 3 * P);
}

#[test]
fn map_fixed_over_a_mapping_unmaps_it_first() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.fill(a, 4);
    rig.watch(pages(a, 4));
    rig.take();

    rig.map_at(a + P, 2 * P, Prot::READ);

    let r = inv(Event::Unmap, a + P, a + 3 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(a + P, a + 3 * P), Call::End(r)]
    );
    log.starts[0].assert_untouched(2);
    log.flushes[0].assert_all(2, "cleared", Pte::is_none);
    assert_eq!(rig.mm.read(a + P).unwrap(), 0, "the new mapping");
    assert_eq!(rig.mm.read(a + 3 * P).unwrap(), a + 3 * P);
}

// ----- exit -----------------------------------------------------------------------------

#[test]
fn exit_releases_first_then_unmaps_everything_before_freeing() {
    let rig = Rig::new();
    let a = rig.map_at(B, 4 * P, Prot::READ_WRITE);
    rig.fill(a, 4);
    let frames: Vec<_> = pages(a, 4)
        .map(|p| rig.mm.frames().frame_ref(rig.pfn(p)))
        .collect();
    let sub: IntervalSubscription<Mirror> = rig
        .mm
        .notifier()
        .insert_interval(a..a + 4 * P, Mirror(rig.s.clone()))
        .unwrap();
    rig.watch(pages(a, 4));
    rig.take();

    rig.mm.exit();

    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Interval(inv(Event::Release, 0, u64::MAX)),
            Call::Release,
            // List subscribers are gone after release: only the interval one hears it.
            Call::Interval(inv(Event::Unmap, 0, u64::MAX)),
        ]
    );
    log.starts[0].assert_untouched(4);
    log.starts[1].assert_untouched(4);
    assert!(frames.iter().all(|&f| !rig.mm.frames().is_current(f)));
    assert!(rig.mm.vmas().is_empty());
    drop(sub);
}

// ----- OOM reaper -----------------------------------------------------------------------

/// Private `a` and `b` with two written pages each, shared `s` between them.
fn reaper_layout(rig: &Rig) -> (u64, u64, u64) {
    let a = rig.map_at(B, 2 * P, Prot::READ_WRITE);
    let s = rig
        .mm
        .mmap(
            2 * P,
            Prot::READ_WRITE,
            MapKind::AnonShared,
            Some(B + 4 * P),
        )
        .unwrap();
    let b = rig.map_at(B + 8 * P, 2 * P, Prot::READ_WRITE);
    rig.fill(a, 2);
    rig.fill(s, 2);
    rig.fill(b, 2);
    rig.take();
    (a, s, b)
}

#[test]
fn oom_reaper_is_a_non_blockable_unmap_per_private_vma() {
    let rig = Rig::new();
    let (a, s, b) = reaper_layout(&rig);
    rig.watch(pages(a, 2).chain(pages(s, 2)).chain(pages(b, 2)));

    let reap = rig.mm.oom_reap();

    assert_eq!(
        reap,
        OomReap {
            reaped: 2,
            skipped: 0,
            lock_contended: false
        }
    );
    assert!(reap.is_complete());
    let (ra, rb) = (
        inv(Event::Unmap, a, a + 2 * P).non_blockable(),
        inv(Event::Unmap, b, b + 2 * P).non_blockable(),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(ra),
            Call::Flush(a, a + 2 * P),
            Call::End(ra),
            Call::Start(rb),
            Call::Flush(b, b + 2 * P),
            Call::End(rb),
        ]
    );
    log.starts[0].assert_untouched(2);
    log.starts[1].assert_untouched(2);
    log.flushes[0].assert_all(2, "cleared", Pte::is_none);
    log.flushes[1].assert_all(2, "cleared", Pte::is_none);
    assert_eq!(rig.mm.read(s + P).unwrap(), s + P, "shared memory is kept");
    assert_eq!(
        rig.mm.vmas().len(),
        3,
        "the reaper frees pages, not mappings"
    );
}

#[test]
fn oom_reaper_skips_a_vma_whose_subscriber_would_block_and_reaps_it_on_a_later_pass() {
    let mut rig = Rig::new();
    let (a, _s, b) = reaper_layout(&rig);
    rig.add_blocker(a, a + 2 * P, 1);
    let a_frames: Vec<Pfn> = pages(a, 2).map(|p| rig.pfn(p)).collect();
    rig.watch(pages(a, 2).chain(pages(b, 2)));

    let first = rig.mm.oom_reap();

    assert_eq!(
        first,
        OomReap {
            reaped: 1,
            skipped: 1,
            lock_contended: false
        }
    );
    assert!(!first.is_complete());
    let (ra, rb) = (
        inv(Event::Unmap, a, a + 2 * P).non_blockable(),
        inv(Event::Unmap, b, b + 2 * P).non_blockable(),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(ra),
            Call::Refused(ra),
            Call::End(ra), // the failed start unwinds through end
            Call::Start(rb),
            Call::Flush(b, b + 2 * P),
            Call::End(rb),
        ]
    );
    assert!(
        a_frames.iter().all(|&p| rig.mm.frames().refs(p) == 1),
        "skipped: its pages stay"
    );
    assert!(pages(a, 2).all(|p| rig.mm.pte(p).present()));

    let second = rig.mm.oom_reap();

    assert_eq!(
        second,
        OomReap {
            reaped: 2,
            skipped: 0,
            lock_contended: false
        }
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(ra),
            Call::Flush(a, a + 2 * P),
            Call::End(ra),
            Call::Start(rb), // nothing left in b: no flush
            Call::End(rb),
        ]
    );
    log.flushes[0].assert_all(2, "cleared", Pte::is_none);
    assert!(a_frames.iter().all(|&p| rig.mm.frames().refs(p) == 0));
    assert_eq!(rig.mm.notifier().stats().subscriber_bugs, 0);
}

#[test]
fn oom_reap_with_retries_passes_until_one_is_complete_or_attempts_run_out() {
    let mut rig = Rig::new();
    let (a, _s, _b) = reaper_layout(&rig);
    rig.add_blocker(a, a + 2 * P, 2);

    let last = rig.mm.oom_reap_with_retries(10, Duration::ZERO);

    assert!(last.is_complete(), "{last:?}");
    let calls = rig.take().calls;
    let refused = calls
        .iter()
        .filter(|c| matches!(c, Call::Refused(_)))
        .count();
    let starts_on_a = calls
        .iter()
        .filter(|c| matches!(c, Call::Start(i) if i.start == a && !i.blockable))
        .count();
    assert_eq!((refused, starts_on_a), (2, 3), "three passes: {calls:?}");
    assert!(rig.mm.pte(a).is_none());

    // A subscriber that never stops blocking: exactly `attempts` passes, then give up.
    let mut rig = Rig::new();
    let (a, _s, _b) = reaper_layout(&rig);
    rig.add_blocker(a, a + 2 * P, usize::MAX);
    let last = rig.mm.oom_reap_with_retries(4, Duration::ZERO);
    assert_eq!(last.skipped, 1);
    let refused = rig
        .take()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Refused(_)))
        .count();
    assert_eq!(refused, 4);
    assert_eq!(rig.mm.read(a + P).unwrap(), a + P, "never reaped");
}

#[test]
fn oom_reaper_gives_up_at_once_when_the_mmap_lock_is_taken() {
    let rig = Rig::new();
    let (a, _s, b) = reaper_layout(&rig);
    rig.s.reap_in_start.store(true, SeqCst);
    rig.mm.munmap(a, P).unwrap(); // holds the mmap lock for writing around its callbacks
    let reap = rig.s.reaped_in_start.lock().unwrap().take();
    assert_eq!(
        reap,
        Some(OomReap {
            reaped: 0,
            skipped: 0,
            lock_contended: true
        })
    );
    let r = inv(Event::Unmap, a, a + P);
    assert_eq!(
        rig.take().calls,
        [Call::Start(r), Call::Flush(a, a + P), Call::End(r)],
        "the contended pass invalidated nothing"
    );
    assert_eq!(rig.mm.read(b).unwrap(), b);
}

// ----- soft-dirty ---------------------------------------------------------------------

#[test]
fn soft_dirty_reset_is_one_soft_dirty_over_everything_and_the_next_write_marks_again() {
    let rig = Rig::new();
    let a = rig.map_at(B, 3 * P, Prot::READ_WRITE);
    rig.fill(a, 2);
    rig.mm.read(a + 2 * P).unwrap(); // the zero page: read-only already
    assert!(rig.mm.pte(a).soft_dirty() && rig.mm.pte(a).writable());
    rig.watch(pages(a, 2));
    rig.take();

    rig.mm.clear_soft_dirty();

    let r = inv(Event::SoftDirty, 0, u64::MAX);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(0, TASK_SIZE), Call::End(r)]
    );
    log.starts[0].assert_untouched(2);
    log.flushes[0].assert_all(2, "write-protected and soft-clean", |p| {
        read_only(p) && !p.soft_dirty()
    });

    rig.mm.write(a, 5).unwrap();
    assert_eq!(
        rig.take().calls,
        [],
        "the write fault re-enables write without invalidating"
    );
    let e = rig.mm.pte(a);
    assert!(e.soft_dirty() && e.writable(), "{e:?}");
    assert!(
        !rig.mm.pte(a + P).soft_dirty(),
        "the page not written since stays clean"
    );
}

// ----- device-exclusive access --------------------------------------------------------

#[test]
fn make_exclusive_is_exclusive_with_owner_and_cpu_access_restores_without_owner() {
    let rig = Rig::new();
    let a = rig.map_at(B, 2 * P, Prot::READ_WRITE);
    rig.mm.write(a + P, 5).unwrap();
    let pfn = rig.pfn(a + P);
    rig.watch([a + P]);
    rig.take();

    let f = rig.mm.make_exclusive(a + P, OwnerToken(7)).unwrap();

    let r = inv(Event::Exclusive, a + P, a + 2 * P).owned_by(7);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::Flush(a + P, a + 2 * P), Call::End(r)]
    );
    log.starts[0].assert_untouched(1);
    log.flushes[0].assert_all(1, "device-exclusive", |p| {
        p.kind() == PteKind::Exclusive(pfn)
    });
    assert_eq!(f.pfn, pfn);

    rig.watch([a + P]); // as exclusive
    assert_eq!(rig.mm.read(a + P).unwrap(), 5);

    let r = inv(Event::Exclusive, a + P, a + 2 * P);
    let log = rig.take();
    assert_eq!(
        log.calls,
        [Call::Start(r), Call::End(r)],
        "restoring makes an entry present: nothing to flush"
    );
    log.starts[0].assert_untouched(1);
    assert_eq!(rig.mm.pte(a + P).pfn(), Some(pfn));
}

#[test]
fn make_exclusive_of_a_cow_page_breaks_cow_first() {
    let rig = Rig::new();
    let a = rig.map_at(B, P, Prot::READ_WRITE);
    rig.mm.write(a, 5).unwrap();
    let child = rig.mm.fork();
    rig.watch([a]);
    rig.take();

    let f = rig.mm.make_exclusive(a, OwnerToken(9)).unwrap();

    let (cow, excl) = (
        inv(Event::Clear, a, a + P),
        inv(Event::Exclusive, a, a + P).owned_by(9),
    );
    let log = rig.take();
    assert_eq!(
        log.calls,
        [
            Call::Start(cow),
            Call::Flush(a, a + P),
            Call::End(cow),
            Call::Start(excl),
            Call::Flush(a, a + P),
            Call::End(excl),
        ]
    );
    log.starts[0].assert_untouched(1);
    log.flushes[0].assert_all(1, "busy", is_busy);
    assert_eq!(rig.mm.pte(a).kind(), PteKind::Exclusive(f.pfn));
    assert_eq!(child.read(a).unwrap(), 5);
}
