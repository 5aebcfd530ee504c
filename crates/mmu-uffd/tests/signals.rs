//! The monitor under signals: a SIGPROF storm while several threads map, watch, look up
//! and unmap; and signals aimed at a thread that waits in munmap for the monitor.
//!
//! Signal handlers and interval timers are process-wide: the tests of this binary run one
//! at a time (`SERIAL`), and each restores the handler and the timer it changed, also when
//! it fails.

mod common;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::recording::*;
use common::*;
use mmu_notifier::Event;
use mmu_uffd::{CacheConfig, MonitorState};
use parking_lot::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn rec_key(r: &Rec) -> (u64, u64, usize) {
    (r.0, r.1, Event::ALL.iter().position(|e| *e == r.2).unwrap())
}

const SLOT: usize = 4 * PAGE;

/// A thread's own slots of 4 pages, held by its inaccessible placeholders while unused
/// (see `Slots` in tests/monitor/threads.rs: no thread maps at an address another thread has just
/// unmapped, which userfaultfd cannot make safe).
struct Slots {
    free: VecDeque<usize>,
}

impl Slots {
    fn new(count: usize) -> Slots {
        let base = map(
            0,
            count * SLOT,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) as usize;
        Slots {
            free: (0..count).map(|i| base + i * SLOT).collect(),
        }
    }

    /// Touched read-write memory over one of this thread's placeholders (unwatched: no
    /// event).
    fn map(&mut self) -> *mut u8 {
        let slot = self
            .free
            .pop_front()
            .expect("every slot was taken by someone else");
        let p = map(
            slot,
            SLOT,
            RW,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
        touch(p, SLOT);
        p
    }

    /// Claims a slot back after its memory was unmapped.
    fn give_back(&mut self, slot: *mut u8) {
        // SAFETY: MAP_FIXED_NOREPLACE maps a placeholder only where nothing is mapped.
        let r = unsafe {
            libc::mmap(
                slot.cast(),
                SLOT,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "placeholder: {e}");
            return;
        }
        assert_eq!(r.cast(), slot);
        self.free.push_back(slot as usize);
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        for &slot in &self.free {
            unmap(slot as *mut u8, SLOT);
        }
    }
}

/// Installs `handler` for `sig` (SA_RESTART); the old action comes back on drop.
struct Handler {
    sig: libc::c_int,
    old: libc::sigaction,
}

impl Handler {
    fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> Handler {
        // SAFETY: `sa` is fully initialised (zeroed, then the mask emptied and the handler
        // and flags set); `old` receives the previous action. The handler only touches
        // atomics, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig, &sa, &mut old), 0);
            Handler { sig, old }
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // A signal generated before the timer (or the sender) stopped may still be
        // pending: let it reach our handler before the old action (maybe "terminate")
        // comes back.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            std::thread::sleep(Duration::from_millis(5));
            // SAFETY: `set` is initialised by sigpending.
            let pending = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigpending(&mut set);
                libc::sigismember(&set, self.sig) == 1
            };
            if !pending || Instant::now() > deadline {
                break;
            }
        }
        // SAFETY: restores the action saved by `install`.
        unsafe { libc::sigaction(self.sig, &self.old, std::ptr::null_mut()) };
    }
}

/// An ITIMER_PROF timer; the old timer comes back on drop.
struct ProfTimer {
    old: libc::itimerval,
}

impl ProfTimer {
    fn start(every: Duration) -> ProfTimer {
        let tv = libc::timeval {
            tv_sec: every.as_secs() as libc::time_t,
            tv_usec: every.subsec_micros() as libc::suseconds_t,
        };
        let it = libc::itimerval {
            it_interval: tv,
            it_value: tv,
        };
        // SAFETY: `it` is initialised; `old` receives the previous timer.
        unsafe {
            let mut old: libc::itimerval = std::mem::zeroed();
            assert_eq!(libc::setitimer(libc::ITIMER_PROF, &it, &mut old), 0);
            ProfTimer { old }
        }
    }
}

impl Drop for ProfTimer {
    fn drop(&mut self) {
        // SAFETY: restores the timer saved by `start` (normally: disarmed).
        unsafe { libc::setitimer(libc::ITIMER_PROF, &self.old, std::ptr::null_mut()) };
    }
}

/// Sends SIGPROF straight to the registered threads (tgkill, round robin, every ~50 us
/// of wall-clock time) until dropped: ITIMER_PROF alone counts process CPU time, so on a
/// machine busy with other work it fires only a few dozen times a second.
struct Sender {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

/// The thread ids a [`Sender`] aims at.
#[derive(Clone, Default)]
struct Targets(Arc<Mutex<Vec<libc::pid_t>>>);

impl Targets {
    /// Registers the calling thread until the returned guard drops.
    fn join(&self) -> TargetGuard {
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::gettid() };
        self.0.lock().push(tid);
        TargetGuard(self.clone(), tid)
    }
}

