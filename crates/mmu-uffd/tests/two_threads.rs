//! The monitor's two threads (see `applier`): the one an event wakes applies it unless the
//! other holds the applying role, and whichever runs user code, the other stays free to
//! read. A callback that unmaps watched memory needs that: its munmap returns only once
//! the *other* thread has read the event. Run with the monitor on its own CPUs and with
//! everything pinned to one CPU (where the thread that reads is the one that applies).
//! The failure mode is a hang: a watchdog turns it into an abort with a message.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, WouldBlock};
use mmu_uffd::Monitor;

/// On its first `Unmap`, unmaps `next` (watched memory) from inside the callback.
struct UnmapsNext {
    next: Option<(usize, usize)>,
    calls: Arc<AtomicUsize>,
}

impl IntervalSubscriber for UnmapsNext {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.calls.fetch_add(1, SeqCst);
        if r.event() == Event::Unmap {
            if let Some((p, len)) = self.next.take() {
                unmap(p as *mut u8, len);
            }
        }
        Ok(())
    }
}

/// Records that it was invalidated.
struct Seen(Arc<AtomicBool>);

impl IntervalSubscriber for Seen {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0.store(true, SeqCst);
        Ok(())
    }
}

/// A chain of `n` watched mappings: unmapping the first makes each callback unmap the
/// next, from the monitor thread that applies. Every munmap returns, and every
/// subscription is invalidated by the time the first munmap's caller passes `sync`.
fn chain(m: &Monitor, n: usize) {
    let bufs: Vec<*mut u8> = (0..n).map(|_| anon(2)).collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(AtomicBool::new(false));
    let mut subs = Vec::new();
    for (i, &p) in bufs.iter().enumerate() {
        m.watch(p, 2 * PAGE).unwrap();
        let range = p as u64..p as u64 + 2 * PAGE as u64;
        if i + 1 < n {
            let next = Some((bufs[i + 1] as usize, 2 * PAGE));
            subs.push(
                m.subscriptions()
                    .insert_interval(
                        range,
                        UnmapsNext {
                            next,
                            calls: calls.clone(),
                        },
                    )
                    .map(|s| Box::new(s) as Box<dyn std::any::Any>)
                    .unwrap(),
            );
        } else {
            subs.push(
                m.subscriptions()
                    .insert_interval(range, Seen(last.clone()))
                    .map(|s| Box::new(s) as Box<dyn std::any::Any>)
                    .unwrap(),
            );
        }
    }
    unmap(bufs[0], 2 * PAGE);
    m.sync().unwrap();
    // The callbacks ran one inside the other's event: each unmap's event is read by the
    // thread that is not applying, then applied once the role is free again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !last.load(SeqCst) {
        assert!(std::time::Instant::now() < deadline, "the chain stopped");
        std::thread::sleep(Duration::from_millis(1));
        m.sync().unwrap();
    }
    assert!(calls.load(SeqCst) >= n - 1, "every link's callback ran");
    drop(subs);
}

#[test]
fn a_callback_that_unmaps_watched_memory_returns() {
    let Some(m) = monitor_or_skip("a_callback_that_unmaps_watched_memory_returns") else {
        return;
    };
    let _w = Watchdog::new(
        "a callback that unmaps watched memory",
        Duration::from_secs(60),
    );
    for _ in 0..20 {
        chain(&m, 4);
    }
}

#[test]
fn a_callback_that_unmaps_watched_memory_returns_on_one_cpu() {
    // In a thread of its own, pinned with the monitor it creates (threads inherit the
    // mask), so the pinning ends with it.
    std::thread::spawn(|| {
        // SAFETY: sched_getcpu takes no arguments.
        let cpu = unsafe { libc::sched_getcpu() };
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it;
        // sched_setaffinity(0, ...) applies to the calling thread only.
        let pinned = cpu >= 0
            && unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu as usize, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
            };
        if !pinned {
            println!("SKIPPED: cannot pin to one CPU (sched_getcpu/sched_setaffinity)");
            return;
        }
        let Some(m) = monitor_or_skip("a_callback_that_unmaps_watched_memory_returns_on_one_cpu")
        else {
            return;
        };
        let _w = Watchdog::new(
            "a callback that unmaps watched memory, one CPU",
            Duration::from_secs(60),
        );
        for _ in 0..20 {
            chain(&m, 4);
        }
    })
    .join()
    .unwrap();
}
