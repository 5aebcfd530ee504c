//! The registration cache's lookups of libfabric's MR cache: `find` (a lookup that never
//! registers), a limit in bytes besides the entry count, and registration attributes as
//! part of the key; each alone and from several threads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use common::*;
use mmu_uffd::{CacheConfig, KeyedRegistrar, RegCache};

#[test]
fn find_never_registers_and_sees_what_get_cached() {
    let Some(m) = monitor_or_skip("find_never_registers") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    assert!(cache.find(p, 4 * PAGE).unwrap().is_none());
    assert_eq!(counts.registered.load(SeqCst), 0, "find registered");
    assert_eq!(cache.stats().not_found, 1);
    assert_eq!(cache.len(), 0);

    let h = cache.get(p, 2 * PAGE).unwrap();
    // SAFETY: inside the mapping.
    let inner = unsafe { p.add(PAGE + 5) };
    let f = cache
        .find(inner, 10)
        .unwrap()
        .expect("a covered sub-range is found");
    assert_eq!(*f, *h);
    // Not covered: pages 2-3 were never registered, and find does not register them.
    // SAFETY: inside the mapping.
    assert!(cache
        .find(unsafe { p.add(PAGE) }, 2 * PAGE)
        .unwrap()
        .is_none());
    assert_eq!(counts.registered.load(SeqCst), 1);
    let st = cache.stats();
    assert_eq!((st.hits, st.misses, st.not_found), (1, 1, 2));
    // Errors as for get.
    assert!(matches!(
        cache.find(p, 0),
        Err(mmu_uffd::Error::InvalidRange { .. })
    ));
    unmap(p, 4 * PAGE);
}

#[test]
fn find_never_returns_an_entry_made_stale() {
    let Some(m) = monitor_or_skip("find_never_returns_an_entry_made_stale") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    // Moved away (new memory over it), madvised, invalidated by hand: each time the entry
    // is found right before and not found right after the call returned.
    let p = anon(2);
    let changes: [(&str, &dyn Fn()); 3] = [
        ("mremap over", &|| replace_with(p, 2 * PAGE, 9)),
        ("madvise(DONTNEED)", &|| {
            madvise(p, PAGE, libc::MADV_DONTNEED)
        }),
        ("invalidate", &|| cache.invalidate(p, PAGE).unwrap()),
    ];
    for (what, change) in changes {
        drop(cache.get(p, 2 * PAGE).unwrap());
        assert!(cache.find(p, 2 * PAGE).unwrap().is_some(), "{what}: before");
        change();
        assert!(
            cache.find(p, 2 * PAGE).unwrap().is_none(),
            "{what}: found an entry made stale by a call that returned"
        );
    }
    drop(cache.get(p, 2 * PAGE).unwrap());
    unmap(p, 2 * PAGE);
    assert!(cache.find(p, 2 * PAGE).unwrap().is_none(), "munmap");
    assert_eq!(cache.len(), 0);
}

