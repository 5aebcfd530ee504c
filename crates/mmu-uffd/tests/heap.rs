//! Heap memory is safe to watch: buffers from malloc's own heap are registered in a cache
//! while the heap top is trimmed (brk shrinks: UNMAP events) and free pages inside it are
//! released (`malloc_trim`: madvise, REMOVE events), and every callback of the monitor's
//! side (a raw subscriber's `invalidate`) and of the registrar allocates and frees.
//!
//! The hazard: a thread that trims the heap holds the allocator's lock while the kernel
//! waits for the monitor to read the event; if the thread that reads events were
//! allocating (or itself trimming watched heap memory) at that moment, neither would go
//! on. The monitor's reader only polls and reads; the callbacks run on its applier.
//!
//! The work runs in a child process of this test binary started with one malloc arena
//! (`GLIBC_TUNABLES=glibc.malloc.arena_max=1`), so that every thread, the monitor's
//! included, shares the heap and its lock: with one arena per thread the hazard would
//! depend on which arena each thread happened to get. The child aborts with a message
//! after 60 s (a hang is a failure), and the parent kills it after 90 s.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mmu_notifier::{IntervalContext, IntervalSubscriber, Range, WouldBlock};
use mmu_uffd::{CacheConfig, MonitorState, RegCache};

/// Set in the child's environment: `heap_child` does the work only there.
const CHILD_ENV: &str = "MMU_UFFD_HEAP_CHILD";
/// Printed by the child when it finished its rounds.
const DONE: &str = "HEAP-CHILD-DONE";

const THREADS: usize = 2;
const ROUNDS: usize = 5_000;

/// A raw subscriber over the whole address space whose `invalidate` allocates a few KiB
/// and frees them (on the monitor's side), counting its calls.
struct Allocating(Arc<AtomicU64>);

impl IntervalSubscriber for Allocating {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        let v = std::hint::black_box(vec![0x33u8; 6 * 1024]);
        drop(v);
        self.0.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// Runs `heap_child` in a child process with one malloc arena and checks it finished.
#[test]
fn heap_memory_is_safe_to_watch() {
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "heap_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child test process");
    let limit = Duration::from_secs(90);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("the killed child's output");
            panic!(
                "HANG: the heap child did not finish within {limit:?} (killed)\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("the child's output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        status.success(),
        "the heap child failed ({status}):\n{text}"
    );
    if text.contains("SKIPPED") {
        eprintln!("SKIPPED heap_memory_is_safe_to_watch: the child skipped");
        return;
    }
    assert!(
        text.contains(DONE),
        "the child did not run its rounds:\n{text}"
    );
}

/// The child's work (does nothing unless started by `heap_memory_is_safe_to_watch`):
/// frees trim the heap top at once, buffers come from the heap, and `THREADS` threads
/// each run `ROUNDS` rounds of malloc, `get`, free, `malloc_trim`.
#[test]
fn heap_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let _dog = Watchdog::new(
        "heap child: malloc/get/free/malloc_trim rounds on watched heap memory",
        Duration::from_secs(60),
    );
    // SAFETY: mallopt only changes the allocator's tunables.
    unsafe {
        assert_eq!(libc::mallopt(libc::M_TRIM_THRESHOLD, PAGE as i32), 1);
        assert_eq!(libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20), 1);
    }
    let Some(m) = monitor_or_skip("heap_child") else {
        return;
    };
    let calls = Arc::new(AtomicU64::new(0));
    let _sub = m
        .subscriptions()
        .insert_interval(0..u64::MAX, Allocating(calls.clone()))
        .expect("subscribe");
    let (registered, deregistered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (r, d) = (registered.clone(), deregistered.clone());
    // The registrar allocates on register and frees on deregister (user threads).
    let cache = RegCache::with_fns(
        &m,
        CacheConfig::default().with_capacity(16),
        move |p: *mut u8, len: usize| {
            r.fetch_add(1, Relaxed);
            Ok::<_, std::io::Error>((p as usize, len, vec![0u8; 3 * 1024]))
        },
        move |reg: (usize, usize, Vec<u8>)| {
            drop(std::hint::black_box(reg));
            d.fetch_add(1, Relaxed);
        },
    );
    let started = Instant::now();
    let lookups = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (cache, lookups) = (&cache, &lookups);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let len = PAGE * (2 + (round * 7 + t * 3) % 30);
                    let mut buf = vec![0u8; len];
                    for i in (0..len).step_by(PAGE) {
                        buf[i] = round as u8;
                    }
                    let h = cache
                        .get(buf.as_ptr(), len)
                        .expect("lookup of a heap buffer");
                    assert!(h.len() >= len);
                    lookups.fetch_add(1, Relaxed);
                    drop(h);
                    drop(std::hint::black_box(buf)); // free: the heap top is trimmed
                    if round % 4 == 0 {
                        // SAFETY: malloc_trim only releases free memory of the allocator.
                        unsafe { libc::malloc_trim(0) };
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    m.sync().expect("the monitor still runs");
    assert!(
        m.state() == MonitorState::Running,
        "the monitor stopped: {:?}",
        m.state()
    );
    let st = m.stats();
    let cs = cache.stats();
    drop(cache);
    let calls = calls.load(SeqCst);
    eprintln!(
        "{} lookups in {elapsed:?}; monitor {st:?}; cache {cs:?}; allocating callback ran {calls} times",
        lookups.load(SeqCst)
    );
    assert_eq!(lookups.load(SeqCst), (THREADS * ROUNDS) as u64);
    // Not vacuous: the heap was trimmed under watched buffers, and the callbacks ran.
    assert!(
        st.unmaps + st.removes >= 100,
        "too few heap trims reached the monitor: {st:?}"
    );
    assert!(calls >= 100, "the allocating callback ran {calls} times");
    assert_eq!(
        registered.load(SeqCst),
        deregistered.load(SeqCst),
        "every registration released"
    );
    println!("{DONE}");
}
