//! The XPMEM exporter and the ODP region over the simulated primary, with the coherence
//! checker attached: every test ends with zero violations.

use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmu_secondary::odp::OdpRegion;
use mmu_secondary::xpmem::Xpmem;
use mmu_secondary::{SecondaryError, SecondaryMmu};
use mmu_sim::{
    AddressSpace, Advice, CheckedSecondary, Checker, FrameAllocator, MapKind, Prot, SimError,
    MMAP_MIN_ADDR, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;
/// A fixed, 16-page-aligned base address, so the ODP chunk boundaries are known.
const BASE: u64 = 0x100000;
/// How long anything that must finish may take before the test fails.
const LIMIT: Duration = Duration::from_secs(2);

fn setup(frames: u32) -> (Arc<AddressSpace>, Arc<Checker>) {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(frames)));
    let checker = Checker::new(0x5eed);
    mm.attach_checker(checker.clone())
        .expect("fresh address space");
    (mm, checker)
}

fn map_fixed(mm: &AddressSpace, addr: u64, pages: u64) {
    let got = mm
        .mmap(
            pages * P,
            Prot::READ_WRITE,
            MapKind::AnonPrivate,
            Some(addr),
        )
        .expect("mmap fixed");
    assert_eq!(got, addr);
}

#[track_caller]
fn assert_coherent(checker: &Checker) {
    let v = checker.violations();
    assert!(
        checker.violation_count() == 0,
        "{} violations, first: {:#?}",
        checker.violation_count(),
        v.first().map(ToString::to_string)
    );
    assert!(checker.checks() > 0, "the checker saw nothing");
}

/// Runs `f` on another thread; fails the test if it has not finished within `LIMIT`.
#[track_caller]
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => panic!("{what} did not finish within {LIMIT:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// A small deterministic generator.
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

// ----- XPMEM ------------------------------------------------------------------------------

/// Waits until the exporter's fault server has finished the grants it has sent. It sends a
/// grant with the export's user lock held and lets go just after, so right after an access
/// returns the lock may still be held, and a non-blockable invalidation's try-lock of it
/// then fails in the library (`WouldBlock` without reaching the export's callback, so not
/// counted). A request for an address outside every export is refused by the same server
/// after it has finished everything before.
fn quiesce(x: &Xpmem) {
    assert_eq!(
        x.access(MMAP_MIN_ADDR, None),
        Err(SecondaryError::OutOfRange(MMAP_MIN_ADDR))
    );
}

#[test]
fn xpmem_consumer_maps_reads_and_writes_exported_pages() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 8);
    for i in 0..8 {
        mm.write(BASE + i * P, 100 + i).unwrap();
    }
    let x = Xpmem::new(&mm).unwrap();
    let id = x.export(BASE, 8 * P).unwrap();
    assert_eq!(x.exports(), vec![(id, BASE, BASE + 8 * P)]);
    for i in 0..8 {
        assert_eq!(x.access(BASE + i * P + 8, None).unwrap(), 100 + i);
    }
    // A write needs a writable grant: the consumer asks again.
    assert_eq!(x.access(BASE, Some(55)).unwrap(), 55);
    assert_eq!(
        mm.read(BASE).unwrap(),
        55,
        "the primary sees the consumer's write"
    );
    assert_eq!(x.remote_pages().len(), 8);
    let s = x.stats();
    assert_eq!(s.fills, 9, "8 read grants and 1 write grant");
    assert_eq!(s.accesses, 9);
    assert_eq!(s.would_blocks, 0);

    // Caller errors, no panics.
    assert_eq!(
        x.access(BASE + 8 * P, None),
        Err(SecondaryError::OutOfRange(BASE + 8 * P))
    );
    assert_eq!(x.export(BASE, 0), Err(SecondaryError::OutOfRange(BASE)));
    assert_eq!(
        x.export(u64::MAX - 10, 100),
        Err(SecondaryError::OutOfRange(u64::MAX - 10))
    );
    assert_coherent(&checker);
}