/// Owners recycle their own address (new memory with a fresh token moved over the old)
/// while racers keep registering the owners' addresses with `get`. After the owner's
/// replacement returned, its `find` must return nothing or a registration of the new
/// memory, never one of earlier memory; then `get` registers the new memory and a second
/// `find` must return exactly it.
#[test]
fn find_is_never_stale_under_concurrent_recycling() {
    let Some(m) = monitor_or_skip("find_is_never_stale_under_concurrent_recycling") else {
        return;
    };
    const OWNERS: usize = 3;
    const ROUNDS: u64 = 300;
    let cache = Arc::new(RegCache::with_fns(
        &m,
        CacheConfig::default().with_capacity(8),
        |p: *mut u8, _len: usize| {
            // The token of the memory registered (read through /proc/self/mem: a racer
            // may register memory that is being replaced under it).
            let mut token = [0u8; 8];
            let f = std::fs::File::open("/proc/self/mem")?;
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut token, p as u64)?;
            Ok::<u64, std::io::Error>(u64::from_ne_bytes(token))
        },
        |_t: u64| {},
    ));
    let addrs: Vec<usize> = (0..OWNERS).map(|_| anon(2) as usize).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicU64::new(0));
    let found_stale_free = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for r in 0..2 {
            let (cache, addrs, stop) = (&cache, &addrs, &stop);
            s.spawn(move || {
                let mut n = r;
                while !stop.load(SeqCst) {
                    let _ = cache.get(addrs[n % addrs.len()] as *const u8, PAGE);
                    n += 1;
                }
            });
        }
        let owners: Vec<_> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let (cache, stale, found) = (&cache, &stale, &found_stale_free);
                s.spawn(move || {
                    for round in 1..=ROUNDS {
                        let token = ((i as u64 + 1) << 32) | round;
                        replace_with(a as *mut u8, 2 * PAGE, token);
                        if let Some(h) = cache.find(a as *const u8, PAGE).expect("find") {
                            if *h != token {
                                stale.fetch_add(1, SeqCst);
                                eprintln!("owner {i} round {round}: found {:#x}", *h);
                            }
                        }
                        let g = cache.get(a as *const u8, PAGE).expect("get");
                        if let Some(h) = cache.find(a as *const u8, PAGE).expect("find") {
                            // Racers may have replaced the entry meanwhile, with the same
                            // memory: the same token.
                            if *h == token && *g == token {
                                found.fetch_add(1, SeqCst);
                            } else {
                                stale.fetch_add(1, SeqCst);
                            }
                        }
                    }
                })
            })
            .collect();
        for o in owners {
            o.join().unwrap();
        }
        stop.store(true, SeqCst);
    });
    assert_eq!(stale.load(SeqCst), 0, "find handed out stale registrations");
    let found = found_stale_free.load(SeqCst);
    assert!(
        found > OWNERS as u64 * ROUNDS / 2,
        "find found the entry just registered only {found} times"
    );
    for a in addrs {
        unmap(a as *mut u8, 2 * PAGE);
    }
}

#[test]
fn max_bytes_evicts_the_least_recently_used_until_a_range_fits() {
    let Some(m) = monitor_or_skip("max_bytes_evicts") else {
        return;
    };
    let max = 4 * PAGE as u64;
    let (cache, counts) = counting_cache(&m, CacheConfig::default().with_max_bytes(max));
    let (a, b, c) = (anon(2), anon(2), anon(1));
    drop(cache.get(a, 2 * PAGE).unwrap());
    let hb = cache.get(b, 2 * PAGE).unwrap(); // in use while evicted
    assert_eq!(cache.stats().bytes, max);
    drop(cache.get(a, PAGE).unwrap()); // a is now more recent than b
    drop(cache.get(c, PAGE).unwrap()); // 5 pages would not fit: evicts b
    let st = cache.stats();
    assert_eq!(
        (st.entries, st.bytes, st.evictions),
        (2, 3 * PAGE as u64, 1)
    );
    assert!(cache.find(b, PAGE).unwrap().is_none(), "b was evicted");
    assert!(cache.find(a, PAGE).unwrap().is_some(), "a was kept");
    // The evicted entry in use stays registered and valid until its handle drops.
    assert_eq!(counts.deregistered.load(SeqCst), 0);
    assert!(hb.is_valid());
    drop(hb);
    assert_eq!(counts.deregistered.load(SeqCst), 1);
    // The entry count limit still applies with a byte limit.
    let (both, _) = counting_cache(
        &m,
        CacheConfig::default()
            .with_capacity(1)
            .with_max_bytes(1 << 30),
    );
    drop(both.get(a, PAGE).unwrap());
    drop(both.get(c, PAGE).unwrap());
    assert_eq!(both.len(), 1);
    for (p, pages) in [(a, 2), (b, 2), (c, 1)] {
        unmap(p, pages * PAGE);
    }
}

