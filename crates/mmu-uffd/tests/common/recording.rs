//! Recording what the monitor delivers, and the system calls the monitor tests make: a
//! [`Recorder`] subscription over the address space, the expected record of an event
//! ([`ev`]), a [`fence`] that proves "nothing more happened", the memory types a monitor
//! can watch ([`Kind`]), and thin wrappers of `mremap`, `mprotect`, `madvise`, fork.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mmu_notifier::{
    Event, IntervalContext, IntervalSubscriber, IntervalSubscription, Range, WouldBlock,
};
use mmu_uffd::{CachedRegistration, Error, Monitor, RegCache, Registrar};
use parking_lot::Mutex;

use super::*;

/// One invalidation as a subscriber saw it: `[start, end)` and why.
pub type Rec = (u64, u64, Event);

/// What a [`Recorder`] saw, in order.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<Rec>>>);

impl Log {
    /// Everything recorded so far; the log is empty afterwards.
    pub fn take(&self) -> Vec<Rec> {
        std::mem::take(&mut *self.0.lock())
    }

    /// Polls (without passing the monitor's gate) until at least `n` records are there or
    /// `within` has passed; then takes them all.
    pub fn take_when(&self, n: usize, within: Duration) -> Vec<Rec> {
        let deadline = Instant::now() + within;
        while self.0.lock().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.take()
    }
}

/// An interval subscriber that records every invalidation it receives (the whole range the
/// monitor invalidated, not clipped to the subscription).
pub struct Recorder(pub Log);

impl IntervalSubscriber for Recorder {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0 .0.lock().push((r.start(), r.end(), r.event()));
        Ok(())
    }
}

/// A recorder on `[start, start + len)` of the monitor's address space.
pub fn record(m: &Monitor, start: *mut u8, len: usize) -> (IntervalSubscription<Recorder>, Log) {
    let log = Log::default();
    let sub = m
        .subscriptions()
        .insert_interval(
            start as u64..start as u64 + len as u64,
            Recorder(log.clone()),
        )
        .expect("insert a recording subscription");
    (sub, log)
}

/// A recorder over the whole address space: every invalidation the monitor delivers.
pub fn record_all(m: &Monitor) -> (IntervalSubscription<Recorder>, Log) {
    record(m, std::ptr::null_mut(), usize::MAX)
}

/// The record of an invalidation of pages `[from, to)` of the mapping at `p`.
pub fn ev(p: *mut u8, from: usize, to: usize, e: Event) -> Rec {
    let p = p as u64;
    (p + (from * PAGE) as u64, p + (to * PAGE) as u64, e)
}

pub fn at(p: *mut u8, page: usize) -> *mut u8 {
    p.wrapping_add(page * PAGE)
}

/// Unmaps a freshly watched sentinel page and passes the gate: afterwards the log holds
/// every event of every call this thread made before (see the module docs). Returns the
/// sentinel's own record, which the log also holds.
pub fn fence<R: Registrar>(cache: &RegCache<R>) -> Rec {
    let s = anon(1);
    let h = cache.get(s, PAGE).expect("watch and register the sentinel");
    unmap(s, PAGE);
    assert!(!h.is_valid(), "the sentinel's unmap was not applied");
    ev(s, 0, 1, Event::Unmap)
}

/// Whether each handle is still valid (each check passes the gate).
pub fn validity<R: Registrar>(hs: &[CachedRegistration<R>]) -> Vec<bool> {
    hs.iter().map(|h| h.is_valid()).collect()
}

/// The memory types the monitor can watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    AnonPrivate,
    AnonShared,
    Memfd,
    FileShared,
    FilePrivate,
}