#[test]
fn xpmem_munmap_waits_until_the_consumer_acknowledges() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 4);
    let x = Xpmem::new(&mm).unwrap();
    x.export(BASE, 4 * P).unwrap();
    for i in 0..4 {
        x.access(BASE + i * P, Some(i)).unwrap();
    }
    assert_eq!(x.remote_pages().len(), 4);

    // A slow remote node: the drop order waits in its queue.
    let pause = x.pause_consumer().unwrap();
    let (done_tx, done) = channel();
    let mm2 = mm.clone();
    let unmapper = std::thread::spawn(move || {
        mm2.munmap(BASE, 4 * P).unwrap();
        done_tx.send(Instant::now()).unwrap();
    });
    assert_eq!(
        done.recv_timeout(Duration::from_millis(150)),
        Err(RecvTimeoutError::Timeout),
        "munmap returned while the consumer still held the pages"
    );
    // invalidate_range_start has not returned: the primary has changed nothing yet, and
    // the consumer still holds everything.
    assert!((0..4).all(|i| mm.pte(BASE + i * P).present()));
    assert_eq!(x.remote_pages().len(), 4);

    let resumed = Instant::now();
    drop(pause);
    let finished = done
        .recv_timeout(LIMIT)
        .expect("munmap finishes once acknowledged");
    assert!(finished >= resumed);
    unmapper.join().unwrap();
    assert!(x.remote_pages().is_empty());
    assert!((0..4).all(|i| !mm.pte(BASE + i * P).present()));
    assert_eq!(
        x.access(BASE, None),
        Err(SecondaryError::Primary(SimError::Fault(BASE)))
    );
    let s = x.stats();
    assert!(s.invalidations >= 1);
    assert_eq!(s.would_blocks, 0);
    // The window opened after the consumer had dropped everything: no stale translation.
    assert_coherent(&checker);
}

#[test]
fn xpmem_mprotect_migrate_and_madvise_drop_remote_pages_first() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 4);
    let x = Xpmem::new(&mm).unwrap();
    x.export(BASE, 4 * P).unwrap();
    for i in 0..4 {
        x.access(BASE + i * P, Some(10 + i)).unwrap();
    }

    // mprotect read-only: the consumer drops everything; reads come back, writes are
    // refused by the primary.
    mm.mprotect(BASE, 4 * P, Prot::READ).unwrap();
    assert!(x.remote_pages().is_empty());
    assert_eq!(x.access(BASE, None).unwrap(), 10);
    assert_eq!(
        x.access(BASE, Some(1)),
        Err(SecondaryError::Primary(SimError::Permission(BASE)))
    );
    mm.mprotect(BASE, 4 * P, Prot::READ_WRITE).unwrap();
    assert!(x.remote_pages().is_empty());
    assert_eq!(x.access(BASE, Some(20)).unwrap(), 20);

    // Migration: dropped, then refaulted to the new frame with the data.
    x.access(BASE + P, None).unwrap();
    let new = mm.migrate(BASE + P).unwrap();
    assert!(!x.remote_pages().contains(&(BASE + P)));
    assert_eq!(x.access(BASE + P, None).unwrap(), 11);
    let held = x.translations_in(BASE + P, BASE + 2 * P);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].1.pfn, new.pfn);

    // MADV_DONTNEED: dropped; the page reads back as zero.
    x.access(BASE + 2 * P, None).unwrap();
    mm.madvise(BASE + 2 * P, P, Advice::DontNeed).unwrap();
    assert!(!x.remote_pages().contains(&(BASE + 2 * P)));
    assert_eq!(x.access(BASE + 2 * P, None).unwrap(), 0);
    assert_eq!(x.stats().would_blocks, 0);
    assert_coherent(&checker);
}

