//! Linux's HMM self-tests (`tools/testing/selftests/mm/hmm-tests.c`) against the HMM
//! mirror, each test named after its Linux counterpart, plus the mirror's own migration,
//! the timeout path, exclusive access, the OOM reaper and process exit.
//!
//! Every test runs with a coherence checker attached to each address space and ends
//! with zero violations. Linux's tests compare a device "mirror" buffer of `int`s; here
//! each page has one data word, so a page stands for a buffer element: the CPU stores `i`
//! in page `i`, the device stores `!i` (Linux's `-i`, but never equal to `i`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmu_notifier::{Event, IntervalError, ListSubscriber, OwnerToken, Range};
use mmu_secondary::hmm::{HmmMirror, MirrorProt};
use mmu_secondary::{SecondaryError, SecondaryMmu};
use mmu_sim::{
    AddressSpace, CheckedSecondary, Checker, File, FrameAllocator, MapKind, Prot, PteKind,
    SimError, PAGE_SIZE, TASK_SIZE,
};

const P: u64 = PAGE_SIZE;
/// Pages per buffer (Linux's `HMM_BUFFER_SIZE` is 1 MiB; a page per element suffices).
const N: u64 = 16;

fn space(seed: u64) -> (Arc<AddressSpace>, Arc<Checker>) {
    let mm = AddressSpace::new(Arc::new(FrameAllocator::new(4096)));
    let checker = Checker::new(seed);
    mm.attach_checker(checker.clone()).unwrap();
    (mm, checker)
}

/// `hmm_open`: a mirror of the whole address space for device `owner`.
fn open(mm: &Arc<AddressSpace>, owner: u64) -> Arc<HmmMirror> {
    HmmMirror::new(mm, OwnerToken(owner)).unwrap()
}

fn assert_clean(checker: &Checker) {
    assert_eq!(checker.violations(), [], "coherence violations");
    assert!(checker.checks() > 0, "the checker saw nothing");
}

fn cpu_values(mm: &AddressSpace, a: u64, n: u64) -> Vec<u64> {
    (0..n).map(|i| mm.read(a + i * P).unwrap()).collect()
}

fn iota(n: u64) -> Vec<u64> {
    (0..n).collect()
}

fn negated(n: u64) -> Vec<u64> {
    (0..n).map(|i| !i).collect()
}

fn held(m: &HmmMirror, a: u64, n: u64) -> usize {
    m.translations_in(a, a + n * P).len()
}

// ----- hmm-tests.c ---------------------------------------------------------------------

/// `open_close`: opening a device subscribes one interval over the whole space; closing
/// it removes it. A released address space cannot be mirrored.
#[test]
fn open_close() {
    let (mm, checker) = space(1);
    for _ in 0..2 {
        assert_eq!(mm.notifier().stats().interval_subscriptions, 0);
        let m = open(&mm, 1);
        assert_eq!(mm.notifier().stats().interval_subscriptions, 1);
        assert_eq!(m.range(), (0, TASK_SIZE));
        assert_eq!(m.owner(), OwnerToken(1));
        drop(m);
        assert_eq!(mm.notifier().stats().interval_subscriptions, 0);
    }
    // Something for the checker to look at after the close.
    let a = mm.mmap_anon(P, Prot::READ_WRITE).unwrap();
    mm.write(a, 1).unwrap();
    mm.munmap(a, P).unwrap();
    mm.exit();
    assert_eq!(
        HmmMirror::new(&mm, OwnerToken(1)).unwrap_err(),
        IntervalError::Released
    );
    assert_clean(&checker);
}

/// `anon_read`: the device reads private anonymous memory whose first page was never
/// touched (`pte_none`) and whose second is the CPU's zero page; one device fault.
#[test]
fn anon_read() {
    let (mm, checker) = space(2);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    for i in 2..N {
        mm.write(a + i * P, i).unwrap();
    }
    mm.mprotect(a, N * P, Prot::READ).unwrap();
    assert_eq!(mm.read(a + P).unwrap(), 0, "the zero page");
    assert_eq!(
        m.snapshot(a, 2).unwrap(),
        [MirrorProt::NONE, MirrorProt::ZERO | MirrorProt::READ]
    );

    assert_eq!(m.read(a, N).unwrap(), [&[0, 0], &iota(N)[2..]].concat());
    assert_eq!(m.faults(), 1);
    assert_eq!(held(&m, a, N), N as usize);
    // The device's fault mapped page 0 as the zero page too; the rest read-only.
    let snap = m.snapshot(a, N).unwrap();
    assert_eq!(snap[..2], [MirrorProt::ZERO | MirrorProt::READ; 2]);
    assert!(snap[2..].iter().all(|&p| p == MirrorProt::READ), "{snap:?}");
    // The trait's one-page access reads through the same translations: no new fault.
    assert_eq!(m.access(a + 3 * P + 8, None).unwrap(), 3);
    assert_eq!(m.faults(), 1);
    assert_clean(&checker);
}

