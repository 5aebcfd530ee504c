//! Unwatching: cleared at once, no events afterwards.

use super::*;

#[test]
fn unwatch_clears_at_once_and_stops_events() {
    let _g = shared();
    let Some(m) = monitor_or_skip("unwatch_clears_at_once_and_stops_events") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    m.unwatch(p, 4 * PAGE).unwrap();
    // On the calling thread, before unwatch returns: no gate needed.
    assert_eq!(log.take(), vec![ev(p, 0, 4, Event::Clear)]);
    assert!(!h.is_valid());
    // The cache entry's lease keeps its memory watched until the entry goes (so a change
    // made meanwhile cannot go unseen); once purged, nothing watches it.
    drop(h);
    assert_eq!(cache.purge_invalid(), 1);
    unmap(p, 4 * PAGE);
    let s = fence(&cache);
    assert_eq!(log.take(), vec![s]);
}