#[test]
fn xpmem_oom_reaper_skips_the_exported_vma_until_the_consumer_lets_go() {
    let (mm, checker) = setup(64);
    let a = BASE;
    let g = BASE + 4 * P; // a read-only page between, so the mappings do not merge
    let b = BASE + 5 * P;
    map_fixed(&mm, a, 4);
    mm.mmap(P, Prot::READ, MapKind::AnonPrivate, Some(g))
        .unwrap();
    map_fixed(&mm, b, 4);
    for i in 0..4 {
        mm.write(a + i * P, 1 + i).unwrap();
        mm.write(b + i * P, 11 + i).unwrap();
    }
    let x = Xpmem::new(&mm).unwrap();
    x.export(a, 4 * P).unwrap();
    x.export(b, 4 * P).unwrap(); // exported, but nothing mapped remotely
    x.access(a, None).unwrap();
    x.access(a + P, None).unwrap();
    quiesce(&x);

    // Pass 1: `a` would need a round trip to the consumer: WouldBlock, skipped; `g` and
    // `b` are reaped.
    let r1 = mm.oom_reap();
    assert_eq!((r1.reaped, r1.skipped, r1.lock_contended), (2, 1, false));
    assert_eq!(x.stats().would_blocks, 1);
    assert!((0..4).all(|i| !mm.pte(b + i * P).present()), "b was reaped");
    assert!(
        (0..4).all(|i| mm.pte(a + i * P).present()),
        "a was left alone"
    );
    assert_eq!(x.remote_pages(), vec![a, a + P]);
    assert_eq!(
        x.access(a + P, None).unwrap(),
        2,
        "the consumer still reads its page"
    );

    // Pass 2: exactly the same answer while the consumer holds the pages.
    let r2 = mm.oom_reap();
    assert_eq!((r2.reaped, r2.skipped), (2, 1));
    assert_eq!(x.stats().would_blocks, 2);

    // The consumer lets go; the exporter forgets the pages before detach returns.
    assert_eq!(x.detach(a, a + 4 * P).unwrap(), 2);
    assert!(x.remote_pages().is_empty());
    let r3 = mm.oom_reap();
    assert!(r3.is_complete());
    assert_eq!((r3.reaped, r3.skipped), (3, 0));
    assert_eq!(x.stats().would_blocks, 2);
    assert!(
        (0..4).all(|i| !mm.pte(a + i * P).present()),
        "a is reaped now"
    );

    // The retry loop: the consumer maps again, lets go 60 ms later; the reaper, retrying
    // every 10 ms, completes once it has.
    x.access(a, None).unwrap();
    quiesce(&x);
    let x2 = x.clone();
    let detacher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(60));
        x2.detach(a, a + 4 * P).unwrap()
    });
    let before = x.stats().would_blocks;
    let last = mm.oom_reap_with_retries(100, Duration::from_millis(10));
    assert!(last.is_complete(), "{last:?}");
    assert_eq!(detacher.join().unwrap(), 1);
    let refused = x.stats().would_blocks - before;
    assert!(
        (1..100).contains(&refused),
        "one WouldBlock per pass until the detach: {refused}"
    );
    assert_coherent(&checker);
}

#[test]
fn xpmem_detach_racing_a_regrant_keeps_the_exporter_informed() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 4);
    mm.write(BASE, 9).unwrap();
    let x = Xpmem::new(&mm).unwrap();
    x.export(BASE, 4 * P).unwrap();
    x.access(BASE, None).unwrap(); // a read-only grant

    // Queue, behind a pause: a write (needs a new, writable grant), then a detach. The
    // consumer asks for the write grant, then detaches the old read-only translation and
    // tells the exporter, before the new grant arrives and is installed.
    let pause = x.pause_consumer().unwrap();
    let writer = {
        let x = x.clone();
        std::thread::spawn(move || x.access(BASE, Some(10)))
    };
    std::thread::sleep(Duration::from_millis(30));
    let detacher = {
        let x = x.clone();
        std::thread::spawn(move || x.detach(BASE, BASE + P))
    };
    std::thread::sleep(Duration::from_millis(30));
    drop(pause);
    assert_eq!(writer.join().unwrap(), Ok(10));
    assert_eq!(detacher.join().unwrap(), Ok(1));
    assert_eq!(x.remote_pages(), vec![BASE], "the new grant was installed");
    quiesce(&x);

    // The release of the old grant must not make the exporter forget the new one: the
    // reaper still has to wait for the consumer.
    let r = mm.oom_reap();
    assert_eq!((r.reaped, r.skipped), (0, 1));
    assert_eq!(x.stats().would_blocks, 1);
    mm.munmap(BASE, 4 * P).unwrap();
    assert!(x.remote_pages().is_empty());
    assert_coherent(&checker);
}

