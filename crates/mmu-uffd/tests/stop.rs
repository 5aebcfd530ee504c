//! The stop sequence leaves nothing registered (a forked child holding a copy of the
//! descriptor would otherwise make the parent's munmap wait), whatever moved or grew, and
//! completes even when a callback panics again on `Release`.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use mmu_notifier::{Event, IntervalContext, IntervalSubscriber, Range, WouldBlock};
use mmu_uffd::MonitorState;

/// A subscriber whose every invalidation panics (the Release at stop included), as a
/// callback with a failing assertion or a poisoned lock would.
struct AlwaysPanics;

impl IntervalSubscriber for AlwaysPanics {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        panic!(
            "review: this subscriber panics on every invalidation ({:?})",
            r.event()
        );
    }
}

/// A callback that panics stops the monitor (caught around `apply`). The stop sequence
/// then delivers `Release` to every subscription, outside any `catch_unwind`: the same
/// callback panics again, the applier thread dies before setting `released`, the reader
/// polls for ever, and dropping the monitor hangs in `reader.join()`. Nothing is
/// unregistered either.
#[test]
fn drop_completes_when_a_callback_also_panics_on_release() {
    let Some(m) = monitor_or_skip("drop_completes_when_a_callback_also_panics_on_release") else {
        return;
    };
    let p = anon(4);
    m.watch(p, 4 * PAGE).unwrap();
    let sub = m
        .subscriptions()
        .insert_interval(p as u64..p as u64 + 4 * PAGE as u64, AlwaysPanics)
        .unwrap();
    unmap(p, 4 * PAGE);
    // The monitor stops (the Unmap's panic was caught).
    let _ = m.sync();
    assert!(m.state() != MonitorState::Running);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(m);
        let _ = tx.send(());
    });
    let dropped = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    std::mem::forget(sub);
    assert!(
        dropped,
        "dropping the monitor hung: the applier died in stop() (Release panicked) before \
         setting `released`, so the reader never exits"
    );
    let _ = Event::Unmap;
}

/// Forks a child that holds a copy of every descriptor (the monitor's userfaultfd
/// included: O_CLOEXEC only closes it at exec) and sleeps until killed.
fn child_holding_descriptors() -> libc::pid_t {
    // SAFETY: the child only calls async-signal-safe functions, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        loop {
            // SAFETY: async-signal-safe.
            unsafe { libc::sleep(60) };
        }
    }
    pid
}

fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// munmap `[p, p + len)` on another thread; whether it returned within `limit`.
fn munmap_returns_within(p: *mut u8, len: usize, limit: Duration) -> (bool, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let a = p as usize;
    std::thread::spawn(move || {
        unmap(a as *mut u8, len);
        let _ = tx.send(());
    });
    let ok = rx.recv_timeout(limit).is_ok();
    (ok, rx)
}

/// The stop sequence unregisters "everything ever registered" (`Shared::registered`) so
/// that a forked child holding a copy of the descriptor cannot keep this process's
/// memory registered with a context nobody reads. But the kernel carries a registration
/// along when a registered mapping is moved by mremap (REMAP is enabled: the monitor's
/// own docs say "the moved mapping keeps its registration"), and nothing adds the
/// destination to `registered`. After the monitor is dropped the moved memory is still
/// registered; with a child holding the descriptor, the parent's munmap of it waits in
/// the kernel for an event reader that no longer exists, until the child exits.
#[test]
fn stop_unregisters_mremap_destinations() {
    let Some(m) = monitor_or_skip("stop_unregisters_mremap_destinations") else {
        return;
    };
    let p = anon(4);
    m.watch(p, 4 * PAGE).unwrap();
    let dest = reserve(4);
    // SAFETY: moves our own mapping over our own reservation.
    let q = unsafe {
        libc::mremap(
            p.cast(),
            4 * PAGE,
            4 * PAGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dest.cast::<libc::c_void>(),
        )
    };
    assert_eq!(q, dest.cast());
    m.sync().unwrap();
    assert_eq!(m.stats().remaps, 1);
    let child = child_holding_descriptors();
    drop(m);
    let (ok, rx) = munmap_returns_within(dest, 4 * PAGE, Duration::from_secs(3));
    kill_and_reap(child);
    let _ = rx.recv_timeout(Duration::from_secs(5));
    assert!(
        ok,
        "munmap of memory moved by mremap hung after the monitor stopped (released only \
         when the child holding the descriptor exited): the destination stayed registered"
    );
}

/// The same with mremap growing a registered mapping in place: the kernel extends the
/// registered VMA, the new tail is registered but not in `registered`.
#[test]
fn stop_unregisters_mremap_grown_tails() {
    let Some(m) = monitor_or_skip("stop_unregisters_mremap_grown_tails") else {
        return;
    };
    // Room to grow: map 8 pages, give back the last 4 (before watching: no event).
    let p = anon(8);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(p.add(4 * PAGE).cast(), 4 * PAGE) };
    m.watch(p, 4 * PAGE).unwrap();
    // SAFETY: grows our own mapping in place (no MAYMOVE).
    let r = unsafe { libc::mremap(p.cast(), 4 * PAGE, 8 * PAGE, 0) };
    if r == libc::MAP_FAILED {
        eprintln!("SKIPPED: the space after the mapping was taken meanwhile");
        return;
    }
    touch(p, 8 * PAGE);
    let child = child_holding_descriptors();
    drop(m);
    // SAFETY: p + 4 pages is inside our grown mapping.
    let tail = unsafe { p.add(4 * PAGE) };
    let (ok, rx) = munmap_returns_within(tail, 4 * PAGE, Duration::from_secs(3));
    kill_and_reap(child);
    let _ = rx.recv_timeout(Duration::from_secs(5));
    unmap(p, 4 * PAGE);
    assert!(
        ok,
        "munmap of the grown tail hung after the monitor stopped: the tail stayed registered"
    );
}