struct TargetGuard(Targets, libc::pid_t);

impl Drop for TargetGuard {
    fn drop(&mut self) {
        self.0 .0.lock().retain(|&t| t != self.1);
    }
}

impl Sender {
    fn start(sig: libc::c_int, targets: Targets) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: getpid has no arguments.
                let pid = unsafe { libc::getpid() };
                let mut sent = 0u64;
                let mut i = 0usize;
                while !stop.load(Relaxed) {
                    let tid = {
                        let t = targets.0.lock();
                        (!t.is_empty()).then(|| t[i % t.len()])
                    };
                    i = i.wrapping_add(1);
                    if let Some(tid) = tid {
                        // SAFETY: tgkill with our own pid only reaches threads of this
                        // process, whose handler for `sig` is installed; a thread that
                        // exited meanwhile makes it fail with ESRCH, which is fine.
                        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } == 0 {
                            sent += 1;
                        }
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                sent
            })
        };
        Sender {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let sent = t.join().unwrap_or(0);
            eprintln!("sender: {sent} directed signals");
        }
    }
}

static PROF_HITS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_prof(_: libc::c_int) {
    PROF_HITS.fetch_add(1, Relaxed);
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// SIGPROF every 50 us of process CPU time (SA_RESTART), plus SIGPROF aimed at each worker
/// in turn every 50 us of wall-clock time, for about a second while four
/// threads map, watch, look up (hits and misses), madvise and unmap: no call fails, nothing
/// hangs, every invalidation is visible to its thread as soon as the call returns and the
/// recorder sees exactly the expected events, the monitor keeps running, and the handler
/// ran many times.
#[test]
fn sigprof_storm_while_threads_map_watch_and_unmap() {
    const THREADS: usize = 4;
    let _serial = SERIAL.lock();
    let Some(m) = monitor_or_skip("sigprof_storm_while_threads_map_watch_and_unmap") else {
        return;
    };
    let (cache, counts) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let _dog = Watchdog::new(
        "sigprof_storm_while_threads_map_watch_and_unmap",
        Duration::from_secs(60),
    );
    let hits_before = PROF_HITS.load(Relaxed);
    let started = Instant::now();
    let (mut expected, rounds) = {
        // Declared first, dropped last: the timer stops before the handler goes.
        let _handler = Handler::install(libc::SIGPROF, count_prof);
        let _timer = ProfTimer::start(Duration::from_micros(50));
        let targets = Targets::default();
        let _sender = Sender::start(libc::SIGPROF, targets.clone());
        let until = Instant::now() + Duration::from_millis(1000);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (cache, m, targets) = (&cache, &m, &targets);
                    s.spawn(move || {
                        let _target = targets.join();
                        let mut slots = Slots::new(4);
                        let mut expect = Vec::new();
                        let mut rounds = 0u64;
                        while Instant::now() < until {
                            rounds += 1;
                            let p = slots.map();
                            let mut h = cache.get(p, SLOT).unwrap();
                            assert_eq!((h.start(), h.len()), (p, SLOT));
                            assert!(h.is_valid());
                            let hit = cache.get(p.wrapping_add(PAGE), PAGE).unwrap();
                            assert_eq!(*hit, *h, "a lookup inside the range is a hit");
                            m.watch(p, SLOT).unwrap();
                            if (rounds as usize + t) % 2 == 0 {
                                madvise(p, PAGE, libc::MADV_DONTNEED);
                                assert!(!h.is_valid());
                                expect.push(ev(p, 0, 1, Event::Clear));
                                h = cache.get(p, SLOT).unwrap();
                                assert!(h.is_valid());
                            }
                            unmap(p, SLOT);
                            assert!(!h.is_valid());
                            assert!(!hit.is_valid());
                            expect.push(ev(p, 0, 4, Event::Unmap));
                            slots.give_back(p);
                        }
                        (expect, rounds)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).fold(
                (Vec::new(), 0),
                |(mut all, n), (e, r)| {
                    all.extend(e);
                    (all, n + r)
                },
            )
        })
    };
    let elapsed = started.elapsed();
    let handled = PROF_HITS.load(Relaxed) - hits_before;
    assert!(m.state() == MonitorState::Running, "{:?}", m.state());
    let s = fence(&cache);
    expected.push(s);
    let mut seen = log.take();
    expected.sort_by_key(rec_key);
    seen.sort_by_key(rec_key);
    assert_eq!(seen.len(), expected.len());
    assert_eq!(seen, expected);
    let st = m.stats();
    let clears = expected.iter().filter(|r| r.2 == Event::Clear).count() as u64;
    assert_eq!(st.removes, clears, "{st:?}");
    assert_eq!(st.unmaps, expected.len() as u64 - clears, "{st:?}");
    assert_eq!(st.invalidations, expected.len() as u64, "{st:?}");
    assert_eq!((st.remaps, st.unexpected_faults, st.unknown), (0, 0, 0));
    drop(cache);
    assert_eq!(
        counts.registered.load(SeqCst),
        counts.deregistered.load(SeqCst)
    );
    eprintln!(
        "{rounds} rounds, {} events in {elapsed:?}; SIGPROF handled {handled} times; {} batches",
        expected.len(),
        st.batches
    );
    assert!(
        handled > 500,
        "the storm was too weak to mean anything: {handled} signals"
    );
    assert!(rounds > 100, "only {rounds} rounds");
}