/// `anon_read_prot`: a device read of `PROT_NONE` memory fails, and the mirror holds
/// nothing of it; the CPU's data is intact.
#[test]
fn anon_read_prot() {
    let (mm, checker) = space(3);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    for i in 0..N {
        mm.write(a + i * P, i).unwrap();
    }
    // (Beyond Linux's test: the device had it mapped; mprotect takes it away.)
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    mm.mprotect(a, N * P, Prot::NONE).unwrap();
    assert_eq!(held(&m, a, N), 0, "mprotect dropped the device's entries");

    assert_eq!(
        m.read(a, N),
        Err(SecondaryError::Primary(SimError::Permission(a))),
        "Linux: -EFAULT"
    );
    assert_eq!(held(&m, a, N), 0, "the mirror is untouched");
    assert_eq!(m.faults(), 1, "no fault completed");

    mm.mprotect(a, N * P, Prot::READ).unwrap();
    assert_eq!(cpu_values(&mm, a, N), iota(N));
    assert_clean(&checker);
}

/// `anon_write`: the device writes private anonymous memory; the CPU sees it.
#[test]
fn anon_write() {
    let (mm, checker) = space(4);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    m.write(a, &iota(N)).unwrap();
    assert_eq!(m.faults(), 1);
    assert_eq!(cpu_values(&mm, a, N), iota(N));
    assert!(m
        .snapshot(a, N)
        .unwrap()
        .iter()
        .all(|&p| p == MirrorProt::WRITE));
    // Writing again goes through the writable translations: no new fault.
    m.write(a, &negated(N)).unwrap();
    assert_eq!(m.faults(), 1);
    assert_eq!(cpu_values(&mm, a, N), negated(N));
    assert_clean(&checker);
}

/// `anon_write_prot`: the device reads a zero page of read-only memory, cannot write it
/// (permission error, nothing written), and can after `mprotect` makes it writable.
#[test]
fn anon_write_prot() {
    let (mm, checker) = space(5);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ).unwrap();
    assert_eq!(m.read(a, 1).unwrap(), [0]);
    assert_eq!(m.faults(), 1);

    assert_eq!(
        m.write(a, &iota(N)),
        Err(SecondaryError::Primary(SimError::Permission(a)))
    );
    assert_eq!(cpu_values(&mm, a, N), vec![0; N as usize]);

    mm.mprotect(a, N * P, Prot::READ_WRITE).unwrap();
    m.write(a, &iota(N)).unwrap();
    assert_eq!(cpu_values(&mm, a, N), iota(N));
    assert_clean(&checker);
}

/// `anon_write_child`: after fork, a device of the child writes the child's copy; the
/// parent's memory does not change. Twice, as Linux: without and with the parent's pages
/// migrated by its device before the fork.
#[test]
fn anon_write_child() {
    for migrate in [false, true] {
        let (mm, checker) = space(6);
        let m = open(&mm, 1);
        let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
        for i in 0..N {
            mm.write(a + i * P, i).unwrap();
        }
        if migrate {
            assert_eq!(m.read(a, N).unwrap(), iota(N));
            assert_eq!(m.migrate_to_device(a, N).unwrap(), N as usize);
        }

        let child = mm.fork();
        let child_checker = Checker::new(60);
        child.attach_checker(child_checker.clone()).unwrap();
        assert_eq!(held(&m, a, N), 0, "fork write-protected the parent");
        assert_eq!(
            cpu_values(&child, a, N),
            iota(N),
            "the child sees the parent's"
        );
        // The child needs its own mirror of its own address space.
        let cm = open(&child, 2);
        cm.write(a, &negated(N)).unwrap();
        assert_eq!(cm.faults(), 1);
        assert_eq!(cpu_values(&child, a, N), negated(N));
        drop(cm);
        child.exit();

        assert_eq!(
            cpu_values(&mm, a, N),
            iota(N),
            "the parent's did not change"
        );
        assert_clean(&checker);
        assert_clean(&child_checker);
    }
}

