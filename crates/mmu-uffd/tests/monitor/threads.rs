//! Many threads unmapping, remapping and reusing each other's addresses.

use super::*;

/// A thread's own stretch of address space: slots of 4 pages, each held by an
/// inaccessible placeholder of this thread while not in use. Memory is only ever mapped
/// with `MAP_FIXED` over the thread's own placeholder, and a slot freed by an unmap is
/// claimed back at once (`MAP_FIXED_NOREPLACE`; if something else took it meanwhile, the
/// slot is given up). So no two threads ever reuse each other's addresses: the kernel
/// reports an unmap only after the address is free again, and a thread that reused it
/// in that window could be handed the old registration (see
/// `threads_reusing_each_others_addresses_get_no_stale_handle`).
struct Slots {
    free: std::collections::VecDeque<usize>,
}

const SLOT: usize = 4 * PAGE;

impl Slots {
    fn new(count: usize) -> Slots {
        let base = reserve(count * 4) as usize;
        Slots {
            free: (0..count).map(|i| base + i * SLOT).collect(),
        }
    }

    /// A slot holding this thread's placeholder.
    fn take(&mut self) -> *mut u8 {
        self.free
            .pop_front()
            .expect("every slot was taken by someone else") as *mut u8
    }

    /// Claims a slot back after its memory was unmapped (or puts a placeholder over a slot
    /// still mapped by this thread, unwatched).
    fn give_back(&mut self, slot: *mut u8, still_mapped: bool) {
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | if still_mapped {
                libc::MAP_FIXED
            } else {
                libc::MAP_FIXED_NOREPLACE
            };
        // SAFETY: maps an inaccessible placeholder at a slot of this thread: over memory
        // of its own (MAP_FIXED), or where nothing is mapped (MAP_FIXED_NOREPLACE fails
        // instead of replacing anything).
        let r = unsafe { libc::mmap(slot.cast(), SLOT, libc::PROT_NONE, flags, -1, 0) };
        if r == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "placeholder: {e}");
            // Someone else (another test's mmap) mapped there: not ours any more. Reserve
            // a fresh slot instead, so the pool never runs dry however often that happens.
            self.free.push_back(reserve(4) as usize);
            return;
        }
        assert_eq!(r.cast(), slot);
        self.free.push_back(slot as usize);
    }

    /// Memory (read-write, touched) at a slot, over this thread's placeholder: unwatched,
    /// so no event.
    fn map(&mut self) -> *mut u8 {
        let slot = self.take();
        Kind::AnonPrivate.map(Some(slot), 4)
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        for &slot in &self.free {
            unmap(slot as *mut u8, SLOT);
        }
    }
}

fn rec_key(r: &Rec) -> (u64, u64, u8) {
    (
        r.0,
        r.1,
        Event::ALL.iter().position(|e| *e == r.2).unwrap() as u8,
    )
}

/// Four threads unmap, move and map over their own watched memory at once, many rounds:
/// each invalidation is visible to its thread as soon as the call returns (through the
/// gate), the recorder sees exactly the expected multiset of events, the counters agree,
/// nothing hangs, every registration is released.
#[test]
fn threads_unmap_and_remap_concurrently() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 200;
    let _g = shared();
    let Some(m) = monitor_or_skip("threads_unmap_and_remap_concurrently") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let _dog = Watchdog::new(
        "threads_unmap_and_remap_concurrently",
        Duration::from_secs(60),
    );
    let started = Instant::now();
    let (mut expected, moves): (Vec<Rec>, u64) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let cache = &cache;
                s.spawn(move || {
                    let mut slots = Slots::new(8);
                    let mut expect = Vec::new();
                    let mut moves = 0;
                    for round in 0..ROUNDS {
                        let p = slots.map();
                        let h = cache.get(p, 4 * PAGE).unwrap();
                        assert_eq!((h.start(), h.len()), (p, 4 * PAGE));
                        assert!(h.is_valid());
                        match (round + t) % 4 {
                            0 => {
                                unmap(p, 4 * PAGE);
                                assert!(!h.is_valid());
                                expect.push(ev(p, 0, 4, Event::Unmap));
                                slots.give_back(p, false);
                            }
                            1 => {
                                unmap(at(p, 1), PAGE);
                                assert!(!h.is_valid());
                                unmap(p, PAGE);
                                unmap(at(p, 2), 2 * PAGE);
                                assert!(!h.is_valid());
                                expect.extend([
                                    ev(p, 1, 2, Event::Unmap),
                                    ev(p, 0, 1, Event::Unmap),
                                    ev(p, 2, 4, Event::Unmap),
                                ]);
                                slots.give_back(p, false);
                            }
                            2 => {
                                let dst = slots.take();
                                let q = mremap(
                                    p,
                                    4 * PAGE,
                                    4 * PAGE,
                                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                                    dst,
                                )
                                .unwrap();
                                assert_eq!(q, dst);
                                assert!(!h.is_valid());
                                // REMAP and UNMAP of the old range.
                                expect.extend([ev(p, 0, 4, Event::Unmap); 2]);
                                moves += 1;
                                slots.give_back(p, false);
                                let hq = cache.get(q, 4 * PAGE).unwrap();
                                assert_eq!((hq.start(), hq.len()), (q, 4 * PAGE));
                                assert!(hq.is_valid());
                                unmap(q, 4 * PAGE);
                                assert!(!hq.is_valid());
                                expect.push(ev(q, 0, 4, Event::Unmap));
                                slots.give_back(q, false);
                            }
                            _ => {
                                let q = Kind::AnonPrivate.map(Some(p), 4);
                                assert_eq!(q, p);
                                assert!(!h.is_valid());
                                expect.push(ev(p, 0, 4, Event::Unmap));
                                // The new memory is not watched: no event.
                                slots.give_back(p, true);
                            }
                        }
                    }
                    (expect, moves)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).fold(
            (Vec::new(), 0),
            |(mut all, n), (e, k)| {
                all.extend(e);
                (all, n + k)
            },
        )
    });
    let elapsed = started.elapsed();
    let s = fence(&cache);
    expected.push(s);
    let mut seen = log.take();
    expected.sort_by_key(rec_key);
    seen.sort_by_key(rec_key);
    assert_eq!(seen.len(), expected.len());
    assert_eq!(seen, expected);
    let st = m.stats();
    assert_eq!(moves, (THREADS * ROUNDS / 4) as u64);
    assert_eq!(st.remaps, moves, "{st:?}");
    assert_eq!(st.unmaps + st.remaps, expected.len() as u64, "{st:?}");
    assert_eq!(st.invalidations, expected.len() as u64, "{st:?}");
    assert_eq!((st.unexpected_faults, st.unknown), (0, 0));
    assert!(m.state() == MonitorState::Running);
    drop(cache);
    assert_eq!(
        counts.registered.load(SeqCst),
        counts.deregistered.load(SeqCst)
    );
    eprintln!(
        "{} events from {THREADS} threads x {ROUNDS} rounds in {elapsed:?}; {} batches",
        expected.len(),
        st.batches
    );
}

