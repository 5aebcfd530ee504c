//! mremap of watched memory: moves, shrinks, grows, `MREMAP_DONTUNMAP`.

use super::*;

fn mremap_move_patterns(test: &str, kind: Kind) {
    let _g = shared();
    let Some(m) = monitor_or_skip(test) else {
        return;
    };
    if let Some(why) = kind.unsupported(&m) {
        eprintln!("SKIPPED {test}: {why}");
        return;
    }
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);

    // Move the whole mapping: Unmap of the old range, twice: the kernel reports the move
    // (REMAP) and then the unmap of the old VMA (UNMAP), both before mremap returns.
    let p = kind.map(None, 4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    let dst = reserve(4);
    let q = mremap(
        p,
        4 * PAGE,
        4 * PAGE,
        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
        dst,
    )
    .unwrap();
    assert_eq!(q, dst);
    assert!(!h.is_valid(), "{kind:?}: move not applied on return");
    assert_eq!(
        log.take(),
        vec![ev(p, 0, 4, Event::Unmap), ev(p, 0, 4, Event::Unmap)],
        "{kind:?} move"
    );
    let st = m.stats();
    assert_eq!((st.remaps, st.unmaps), (1, 1), "{kind:?}: {st:?}");
    assert_eq!(read_byte(q), 0x5a, "the contents moved");
    // The moved memory is still registered with the kernel (REMAP is enabled): unmapping
    // part of it at its new address produces an event although nobody watched it there.
    unmap(at(q, 3), PAGE);
    let s = fence(&cache);
    assert_eq!(log.take(), vec![ev(q, 3, 4, Event::Unmap), s], "{kind:?}");
    // The monitor does not claim the destination as watched (the REMAP event may arrive
    // after the destination was unmapped again): one more registration, harmless.
    let regs = m.stats().watch_registrations;
    let hq = cache.get(q, 3 * PAGE).unwrap();
    assert_eq!(m.stats().watch_registrations, regs + 1, "{kind:?}");
    assert!(hq.is_valid());
    unmap(q, 3 * PAGE);
    assert!(!hq.is_valid());
    assert_eq!(log.take(), vec![ev(q, 0, 3, Event::Unmap)]);

    // Move one page out of the middle: Unmap of just that page; the rest stays valid
    // only where the entries do not overlap the moved page.
    let p = kind.map(None, 4);
    let hs: Vec<_> = (0..4).map(|i| cache.get(at(p, i), PAGE).unwrap()).collect();
    let dst = reserve(1);
    let q = mremap(
        at(p, 1),
        PAGE,
        PAGE,
        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
        dst,
    )
    .unwrap();
    assert_eq!(validity(&hs), [true, false, true, true]);
    assert_eq!(
        log.take(),
        vec![ev(p, 1, 2, Event::Unmap), ev(p, 1, 2, Event::Unmap)],
        "{kind:?} page"
    );
    // (Not one munmap over the hole: another test may have mapped something there.)
    unmap(q, PAGE);
    unmap(p, PAGE);
    unmap(at(p, 2), 2 * PAGE);
    assert_eq!(validity(&hs), [false; 4]);
    assert_eq!(
        log.take(),
        vec![
            ev(q, 0, 1, Event::Unmap),
            ev(p, 0, 1, Event::Unmap),
            ev(p, 2, 4, Event::Unmap)
        ],
        "{kind:?}"
    );
}

#[test]
fn mremap_move_anon_private() {
    mremap_move_patterns("mremap_move_anon_private", Kind::AnonPrivate);
}

#[test]
fn mremap_move_memfd() {
    mremap_move_patterns("mremap_move_memfd", Kind::Memfd);
}

#[test]
fn mremap_move_file_shared() {
    mremap_move_patterns("mremap_move_file_shared", Kind::FileShared);
}