/// `anon_write_child_shared`: the same with `MAP_SHARED`: the parent sees the write.
#[test]
fn anon_write_child_shared() {
    let (mm, checker) = space(7);
    let m = open(&mm, 1);
    let a = mm
        .mmap(N * P, Prot::READ_WRITE, MapKind::AnonShared, None)
        .unwrap();
    for i in 0..N {
        mm.write(a + i * P, i).unwrap();
    }
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    let child = mm.fork();
    let child_checker = Checker::new(70);
    child.attach_checker(child_checker.clone()).unwrap();
    assert_eq!(cpu_values(&child, a, N), iota(N));
    let cm = open(&child, 2);
    cm.write(a, &negated(N)).unwrap();
    assert_eq!(cm.faults(), 1);
    assert_eq!(cpu_values(&child, a, N), negated(N));
    drop(cm);
    child.exit();

    assert_eq!(cpu_values(&mm, a, N), negated(N), "the parent sees it");
    // So does the parent's device, through the translations it kept: the page is shared,
    // the fork did not write-protect it.
    assert_eq!(m.read(a, N).unwrap(), negated(N));
    assert_eq!(m.faults(), 1);
    assert_clean(&checker);
    assert_clean(&child_checker);
}

/// `file_read`: the device reads a read-only shared file mapping.
#[test]
fn file_read() {
    let (mm, checker) = space(8);
    let m = open(&mm, 1);
    let file = File::new(mm.frames().clone());
    for i in 0..N {
        file.write(i * P, i).unwrap();
    }
    let kind = MapKind::File {
        file,
        offset: 0,
        shared: true,
    };
    let a = mm.mmap(N * P, Prot::READ, kind, None).unwrap();
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    assert_eq!(m.faults(), 1);
    assert_clean(&checker);
}

/// `file_write`: the device writes a shared file mapping; the CPU and the file see it.
#[test]
fn file_write() {
    let (mm, checker) = space(9);
    let m = open(&mm, 1);
    let file = File::new(mm.frames().clone());
    let kind = MapKind::File {
        file: file.clone(),
        offset: 0,
        shared: true,
    };
    let a = mm.mmap(N * P, Prot::READ_WRITE, kind, None).unwrap();
    m.write(a, &iota(N)).unwrap();
    assert_eq!(m.faults(), 1);
    assert_eq!(cpu_values(&mm, a, N), iota(N));
    let in_file: Vec<u64> = (0..N).map(|i| file.read(i * P).unwrap()).collect();
    assert_eq!(in_file, iota(N), "pread sees the device's writes");
    assert_clean(&checker);
}

/// `anon_read_multiple`: repeated device reads of fresh buffers, one fault each.
#[test]
fn anon_read_multiple() {
    let (mm, checker) = space(10);
    let m = open(&mm, 1);
    for p in 0..10 {
        let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
        for i in 0..N {
            mm.write(a + i * P, i + p).unwrap();
        }
        let want: Vec<u64> = (0..N).map(|i| i + p).collect();
        assert_eq!(m.read(a, N).unwrap(), want, "buffer {p}");
        assert_eq!(m.faults(), p + 1, "buffer {p}");
        mm.munmap(a, N * P).unwrap();
        assert_eq!(held(&m, a, N), 0);
    }
    assert_clean(&checker);
}

/// `anon_teardown`: `munmap` on another thread races the device reading the buffer, many
/// times. A read either returns the right data or fails because the buffer is gone;
/// nothing panics and the checker finds nothing.
#[test]
fn anon_teardown() {
    const ROUNDS: u64 = 150;
    let (mm, checker) = space(11);
    let m = open(&mm, 1);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut complete, mut torn) = (0, 0);
    for round in 0..ROUNDS {
        let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
        let c = next() % 1000;
        for i in 0..N {
            mm.write(a + i * P, i + c).unwrap();
        }
        // Both sides start together, each after its own random delay.
        let (unmap_delay, read_delay) = (next() % 48, next() % 48);
        let ready = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                ready.store(true, SeqCst);
                for _ in 0..unmap_delay {
                    std::thread::yield_now();
                }
                mm.munmap(a, N * P).unwrap();
            });
            while !ready.load(SeqCst) {
                std::hint::spin_loop();
            }
            for _ in 0..read_delay {
                std::thread::yield_now();
            }
            match m.read(a, N) {
                Ok(v) => {
                    let want: Vec<u64> = (0..N).map(|i| i + c).collect();
                    assert_eq!(v, want, "round {round}");
                    complete += 1;
                }
                Err(SecondaryError::Primary(SimError::Fault(addr))) => {
                    assert!((a..a + N * P).contains(&addr), "round {round}");
                    torn += 1;
                }
                Err(e) => panic!("round {round}: unexpected {e}"),
            }
        });
        assert_eq!(
            held(&m, a, N),
            0,
            "round {round}: the munmap dropped everything"
        );
    }
    eprintln!("anon_teardown: {complete} complete reads, {torn} torn by munmap");
    assert_eq!(complete + torn, ROUNDS);
    assert_clean(&checker);
}

