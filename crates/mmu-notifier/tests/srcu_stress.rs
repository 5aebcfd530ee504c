//! Real-thread stress of the grace-period domain (the asymmetric membarrier barrier cannot
//! be modelled by loom; this runs whichever flavour the process chose, and
//! `scripts/test.sh` runs it again with `MMU_NOTIFIER_SYMMETRIC_BARRIERS=1`).
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mmu_notifier::Srcu;

const LIVE: u64 = 0x11fe;
const POISON: u64 = 0xdead;

struct Object {
    state: AtomicU64,
}

#[test]
fn readers_never_see_an_object_retired_by_synchronize() {
    let srcu = Srcu::new();
    let current = Arc::new(AtomicPtr::new(Box::into_raw(Box::new(Object {
        state: AtomicU64::new(LIVE),
    }))));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (srcu, current, stop, reads) =
                (srcu.clone(), current.clone(), stop.clone(), reads.clone());
            thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Relaxed) {
                    n = n.wrapping_add(1);
                    let _g = srcu.read_lock();
                    let p = current.load(Acquire);
                    // Stay inside a while, sometimes off the CPU, so a grace period that
                    // failed to wait would poison the object under our feet.
                    if n % 8 == 0 {
                        thread::yield_now();
                    } else {
                        (0..n % 64).for_each(|_| std::hint::spin_loop());
                    }
                    // SAFETY: retired objects are poisoned, never freed, until the end.
                    let s = unsafe { &*p }.state.load(Relaxed);
                    assert_eq!(s, LIVE, "a reader saw an object retired by synchronize");
                    reads.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();
    let mut graveyard = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(700);
    let mut grace_periods = 0;
    while Instant::now() < deadline {
        let new = Box::into_raw(Box::new(Object {
            state: AtomicU64::new(LIVE),
        }));
        let old = current.swap(new, AcqRel);
        srcu.synchronize();
        // SAFETY: `old` came from Box::into_raw and is only freed below, after the readers.
        unsafe { &*old }.state.store(POISON, Relaxed);
        graveyard.push(old);
        grace_periods += 1;
    }
    stop.store(true, Relaxed);
    readers.into_iter().for_each(|r| r.join().unwrap());
    assert!(grace_periods > 100 && reads.load(Relaxed) > 1000);
    graveyard.push(current.load(Relaxed));
    for p in graveyard {
        // SAFETY: every reader has stopped; each pointer came from Box::into_raw once.
        drop(unsafe { Box::from_raw(p) });
    }
}

#[test]
fn threads_that_exit_hand_their_slots_to_new_threads() {
    let srcu = Srcu::new();
    for _ in 0..50 {
        let s = srcu.clone();
        thread::spawn(move || drop(s.read_lock())).join().unwrap();
    }
    // Sequential threads reuse one slot; a grace period still completes at once.
    assert!(srcu.reader_slots() <= 2, "{} slots", srcu.reader_slots());
    srcu.synchronize();
    assert_eq!(srcu.grace_periods(), 1);
}

#[test]
fn deferred_callbacks_run_once_each_in_order_of_batches() {
    let srcu = Srcu::new();
    let runs = Arc::new(AtomicUsize::new(0));
    for _ in 0..1000 {
        let r = runs.clone();
        srcu.call(move || {
            r.fetch_add(1, SeqCst);
        });
    }
    srcu.barrier();
    assert_eq!(runs.load(SeqCst), 1000);
    srcu.barrier();
    assert_eq!(runs.load(SeqCst), 1000);
}

#[test]
fn synchronize_inside_a_section_panics_with_a_clear_message() {
    let srcu = Srcu::new();
    let g = srcu.read_lock();
    assert!(srcu.held_by_current_thread());
    let other = Srcu::new();
    other.synchronize(); // another domain: fine
    let err =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| srcu.synchronize())).unwrap_err();
    let msg = err.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(msg.contains("wait for itself"), "{msg}");
    drop(g);
    assert!(!srcu.held_by_current_thread());
    srcu.synchronize();
}

#[test]
fn barrier_inside_a_deferred_callback_panics() {
    let srcu = Srcu::new();
    let panicked = Arc::new(AtomicBool::new(false));
    let (s, p) = (srcu.clone(), panicked.clone());
    srcu.call(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.barrier()));
        p.store(r.is_err(), SeqCst);
    });
    srcu.barrier();
    assert!(panicked.load(SeqCst));
}