/// Threads that reuse each other's addresses. The kernel frees an unmapped range, drops
/// the mmap lock, and only then queues the UNMAP event; a thread that maps new memory there
/// meanwhile could look up the old entry (a stale hit: its memory is then not even
/// registered, so its own unmap or madvise is not reported either). Here four threads as in
/// `threads_unmap_and_remap_concurrently`, but with the kernel choosing the addresses (it
/// hands a just-freed range straight back): 2311 stale handles in 4000 rounds in one run on
/// the 2-CPU test machine before the cache's reuse check (`CacheConfig::reuse_check`, on
/// by default) existed. The check probes the kernel's count of events in flight before
/// every lookup and waits while it is raised; `tests/reuse.rs` holds it to account with
/// tokens in the memory, and shows the stale hits with the check off.
#[test]
fn threads_reusing_each_others_addresses_get_no_stale_handle() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 1000;
    let _g = shared();
    let Some(m) = monitor_or_skip("threads_reusing_each_others_addresses_get_no_stale_handle")
    else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let _dog = Watchdog::new(
        "threads_reusing_each_others_addresses_get_no_stale_handle",
        Duration::from_secs(60),
    );
    let stale = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (cache, stale) = (&cache, &stale);
            s.spawn(move || {
                let check = |fresh_ok: bool| {
                    if !fresh_ok {
                        stale.fetch_add(1, SeqCst);
                    }
                };
                for round in 0..ROUNDS {
                    let p = anon(4);
                    let h = cache.get(p, 4 * PAGE).unwrap();
                    // (A fresh handle may already be invalid: a late event of the address's
                    // previous owner. That costs a miss, it is not stale.)
                    check((h.start(), h.len()) == (p, 4 * PAGE));
                    match (round + t) % 4 {
                        0 => unmap(p, 4 * PAGE),
                        1 => {
                            unmap(at(p, 1), PAGE);
                            unmap(p, PAGE);
                            unmap(at(p, 2), 2 * PAGE);
                        }
                        2 => {
                            madvise(p, PAGE, libc::MADV_DONTNEED);
                            check(!h.is_valid());
                            unmap(p, 4 * PAGE);
                        }
                        _ => {
                            let dst = reserve(4);
                            let q = mremap(
                                p,
                                4 * PAGE,
                                4 * PAGE,
                                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                                dst,
                            )
                            .unwrap();
                            check(!h.is_valid());
                            let hq = cache.get(q, 4 * PAGE).unwrap();
                            unmap(q, 4 * PAGE);
                            check(!hq.is_valid());
                            continue;
                        }
                    }
                    check(!h.is_valid());
                }
            });
        }
    });
    let stale = stale.load(SeqCst);
    eprintln!("stale handles: {stale} in {} rounds", THREADS * ROUNDS);
    assert_eq!(
        stale, 0,
        "stale handles after the owner's own unmap/madvise returned"
    );
}
