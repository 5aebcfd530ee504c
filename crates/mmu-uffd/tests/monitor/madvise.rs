//! madvise and mprotect of watched memory: which advice invalidates what; mprotect produces nothing.

use super::*;

fn madvise_patterns(test: &str, kind: Kind) {
    let _g = shared();
    let Some(m) = monitor_or_skip(test) else {
        return;
    };
    if let Some(why) = kind.unsupported(&m) {
        eprintln!("SKIPPED {test}: {why}");
        return;
    }
    let advices: &[(&str, i32)] = match kind {
        Kind::AnonPrivate => &[
            ("MADV_DONTNEED", libc::MADV_DONTNEED),
            ("MADV_FREE", libc::MADV_FREE),
        ],
        Kind::AnonShared | Kind::Memfd | Kind::FileShared => &[
            ("MADV_DONTNEED", libc::MADV_DONTNEED),
            ("MADV_REMOVE", libc::MADV_REMOVE),
        ],
        Kind::FilePrivate => &[("MADV_DONTNEED", libc::MADV_DONTNEED)],
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default().with_merge(false));
    let (_all, log) = record_all(&m);
    let p = kind.map(None, 8);
    let mut hs: Vec<_> = (0..8).map(|i| cache.get(at(p, i), PAGE).unwrap()).collect();
    let mut expected_removes = 0;
    // Each advice on its own pages: [1, 3), then [4, 5).
    for (&(name, advice), (a, b)) in advices.iter().zip([(1, 3), (4, 5)]) {
        let before = m.stats();
        match try_madvise(at(p, a), (b - a) * PAGE, advice) {
            Ok(()) => {}
            Err(e) if advice == libc::MADV_REMOVE => {
                eprintln!("{test}: {name} not supported here ({e}); skipping that advice");
                continue;
            }
            Err(e) => panic!("{kind:?} {name}: {e}"),
        }
        expected_removes += 1;
        let v = validity(&hs);
        for (i, valid) in v.iter().enumerate() {
            assert_eq!(*valid, !(a..b).contains(&i), "{kind:?} {name}: page {i}");
        }
        assert_eq!(
            log.take(),
            vec![ev(p, a, b, Event::Clear)],
            "{kind:?} {name} pages {a}..{b}"
        );
        let after = m.stats();
        assert_eq!(after.removes, before.removes + 1, "{kind:?} {name}");
        assert_eq!(after.unmaps, before.unmaps, "{kind:?} {name}");
        // The memory is still mapped and still watched: a new registration is valid (the
        // monitor registers it again, idempotently).
        for (i, h) in hs.iter_mut().enumerate().take(b).skip(a) {
            *h = cache.get(at(p, i), PAGE).unwrap();
            assert!(h.is_valid());
        }
        assert_eq!(
            m.stats().watch_registrations,
            after.watch_registrations + (b - a) as u64,
            "{kind:?} {name}: one registration call per new entry"
        );
    }
    // One advice over the whole mapping (one VMA by now): one event.
    madvise(p, 8 * PAGE, libc::MADV_DONTNEED);
    assert_eq!(validity(&hs), [false; 8]);
    assert_eq!(log.take(), vec![ev(p, 0, 8, Event::Clear)], "{kind:?} all");
    expected_removes += 1;
    // Over watched and unwatched memory (three VMAs): only the watched VMA's part.
    let q = kind.map(None, 8);
    let hq = cache.get(at(q, 2), 4 * PAGE).unwrap();
    madvise(q, 8 * PAGE, libc::MADV_DONTNEED);
    assert!(!hq.is_valid());
    assert_eq!(
        log.take(),
        vec![ev(q, 2, 6, Event::Clear)],
        "{kind:?} madvise spanning watched and unwatched"
    );
    expected_removes += 1;
    // Unwatched memory: nothing.
    madvise(at(q, 6), 2 * PAGE, libc::MADV_DONTNEED);
    let s = fence(&cache);
    assert_eq!(log.take(), vec![s]);
    assert_eq!(m.stats().removes, expected_removes);
    unmap(p, 8 * PAGE);
    unmap(q, 8 * PAGE);
    assert!(!hs[0].is_valid()); // passes the gate
    assert_eq!(
        log.take(),
        vec![ev(p, 0, 8, Event::Unmap), ev(q, 0, 8, Event::Unmap)]
    );
    drop((hs, hq, cache));
    assert_eq!(
        counts.registered.load(SeqCst),
        counts.deregistered.load(SeqCst)
    );
}

#[test]
fn madvise_anon_private() {
    madvise_patterns("madvise_anon_private", Kind::AnonPrivate);
}

#[test]
fn madvise_anon_shared() {
    madvise_patterns("madvise_anon_shared", Kind::AnonShared);
}

#[test]
fn madvise_memfd() {
    madvise_patterns("madvise_memfd", Kind::Memfd);
}

#[test]
fn madvise_file_shared() {
    madvise_patterns("madvise_file_shared", Kind::FileShared);
}

#[test]
fn madvise_file_private() {
    madvise_patterns("madvise_file_private", Kind::FilePrivate);
}

/// mprotect is not reported by userfaultfd (a known limitation): nothing is invalidated,
/// even when it splits the VMA; a later munmap of the whole range is still one event.
#[test]
fn mprotect_produces_nothing() {
    let _g = shared();
    let Some(m) = monitor_or_skip("mprotect_produces_nothing") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    mprotect(p, 4 * PAGE, libc::PROT_READ);
    mprotect(at(p, 1), PAGE, libc::PROT_NONE);
    mprotect(p, 4 * PAGE, RW);
    let s = fence(&cache);
    assert_eq!(log.take(), vec![s]);
    assert!(
        h.is_valid(),
        "mprotect is invisible to userfaultfd; the entry stays valid"
    );
    // The application's remedy: invalidate by hand.
    cache.invalidate(p, 4 * PAGE).unwrap();
    assert!(!h.is_valid());
    assert_eq!(log.take(), vec![ev(p, 0, 4, Event::Clear)]);
    unmap(p, 4 * PAGE);
    assert!(!h.is_valid()); // passes the gate
    assert_eq!(log.take(), vec![ev(p, 0, 4, Event::Unmap)]);
    assert_eq!(m.stats().unmaps, 2);
}