/// `double_map` (the two-device fixture `hmm2`): two mirrors of one address space read
/// the same read-only buffer; device 1 then migrates it, which invalidates device 0 (not
/// its own migration), whose next read faults again and sees the same data.
#[test]
fn double_map() {
    let (mm, checker) = space(12);
    let m0 = open(&mm, 1);
    let m1 = open(&mm, 2);
    let n = 6;
    let a = mm.mmap_anon(n * P, Prot::READ_WRITE).unwrap();
    for i in 0..n {
        mm.write(a + i * P, i).unwrap();
    }
    mm.mprotect(a, n * P, Prot::READ).unwrap();

    assert_eq!(m0.read(a, n).unwrap(), iota(n));
    assert_eq!(m0.faults(), 1);
    assert_eq!(m1.read(a, n).unwrap(), iota(n));
    assert_eq!(m1.faults(), 1);

    assert_eq!(m1.migrate_to_device(a, n).unwrap(), n as usize);
    assert_eq!(
        held(&m0, a, n),
        0,
        "device 1's migration invalidated device 0"
    );
    assert_eq!(held(&m1, a, n), n as usize, "but not device 1");
    assert_eq!(m0.read(a, n).unwrap(), iota(n));
    assert_eq!(m0.faults(), 2);
    assert_eq!(m1.read(a, n).unwrap(), iota(n));
    assert_eq!(m1.faults(), 1, "device 1 kept its (migrated) translations");
    assert_clean(&checker);
}

/// `snapshot` (`hmm2`): per-page flags of a device snapshot that faults nothing:
/// page 0 `PROT_NONE`, page 1 a hole, page 2 the zero page read-only, page 3 read-only,
/// pages 4 and 5 writable (5 migrated by this device: Linux reports it as device-private
/// local memory, which the simulation does not have), page 6 not present (Linux: migrated
/// to the other device; here swapped out).
#[test]
fn snapshot() {
    let (mm, checker) = space(13);
    let m0 = open(&mm, 1);
    let a = mm.mmap_anon(7 * P, Prot::NONE).unwrap();
    mm.munmap(a + P, P).unwrap();
    mm.mprotect(a + 2 * P, P, Prot::READ).unwrap();
    assert_eq!(mm.read(a + 2 * P).unwrap(), 0);
    mm.mprotect(a + 3 * P, P, Prot::READ_WRITE).unwrap();
    mm.write(a + 3 * P, 3).unwrap();
    mm.mprotect(a + 3 * P, P, Prot::READ).unwrap();
    mm.mprotect(a + 4 * P, 3 * P, Prot::READ_WRITE).unwrap();
    mm.write(a + 4 * P, 3).unwrap();
    mm.write(a + 5 * P, 5).unwrap();
    let before = mm.pte(a + 5 * P).pfn();
    assert_eq!(m0.migrate_to_device(a + 5 * P, 1).unwrap(), 1);
    assert_ne!(mm.pte(a + 5 * P).pfn(), before, "page 5 moved");
    mm.write(a + 6 * P, 6).unwrap();
    mm.reclaim(a + 6 * P, a + 7 * P).unwrap(); // ages it
    assert_eq!(mm.reclaim(a + 6 * P, a + 7 * P).unwrap().reclaimed, 1);

    let m = m0.snapshot(a, 7).unwrap();
    assert_eq!(
        m,
        [
            MirrorProt::ERROR,
            MirrorProt::ERROR,
            MirrorProt::ZERO | MirrorProt::READ,
            MirrorProt::READ,
            MirrorProt::WRITE,
            MirrorProt::WRITE,
            MirrorProt::NONE,
        ]
    );
    assert_eq!(m[2].bits(), 0x11);
    // Nothing was faulted: page 6 is still out.
    assert_eq!(mm.pte(a + 6 * P).pfn(), None);
    assert_clean(&checker);
}