#[test]
fn a_section_held_in_a_thread_local_destructor_is_not_handed_to_another_thread() {
    struct ReadsOnExit(Srcu, Arc<AtomicBool>, Arc<AtomicBool>);
    impl Drop for ReadsOnExit {
        fn drop(&mut self) {
            let _g = self.0.read_lock();
            self.1.store(true, SeqCst);
            while !self.2.load(SeqCst) {
                thread::yield_now();
            }
        }
    }
    thread_local! {
        static EXIT_READER: std::cell::RefCell<Option<ReadsOnExit>> = const { std::cell::RefCell::new(None) };
    }
    let srcu = Srcu::new();
    let inside = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let t = {
        let (s, i, g) = (srcu.clone(), inside.clone(), go.clone());
        thread::spawn(move || {
            drop(s.read_lock()); // this thread gets a slot
            EXIT_READER.with(|e| *e.borrow_mut() = Some(ReadsOnExit(s, i, g)));
        })
    };
    while !inside.load(SeqCst) {
        thread::yield_now();
    }
    // The exiting thread is inside a section: a new reader must get its own slot, and a
    // grace period must wait for the exiting one.
    let s2 = srcu.clone();
    thread::spawn(move || drop(s2.read_lock())).join().unwrap();
    let (s3, done) = (srcu.clone(), Arc::new(AtomicBool::new(false)));
    let d = done.clone();
    let sync = thread::spawn(move || {
        s3.synchronize();
        d.store(true, SeqCst);
    });
    thread::sleep(Duration::from_millis(30));
    assert!(
        !done.load(SeqCst),
        "a grace period ended under a live reader"
    );
    go.store(true, SeqCst);
    sync.join().unwrap();
    t.join().unwrap();
}

#[test]
fn a_panicking_deferred_callback_does_not_stop_the_others() {
    let srcu = Srcu::new();
    let ran = Arc::new(AtomicUsize::new(0));
    srcu.call(|| panic!("a deferred callback fails"));
    let r = ran.clone();
    srcu.call(move || {
        r.fetch_add(1, SeqCst);
    });
    srcu.barrier();
    assert_eq!(ran.load(SeqCst), 1);
    let r = ran.clone();
    srcu.call(move || {
        r.fetch_add(1, SeqCst);
    });
    srcu.barrier();
    assert_eq!(ran.load(SeqCst), 2, "the worker still runs callbacks");
}

/// The process uses the barrier flavour its environment asks for: the symmetric (fence)
/// one when `MMU_NOTIFIER_SYMMETRIC_BARRIERS=1` (as `scripts/test.sh` runs this file
/// again, and once more with `=0`, which asks for nothing), else membarrier where the
/// kernel offers it.
#[test]
fn the_barrier_flavour_is_the_one_the_environment_asks_for() {
    let forced = std::env::var_os("MMU_NOTIFIER_SYMMETRIC_BARRIERS")
        .is_some_and(|v| v != "0" && !v.is_empty());
    if forced {
        assert!(!Srcu::asymmetric_barriers(), "fences were asked for");
    } else {
        assert_eq!(Srcu::asymmetric_barriers(), kernel_offers_membarrier());
    }
    println!(
        "asymmetric barriers: {} (forced symmetric: {forced})",
        Srcu::asymmetric_barriers()
    );
}

/// Whether the kernel offers the private expedited membarrier (queried here directly).
fn kernel_offers_membarrier() -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        const QUERY: libc::c_long = 0;
        const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        // SAFETY: membarrier(MEMBARRIER_CMD_QUERY, 0) only reads; it has no memory operands.
        let cmds = unsafe { libc::syscall(libc::SYS_membarrier, QUERY, 0) };
        cmds >= 0 && cmds & PRIVATE_EXPEDITED != 0
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        false
    }
}

/// The statistics of a domain count what happened: one grace period per `synchronize`,
/// one reader slot per thread reading at the same time; a read guard shows its index.
#[test]
fn grace_periods_and_reader_slots_count_what_happened() {
    let srcu = Srcu::new();
    assert_eq!((srcu.grace_periods(), srcu.reader_slots()), (0, 0));
    for _ in 0..3 {
        srcu.synchronize();
    }
    assert_eq!(srcu.grace_periods(), 3);
    let guard = srcu.read_lock();
    assert_eq!(format!("{guard:?}"), "SrcuReadGuard { .. }");
    let inside = std::sync::Barrier::new(3);
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let _g = srcu.read_lock();
                inside.wait(); // all three read at once
                inside.wait();
            });
        }
        inside.wait();
        assert_eq!(srcu.reader_slots(), 3);
        inside.wait();
    });
    drop(guard);
}
