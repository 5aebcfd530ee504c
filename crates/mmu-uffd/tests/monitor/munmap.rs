//! munmap of watched memory, for every memory type: which calls become which `Unmap` invalidations.

use super::*;

fn munmap_patterns(test: &str, kind: Kind) {
    let _g = shared();
    let Some(m) = monitor_or_skip(test) else {
        return;
    };
    if let Some(why) = kind.unsupported(&m) {
        eprintln!("SKIPPED {test}: {why}");
        return;
    }
    // Without merging, a page-sized request gets a page-sized entry of its own.
    let (cache, counts) = counting_cache(&m, CacheConfig::default().with_merge(false));
    let (_all, log) = record_all(&m);

    // The whole range: one event covering it.
    let p = kind.map(None, 8);
    let h = cache.get(p, 8 * PAGE).unwrap();
    assert_eq!((h.start(), h.len()), (p, 8 * PAGE));
    assert!(h.is_valid());
    unmap(p, 8 * PAGE);
    assert!(
        !h.is_valid(),
        "{kind:?}: whole munmap not applied on return"
    );
    assert_eq!(
        log.take(),
        vec![ev(p, 0, 8, Event::Unmap)],
        "{kind:?} whole"
    );
    drop(h);

    // Middle, first and last page, then the two pieces left: one event per call, exactly
    // the call's range, and only the entries it overlaps go invalid.
    let p = kind.map(None, 8);
    let hs: Vec<_> = (0..8).map(|i| cache.get(at(p, i), PAGE).unwrap()).collect();
    let (_sub5, log5) = record(&m, at(p, 5), PAGE);
    assert_eq!(validity(&hs), [true; 8]);
    unmap(at(p, 3), PAGE);
    assert_eq!(
        validity(&hs),
        [true, true, true, false, true, true, true, true]
    );
    assert_eq!(
        log.take(),
        vec![ev(p, 3, 4, Event::Unmap)],
        "{kind:?} middle"
    );
    unmap(p, PAGE);
    assert_eq!(
        validity(&hs),
        [false, true, true, false, true, true, true, true]
    );
    assert_eq!(
        log.take(),
        vec![ev(p, 0, 1, Event::Unmap)],
        "{kind:?} first"
    );
    unmap(at(p, 7), PAGE);
    assert_eq!(
        validity(&hs),
        [false, true, true, false, true, true, true, false]
    );
    assert_eq!(log.take(), vec![ev(p, 7, 8, Event::Unmap)], "{kind:?} last");
    assert!(
        log5.take().is_empty(),
        "page 5's subscriber was not touched yet"
    );
    unmap(at(p, 1), 2 * PAGE);
    unmap(at(p, 4), 3 * PAGE);
    assert_eq!(validity(&hs), [false; 8]);
    assert_eq!(
        log.take(),
        vec![ev(p, 1, 3, Event::Unmap), ev(p, 4, 7, Event::Unmap)],
        "{kind:?} rest"
    );
    // A subscriber receives only the invalidations overlapping it, each whole.
    assert_eq!(log5.take(), vec![ev(p, 4, 7, Event::Unmap)]);
    drop(hs);

    // Watched middle, unwatched around it (the watch split the VMA): the event covers the
    // whole munmap call.
    let p = kind.map(None, 8);
    let h = cache.get(at(p, 2), 4 * PAGE).unwrap();
    unmap(p, 8 * PAGE);
    assert!(!h.is_valid());
    assert_eq!(
        log.take(),
        vec![ev(p, 0, 8, Event::Unmap)],
        "{kind:?} spanning"
    );
    drop(h);

    // Unwatched memory, even right next to watched memory: nothing.
    let p = kind.map(None, 8);
    let h = cache.get(p, 4 * PAGE).unwrap();
    unmap(at(p, 4), 4 * PAGE);
    let q = kind.map(None, 4);
    unmap(q, 4 * PAGE);
    let s = fence(&cache);
    assert_eq!(
        log.take(),
        vec![s],
        "{kind:?}: unwatched munmaps produced events"
    );
    assert!(h.is_valid());
    assert_eq!(read_byte(p), 0x5a);
    unmap(p, 4 * PAGE);
    assert!(!h.is_valid());
    assert_eq!(log.take(), vec![ev(p, 0, 4, Event::Unmap)]);
    drop(h);

    let st = m.stats();
    // Seven unmapping calls on watched memory above, the fence, the last one.
    assert_eq!(st.unmaps, 9, "{kind:?}: {st:?}");
    assert_eq!(st.invalidations, 9);
    assert_eq!((st.removes, st.remaps, st.forks), (0, 0, 0));
    assert_eq!((st.unexpected_faults, st.unknown), (0, 0));
    drop(cache);
    assert_eq!(
        counts.registered.load(SeqCst),
        counts.deregistered.load(SeqCst)
    );
    assert!(m.state() == MonitorState::Running);
}

