mod common;
use common::*;
use mmu_uffd::CacheConfig;

#[test]
fn munmap_invalidates() {
    let Some(m) = monitor_or_skip("munmap_invalidates") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    let a = cache.get(p, 4 * PAGE).unwrap();
    let b = cache.get(p, PAGE).unwrap();
    assert_eq!(*a, *b);
    assert!(a.is_valid());
    unmap(p, 4 * PAGE);
    assert!(!a.is_valid());
    eprintln!(
        "{:?} {:?} {:?}",
        m.stats(),
        cache.stats(),
        counts.registered
    );
}