/// Shrinking unmaps the tail (an UNMAP event of exactly the tail); the head stays valid.
#[test]
fn mremap_shrink_unmaps_the_tail() {
    let _g = shared();
    let Some(m) = monitor_or_skip("mremap_shrink_unmaps_the_tail") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default().with_merge(false));
    let (_all, log) = record_all(&m);
    let p = anon(8);
    let head = cache.get(p, 3 * PAGE).unwrap();
    let tail = cache.get(at(p, 3), 5 * PAGE).unwrap();
    let q = mremap(p, 8 * PAGE, 3 * PAGE, 0, std::ptr::null_mut()).unwrap();
    assert_eq!(q, p);
    assert!(!tail.is_valid());
    assert!(head.is_valid());
    assert_eq!(log.take(), vec![ev(p, 3, 8, Event::Unmap)]);
    let st = m.stats();
    assert_eq!((st.unmaps, st.remaps), (1, 0));
    unmap(p, 3 * PAGE);
    assert!(!head.is_valid());
    assert_eq!(log.take(), vec![ev(p, 0, 3, Event::Unmap)]);
}

/// Growing in place invalidates nothing. The grown part belongs to the same VMA, so the
/// kernel reports its unmap too, although nobody asked to watch it.
#[test]
fn mremap_grow_in_place_invalidates_nothing() {
    let _g = shared();
    let Some(m) = monitor_or_skip("mremap_grow_in_place_invalidates_nothing") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    // Map 8 pages, free the last 4 (before watching: no event), grow into them. Another
    // test thread may take the hole meanwhile: then try again.
    let mut grown = None;
    for _ in 0..20 {
        let p = anon(8);
        unmap(at(p, 4), 4 * PAGE);
        let h = cache.get(p, 4 * PAGE).unwrap();
        log.take(); // earlier failed attempts' unmaps
        match mremap(p, 4 * PAGE, 8 * PAGE, 0, std::ptr::null_mut()) {
            Ok(q) => {
                assert_eq!(q, p);
                grown = Some((p, h));
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                unmap(p, 4 * PAGE);
                assert!(!h.is_valid());
            }
            Err(e) => panic!("mremap grow: {e}"),
        }
    }
    let (p, h) = grown.expect("no room to grow in place after 20 attempts");
    let s = fence(&cache);
    assert_eq!(
        log.take(),
        vec![s],
        "growing in place produced an invalidation"
    );
    assert!(h.is_valid());
    assert_eq!(read_byte(p), 0x5a);
    touch(at(p, 4), 4 * PAGE);
    // The grown part is registered with the kernel (same VMA) though not in the monitor's
    // watched set.
    unmap(at(p, 6), 2 * PAGE);
    assert!(h.is_valid());
    let s = fence(&cache);
    assert_eq!(log.take(), vec![ev(p, 6, 8, Event::Unmap), s]);
    unmap(p, 6 * PAGE);
    assert!(!h.is_valid());
    assert_eq!(log.take(), vec![ev(p, 0, 6, Event::Unmap)]);
}

/// MREMAP_DONTUNMAP moves the pages and leaves the old range mapped (empty): the old range
/// is invalidated once (a REMAP, no UNMAP), and both ranges stay registered.
#[test]
fn mremap_dontunmap() {
    let _g = shared();
    let Some(m) = monitor_or_skip("mremap_dontunmap") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    let dst = reserve(4);
    let q = mremap(
        p,
        4 * PAGE,
        4 * PAGE,
        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
        dst,
    )
    .unwrap();
    assert_eq!(q, dst);
    assert!(!h.is_valid());
    assert_eq!(log.take(), vec![ev(p, 0, 4, Event::Unmap)]);
    assert_eq!(m.stats().remaps, 1);
    assert_eq!(read_byte(q), 0x5a);
    assert_eq!(read_byte(p), 0, "the old range is mapped and empty");
    // Both ranges are still registered with the kernel: the old (now empty) mapping kept
    // its registration, the moved one carried it along.
    unmap(p, 4 * PAGE);
    unmap(q, 4 * PAGE);
    let s = fence(&cache);
    assert_eq!(
        log.take(),
        vec![ev(p, 0, 4, Event::Unmap), ev(q, 0, 4, Event::Unmap), s]
    );
    // A move that keeps the old mapping is reported once (REMAP), not twice.
    let st = m.stats();
    assert_eq!((st.remaps, st.unmaps), (1, 3), "{st:?}");
}