/// Control (passes): memory watched where it is, then the same sequence: stop unregisters
/// it, and the munmap returns although the child holds the descriptor.
#[test]
fn stop_unregisters_memory_that_did_not_move() {
    let Some(m) = monitor_or_skip("stop_unregisters_memory_that_did_not_move") else {
        return;
    };
    let p = anon(4);
    m.watch(p, 4 * PAGE).unwrap();
    let child = child_holding_descriptors();
    drop(m);
    let (ok, rx) = munmap_returns_within(p, 4 * PAGE, Duration::from_secs(3));
    kill_and_reap(child);
    let _ = rx.recv_timeout(Duration::from_secs(5));
    assert!(ok, "control: munmap hung");
}

/// Without `/proc/self/maps` the stop sequence falls back on what the monitor knows it
/// registered: watched memory, and memory that cache entries leased, is unregistered.
#[cfg(feature = "fault-injection")]
#[test]
fn stop_without_proc_maps_unregisters_what_it_knows() {
    let Some(m) = monitor_or_skip("stop_without_proc_maps_unregisters_what_it_knows") else {
        return;
    };
    let (cache, _) = counting_cache(&m, mmu_uffd::CacheConfig::default());
    let watched = anon(4);
    m.watch(watched, 4 * PAGE).unwrap();
    let leased = anon(4);
    let h = cache.get(leased, 4 * PAGE).unwrap();
    m.inject_proc_maps_unreadable();
    let child = child_holding_descriptors();
    // The monitor stops while the entry still holds its lease.
    drop(m);
    let (ok_watched, rx1) = munmap_returns_within(watched, 4 * PAGE, Duration::from_secs(3));
    let (ok_leased, rx2) = munmap_returns_within(leased, 4 * PAGE, Duration::from_secs(3));
    kill_and_reap(child);
    let _ = rx1.recv_timeout(Duration::from_secs(5));
    let _ = rx2.recv_timeout(Duration::from_secs(5));
    drop(h);
    drop(cache);
    assert!(
        ok_watched,
        "watched memory stayed registered: its munmap hung"
    );
    assert!(
        ok_leased,
        "leased memory stayed registered: its munmap hung"
    );
}

/// `Shared::register` registers first and checks for holes after: when the check fails
/// the mapped parts stay registered, but the error return skips `registered.add`, so
/// stop never unregisters them (same hang as above with a child holding the descriptor).
#[test]
fn stop_unregisters_a_refused_watch_with_a_hole() {
    let Some(m) = monitor_or_skip("stop_unregisters_a_refused_watch_with_a_hole") else {
        return;
    };
    let p = anon(4);
    // SAFETY: our own mapping: a hole in the middle of it.
    unsafe { libc::munmap(p.add(PAGE).cast(), PAGE) };
    assert!(
        m.watch(p, 4 * PAGE).is_err(),
        "a range with a hole is refused"
    );
    let child = child_holding_descriptors();
    drop(m);
    let (ok, rx) = munmap_returns_within(p, PAGE, Duration::from_secs(3));
    kill_and_reap(child);
    let _ = rx.recv_timeout(Duration::from_secs(5));
    // SAFETY: the last two pages are ours.
    unmap(unsafe { p.add(2 * PAGE) }, 2 * PAGE);
    assert!(
        ok,
        "munmap hung after stop: the refused watch left the mapped part registered"
    );
}

/// Records the events it receives.
#[cfg(feature = "fault-injection")]
struct Events(std::sync::Arc<parking_lot::Mutex<Vec<Event>>>);

#[cfg(feature = "fault-injection")]
impl IntervalSubscriber for Events {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0.lock().push(r.event());
        Ok(())
    }
}

/// A read of the descriptor that fails stops the monitor: the state is `Failed` with the
/// error, every subscription receives `Release` (nothing can be trusted once events stop),
/// and calls that need the monitor fail with that reason instead of waiting.
#[cfg(feature = "fault-injection")]
#[test]
fn a_failed_read_stops_the_monitor_with_its_error() {
    let Some(m) = monitor_or_skip("a_failed_read_stops_the_monitor_with_its_error") else {
        return;
    };
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let p = anon(4);
    m.watch(p, 4 * PAGE).unwrap();
    let kept = anon(4);
    let sub = m
        .subscriptions()
        .insert_interval(
            kept as u64..kept as u64 + 4 * PAGE as u64,
            Events(seen.clone()),
        )
        .unwrap();
    m.inject_read_error(libc::EIO);
    unmap(p, 4 * PAGE); // an event: the read for it fails
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while m.state() == MonitorState::Running && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let state = m.state();
    let MonitorState::Failed(why) = &state else {
        panic!("a failed read left the monitor {state:?}");
    };
    let eio = std::io::Error::from_raw_os_error(libc::EIO).to_string();
    assert!(
        why.contains("reading userfaultfd events failed") && why.contains(&eio),
        "{why}"
    );
    assert_eq!(
        *seen.lock(),
        [Event::Release],
        "the subscription was released"
    );
    match m.sync() {
        Err(mmu_uffd::Error::Stopped { why: Some(w) }) => assert_eq!(&w, why),
        other => panic!("sync after the failure: {other:?}"),
    }
    drop(sub);
    unmap(kept, 4 * PAGE);
}