#[test]
fn xpmem_shutdown_while_idle_does_not_hang() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 4);
    // No export at all.
    let x = Xpmem::new(&mm).unwrap();
    within("dropping an idle exporter", move || drop(x));
    // Exports and remote pages.
    let x = Xpmem::new(&mm).unwrap();
    x.export(BASE, 2 * P).unwrap();
    x.export(BASE + 2 * P, 2 * P).unwrap();
    x.access(BASE, Some(3)).unwrap();
    x.access(BASE + 3 * P, None).unwrap();
    assert_eq!(mm.notifier().stats().interval_subscriptions, 2);
    within("dropping an exporter with remote pages", move || drop(x));
    assert_eq!(mm.notifier().stats().interval_subscriptions, 0);
    // The primary goes on without it.
    mm.munmap(BASE, 4 * P).unwrap();
    assert_coherent(&checker);
}

#[test]
fn xpmem_shutdown_while_an_invalidation_waits_for_the_ack_does_not_hang() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 4);
    let x = Xpmem::new(&mm).unwrap();
    x.export(BASE, 4 * P).unwrap();
    x.access(BASE, Some(1)).unwrap();
    x.access(BASE + P, Some(2)).unwrap();

    let pause = x.pause_consumer().unwrap();
    let (done_tx, done) = channel();
    let mm2 = mm.clone();
    std::thread::spawn(move || {
        mm2.munmap(BASE, 4 * P).unwrap();
        let _ = done_tx.send(());
    });
    assert_eq!(
        done.recv_timeout(Duration::from_millis(100)),
        Err(RecvTimeoutError::Timeout),
        "munmap should be waiting for the paused consumer"
    );
    // Shut down with the consumer paused and the drop order still queued: the stop flag
    // ends the pause, the consumer clears its table and exits, the waiting invalidation
    // finds the channel closed and returns.
    within("dropping the exporter mid-invalidation", move || drop(x));
    done.recv_timeout(LIMIT)
        .expect("the munmap in flight finishes after the shutdown");
    drop(pause);
    assert_eq!(mm.notifier().stats().interval_subscriptions, 0);
    assert!(!mm.pte(BASE).present());
    assert_coherent(&checker);
}

#[test]
fn xpmem_unexport_and_exit() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 4);
    let x = Xpmem::new(&mm).unwrap();
    let id = x.export(BASE, 2 * P).unwrap();
    x.export(BASE + 2 * P, 2 * P).unwrap();
    x.access(BASE, None).unwrap();
    x.access(BASE + P, Some(4)).unwrap();
    x.access(BASE + 2 * P, Some(5)).unwrap();
    assert!(x.unexport(id));
    assert!(!x.unexport(id));
    assert_eq!(x.remote_pages(), vec![BASE + 2 * P]);
    assert_eq!(x.access(BASE, None), Err(SecondaryError::OutOfRange(BASE)));
    assert_eq!(mm.notifier().stats().interval_subscriptions, 1);

    // Process exit: the Release invalidation drops the rest; nothing can be exported.
    mm.exit();
    assert!(x.remote_pages().is_empty());
    assert!(x.access(BASE + 2 * P, None).is_err());
    assert_eq!(x.export(BASE, P), Err(SecondaryError::Gone));
    assert_coherent(&checker);
}