#[test]
fn munmap_anon_private() {
    munmap_patterns("munmap_anon_private", Kind::AnonPrivate);
}

#[test]
fn munmap_anon_shared() {
    munmap_patterns("munmap_anon_shared", Kind::AnonShared);
}

#[test]
fn munmap_memfd() {
    munmap_patterns("munmap_memfd", Kind::Memfd);
}

#[test]
fn munmap_file_shared() {
    munmap_patterns("munmap_file_shared", Kind::FileShared);
}

#[test]
fn munmap_file_private() {
    munmap_patterns("munmap_file_private", Kind::FilePrivate);
}

/// One munmap call over two mappings, a watched one and an unwatched one after it: the
/// event covers the whole call.
#[test]
fn munmap_spanning_two_mappings() {
    let _g = shared();
    let Some(m) = monitor_or_skip("munmap_spanning_two_mappings") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let r = reserve(8);
    let p = map(
        r as usize,
        4 * PAGE,
        RW,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        -1,
        0,
    );
    assert_eq!(p, r);
    let h = cache.get(p, 4 * PAGE).unwrap();
    // Pages 4..8 are still the unwatched PROT_NONE reservation: a second VMA.
    unmap(r, 8 * PAGE);
    assert!(!h.is_valid());
    assert_eq!(log.take(), vec![ev(r, 0, 8, Event::Unmap)]);
}

/// A raw subscriber, without the gate: the kernel releases the unmapper when the monitor
/// reads the event, so the subscriber may see it a moment after munmap returned; it does
/// within a bounded time. Passing the gate (here through an unrelated handle) makes it
/// visible at once.
#[test]
fn raw_subscriber_sees_unmap_soon_and_gate_makes_it_immediate() {
    let _g = shared();
    let Some(m) = monitor_or_skip("raw_subscriber_sees_unmap_soon_and_gate_makes_it_immediate")
    else {
        return;
    };
    let p = anon(4);
    m.watch(p, 4 * PAGE).unwrap();
    let (_sub, log) = record(&m, p, 4 * PAGE);
    let t = Instant::now();
    unmap(p, 4 * PAGE);
    let seen = log.take_when(1, Duration::from_secs(2));
    let latency = t.elapsed();
    assert_eq!(seen, vec![ev(p, 0, 4, Event::Unmap)]);
    eprintln!("raw subscriber saw the unmap {latency:?} after munmap was called");

    // With the gate: any handle's is_valid() waits for the batch being applied.
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let other = anon(1);
    let ho = cache.get(other, PAGE).unwrap();
    let q = anon(4);
    m.watch(q, 4 * PAGE).unwrap();
    let (_subq, logq) = record(&m, q, 4 * PAGE);
    for i in 0..4 {
        unmap(at(q, i), PAGE);
        assert!(ho.is_valid());
        assert_eq!(logq.take(), vec![ev(q, i, i + 1, Event::Unmap)], "page {i}");
    }
    unmap(other, PAGE);
    assert!(!ho.is_valid());
}
