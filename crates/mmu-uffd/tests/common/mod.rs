//! Shared helpers of the integration tests: memory mappings, a monitor or a skip.
#![allow(dead_code)]

pub mod recording;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mmu_uffd::{CacheConfig, Error, Monitor, MonitorConfig, RegCache};

pub const PAGE: usize = 4096;

/// A monitor, or `None` with the reason printed: the test then skips (it cannot pass or
/// fail without userfaultfd).
pub fn monitor_or_skip(test: &str) -> Option<Monitor> {
    monitor_with_or_skip(test, MonitorConfig::default())
}

///
/// With `MMU_UFFD_REQUIRE=1` (the test command sets it where the kernel has userfaultfd
/// and the tests run as root) a monitor that cannot start fails the test instead: a
/// machine that should run these tests never passes them by skipping.
pub fn monitor_with_or_skip(test: &str, config: MonitorConfig) -> Option<Monitor> {
    match Monitor::with_config(config) {
        Ok(m) => Some(m),
        Err(e @ (Error::Unavailable { .. } | Error::MissingFeature { .. })) => {
            if monitor_required() {
                panic!("{test}: MMU_UFFD_REQUIRE is set but the monitor cannot start: {e}");
            }
            eprintln!("SKIPPED {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: unexpected monitor error: {e}"),
    }
}

/// Whether `MMU_UFFD_REQUIRE` asks for the monitor tests to run (never to skip).
pub fn monitor_required() -> bool {
    std::env::var_os("MMU_UFFD_REQUIRE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// `mmap` or panic.
pub fn map(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8 {
    // SAFETY: mmap with caller-chosen flags; MAP_FIXED callers pass addresses they own.
    let p = unsafe { libc::mmap(addr as *mut _, len, prot, flags, fd, off) };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

pub const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// An anonymous private mapping of `pages` pages, touched.
pub fn anon(pages: usize) -> *mut u8 {
    let p = map(
        0,
        pages * PAGE,
        RW,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    touch(p, pages * PAGE);
    p
}

pub fn touch(p: *mut u8, len: usize) {
    for off in (0..len).step_by(PAGE) {
        // SAFETY: callers pass mappings of at least `len` writable bytes.
        unsafe { p.add(off).write_volatile(0x5a) };
    }
}

pub fn unmap(p: *mut u8, len: usize) {
    // SAFETY: tests unmap only their own mappings.
    let r = unsafe { libc::munmap(p.cast(), len) };
    assert_eq!(r, 0, "munmap: {}", std::io::Error::last_os_error());
}

pub fn madvise(p: *mut u8, len: usize, advice: i32) {
    // SAFETY: tests advise only their own mappings.
    let r = unsafe { libc::madvise(p.cast(), len, advice) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// A memfd of `len` bytes.
pub fn memfd(len: usize) -> i32 {
    // SAFETY: the name is a valid C string.
    let fd = unsafe { libc::memfd_create(c"mmu-uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created.
    assert_eq!(unsafe { libc::ftruncate(fd, len as i64) }, 0);
    fd
}

/// Registration counters of a test registrar.
#[derive(Default)]
pub struct Counts {
    pub registered: AtomicUsize,
    pub deregistered: AtomicUsize,
    /// The thread names deregistrations ran on.
    pub threads: parking_lot::Mutex<Vec<String>>,
}

pub type TestCache = RegCache<
    mmu_uffd::FnRegistrar<
        Box<dyn Fn(*mut u8, usize) -> Result<(usize, usize, usize), std::io::Error> + Send + Sync>,
        Box<dyn Fn((usize, usize, usize)) + Send + Sync>,
    >,
>;

/// A cache whose registration is (start, len, serial number).
pub fn counting_cache(monitor: &Monitor, config: CacheConfig) -> (TestCache, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let (c1, c2) = (counts.clone(), counts.clone());
    let cache = RegCache::with_fns(
        monitor,
        config,
        Box::new(move |p: *mut u8, len: usize| {
            let n = c1.registered.fetch_add(1, Ordering::SeqCst);
            Ok((p as usize, len, n))
        })
            as Box<
                dyn Fn(*mut u8, usize) -> Result<(usize, usize, usize), std::io::Error>
                    + Send
                    + Sync,
            >,
        Box::new(move |_r: (usize, usize, usize)| {
            c2.deregistered.fetch_add(1, Ordering::SeqCst);
            c2.threads.lock().push(
                std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_string(),
            );
        }) as Box<dyn Fn((usize, usize, usize)) + Send + Sync>,
    );
    (cache, counts)
}

/// Replaces the mapping at `at` by a new anonymous one whose first word is `token`,
/// atomically: the new memory is prepared elsewhere and moved over the old with
/// `mremap(MREMAP_FIXED)` (which unmaps the old mapping first: an UNMAP event). Unlike
/// munmap + mmap, no other thread (tests run in parallel) can take the address meanwhile,
/// and nobody can see the new memory before it holds its token.
pub fn replace_with(at: *mut u8, len: usize, token: u64) {
    let fresh = map(0, len, RW, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    // SAFETY: the fresh mapping is at least 8 bytes, page-aligned.
    unsafe { (fresh as *mut u64).write_volatile(token) };
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

/// A subscriber that holds the monitor thread in its `invalidate` of an `Unmap` until
/// `open` is set (and its condition variable notified); `entered` says it got there.
pub struct Blocker {
    pub open: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    pub entered: Arc<std::sync::atomic::AtomicBool>,
}

impl mmu_notifier::IntervalSubscriber for Blocker {
    fn invalidate(
        &mut self,
        r: &mmu_notifier::Range,
        _: &mut mmu_notifier::IntervalContext<'_, Self>,
    ) -> Result<(), mmu_notifier::WouldBlock> {
        if r.event() == mmu_notifier::Event::Unmap {
            self.entered.store(true, Ordering::SeqCst);
            let (lock, cv) = &*self.open;
            let mut open = lock.lock();
            while !*open {
                cv.wait(&mut open);
            }
        }
        Ok(())
    }
}

/// An inaccessible anonymous mapping of `pages` pages at an address the kernel picks: a
/// reservation to move or map memory over with `MAP_FIXED`/`MREMAP_FIXED`.
pub fn reserve(pages: usize) -> *mut u8 {
    map(
        0,
        pages * PAGE,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
}

/// Aborts the whole test process if it is not dropped within the given time: for tests
/// whose failure mode is a hang (inside scoped threads, or in a system call), which no
/// timeout can unwind. A hang is then a failure with a message, never a stuck run.
pub struct Watchdog(Option<mpsc::Sender<()>>);

impl Watchdog {
    pub fn new(what: impl Into<String>, limit: Duration) -> Watchdog {
        let what = what.into();
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                // Straight to the descriptor: the harness's capture of eprintln! would be
                // lost with the process.
                let _ = writeln!(
                    std::io::stderr(),
                    "HANG: {what} did not finish within {limit:?}; aborting"
                );
                std::process::abort();
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// Waits (bounded) for a child; kills it and fails if it hangs. Returns its exit code.
pub fn wait_child(pid: libc::pid_t, limit: Duration) -> i32 {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a live int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            assert!(
                libc::WIFEXITED(status),
                "the child did not exit normally (status {status:#x})"
            );
            return libc::WEXITSTATUS(status);
        }
        assert_eq!(r, 0, "waitpid: {}", std::io::Error::last_os_error());
        if std::time::Instant::now() > deadline {
            // SAFETY: kills and reaps our own child, which hangs.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the forked child hung for {limit:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A raw interval subscriber that only raises a flag: it shows what the monitor has
/// applied, without passing any gate.
pub struct Flag(pub Arc<std::sync::atomic::AtomicBool>);

impl mmu_notifier::IntervalSubscriber for Flag {
    fn invalidate(
        &mut self,
        _: &mmu_notifier::Range,
        _: &mut mmu_notifier::IntervalContext<'_, Self>,
    ) -> Result<(), mmu_notifier::WouldBlock> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}