// ----- beyond hmm-tests.c --------------------------------------------------------------

/// The mirror ignores the `Migrate` invalidation of its own migration (its entries stay
/// and end up on the new frames, with no new fault and no retry) but not another
/// device's (its entries are dropped and the next read faults).
#[test]
fn own_migrate_ignored_foreign_migrate_not() {
    let (mm, checker) = space(14);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    for i in 0..N {
        mm.write(a + i * P, i).unwrap();
    }
    let m = open(&mm, 1);
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    let old = m.translations_in(a, a + N * P);
    assert_eq!(old.len(), N as usize);
    let stats = m.stats();

    assert_eq!(m.migrate_to_device(a, N).unwrap(), N as usize);
    assert_eq!(m.ignored_migrations(), 1);
    assert_eq!(
        m.stats().invalidations,
        stats.invalidations + 1,
        "it was called"
    );
    let new = m.translations_in(a, a + N * P);
    assert_eq!(
        new.len(),
        N as usize,
        "its entries survived its own migration"
    );
    for ((addr, before), (addr2, after)) in old.iter().zip(&new) {
        assert_eq!(addr, addr2);
        assert_ne!(
            before.pfn, after.pfn,
            "{addr:#x} follows the page to its new frame"
        );
        assert_eq!(mm.pte(*addr).pfn(), Some(after.pfn));
    }
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    assert_eq!(m.faults(), 1, "no new fault");
    assert_eq!(m.stats().retries, stats.retries, "no retry");

    // Another device's migration of the same range is an ordinary invalidation.
    let other = open(&mm, 2);
    assert_eq!(other.migrate_to_device(a, N).unwrap(), N as usize);
    assert_eq!(m.ignored_migrations(), 1);
    assert_eq!(other.ignored_migrations(), 1);
    assert_eq!(
        held(&m, a, N),
        0,
        "device 2's migration dropped device 1's entries"
    );
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    assert_eq!(m.faults(), 2, "so device 1 faults again");
    // The CPU still sees its data, and can write it.
    assert_eq!(cpu_values(&mm, a, N), iota(N));
    mm.write(a, 100).unwrap();
    assert_eq!(m.read(a, 1).unwrap(), [100]);
    assert_clean(&checker);
}

/// Keeps every device fault of a range colliding: while armed, each CPU restore of page
/// `a` or `b` (an `Exclusive` invalidation without owner, which a fault of a
/// device-exclusive page makes) ends by making the *other* page device-exclusive again,
/// for another device. A fault walks `a` (behind it `b` is made exclusive), then `b`
/// (behind it, `a`): every snapshot of the range runs invalidations of it between the
/// fault's `read_begin` and its `read_retry`, and leaves `a` exclusive for the next one,
/// however the threads are scheduled.
struct PingPong {
    mm: std::sync::Weak<AddressSpace>,
    a: u64,
    b: u64,
    armed: AtomicBool,
    restores: AtomicU64,
}

impl ListSubscriber for PingPong {
    fn invalidate_range_end(&self, r: &Range) {
        if !self.armed.load(SeqCst) || r.event() != Event::Exclusive || r.owner().is_some() {
            return;
        }
        let next = match r.start() {
            s if s == self.a => self.b,
            s if s == self.b => self.a,
            _ => return,
        };
        self.restores.fetch_add(1, SeqCst);
        if let Some(mm) = self.mm.upgrade() {
            // Nothing in this test takes the mmap lock for writing, so taking it for
            // reading again on the faulting thread cannot deadlock.
            mm.make_exclusive(next, OwnerToken(9)).unwrap();
        }
    }
}