/// A registrar with a byte budget (a device's pinning limit, RLIMIT_MEMLOCK) equal to
/// `max_bytes` never runs out because of the cache: it evicts before it registers.
#[test]
fn a_registrar_with_a_max_bytes_budget_never_runs_out() {
    let Some(m) = monitor_or_skip("a_registrar_with_a_max_bytes_budget") else {
        return;
    };
    const BUDGET: usize = 5 * PAGE;
    let pinned = Arc::new(AtomicUsize::new(0));
    let (p1, p2) = (pinned.clone(), pinned.clone());
    let cache = RegCache::with_fns(
        &m,
        CacheConfig::default().with_max_bytes(BUDGET as u64),
        move |_p: *mut u8, len: usize| {
            let now = p1.fetch_add(len, SeqCst) + len;
            if now > BUDGET {
                p1.fetch_sub(len, SeqCst);
                return Err(std::io::Error::other(format!("{now} bytes pinned")));
            }
            Ok(len)
        },
        move |len: usize| {
            p2.fetch_sub(len, SeqCst);
        },
    );
    let bufs: Vec<(*mut u8, usize)> = [1, 3, 2, 4, 1, 5, 2].map(|n| (anon(n), n)).to_vec();
    for round in 0..30 {
        let (p, pages) = bufs[(round * 3) % bufs.len()];
        drop(cache.get(p, pages * PAGE).expect("the registrar ran out"));
    }
    assert!(cache.stats().evictions > 0);
    drop(cache);
    assert_eq!(pinned.load(SeqCst), 0);
    for (p, pages) in bufs {
        unmap(p, pages * PAGE);
    }
}

#[test]
fn a_range_longer_than_max_bytes_is_registered_but_not_cached() {
    let Some(m) = monitor_or_skip("a_range_longer_than_max_bytes") else {
        return;
    };
    let (cache, counts) =
        counting_cache(&m, CacheConfig::default().with_max_bytes(2 * PAGE as u64));
    let small = anon(1);
    let big = anon(3);
    drop(cache.get(small, PAGE).unwrap());
    let h = cache.get(big, 3 * PAGE).unwrap();
    assert!(h.is_valid());
    assert_eq!(h.len(), 3 * PAGE);
    let st = cache.stats();
    assert_eq!((st.uncached, st.entries, st.evictions), (1, 1, 0));
    assert!(
        cache.find(small, PAGE).unwrap().is_some(),
        "an uncachable range evicted a cached one"
    );
    assert!(cache.find(big, PAGE).unwrap().is_none());
    // Still watched while the handle lives: an unmap invalidates it.
    unmap(big, 3 * PAGE);
    assert!(!h.is_valid());
    drop(h);
    assert_eq!(counts.deregistered.load(SeqCst), 1, "deregistered on drop");
    // A merge whose union would be too long registers the request alone.
    let p = anon(3);
    drop(cache.get(p, 2 * PAGE).unwrap());
    // SAFETY: inside the mapping.
    let q = cache.get(unsafe { p.add(2 * PAGE) }, PAGE).unwrap();
    assert_eq!(q.len(), PAGE, "merged past max_bytes");
    assert_eq!(cache.stats().uncached, 1);
    unmap(small, PAGE);
    unmap(p, 3 * PAGE);
}