#[test]
fn xpmem_concurrent_consumer_vs_munmap_mprotect_migrate() {
    let (mm, checker) = setup(256);
    const N: u64 = 16;
    map_fixed(&mm, BASE, N);
    let x = Xpmem::new(&mm).unwrap();
    x.export(BASE, N * P).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let device = {
        let (x, stop) = (x.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x1234_5678);
            let mut ok = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let a = BASE + rng.below(N) * P;
                let r = if rng.below(2) == 0 {
                    x.access(a, None)
                } else {
                    x.access(a, Some(rng.next()))
                };
                match r {
                    Ok(_) => ok += 1,
                    Err(SecondaryError::Primary(_)) => {}
                    Err(e) => panic!("unexpected device error {e}"),
                }
            }
            ok
        })
    };
    let mut rng = Rng(0x9abc_def1);
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        let a = BASE + rng.below(N) * P;
        match rng.below(4) {
            0 => {
                let n = 1 + rng.below(3).min(N - (a - BASE) / P - 1);
                mm.munmap(a, n * P).unwrap();
                mm.mmap(n * P, Prot::READ_WRITE, MapKind::AnonPrivate, Some(a))
                    .unwrap();
            }
            1 => {
                mm.mprotect(a, P, Prot::READ).unwrap();
                mm.mprotect(a, P, Prot::READ_WRITE).unwrap();
            }
            2 => {
                let _ = mm.migrate(a);
            }
            _ => {
                mm.write(a, rng.next()).unwrap();
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ok = device.join().expect("device thread");
    assert!(ok > 0, "the device made progress");
    let s = x.stats();
    assert!(s.fills > 0 && s.invalidations > 0, "{s:?}");
    assert_eq!(s.would_blocks, 0);
    within("dropping the exporter after the run", move || drop(x));
    assert_coherent(&checker);
}

// ----- ODP ----------------------------------------------------------------------------------

#[test]
fn odp_faults_create_aligned_chunk_subscriptions() {
    let (mm, checker) = setup(128);
    map_fixed(&mm, BASE, 40);
    let mr = OdpRegion::new(&mm, BASE, 40 * P).unwrap();
    assert_eq!(mr.range(), (BASE, BASE + 40 * P));
    assert_eq!(mr.subscription_count(), 0);

    mr.fault(BASE + 3 * P, false).unwrap();
    assert_eq!(mr.subscription_ranges(), vec![(BASE, BASE + 16 * P)]);
    mr.access(BASE + 9 * P, Some(7)).unwrap(); // same chunk: no new subscription
    assert_eq!(mr.subscription_count(), 1);
    mr.fault(BASE + 20 * P, true).unwrap();
    // The last chunk is clipped to the end of the mapping.
    assert_eq!(mr.fault_pages(BASE + 34 * P, 100, true).unwrap(), 6);
    assert_eq!(
        mr.subscription_ranges(),
        vec![
            (BASE, BASE + 16 * P),
            (BASE + 16 * P, BASE + 32 * P),
            (BASE + 32 * P, BASE + 40 * P)
        ]
    );
    assert_eq!(mm.notifier().stats().interval_subscriptions, 3);
    assert_eq!(mr.access(BASE + 9 * P, None).unwrap(), 7);
    assert_eq!(mm.read(BASE + 9 * P).unwrap(), 7);

    // Errors, no panics.
    assert_eq!(
        mr.access(BASE + 40 * P, None),
        Err(SecondaryError::OutOfRange(BASE + 40 * P))
    );
    assert!(OdpRegion::new(&mm, BASE, 0).is_err());
    mm.munmap(BASE + 38 * P, 2 * P).unwrap();
    assert_eq!(
        mr.fault(BASE + 39 * P, false),
        Err(SecondaryError::Primary(SimError::Fault(BASE + 39 * P)))
    );
    // A region narrower than the mapping clips its chunks to itself.
    let narrow = OdpRegion::with_chunk_pages(&mm, BASE + 2 * P, 3 * P, 0).unwrap();
    narrow.fault(BASE + 3 * P, false).unwrap();
    assert_eq!(
        narrow.subscription_ranges(),
        vec![(BASE + 3 * P, BASE + 4 * P)],
        "a chunk size of 0 is clamped to one page"
    );
    drop(mr);
    drop(narrow);
    assert_eq!(mm.notifier().stats().interval_subscriptions, 0);
    assert_coherent(&checker);
}

#[test]
fn odp_munmap_splits_shrinks_and_removes_chunks() {
    let (mm, checker) = setup(128);
    map_fixed(&mm, BASE, 32);
    let mr = OdpRegion::new(&mm, BASE, 32 * P).unwrap();
    assert_eq!(mr.fault_pages(BASE, 16, true).unwrap(), 16);
    assert_eq!(mr.fault_pages(BASE + 16 * P, 16, true).unwrap(), 16);
    for i in 0..32 {
        mr.access(BASE + i * P, Some(1000 + i)).unwrap();
    }
    let a = |i: u64| BASE + i * P;

    // A hole in the middle of the first chunk: split, the translations above the hole go
    // with the new half.
    mm.munmap(a(4), 2 * P).unwrap();
    assert_eq!(
        mr.subscription_ranges(),
        vec![(a(0), a(4)), (a(6), a(16)), (a(16), a(32))]
    );
    let pages = mr.chunk_pages();
    assert_eq!(pages[0].1, (0..4).map(a).collect::<Vec<_>>());
    assert_eq!(pages[1].1, (6..16).map(a).collect::<Vec<_>>());
    let fills = mr.stats().fills;
    assert_eq!(mr.access(a(7), None).unwrap(), 1007);
    assert_eq!(mr.stats().fills, fills, "served by the moved translation");

    // The tail of a chunk: shrink.
    mm.munmap(a(14), 2 * P).unwrap();
    assert_eq!(
        mr.subscription_ranges(),
        vec![(a(0), a(4)), (a(6), a(14)), (a(16), a(32))]
    );
    // The head of a chunk: shrink.
    mm.munmap(a(16), 3 * P).unwrap();
    assert_eq!(
        mr.subscription_ranges(),
        vec![(a(0), a(4)), (a(6), a(14)), (a(19), a(32))]
    );
    // A whole chunk: removed.
    mm.munmap(a(0), 4 * P).unwrap();
    assert_eq!(
        mr.subscription_ranges(),
        vec![(a(6), a(14)), (a(19), a(32))]
    );
    // Across chunks: one removed whole, the next loses its head.
    mm.munmap(a(6), 20 * P).unwrap();
    assert_eq!(mr.subscription_ranges(), vec![(a(26), a(32))]);
    assert_eq!(mr.chunk_pages()[0].1, (26..32).map(a).collect::<Vec<_>>());
    assert_eq!(mr.access(a(30), None).unwrap(), 1030);
    // Everything: nothing left, in the library either.
    mm.munmap(BASE, 32 * P).unwrap();
    assert_eq!(mr.subscription_count(), 0);
    assert_eq!(mm.notifier().stats().interval_subscriptions, 0);
    // Mapping again and faulting subscribes afresh.
    map_fixed(&mm, BASE, 32);
    mr.fault(a(20), false).unwrap();
    assert_eq!(mr.subscription_ranges(), vec![(a(16), a(32))]);
    assert_coherent(&checker);
}

#[test]
fn odp_other_events_drop_translations_and_keep_chunks() {
    let (mm, checker) = setup(128);
    map_fixed(&mm, BASE, 8);
    let mr = OdpRegion::new(&mm, BASE, 8 * P).unwrap();
    for i in 0..8 {
        mr.access(BASE + i * P, Some(50 + i)).unwrap();
    }
    let chunks = vec![(BASE, BASE + 8 * P)];
    assert_eq!(mr.subscription_ranges(), chunks);

    mm.madvise(BASE + 2 * P, 2 * P, Advice::DontNeed).unwrap();
    assert_eq!(mr.subscription_ranges(), chunks);
    let held = &mr.chunk_pages()[0].1;
    assert!(!held.contains(&(BASE + 2 * P)) && !held.contains(&(BASE + 3 * P)));
    assert_eq!(held.len(), 6);
    assert_eq!(mr.access(BASE + 2 * P, None).unwrap(), 0);

    mm.mprotect(BASE, 8 * P, Prot::READ).unwrap();
    assert_eq!(mr.subscription_ranges(), chunks);
    assert!(mr.chunk_pages()[0].1.is_empty());
    assert_eq!(mr.access(BASE + 5 * P, None).unwrap(), 55);
    assert_eq!(
        mr.access(BASE + 5 * P, Some(1)),
        Err(SecondaryError::Primary(SimError::Permission(BASE + 5 * P)))
    );
    mm.mprotect(BASE, 8 * P, Prot::READ_WRITE).unwrap();

    mr.access(BASE + 6 * P, None).unwrap();
    let new = mm.migrate(BASE + 6 * P).unwrap();
    assert_eq!(mr.subscription_ranges(), chunks);
    assert_eq!(mr.access(BASE + 6 * P, None).unwrap(), 56);
    assert_eq!(
        mr.translations_in(BASE + 6 * P, BASE + 7 * P)[0].1.pfn,
        new.pfn
    );
    assert!(mr.stats().invalidations >= 3);
    assert_coherent(&checker);
}

#[test]
fn odp_oom_reaper_unmap_removes_chunks_without_blocking() {
    let (mm, checker) = setup(64);
    map_fixed(&mm, BASE, 8);
    let mr = OdpRegion::new(&mm, BASE, 8 * P).unwrap();
    mr.fault_pages(BASE, 8, true).unwrap();
    let r = mm.oom_reap();
    assert!(r.is_complete(), "{r:?}");
    assert_eq!(mr.stats().would_blocks, 0);
    assert_eq!(mr.subscription_count(), 0);
    // The mapping is still there: a new fault subscribes again.
    assert_eq!(mr.access(BASE, None).unwrap(), 0);
    assert_eq!(mr.subscription_count(), 1);
    assert_coherent(&checker);
}

#[test]
fn odp_concurrent_faults_vs_munmap() {
    let (mm, checker) = setup(512);
    const N: u64 = 64;
    map_fixed(&mm, BASE, N);
    let mr = OdpRegion::new(&mm, BASE, N * P).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let devices: Vec<_> = (0..2u64)
        .map(|t| {
            let (mr, stop) = (mr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x51 + t * 0x1000);
                let mut ok = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let a = BASE + rng.below(N) * P;
                    let r = match rng.below(3) {
                        0 => mr.access(a, None),
                        1 => mr.access(a, Some(rng.next())),
                        _ => mr
                            .fault_pages(a, 1 + rng.below(16), false)
                            .map(|n| n as u64),
                    };
                    match r {
                        Ok(_) => ok += 1,
                        Err(SecondaryError::Primary(_)) => {}
                        Err(e) => panic!("unexpected device error {e}"),
                    }
                }
                ok
            })
        })
        .collect();
    let mut rng = Rng(0xfeed);
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut rounds = 0;
    while Instant::now() < deadline {
        let first = rng.below(N);
        let n = 1 + rng.below(6).min(N - first - 1);
        let a = BASE + first * P;
        match rng.below(4) {
            // Unmap a run (the chunks split, shrink or go) and map it again.
            0 | 1 => {
                mm.munmap(a, n * P).unwrap();
                mm.mmap(n * P, Prot::READ_WRITE, MapKind::AnonPrivate, Some(a))
                    .unwrap();
            }
            // These run under the mmap lock for reading, concurrently with the faults.
            2 => {
                let _ = mm.migrate(a);
            }
            _ => mm.madvise(a, n * P, Advice::DontNeed).unwrap(),
        }
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ok: u64 = devices
        .into_iter()
        .map(|d| d.join().expect("device thread"))
        .sum();
    assert!(ok > 0 && rounds > 0);

    // The chunks are disjoint and inside the region.
    let ranges = mr.subscription_ranges();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlapping chunks {ranges:x?}");
    }
    assert!(ranges
        .iter()
        .all(|&(s, e)| BASE <= s && s < e && e <= BASE + N * P));
    // And they follow the mapping: unmapping everything removes them all.
    mm.munmap(BASE, N * P).unwrap();
    assert_eq!(mr.subscription_count(), 0);
    assert_eq!(mm.notifier().stats().interval_subscriptions, 0);
    assert_coherent(&checker);
}