/// The timeout path: invalidations of the range keep coming, so every `read_retry`
/// fails; with a short timeout the read gives up with `Timeout` after counting its
/// retries. The invalidations come from the fault's own snapshot (see [`PingPong`]),
/// which makes the collision certain on every attempt: a helper thread cannot promise
/// that on a loaded two-core machine (the faulting thread, woken when an invalidation
/// ends, preempts the helper and fills before its next one; see
/// `fill_against_a_helper_thread_invalidating`).
#[test]
fn timeout_when_every_fill_collides() {
    let (mm, checker) = space(15);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    for i in 0..N {
        mm.write(a + i * P, i).unwrap();
    }
    let (pa, pb) = (a + 3 * P, a + 9 * P);
    let pingpong = Arc::new(PingPong {
        mm: Arc::downgrade(&mm),
        a: pa,
        b: pb,
        armed: AtomicBool::new(true),
        restores: AtomicU64::new(0),
    });
    let reg = mm.notifier().register(pingpong.clone()).unwrap();
    mm.make_exclusive(pa, OwnerToken(9)).unwrap();

    m.set_fault_timeout(Duration::from_millis(20));
    assert_eq!(m.fault_timeout(), Duration::from_millis(20));
    let t = Instant::now();
    assert_eq!(m.read(a, N), Err(SecondaryError::Timeout));
    let waited = t.elapsed();
    let stats = m.stats();
    eprintln!(
        "timeout: after {waited:?}, {} retries, {} CPU restores, {} invalidations",
        stats.retries,
        pingpong.restores.load(SeqCst),
        stats.invalidations
    );
    assert!(waited >= Duration::from_millis(20));
    assert!(stats.retries >= 2, "every attempt was counted: {stats:?}");
    assert_eq!(m.faults(), 0, "no fault completed");
    assert_eq!(held(&m, a, N), 0, "nothing was installed");
    assert!(pingpong.restores.load(SeqCst) >= 2 * stats.retries);

    // Disarmed, the same read gets through at once with the right data.
    pingpong.armed.store(false, SeqCst);
    reg.unregister();
    m.set_fault_timeout(Duration::from_secs(1));
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    assert_eq!(m.faults(), 1);
    assert_clean(&checker);
}

/// Fills against a helper thread that keeps the range under invalidation (each held for a
/// while, the next started at once), with a short timeout: every read either returns the
/// right data or times out, and the checker finds nothing. Whether a given read times
/// out depends on the scheduler (see the test above), so the outcome is only reported.
#[test]
fn fill_against_a_helper_thread_invalidating() {
    const N: u64 = 64;
    let (mm, checker) = space(19);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    for i in 0..N {
        mm.write(a + i * P, i).unwrap();
    }
    m.set_fault_timeout(Duration::from_millis(5));
    let stop = AtomicBool::new(false);
    let range = Range::new(a, a + N * P, Event::Clear).unwrap();
    let (mut ok, mut timeouts) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            // The helper plays a primary that keeps changing the range.
            while !stop.load(SeqCst) {
                let g = mm.notifier().invalidate_range_start(range);
                std::thread::sleep(Duration::from_micros(500));
                drop(g);
            }
        });
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(150) {
            match m.read(a, N) {
                Ok(v) => {
                    assert_eq!(v, iota(N));
                    ok += 1;
                    // Do not starve the helper of the device's lock.
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(SecondaryError::Timeout) => timeouts += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        stop.store(true, SeqCst);
    });
    let stats = m.stats();
    eprintln!(
        "helper thread: {ok} reads got through, {timeouts} timed out, {} retries, {} faults, \
         {} invalidations",
        stats.retries,
        m.faults(),
        stats.invalidations
    );
    assert!(ok + timeouts > 0);
    assert!(stats.invalidations > 0);
    assert_clean(&checker);
}

/// `exclusive`: the device takes exclusive access (its ordinary entries go, atomic ones
/// come); a CPU access revokes it and sees the data, and the device reads the CPU's
/// later writes.
#[test]
fn exclusive() {
    let (mm, checker) = space(16);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    for i in 0..N {
        mm.write(a + i * P, i).unwrap();
    }
    assert_eq!(m.read(a, N).unwrap(), iota(N));
    assert_eq!(m.exclusive(a, N).unwrap(), N as usize);
    assert_eq!(m.exclusive_pages(a, N).unwrap(), N as usize);
    for i in 0..N {
        assert!(matches!(mm.pte(a + i * P).kind(), PteKind::Exclusive(_)));
    }
    for i in 0..N {
        assert_eq!(mm.read(a + i * P).unwrap(), i);
        mm.write(a + i * P, i + 1).unwrap();
    }
    assert_eq!(m.exclusive_pages(a, N).unwrap(), 0, "the CPU revoked it");
    let plus_one: Vec<u64> = (1..=N).collect();
    assert_eq!(m.read(a, N).unwrap(), plus_one);
    assert_clean(&checker);
}

