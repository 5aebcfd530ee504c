//! With FORK events, a fork whose child descriptor the monitor cannot receive (the process
//! is out of descriptors: EMFILE on the read) does not stop the monitor: it backs off,
//! receives the descriptor once one is free, and the fork completes.
//!
//! Alone in its file (so in its own process): lowering the descriptor limit would break
//! any test running alongside.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use mmu_uffd::{CacheConfig, MonitorConfig, MonitorState};

/// The lowest descriptor number not in use (all below it are open).
fn lowest_free_fd() -> u64 {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory's own descriptor is closed again by now: a number it took is free.
    (0..)
        .find(|n| !open.contains(n) || !fd_is_open(*n))
        .unwrap()
}

fn fd_is_open(fd: u64) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    unsafe { libc::fcntl(fd as i32, libc::F_GETFD) != -1 }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

fn nofile() -> libc::rlimit {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `l`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
    l
}

fn set_nofile(l: &libc::rlimit) {
    // SAFETY: setrlimit reads one rlimit; the soft limit is at most the hard one.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, l) };
    assert_eq!(r, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// Forks a child that exits at once; returns how long `fork` took.
fn fork_and_reap() -> Duration {
    let t = Instant::now();
    // SAFETY: the child only calls _exit.
    let pid = unsafe { libc::fork() };
    let took = t.elapsed();
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: async-signal-safe; no destructor runs in the child.
        unsafe { libc::_exit(0) };
    }
    assert_eq!(wait_child(pid, Duration::from_secs(10)), 0);
    took
}

#[test]
fn emfile_on_a_fork_event_is_survived() {
    let Some(m) = monitor_with_or_skip(
        "emfile_on_a_fork_event_is_survived",
        MonitorConfig::default().with_fork_events(true),
    ) else {
        return;
    };
    let _dog = Watchdog::new(
        "emfile_on_a_fork_event_is_survived (a fork waiting for its FORK event to be read)",
        Duration::from_secs(60),
    );
    // Watched memory that stays mapped across the fork: the fork raises a FORK event.
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let p = anon(4);
    let h = cache.get(p, 4 * PAGE).unwrap();
    let applied = Arc::new(AtomicBool::new(false));
    let _sub = m
        .subscriptions()
        .insert_interval(
            p as u64..p as u64 + (4 * PAGE) as u64,
            Flag(applied.clone()),
        )
        .unwrap();
    let fds = fd_count();
    let normal = nofile();
    let restored = Arc::new(AtomicBool::new(false));
    // Started (and done allocating) before the fork: it restores the limit while the
    // forking thread waits in the kernel.
    let ready = Arc::new(Barrier::new(2));
    let restorer = {
        let (ready, restored) = (ready.clone(), restored.clone());
        std::thread::spawn(move || {
            ready.wait();
            // Part of the scenario, not synchronization: the fork stays blocked (the
            // monitor cannot take the child's descriptor) for this long.
            std::thread::sleep(Duration::from_millis(100));
            set_nofile(&normal);
            restored.store(true, SeqCst);
        })
    };
    let lowest = lowest_free_fd();
    set_nofile(&libc::rlimit {
        rlim_cur: lowest,
        rlim_max: normal.rlim_max,
    });
    // No descriptor is free now: the monitor's read of the FORK event gets EMFILE.
    // SAFETY: dup of stdin; closed at once if it unexpectedly succeeds.
    let d = unsafe { libc::dup(0) };
    let dup_error = std::io::Error::last_os_error();
    if d >= 0 {
        // SAFETY: closes the descriptor just made.
        unsafe { libc::close(d) };
    }
    ready.wait();
    let took = fork_and_reap();
    restorer.join().unwrap();
    assert_eq!(
        (d, dup_error.raw_os_error()),
        (-1, Some(libc::EMFILE)),
        "the limit {lowest} left a descriptor free"
    );
    assert!(restored.load(SeqCst));
    eprintln!("the fork took {took:?} (the limit was restored after 100 ms)");
    assert!(
        m.state() == MonitorState::Running,
        "the monitor stopped: {:?}",
        m.state()
    );
    m.sync().expect("the monitor runs");
    let st = m.stats();
    assert_eq!(st.forks, 1, "{st:?}");
    assert!(
        st.read_backoffs >= 1,
        "the monitor never hit EMFILE: the test did not test anything: {st:?}"
    );
    eprintln!("{} reads backed off", st.read_backoffs);
    assert!(h.is_valid(), "nothing happened to the watched memory");
    // The child's descriptor was received and closed.
    let deadline = Instant::now() + Duration::from_secs(2);
    while fd_count() != fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(fd_count(), fds, "the child's userfaultfd leaked");
    // A second fork, with descriptors to spare, is plain.
    fork_and_reap();
    m.sync().expect("the monitor runs");
    assert_eq!(m.stats().forks, 2);
    // A watched munmap is still applied: the raw flag (no gate) is set once sync returns.
    unmap(p, 4 * PAGE);
    m.sync().expect("the monitor runs");
    assert!(
        applied.load(SeqCst),
        "the munmap after the EMFILE was not applied"
    );
    assert!(!h.is_valid());
    assert!(m.state() == MonitorState::Running);
}
