//! How the monitor's threads use the CPU. `MonitorConfig::busy_poll`, observed through
//! their CPU time: by default they sleep whenever no event is pending (an idle monitor
//! costs no CPU); with a period, one thread keeps polling for that long after an event,
//! then sleeps again. And their time slice: the scheduler's shortest.
//!
//! One test in its own binary: the CPU time is read per thread of this process, and no
//! other monitor may exist meanwhile.

mod common;

use std::time::Duration;

use common::*;
use mmu_uffd::{Monitor, MonitorConfig};

/// The ids of this process's threads whose name starts with the monitor's (the kernel
/// keeps the first 15 bytes of a thread name).
fn monitor_tids() -> Vec<u64> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let entry = entry.expect("a task entry");
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with("mmu-uffd-monito") {
            tids.push(entry.file_name().to_string_lossy().parse().expect("a tid"));
        }
    }
    tids
}

/// CPU time the threads have run, from the scheduler's per-task statistics (nanoseconds;
/// `None` where the kernel does not keep them).
fn cpu_ns(tids: &[u64]) -> Option<u64> {
    let mut sum = 0;
    for tid in tids {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        sum += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(sum)
}

/// Times the threads went to sleep (voluntary context switches) so far.
fn sleeps(tids: &[u64]) -> u64 {
    tids.iter()
        .map(|tid| {
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
                .expect("the thread's status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("voluntary_ctxt_switches")
        })
        .sum()
}

/// CPU time of `tids` over `window` of wall time, in milliseconds.
fn cpu_ms_over(tids: &[u64], window: Duration) -> f64 {
    let before = cpu_ns(tids).expect("schedstat");
    std::thread::sleep(window);
    let after = cpu_ns(tids).expect("schedstat");
    (after - before) as f64 / 1e6
}

fn threads_of(m: &Monitor) -> Vec<u64> {
    // The constructor returns once both threads run; ask again until the names are set.
    m.sync().expect("a running monitor");
    let tids = monitor_tids();
    assert_eq!(
        tids.len(),
        2,
        "the monitor's two threads, by name: {tids:?}"
    );
    tids
}

/// One watched range unmapped: an UNMAP event for the monitor.
fn one_event(m: &Monitor) {
    let p = anon(4);
    m.watch(p, 4 * PAGE).expect("watch");
    unmap(p, 4 * PAGE);
    m.sync().expect("the event applied");
}

#[test]
fn an_idle_monitor_sleeps_and_a_busy_poll_period_polls_then_sleeps() {
    if cpu_ns(&[]).is_none() || std::fs::metadata("/proc/self/schedstat").is_err() {
        eprintln!("SKIPPED: the kernel keeps no per-task schedstat");
        return;
    }
    let window = Duration::from_millis(300);

    // Default: no polling. Before and after an event, the threads sleep.
    let Some(m) = monitor_or_skip("an_idle_monitor_sleeps") else {
        return;
    };
    let tids = threads_of(&m);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut version = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    let custom_slices = matches!(
        (version.next(), version.next()),
        (Some(Ok(major)), Some(Ok(minor))) if (major, minor) >= (6, 12)
    );
    for tid in tids.iter().filter(|_| custom_slices) {
        // Kernels from 6.12 honour the request, and show the slice (ns) as `se.slice`.
        let sched =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).unwrap_or_default();
        let slice = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse::<u64>().ok());
        match slice {
            Some(ns) => assert_eq!(ns, 100_000, "monitor thread {tid}'s time slice"),
            None => eprintln!("SKIPPED the slice check: no se.slice in /proc/self/task/*/sched"),
        }
    }
    if !custom_slices {
        eprintln!(
            "SKIPPED the slice check: kernel {} predates custom slices (6.12)",
            release.trim()
        );
    }
    let slept = sleeps(&tids);
    let idle = cpu_ms_over(&tids, window);
    // Asleep means asleep: not waking up now and then to look (a timeout in the wait).
    let wakeups = sleeps(&tids) - slept;
    assert!(
        wakeups < 10,
        "an idle monitor woke {wakeups} times in 300 ms"
    );
    one_event(&m);
    let after_event = cpu_ms_over(&tids, window);
    eprintln!("default: {idle:.2} ms idle, {after_event:.2} ms after an event, per 300 ms");
    // A polling thread would take a large share of a CPU (even on a loaded machine its
    // fair share of 300 ms is tens of milliseconds); a sleeping one takes nothing.
    assert!(
        idle < 15.0,
        "an idle monitor used {idle:.2} ms of CPU in 300 ms"
    );
    assert!(
        after_event < 15.0,
        "the monitor kept using CPU after its event: {after_event:.2} ms in 300 ms"
    );
    drop(m);

    // A period of 600 ms: polling during the first 300 ms after an event, asleep from
    // 900 ms on.
    let config = MonitorConfig::default().with_busy_poll(Duration::from_millis(600));
    let Some(m) = monitor_with_or_skip("a_busy_poll_period_polls_then_sleeps", config) else {
        return;
    };
    let tids = threads_of(&m);
    // The period runs from the thread's start, too: let it pass first.
    std::thread::sleep(Duration::from_millis(700));
    let before_event = cpu_ms_over(&tids, window);
    one_event(&m);
    let polling = cpu_ms_over(&tids, window);
    std::thread::sleep(Duration::from_millis(400));
    let after_period = cpu_ms_over(&tids, window);
    eprintln!(
        "busy_poll 600 ms: {before_event:.2} ms before the event, {polling:.2} ms in the \
         300 ms after it, {after_period:.2} ms once the period is over"
    );
    assert!(
        before_event < 15.0,
        "polled with no recent event: {before_event:.2} ms of CPU in 300 ms"
    );
    assert!(
        polling > 30.0,
        "did not poll after an event: {polling:.2} ms of CPU in 300 ms"
    );
    assert!(
        after_period < 15.0,
        "kept polling after the period: {after_period:.2} ms of CPU in 300 ms"
    );
}