/// A non-blockable invalidation (the OOM reaper) takes the mirror's lock with a try-lock
/// and drops its entries; nothing had to wait.
#[test]
fn oom_reaper_nonblocking_invalidation() {
    let (mm, checker) = space(17);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    m.write(a, &iota(N)).unwrap();
    let reap = mm.oom_reap();
    assert!(reap.is_complete(), "{reap:?}");
    assert_eq!(held(&m, a, N), 0);
    assert_eq!(m.stats().would_blocks, 0);
    assert_clean(&checker);
}

/// Process exit: the `Release` invalidation empties the mirror, and every later device
/// operation fails with `Gone`. Bad arguments fail without a panic.
#[test]
fn exit_and_bad_arguments() {
    let (mm, checker) = space(18);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    m.write(a, &iota(N)).unwrap();

    let bad = SecondaryError::Primary(SimError::InvalidArgument("address not page aligned"));
    assert_eq!(m.read(a + 1, 1), Err(bad));
    assert_eq!(m.read(a, u64::MAX), Err(SecondaryError::OutOfRange(a)));
    assert_eq!(
        m.snapshot(TASK_SIZE - P, 2),
        Err(SecondaryError::OutOfRange(TASK_SIZE))
    );
    assert_eq!(m.read(a, 0), Ok(vec![]));
    assert_eq!(
        m.read(TASK_SIZE - P, 1),
        Err(SecondaryError::Primary(SimError::Fault(TASK_SIZE - P)))
    );
    let small = HmmMirror::with_range(&mm, OwnerToken(3), a, P).unwrap();
    assert_eq!(small.read(a + P, 1), Err(SecondaryError::OutOfRange(a + P)));
    assert_eq!(
        small.fault(a - P, false),
        Err(SecondaryError::OutOfRange(a - P))
    );

    mm.exit();
    assert_eq!(held(&m, 0, TASK_SIZE / P), 0);
    assert_eq!(m.read(a, N), Err(SecondaryError::Gone));
    assert_eq!(m.write(a, &[1]), Err(SecondaryError::Gone));
    assert_eq!(m.migrate_to_device(a, N), Err(SecondaryError::Gone));
    assert_eq!(m.snapshot(a, N), Err(SecondaryError::Gone));
    assert_clean(&checker);
}

/// The device migrating its own pages and taking exclusive access, reading and writing
/// them, against a primary that zaps, reclaims, migrates, writes and write-protects them,
/// on three threads: nothing fails but for a write to read-only memory, and the checker
/// finds nothing.
#[test]
fn own_migration_races_faults_and_invalidations() {
    const N: u64 = 8;
    let (mm, checker) = space(20);
    let m = open(&mm, 1);
    let a = mm.mmap_anon(N * P, Prot::READ_WRITE).unwrap();
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(SeqCst) {
                let p = a + (k % N) * P;
                let _ = match k % 5 {
                    0 => mm.madvise(p, 2 * P, mmu_sim::Advice::DontNeed),
                    1 => mm.reclaim(a, a + N * P).map(drop),
                    2 => mm.migrate(p).map(drop),
                    3 => mm.write(p, k),
                    _ => mm
                        .mprotect(a, N * P, Prot::READ)
                        .and_then(|()| mm.mprotect(a, N * P, Prot::READ_WRITE)),
                };
                k += 1;
            }
        });
        s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(SeqCst) {
                let r = if k % 3 == 2 {
                    m.exclusive(a + (k % N) * P, 1).map(drop)
                } else {
                    m.migrate_to_device(a, N).map(drop)
                };
                match r {
                    Ok(()) | Err(SecondaryError::Primary(SimError::Permission(_))) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
                k += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        let mut k = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            let r = if k % 2 == 0 {
                m.write(a, &iota(N)).map(|()| Vec::new())
            } else {
                m.read(a, N)
            };
            match r {
                Ok(_) | Err(SecondaryError::Primary(SimError::Permission(_))) => {}
                Err(e) => panic!("unexpected {e}"),
            }
            k += 1;
        }
        stop.store(true, SeqCst);
    });
    let stats = m.stats();
    eprintln!(
        "race: {stats:?}, {} faults, {} own migrations ignored",
        m.faults(),
        m.ignored_migrations()
    );
    assert!(m.ignored_migrations() > 0);
    assert_clean(&checker);
}
