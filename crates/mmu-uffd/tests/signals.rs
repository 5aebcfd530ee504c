//! A SIGPROF storm during monitoring: every invalidation is still seen, nothing hangs, the
//! monitor keeps running.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mmu_uffd::CacheConfig;

static SIGNALS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigprof(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

fn set_timer(usec: i64) {
    let t = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: usec,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: usec,
        },
    };
    // SAFETY: `t` is a valid itimerval; the old value is not wanted.
    let r = unsafe { libc::setitimer(libc::ITIMER_PROF, &t, std::ptr::null_mut()) };
    assert_eq!(r, 0, "setitimer: {}", std::io::Error::last_os_error());
}

/// Moves a fresh mapping over `at` (unmapping the old one: an UNMAP event).
fn replace(at: *mut u8, len: usize) {
    let fresh = anon(len / PAGE);
    // SAFETY: moves our own fresh mapping over our own old one.
    let r = unsafe {
        libc::mremap(
            fresh.cast(),
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            at.cast::<libc::c_void>(),
        )
    };
    assert_eq!(r, at.cast(), "mremap: {}", std::io::Error::last_os_error());
}

#[test]
fn sigprof_storm_loses_nothing() {
    let Some(m) = monitor_or_skip("sigprof_storm_loses_nothing") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default().with_capacity(16));
    let cache = Arc::new(cache);
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask; the old action is
    // saved and restored below.
    let old = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigprof as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGPROF, &sa, &mut old), 0);
        old
    };
    set_timer(50);
    let deadline = Instant::now() + Duration::from_millis(800);
    // Each worker owns one address and replaces its memory there atomically (mremap of a
    // fresh mapping over it: an UNMAP), so no other thread can be handed that address
    // while an unmap of it is in flight (see the cache's documented limits).
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let at = anon(2);
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    let h = cache.get(at, 2 * PAGE).expect("lookup during the storm");
                    assert!(h.is_valid());
                    madvise(at, PAGE, libc::MADV_DONTNEED);
                    assert!(!h.is_valid(), "madvise lost during the storm");
                    let h = cache.get(at, 2 * PAGE).expect("lookup during the storm");
                    assert!(h.is_valid());
                    replace(at, 2 * PAGE);
                    assert!(!h.is_valid(), "an unmap lost during the storm");
                    rounds += 1;
                }
                unmap(at, 2 * PAGE);
                rounds
            })
        })
        .collect();
    let rounds: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    set_timer(0);
    // SAFETY: restores the saved action.
    unsafe { libc::sigaction(libc::SIGPROF, &old, std::ptr::null_mut()) };
    let signals = SIGNALS.load(Ordering::Relaxed);
    let st = m.stats();
    eprintln!("{rounds} rounds, {signals} SIGPROFs, {st:?}");
    assert!(signals > 100, "the storm did not happen: {signals} signals");
    assert!(rounds > 50, "only {rounds} rounds");
    assert!(
        m.stopped().is_none(),
        "the monitor stopped: {:?}",
        m.stopped()
    );
    assert!(st.unmaps >= rounds, "{st:?}");
    assert!(st.removes >= rounds, "{st:?}");
}