impl Kind {
    /// Why this monitor cannot watch this kind, if it cannot (the caller then skips).
    /// Under `MMU_UFFD_REQUIRE` every kind must be watchable: a missing one fails.
    pub fn unsupported(self, m: &Monitor) -> Option<&'static str> {
        let why = self.unsupported_by(m);
        if let Some(why) = why {
            assert!(!monitor_required(), "MMU_UFFD_REQUIRE is set, but {why}");
        }
        why
    }

    fn unsupported_by(self, m: &Monitor) -> Option<&'static str> {
        let caps = m.capabilities();
        match self {
            Kind::AnonPrivate => None,
            Kind::AnonShared | Kind::Memfd if !caps.shmem => {
                Some("this kernel cannot watch shmem (no UFFD_FEATURE_WP_HUGETLBFS_SHMEM)")
            }
            Kind::FileShared | Kind::FilePrivate if !caps.any_memory => {
                Some("this kernel cannot watch file mappings (no UFFD_FEATURE_WP_ASYNC)")
            }
            _ => None,
        }
    }

    /// A touched mapping of `pages` pages of this kind (at `fixed`, `MAP_FIXED`, if given).
    pub fn map(self, fixed: Option<*mut u8>, pages: usize) -> *mut u8 {
        let len = pages * PAGE;
        let (flags, fd) = match self {
            Kind::AnonPrivate => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            Kind::AnonShared => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
            Kind::Memfd => (libc::MAP_SHARED, memfd(len)),
            Kind::FileShared => (libc::MAP_SHARED, temp_file(len)),
            Kind::FilePrivate => (libc::MAP_PRIVATE, temp_file(len)),
        };
        let fixed_flag = if fixed.is_some() { libc::MAP_FIXED } else { 0 };
        let p = map(
            fixed.map_or(0, |p| p as usize),
            len,
            RW,
            flags | fixed_flag,
            fd,
            0,
        );
        if fd >= 0 {
            // SAFETY: closes the descriptor this function opened; the mapping keeps the
            // file alive.
            unsafe { libc::close(fd) };
        }
        touch(p, len);
        p
    }
}

/// A regular file of `len` bytes in a fresh directory under the temp dir, opened
/// read-write; the file and its directory are removed at once (the descriptor, and then
/// the mapping, keep the inode alive), so nothing is left behind.
pub fn temp_file(len: usize) -> i32 {
    use std::os::fd::IntoRawFd;
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mmu-uffd-monitor-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    let path = dir.join("mapped");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create a temp file");
    f.set_len(len as u64).expect("size the temp file");
    std::fs::remove_file(&path).expect("unlink the temp file");
    std::fs::remove_dir(&dir).expect("remove the temp dir");
    f.into_raw_fd()
}

pub fn mremap(
    old: *mut u8,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new: *mut u8,
) -> io::Result<*mut u8> {
    // SAFETY: the tests move, shrink and grow only their own mappings; `new` is only used
    // with MREMAP_FIXED, over a reservation of the test's own.
    let r = unsafe { libc::mremap(old.cast(), old_len, new_len, flags, new) };
    if r == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(r.cast())
    }
}

pub fn mprotect(p: *mut u8, len: usize, prot: i32) {
    // SAFETY: changes the protection of the test's own mapping; nothing else uses it.
    let r = unsafe { libc::mprotect(p.cast(), len, prot) };
    assert_eq!(r, 0, "mprotect: {}", io::Error::last_os_error());
}

/// madvise that reports failure instead of asserting.
pub fn try_madvise(p: *mut u8, len: usize, advice: i32) -> io::Result<()> {
    // SAFETY: advises only the test's own mapping.
    let r = unsafe { libc::madvise(p.cast(), len, advice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn read_byte(p: *mut u8) -> u8 {
    // SAFETY: callers pass an address inside a live readable mapping of theirs.
    unsafe { p.read_volatile() }
}

/// Runs `f` on another thread and fails (instead of hanging the whole run) if it does not
/// return within `within`.
pub fn within<T: Send + 'static>(
    what: &str,
    within: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(within) {
        Ok(v) => {
            t.join().unwrap();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within {within:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(t.join().unwrap_err())
        }
    }
}

/// Descriptors open in this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// The body of a forked child: only async-signal-safe work (no allocation, no lock, no
/// panic, no destructor). Exit code bits: 1 = `get` did not answer `Forked`; 2 = a handle
/// still looked valid; 4 = munmap of the watched memory failed.
pub fn child_checks<R: Registrar>(
    cache: &RegCache<R>,
    h: &CachedRegistration<R>,
    p: *mut u8,
    len: usize,
) -> ! {
    let mut code = 0;
    match cache.get(p, len) {
        Err(Error::Forked) => {}
        other => {
            // Never drop what came back: that could take locks or free memory.
            std::mem::forget(other);
            code |= 1;
        }
    }
    if h.is_valid() {
        code |= 2;
    }
    // SAFETY: unmaps the child's copy of the test's mapping; munmap is async-signal-safe.
    if unsafe { libc::munmap(p.cast(), len) } != 0 {
        code |= 4;
    }
    // SAFETY: _exit is async-signal-safe and runs no destructor and no atexit handler,
    // which a forked child of a multithreaded process must not run.
    unsafe { libc::_exit(code) }
}