#[test]
fn max_bytes_holds_with_several_threads() {
    let Some(m) = monitor_or_skip("max_bytes_holds_with_several_threads") else {
        return;
    };
    let max = 6 * PAGE as u64;
    let (cache, counts) = counting_cache(&m, CacheConfig::default().with_max_bytes(max));
    let bufs: Vec<(usize, usize)> = (1..=5).map(|n| (anon(n) as usize, n)).collect();
    let over = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (cache, bufs, over) = (&cache, &bufs, &over);
            s.spawn(move || {
                for i in 0..1500 {
                    let (p, pages) = bufs[(i * 7 + t * 3) % bufs.len()];
                    let h = cache.get(p as *const u8, pages * PAGE).unwrap();
                    assert!(h.len() >= pages * PAGE);
                    if cache.stats().bytes > max {
                        over.fetch_add(1, SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(over.load(SeqCst), 0, "the cached bytes went over max_bytes");
    let st = cache.stats();
    assert!(
        st.evictions > 0,
        "no eviction: the test did not fill the cache"
    );
    assert!(st.bytes <= max);
    drop(cache);
    assert_eq!(
        counts.registered.load(SeqCst),
        counts.deregistered.load(SeqCst)
    );
    for (p, pages) in bufs {
        unmap(p as *mut u8, pages * PAGE);
    }
}

/// Access flags and a device, as libfabric keys its MR cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Attrs {
    access: u32,
    device: u8,
}

const READ: u32 = 1;
const WRITE: u32 = 2;

/// Registrations carry their attributes and a serial number; deregistrations are checked
/// to come with the attributes of the registration.
#[derive(Default)]
struct Nic {
    serial: AtomicUsize,
    deregistered: AtomicUsize,
    mismatched: AtomicUsize,
}

impl KeyedRegistrar<Attrs> for Arc<Nic> {
    type Registration = (Attrs, usize);
    type Error = std::io::Error;
    fn register_with(
        &self,
        a: &Attrs,
        _p: *mut u8,
        _len: usize,
    ) -> std::io::Result<(Attrs, usize)> {
        Ok((*a, self.serial.fetch_add(1, SeqCst)))
    }
    fn deregister_with(&self, a: &Attrs, r: (Attrs, usize)) {
        if *a != r.0 {
            self.mismatched.fetch_add(1, SeqCst);
        }
        self.deregistered.fetch_add(1, SeqCst);
    }
}

#[test]
fn attributes_are_part_of_the_key() {
    let Some(m) = monitor_or_skip("attributes_are_part_of_the_key") else {
        return;
    };
    let nic = Arc::new(Nic::default());
    let cache = RegCache::keyed(&m, CacheConfig::default(), nic.clone());
    let p = anon(8);
    let ro = Attrs {
        access: READ,
        device: 0,
    };
    let rw = Attrs {
        access: READ | WRITE,
        device: 0,
    };
    let other_dev = Attrs {
        access: READ,
        device: 1,
    };
    let a = cache.get_with(&ro, p, 4 * PAGE).unwrap();
    let b = cache.get_with(&rw, p, 4 * PAGE).unwrap();
    assert_ne!(a.1, b.1, "one range, two attributes: two registrations");
    assert_eq!((a.0, b.0), (ro, rw));
    assert_eq!((*a.attrs(), *b.attrs()), (ro, rw));
    assert_eq!(cache.len(), 2);
    // Each is a hit under its own attributes, none under a third.
    assert_eq!(cache.get_with(&ro, p, PAGE).unwrap().1, a.1);
    assert_eq!(cache.find_with(&rw, p, PAGE).unwrap().unwrap().1, b.1);
    assert!(cache.find_with(&other_dev, p, PAGE).unwrap().is_none());
    // Overlap and merging stay within one key: [2, 6) of rw merges with rw's [0, 4) only.
    // SAFETY: inside the mapping.
    let q = unsafe { p.add(2 * PAGE) };
    let c = cache.get_with(&rw, q, 4 * PAGE).unwrap();
    assert_eq!((c.start(), c.len()), (p, 6 * PAGE));
    assert_eq!(cache.find_with(&ro, p, 4 * PAGE).unwrap().unwrap().1, a.1);
    let d = cache.get_with(&other_dev, q, 4 * PAGE).unwrap();
    assert_eq!((d.start(), d.len()), (q, 4 * PAGE), "merged across keys");
    assert_eq!(cache.len(), 3);
    // An unmap concerns the memory: every key's entry goes invalid.
    unmap(p, 8 * PAGE);
    assert!(![&a, &b, &c, &d].iter().any(|h| h.is_valid()));
    assert_eq!(cache.len(), 0);
    drop((a, b, c, d));
    drop(cache);
    assert_eq!(nic.deregistered.load(SeqCst), nic.serial.load(SeqCst));
    assert_eq!(
        nic.mismatched.load(SeqCst),
        0,
        "deregistered with other attributes"
    );
}

#[test]
fn many_keys_on_one_range() {
    let Some(m) = monitor_or_skip("many_keys_on_one_range") else {
        return;
    };
    let nic = Arc::new(Nic::default());
    let cache = RegCache::keyed(&m, CacheConfig::default(), nic.clone());
    let p = anon(2);
    // More devices than the index compares one by one (it then hashes the key).
    let keys: Vec<Attrs> = (0..20)
        .map(|d| Attrs {
            access: READ,
            device: d,
        })
        .collect();
    let first: Vec<usize> = keys
        .iter()
        .map(|k| cache.get_with(k, p, 2 * PAGE).unwrap().1)
        .collect();
    assert_eq!(cache.len(), 20);
    for (k, serial) in keys.iter().zip(&first) {
        let h = cache.find_with(k, p, PAGE).unwrap().expect("cached");
        assert_eq!((h.0, h.1), (*k, *serial));
    }
    // Half the keys leave (cleared entries are evicted one by one under a small capacity
    // elsewhere; here invalidate the memory and look again).
    madvise(p, PAGE, libc::MADV_DONTNEED);
    for k in &keys {
        assert!(cache.find_with(k, p, PAGE).unwrap().is_none());
    }
    let again: Vec<usize> = keys
        .iter()
        .map(|k| cache.get_with(k, p, 2 * PAGE).unwrap().1)
        .collect();
    assert!(
        again.iter().zip(&first).all(|(x, y)| x != y),
        "new registrations"
    );
    assert_eq!(cache.len(), 20);
    unmap(p, 2 * PAGE);
    assert_eq!(cache.len(), 0);
    drop(cache);
    assert_eq!(nic.deregistered.load(SeqCst), 40);
    assert_eq!(nic.mismatched.load(SeqCst), 0);
}

#[test]
fn keyed_lookups_from_several_threads_get_their_own_attributes() {
    let Some(m) = monitor_or_skip("keyed_lookups_from_several_threads") else {
        return;
    };
    let nic = Arc::new(Nic::default());
    let cache = RegCache::keyed(&m, CacheConfig::default().with_capacity(12), nic.clone());
    let bufs: Vec<usize> = (0..4).map(|_| anon(2) as usize).collect();
    let wrong = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let (cache, bufs, wrong) = (&cache, &bufs, &wrong);
            s.spawn(move || {
                for i in 0..400usize {
                    let attrs = Attrs {
                        access: if i % 2 == 0 { READ } else { READ | WRITE },
                        device: t % 2,
                    };
                    let p = bufs[(i + t as usize) % bufs.len()] as *const u8;
                    let h = if i % 3 == 0 {
                        match cache.find_with(&attrs, p, PAGE).unwrap() {
                            Some(h) => h,
                            None => continue,
                        }
                    } else {
                        cache.get_with(&attrs, p, 2 * PAGE).unwrap()
                    };
                    if h.0 != attrs || *h.attrs() != attrs || !std::ptr::eq(h.start(), p) {
                        wrong.fetch_add(1, SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(
        wrong.load(SeqCst),
        0,
        "a handle of other attributes or memory"
    );
    let st = cache.stats();
    assert!(st.hits > 0 && st.entries <= 12, "{st:?}");
    drop(cache);
    assert_eq!(nic.deregistered.load(SeqCst), nic.serial.load(SeqCst));
    assert_eq!(nic.mismatched.load(SeqCst), 0);
    for p in bufs {
        unmap(p as *mut u8, 2 * PAGE);
    }
}
