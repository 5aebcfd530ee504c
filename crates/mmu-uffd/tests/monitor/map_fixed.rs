//! `MAP_FIXED` mappings over watched memory.

use super::*;

#[test]
fn map_fixed_over_watched_memory() {
    let _g = shared();
    let Some(m) = monitor_or_skip("map_fixed_over_watched_memory") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    let q = Kind::AnonPrivate.map(Some(p), 4);
    assert_eq!(q, p);
    assert!(!h.is_valid());
    assert_eq!(log.take(), vec![ev(p, 0, 4, Event::Unmap)]);
    // The new memory is not watched: its unmap produces nothing...
    unmap(p, PAGE);
    let s = fence(&cache);
    assert_eq!(
        log.take(),
        vec![s],
        "new memory at a watched address was watched"
    );
    // ...until watch() is called for it: that needs a new registration.
    let regs = m.stats().watch_registrations;
    m.watch(at(p, 1), 3 * PAGE).unwrap();
    assert_eq!(m.stats().watch_registrations, regs + 1);
    unmap(at(p, 1), PAGE);
    let s = fence(&cache);
    assert_eq!(log.take(), vec![ev(p, 1, 2, Event::Unmap), s]);

    // MAP_FIXED over the middle of watched memory: Unmap of exactly the new mapping.
    let h2 = cache.get(at(p, 2), 2 * PAGE).unwrap();
    let r = anon(6);
    let hr = cache.get(r, 6 * PAGE).unwrap();
    let mid = Kind::Memfd.map(Some(at(r, 2)), 2);
    assert_eq!(mid, at(r, 2));
    assert!(!hr.is_valid());
    assert!(h2.is_valid());
    assert_eq!(log.take(), vec![ev(r, 2, 4, Event::Unmap)]);
    unmap(at(p, 2), 2 * PAGE);
    unmap(r, 6 * PAGE);
    assert!(!h2.is_valid());
    assert_eq!(
        log.take(),
        vec![ev(p, 2, 4, Event::Unmap), ev(r, 0, 6, Event::Unmap)]
    );
}