static USR1_HITS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_usr1(_: libc::c_int) {
    USR1_HITS.fetch_add(1, Relaxed);
}

/// A userfaultfd that nobody reads until told: the monitor never leaves an unmapper
/// waiting for long (its reader does nothing else), so the kernel's side of the promise is
/// checked on a descriptor of the test's own.
struct StalledUffd(std::os::fd::OwnedFd);

impl StalledUffd {
    /// A descriptor with UNMAP events, `[p, p + len)` registered (missing mode: the pages
    /// are already populated, so no fault is ever routed to it).
    fn register(p: *mut u8, len: usize) -> io::Result<StalledUffd> {
        use std::os::fd::FromRawFd;
        const IOWR: u64 = 3 << 30;
        const UFFDIO_API: u64 = IOWR | (24 << 16) | (0xAA << 8) | 0x3F;
        const UFFDIO_REGISTER: u64 = IOWR | (32 << 16) | (0xAA << 8);
        const EVENT_UNMAP: u64 = 1 << 6;
        const MODE_MISSING: u64 = 1;
        // SAFETY: plain system call with integer flags.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | 1) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor the kernel returned to us.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let mut api = [0xAAu64, EVENT_UNMAP, 0];
        // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (three u64), alive.
        if unsafe { libc::ioctl(raw, UFFDIO_API as _, api.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reg = [p as u64, len as u64, MODE_MISSING, 0];
        // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register (four u64).
        if unsafe { libc::ioctl(raw, UFFDIO_REGISTER as _, reg.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(StalledUffd(fd))
    }

    /// Reads one 32-byte message (blocking): releases the thread that caused it.
    fn read_one(&self) -> io::Result<[u8; 32]> {
        let mut msg = [0u8; 32];
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.0);
        // SAFETY: reads at most 32 bytes into a live 32-byte buffer.
        let n = unsafe { libc::read(raw, msg.as_mut_ptr().cast(), 32) };
        if n != 32 {
            return Err(io::Error::last_os_error());
        }
        Ok(msg)
    }
}

/// A thread that waits in munmap for its event to be read is not released by signals (the
/// kernel waits killably: handlers run only once munmap completes), so a signal can never
/// make munmap return before its event is read; after the read, munmap returns normally.
/// Then the same through the monitor: munmap of watched memory under the same signals
/// returns with its invalidation visible.
#[test]
fn signals_do_not_cut_short_an_unmappers_wait() {
    let _serial = SERIAL.lock();
    let Some(m) = monitor_or_skip("signals_do_not_cut_short_an_unmappers_wait") else {
        return;
    };
    let _handler = Handler::install(libc::SIGUSR1, count_usr1);
    let b = anon(4);
    let stalled = match StalledUffd::register(b, 4 * PAGE) {
        Ok(u) => u,
        Err(e) => {
            eprintln!(
                "SKIPPED signals_do_not_cut_short_an_unmappers_wait: a second userfaultfd: {e}"
            );
            return;
        }
    };
    let before = USR1_HITS.load(Relaxed);
    let unmapped = Arc::new(AtomicBool::new(false));
    let tid = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<libc::pthread_t>();
    let t = {
        let (unmapped, tid) = (unmapped.clone(), tid.clone());
        let b = b as usize;
        std::thread::spawn(move || {
            // SAFETY: pthread_self and gettid have no arguments.
            let (me, id) = unsafe { (libc::pthread_self(), libc::gettid()) };
            tid.store(id as usize, SeqCst);
            tx.send(me).unwrap();
            unmap(b as *mut u8, 4 * PAGE);
            unmapped.store(true, SeqCst);
            USR1_HITS.load(Relaxed)
        })
    };
    let thread = rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let wchan = std::fs::read_to_string(format!("/proc/self/task/{}/wchan", tid.load(SeqCst)))
        .unwrap_or_default();
    // 200 signals at the waiting thread over ~200 ms.
    for _ in 0..200 {
        // SAFETY: the thread is alive (it is joined below); SIGUSR1 has our handler.
        unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(1));
        assert!(
            !unmapped.load(SeqCst),
            "a signal made munmap return before its event was read"
        );
    }
    assert_eq!(
        USR1_HITS.load(Relaxed),
        before,
        "a handler ran on the thread while it waited in munmap"
    );
    let msg = stalled.read_one().expect("reading the UNMAP event");
    assert_eq!(msg[0], 0x16, "an UNMAP message");
    let hits_seen_by_thread = t.join().unwrap();
    assert!(unmapped.load(SeqCst));
    let handled = USR1_HITS.load(Relaxed) - before;
    eprintln!(
        "the unmapper waited in {wchan:?}; its pending SIGUSR1 was handled {handled} time(s) \
         after munmap completed (seen by the thread on return: {})",
        hits_seen_by_thread - before
    );
    assert!(
        (1..=200).contains(&handled),
        "the (coalesced) signal is handled once munmap completes: {handled}"
    );
    // Through the monitor: signals at an unmapper of watched memory.
    let (cache, _) = counting_cache(&m, CacheConfig::default());
    let (_all, log) = record_all(&m);
    let c = anon(4);
    let hc = cache.get(c, 4 * PAGE).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let me = {
        // SAFETY: pthread_self has no arguments.
        let me = unsafe { libc::pthread_self() } as usize;
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                // SAFETY: the target thread outlives this loop (stopped and joined below).
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(5));
    unmap(c, 4 * PAGE);
    assert!(
        !hc.is_valid(),
        "munmap returned; its invalidation must be visible"
    );
    stop.store(true, SeqCst);
    me.join().unwrap();
    assert_eq!(log.take(), vec![ev(c, 0, 4, Event::Unmap)]);
    assert!(m.state() == MonitorState::Running);
}

static PROF_HITS_2: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_prof_2(_: libc::c_int) {
    PROF_HITS_2.fetch_add(1, Relaxed);
}

/// (The maintainers' version of the storm, commit 8d1d96d, kept here with the handler and
/// timer restored by guards.) Each worker owns one address and replaces its memory there
/// atomically, with a madvise in between: every madvise and unmap is seen during the storm.
#[test]
fn sigprof_storm_loses_nothing() {
    let _serial = SERIAL.lock();
    let Some(m) = monitor_or_skip("sigprof_storm_loses_nothing") else {
        return;
    };
    let (cache, _) = counting_cache(&m, CacheConfig::default().with_capacity(16));
    let cache = Arc::new(cache);
    let rounds: u64 = {
        let _handler = Handler::install(libc::SIGPROF, count_prof_2);
        let _timer = ProfTimer::start(Duration::from_micros(50));
        let targets = Targets::default();
        let _sender = Sender::start(libc::SIGPROF, targets.clone());
        let deadline = Instant::now() + Duration::from_millis(800);
        // Each worker owns one address and replaces its memory there atomically (mremap of
        // a fresh mapping over it: an UNMAP), so no other thread can be handed that address
        // while an unmap of it is in flight (see the cache's documented limits).
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (cache, targets) = (cache.clone(), targets.clone());
                std::thread::spawn(move || {
                    let _target = targets.join();
                    let at = anon(2);
                    let mut rounds = 0u64;
                    while Instant::now() < deadline {
                        let h = cache.get(at, 2 * PAGE).expect("lookup during the storm");
                        assert!(h.is_valid());
                        madvise(at, PAGE, libc::MADV_DONTNEED);
                        assert!(!h.is_valid(), "madvise lost during the storm");
                        let h = cache.get(at, 2 * PAGE).expect("lookup during the storm");
                        assert!(h.is_valid());
                        replace_with(at, 2 * PAGE, 0);
                        assert!(!h.is_valid(), "an unmap lost during the storm");
                        rounds += 1;
                    }
                    unmap(at, 2 * PAGE);
                    rounds
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    };
    let signals = PROF_HITS_2.load(Relaxed);
    let st = m.stats();
    eprintln!("{rounds} rounds, {signals} SIGPROFs, {st:?}");
    assert!(signals > 100, "the storm did not happen: {signals} signals");
    assert!(rounds > 50, "only {rounds} rounds");
    assert!(
        m.state() == MonitorState::Running,
        "the monitor stopped: {:?}",
        m.state()
    );
    assert!(st.unmaps >= rounds, "{st:?}");
    assert!(st.removes >= rounds, "{st:?}");
}
