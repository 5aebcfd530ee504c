//! `mmn torture --real`: the registration cache of `mmu-uffd` on this process's real
//! memory, with allocators handing each other's freed addresses around, checked against
//! the kernel's own view of which physical pages are where.
//!
//! # What runs
//!
//! Worker threads loop, each with its own seeded generator, over a small pool of buffers:
//! glibc `malloc` buffers and `mimalloc` buffers of 32 KiB to 1 MiB (glibc's mmap
//! threshold is pinned at 128 KiB with `mallopt`, so that some come from an arena and
//! some from their own mapping for the whole run), and raw anonymous mappings of a few
//! pages. On its raw mappings a thread also maps new memory over the old with
//! `MAP_FIXED`, moves them away with `mremap`, grows and shrinks them, and drops pages
//! with `madvise(MADV_DONTNEED)`. Before every lookup it writes to every page of the
//! buffer, then `get`s the buffer (or a sub-range of it) from one shared [`RegCache`],
//! checks the handle and drops it. Buffers are freed at random, so the allocators give a
//! just-freed address to another thread: the case the cache's promise is about.
//!
//! # The checker: physical frames, not tokens
//!
//! Content tokens written by the program cannot tell a stale registration from a valid
//! one: a heap block is legitimately reused without any unmap, so the same bytes may be
//! seen through old and new registrations alike. The checker instead asks the kernel which
//! physical page frames back the memory.
//!
//! - **The registrar pins.** A registration is an io_uring fixed buffer (a slot of a
//!   sparse buffer table, filled with `IORING_REGISTER_BUFFERS_UPDATE`): the kernel takes
//!   a long-term pin on every page of the range, exactly as an RDMA memory region or a
//!   DMA mapping would. Right after pinning, the registrar records the frame number of
//!   each page from `/proc/self/pagemap`. Deregistering empties the slot (unpins).
//! - **The check.** After each `get` the thread reads the current frame numbers of the
//!   pages it asked for and compares them with those the registration recorded for the
//!   same addresses. Any difference is a stale hit: the registration's I/O would go to
//!   pages that are no longer mapped there.
//! - **No false alarms.** While a registration exists its frames are pinned: a pinned
//!   frame is never freed, so it cannot back a new mapping, and it cannot be migrated,
//!   compacted or collapsed into a huge page (the kernel refuses to move pages with extra
//!   references). So if the mapping is unchanged since the registration, the page table
//!   still points at the recorded frames and the comparison matches. The pages a thread
//!   asks for belong to its own buffer, which it just wrote (so they are present) and
//!   which no other thread unmaps or advises away while it looks them up.
//! - **No missed stale hits.** If the memory was unmapped, replaced, moved or dropped
//!   after the registration, the address now maps other frames (new memory gets fresh
//!   frames, the pinned ones are still held by the registration), so the comparison
//!   differs. A `mremap` move keeps the frames but moves them to the new address, where
//!   any registration of an earlier mapping holds other frames. (The one change not
//!   flagged is harmless: pages moved away and back to the same address, where an old
//!   registration's I/O would still reach the mapped pages.)
//! - **Recording the right frames.** The frames are read after the pin, because a
//!   long-term pin may migrate a page first (out of a movable zone). For pages of the
//!   caller's own buffer (known through a thread-local: the registrar runs on the thread
//!   that called `get`) the mapping cannot change during the registration, so the read is
//!   exact. A merged registration may also cover other threads' pages, which may change
//!   while it is made: those are also read before the pin, and a page seen present with
//!   another frame before than after is recorded as unknown and never compared ("raced
//!   pages" in the report). What remains is only ever a missed detection, never a false
//!   alarm: a page of another thread, absent before the pin and replaced between pin and
//!   read (microseconds).
//!
//! Where userfaultfd, io_uring fixed buffers or frame numbers in pagemap (root only) are
//! unavailable the run is skipped (`SKIPPED: <reason>`, exit status 0).
//!
//! # Moves and split mappings
//!
//! The cache watches (registers with userfaultfd) only the pages it registers, so a lookup
//! of part of a raw mapping splits its VMA in two or three. The kernel then refuses to
//! resize it with `mremap` (`EFAULT`: the old range must be one VMA), and a
//! `MREMAP_FIXED` move of the whole buffer, which recent kernels carry out VMA by VMA,
//! fails with `EFAULT` *after* moving the first part (seen on Linux 6.18: uffd-registered
//! VMAs are not moved in bulk), leaving the buffer in two places. So a worker watches all of half its new raw
//! mappings itself (its later partial watches then change nothing) and moves only those;
//! the others are only resized, and a refused resize is counted ("mremap resize refused").
//! A move that fails all the same is counted and the buffer abandoned, never touched
//! again.
//!
//! # Broken variants
//!
//! `--broken gate` skips the cache's event gate on lookups; `--broken reuse-check` turns
//! its address-reuse check off. Both must produce stale hits; with `--broken` the run
//! stops at the first one.
//!
//! # Hangs
//!
//! A watchdog thread watches the progress counters of the workers and of the main thread
//! (which supervises, then tears down): one that has not moved for 10 s is reported with,
//! for every thread, what it was doing, on which buffer, and where the kernel has it
//! waiting (`/proc/self/task/<tid>/wchan` and `syscall`: number, arguments, stack and
//! instruction pointers; the monitor thread's too); then the process
//! exits with status 2. The report allocates nothing and takes no lock: in the hang it was
//! built for (seen before the monitor had a reader that never allocates) a thread was
//! blocked in `free()` (glibc trimming a watched heap, waiting for the monitor to read the
//! event, while holding its arena's lock) and the monitor thread on a futex, so `malloc`
//! might never have returned.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, IsTerminal as _};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::IoUring;
use mimalloc::MiMalloc;
use mmu_uffd::io_uring::{FixedBuffer, FixedBuffers};
use mmu_uffd::{CacheConfig, Error, Monitor, RegCache, Registrar};

/// Entries the cache keeps (small, so that evictions happen too).
pub const CAPACITY: usize = 16;
/// A worker that has not finished a step for this long is reported as stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);
/// Buffers a worker holds at once.
const POOL: usize = 3;
/// Stale hits kept for the report.
const KEEP_STALE: usize = 8;
/// Lookup errors kept for the report.
const KEEP_ERRORS: usize = 8;
/// glibc's mmap threshold for the run: buffers above it get their own mapping.
const MMAP_THRESHOLD: i32 = 128 << 10;

/// pagemap: the present bit.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: the page frame number (bits 0-54).
const PM_PFN: u64 = (1 << 55) - 1;
/// A recorded frame that must not be compared (see "Recording the right frames").
const UNKNOWN: u64 = 0;

/// A deliberately broken cache configuration (the run must then fail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokenCache {
    /// Lookups skip the event gate.
    Gate,
    /// The address-reuse check is off.
    ReuseCheck,
}

impl BrokenCache {
    /// Every variant.
    pub const ALL: [BrokenCache; 2] = [BrokenCache::Gate, BrokenCache::ReuseCheck];

    /// The `--broken` name.
    pub fn name(self) -> &'static str {
        match self {
            BrokenCache::Gate => "gate",
            BrokenCache::ReuseCheck => "reuse-check",
        }
    }

    /// The variant called `name`.
    pub fn from_name(name: &str) -> Option<BrokenCache> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RealOptions {
    /// Wall-clock seconds.
    pub secs: f64,
    /// Worker threads.
    pub threads: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// A broken cache configuration; the run stops at the first stale hit.
    pub broken: Option<BrokenCache>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// Why the run did not happen.
#[derive(Debug)]
pub enum NotRun {
    /// This machine cannot run it (no userfaultfd, io_uring or frame numbers).
    Skipped(String),
    /// Setting up failed.
    Failed(String),
}

/// One stale hit: a lookup returned a registration whose pages are not mapped there.
#[derive(Clone, Debug)]
pub struct StaleHit {
    /// The worker.
    pub thread: usize,
    /// The page.
    pub addr: usize,
    /// The frame mapped at `addr` now.
    pub mapped: u64,
    /// The frame the registration pinned for `addr`.
    pub registered: u64,
    /// The registration's range and serial number.
    pub reg_start: usize,
    /// End of the registration's range.
    pub reg_end: usize,
    /// Serial number of the registration (registrations are numbered from 1).
    pub serial: u64,
    /// What the buffer was (glibc, mimalloc, mmap).
    pub kind: &'static str,
    /// When, since the start.
    pub at: Duration,
}

/// What happened.
#[derive(Debug, Default)]
pub struct RealReport {
    /// Operations by kind (summed over workers).
    pub ops: Vec<(&'static str, u64)>,
    /// Lookups made.
    pub lookups: u64,
    /// Pages compared.
    pub checked_pages: u64,
    /// Pages not compared (recorded as unknown).
    pub unverified_pages: u64,
    /// Lookups that returned a stale registration.
    pub stale_lookups: u64,
    /// The first stale hits.
    pub stale: Vec<StaleHit>,
    /// Handles that did not cover the requested range.
    pub bad_handles: u64,
    /// Lookup errors.
    pub errors: u64,
    /// The first lookup errors.
    pub error_samples: Vec<String>,
    /// Cache counters.
    pub cache: mmu_uffd::CacheStats,
    /// Monitor counters.
    pub monitor: mmu_uffd::MonitorStats,
    /// Registrations whose other-thread pages changed while they were made.
    pub raced_pages: u64,
    /// Registrations made.
    pub registrations: u64,
    /// Registrar failures (no slot, the kernel refused).
    pub register_failures: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl RealReport {
    /// Whether the cache broke its promise.
    pub fn failed(&self) -> bool {
        self.stale_lookups > 0 || self.bad_handles > 0
    }

    /// The summary, in the style of the simulated torture's tables.
    pub fn table(&self, o: &RealOptions) -> String {
        let mut out = String::new();
        let secs = self.elapsed.as_secs_f64();
        let _ = writeln!(
            out,
            "real-memory torture: {} threads, {:.1} s, seed {}{}",
            o.threads,
            secs,
            o.seed,
            o.broken
                .map(|b| format!(", broken {}", b.name()))
                .unwrap_or_default()
        );
        let _ = writeln!(out, "{:<24}{:>12}", "operation", "count");
        for (k, v) in &self.ops {
            let _ = writeln!(out, "{k:<24}{v:>12}");
        }
        let c = &self.cache;
        let _ = writeln!(out, "\n{:<24}{:>12}", "cache", "count");
        for (k, v) in [
            ("lookups", self.lookups),
            ("hits", c.hits),
            ("misses", c.misses),
            ("invalidated found", c.invalidated_found),
            ("retries", c.retries),
            ("evictions", c.evictions),
            ("merges", c.merges),
            ("registrations", self.registrations),
            ("register failures", self.register_failures),
        ] {
            let _ = writeln!(out, "{k:<24}{v:>12}");
        }
        let m = &self.monitor;
        let _ = writeln!(out, "\n{:<24}{:>12}", "monitor event", "count");
        for (k, v) in [
            ("unmaps", m.unmaps),
            ("removes", m.removes),
            ("remaps", m.remaps),
            ("batches", m.batches),
            ("invalidations", m.invalidations),
            ("unexpected faults", m.unexpected_faults),
        ] {
            let _ = writeln!(out, "{k:<24}{v:>12}");
        }
        let _ = writeln!(out, "\n{:<24}{:>12}", "check", "count");
        for (k, v) in [
            ("pages compared", self.checked_pages),
            ("pages not compared", self.unverified_pages),
            ("raced pages recorded", self.raced_pages),
            ("lookup errors", self.errors),
            ("bad handles", self.bad_handles),
        ] {
            let _ = writeln!(out, "{k:<24}{v:>12}");
        }
        let _ = writeln!(
            out,
            "\nlookups: {} ({:.0}/s)  stale hits: {}",
            self.lookups,
            self.lookups as f64 / secs.max(1e-9),
            self.stale_lookups
        );
        if let Some(first) = self.stale.first() {
            let _ = writeln!(out, "first stale hit after {:.3} s", first.at.as_secs_f64());
        }
        for s in &self.stale {
            let _ = writeln!(
                out,
                "  stale: thread {} {} page {:#x}: mapped frame {:#x}, registration #{} \
                 ({:#x}..{:#x}) pinned frame {:#x}",
                s.thread, s.kind, s.addr, s.mapped, s.serial, s.reg_start, s.reg_end, s.registered
            );
        }
        for e in &self.error_samples {
            let _ = writeln!(out, "  lookup error: {e}");
        }
        out
    }
}

// ---- pagemap --------------------------------------------------------------------------

/// `/proc/self/pagemap`: one 64-bit entry per virtual page.
struct Pagemap {
    file: File,
    page: usize,
}

impl Pagemap {
    fn open(page: usize) -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
            page,
        })
    }

    /// The raw entries of the `n` pages from the page-aligned `addr`, into `out`.
    fn read(&self, addr: usize, n: usize, out: &mut Vec<u64>) -> io::Result<()> {
        let mut bytes = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut bytes, (addr / self.page * 8) as u64)?;
        out.clear();
        out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]))),
        );
        Ok(())
    }
}

/// The frame of a pagemap entry, if the page is present (and frames are shown).
fn frame(entry: u64) -> Option<u64> {
    let pfn = entry & PM_PFN;
    (entry & PM_PRESENT != 0 && pfn != 0).then_some(pfn)
}

// ---- the registrar ----------------------------------------------------------------------

thread_local! {
    /// The page range of the buffer the current thread is looking up: its own, mapped for
    /// the whole lookup (see "Recording the right frames").
    static OWN: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// A registration: a fixed-buffer slot pinning the range's pages, and those pages' frames.
pub struct Pinned {
    buffer: FixedBuffer,
    /// Frame per page of the registered range ([`UNKNOWN`]: not to be compared).
    frames: Box<[u64]>,
}

impl Pinned {
    fn serial(&self) -> u64 {
        self.buffer.serial()
    }
}

/// The cache's registrar: the crate's io_uring fixed-buffer registrar (one slot of a
/// sparse table per registration, which pins the pages), plus the frames of the pinned
/// pages read from pagemap right after pinning.
struct Pins {
    buffers: FixedBuffers<IoUring>,
    pagemap: Arc<Pagemap>,
    raced_pages: AtomicU64,
    failures: AtomicU64,
    registered: AtomicU64,
}

impl Pins {
    fn register_pinned(&self, ptr: *mut u8, len: usize) -> io::Result<Pinned> {
        let page = self.pagemap.page;
        let (start, n) = (ptr as usize, len / page);
        let mut before = Vec::new();
        self.pagemap.read(start, n, &mut before)?;
        let buffer = self.buffers.register(ptr, len).map_err(io::Error::other)?;
        // The pin is taken: the frames read now are the pinned ones (for the caller's own
        // pages exactly; for others, unless they changed in between: compare with before).
        let mut after = Vec::new();
        if let Err(e) = self.pagemap.read(start, n, &mut after) {
            self.buffers.deregister(buffer);
            return Err(e);
        }
        let (own_start, own_end) = OWN.with(Cell::get);
        let mut raced = 0;
        let frames = (0..n)
            .map(|i| {
                let addr = start + i * page;
                let now = frame(after[i]).unwrap_or(UNKNOWN);
                if (own_start..own_end).contains(&addr) {
                    return now;
                }
                match frame(before[i]) {
                    Some(b) if b != now => {
                        raced += 1;
                        UNKNOWN
                    }
                    _ => now,
                }
            })
            .collect();
        if raced > 0 {
            self.raced_pages.fetch_add(raced, Relaxed);
        }
        self.registered.fetch_add(1, Relaxed);
        Ok(Pinned { buffer, frames })
    }
}

/// The cache's registrar: shares the pins with the report.
struct Shared(Arc<Pins>);

impl Registrar for Shared {
    type Registration = Pinned;
    type Error = io::Error;

    fn register(&self, ptr: *mut u8, len: usize) -> io::Result<Pinned> {
        self.0.register_pinned(ptr, len).inspect_err(|_| {
            self.0.failures.fetch_add(1, Relaxed);
        })
    }

    fn deregister(&self, p: Pinned) {
        self.0.buffers.deregister(p.buffer);
    }
}

// ---- buffers ------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Glibc,
    Mi,
    Mmap,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Glibc => "glibc",
            Kind::Mi => "mimalloc",
            Kind::Mmap => "mmap",
        }
    }
}

/// A buffer a worker owns.
struct Buf {
    ptr: *mut u8,
    len: usize,
    kind: Kind,
    /// A raw mapping that is one VMA because the worker watched all of it itself (see
    /// "Moves and split mappings"): only those are moved with `MREMAP_FIXED`.
    whole: bool,
}

/// Alignment of mimalloc buffers.
const MI_ALIGN: usize = 16;
/// Largest raw mapping, in pages.
const MAX_MAP_PAGES: usize = 32;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// An anonymous private read-write mapping: anywhere (`at` null) or replacing whatever
/// this thread has at `at` (`MAP_FIXED`).
fn map_anon(at: *mut u8, len: usize) -> Option<*mut u8> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if !at.is_null() {
        flags |= libc::MAP_FIXED;
    }
    // SAFETY: a new anonymous mapping; with MAP_FIXED, `at..at + len` is a mapping of this
    // worker's own that nothing else refers to (its handles are dropped).
    let p = unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p.cast())
}

// ---- the run ---------------------------------------------------------------------------------

/// What a worker is doing (for the watchdog).
#[derive(Clone, Copy)]
#[repr(u8)]
enum Phase {
    Alloc,
    Touch,
    Get,
    Check,
    Mutate,
    Free,
    Done,
    Supervise,
    Teardown,
}

const PHASES: [&str; 9] = [
    "allocating",
    "writing its buffer",
    "in cache.get",
    "reading pagemap",
    "remapping/advising",
    "freeing",
    "done",
    "supervising",
    "tearing down (dropping the cache, then the monitor)",
];

/// One thread's state as seen by the watchdog.
#[derive(Default)]
struct Beat {
    steps: AtomicU64,
    lookups: AtomicU64,
    phase: AtomicU8,
    addr: AtomicUsize,
    len: AtomicUsize,
    tid: AtomicI32,
}

/// What the watchdog watches: the workers' beats, then the main thread's (last).
struct Watch {
    beats: Vec<Beat>,
    /// Threads that existed before the workers (the monitor's): described in a report.
    others: Vec<i32>,
    finished: AtomicBool,
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The threads of this process other than the caller.
fn other_threads() -> Vec<i32> {
    let me = gettid();
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|t| *t != me)
                .collect()
        })
        .unwrap_or_default()
}

/// The watchdog thread. Once a thread is stuck the process may be deadlocked on a lock
/// that `malloc` needs (an allocator holding its lock while its munmap waits for the
/// monitor), so the report is written without allocating, with `write(2)`, and the
/// process leaves with `_exit` (no exit handlers, which may take locks too).
fn watchdog(watch: &Watch) {
    let mut last: Vec<(u64, Instant)> = watch
        .beats
        .iter()
        .map(|b| (b.steps.load(Relaxed), Instant::now()))
        .collect();
    while !watch.finished.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        for (i, b) in watch.beats.iter().enumerate() {
            let steps = b.steps.load(Relaxed);
            if b.phase.load(Relaxed) == Phase::Done as u8 || steps != last[i].0 {
                last[i] = (steps, Instant::now());
            } else if last[i].1.elapsed() >= STUCK_AFTER && !watch.finished.load(Relaxed) {
                report_stuck(watch, i, &last);
            }
        }
    }
}

/// Says which thread is stuck and what every thread waits for, then exits with status 2.
fn report_stuck(watch: &Watch, stuck: usize, last: &[(u64, Instant)]) -> ! {
    use std::io::Write as _;
    const SIZE: usize = 16 << 10;
    let mut buf = [0u8; SIZE];
    let mut out: &mut [u8] = &mut buf;
    let workers = watch.beats.len() - 1;
    let name = |i: usize, out: &mut &mut [u8]| {
        if i == workers {
            let _ = write!(out, "the main thread");
        } else {
            let _ = write!(out, "thread {i}");
        }
    };
    let _ = write!(out, "mmn torture --real: ");
    name(stuck, &mut out);
    let _ = writeln!(
        out,
        " made no progress for {} s; every thread (kernel wait channel):",
        STUCK_AFTER.as_secs()
    );
    for (i, b) in watch.beats.iter().enumerate() {
        let tid = b.tid.load(Relaxed);
        let _ = write!(out, "  ");
        name(i, &mut out);
        let (mut wchan, mut syscall) = ([0u8; 128], [0u8; 256]);
        let _ = writeln!(
            out,
            " (tid {tid}): {}, last progress {:.1} s ago, buffer {:#x} + {:#x}; wchan {}; \
             syscall {}",
            PHASES.get(b.phase.load(Relaxed) as usize).unwrap_or(&"?"),
            last[i].1.elapsed().as_secs_f64(),
            b.addr.load(Relaxed),
            b.len.load(Relaxed),
            read_proc(tid, b"wchan", &mut wchan),
            read_proc(tid, b"syscall", &mut syscall),
        );
    }
    for &tid in &watch.others {
        let (mut comm, mut wchan, mut syscall) = ([0u8; 64], [0u8; 128], [0u8; 256]);
        let _ = writeln!(
            out,
            "  {} (tid {tid}): wchan {}; syscall {}",
            read_proc(tid, b"comm", &mut comm),
            read_proc(tid, b"wchan", &mut wchan),
            read_proc(tid, b"syscall", &mut syscall),
        );
    }
    let len = SIZE - out.len();
    // SAFETY: writes the initialized prefix of `buf` to standard error, then ends the
    // process without running exit handlers.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(2)
    }
}

/// `/proc/self/task/<tid>/<file>`, read into `out` without allocating ("?" if unreadable).
fn read_proc<'a>(tid: i32, file: &[u8], out: &'a mut [u8]) -> &'a str {
    use std::io::Write as _;
    let mut path = [0u8; 64];
    let mut p: &mut [u8] = &mut path;
    let _ = write!(p, "/proc/self/task/{tid}/");
    let _ = p.write_all(file);
    let _ = p.write_all(b"\0");
    // SAFETY: `path` is NUL-terminated (the buffer is zeroed and longer than any path
    // written); `out` is a writable buffer of `out.len()` bytes; the descriptor is closed.
    let n = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return "?";
        }
        let n = libc::read(fd, out.as_mut_ptr().cast(), out.len());
        libc::close(fd);
        n
    };
    let n = usize::try_from(n).unwrap_or(0).min(out.len());
    std::str::from_utf8(&out[..n]).map(str::trim).unwrap_or("?")
}

impl Beat {
    fn at(&self, phase: Phase, b: &Buf) {
        self.phase.store(phase as u8, Relaxed);
        self.addr.store(b.ptr as usize, Relaxed);
        self.len.store(b.len, Relaxed);
    }
}

/// Per-worker operation counts.
#[derive(Default, Clone, Copy)]
struct Counts {
    ops: [u64; OPS.len()],
    checked: u64,
    unverified: u64,
    bad: u64,
}

const OPS: [&str; 13] = [
    "malloc (glibc)",
    "alloc (mimalloc)",
    "mmap",
    "free/munmap",
    "mmap MAP_FIXED over",
    "mremap move",
    "mremap grow",
    "mremap shrink",
    "madvise DONTNEED",
    "lookups of a sub-range",
    "allocation failures",
    "mremap resize refused",
    "mremap move failed",
];
const OP_GLIBC: usize = 0;
const OP_MI: usize = 1;
const OP_MMAP: usize = 2;
const OP_FREE: usize = 3;
const OP_FIXED: usize = 4;
const OP_MOVE: usize = 5;
const OP_GROW: usize = 6;
const OP_SHRINK: usize = 7;
const OP_DONTNEED: usize = 8;
const OP_SUB: usize = 9;
const OP_ALLOC_FAIL: usize = 10;
const OP_RESIZE_REFUSED: usize = 11;
const OP_MOVE_FAILED: usize = 12;

/// Shared by the workers.
struct World<'m> {
    monitor: &'m Monitor,
    cache: RegCache<Shared>,
    pagemap: Arc<Pagemap>,
    page: usize,
    stop: AtomicBool,
    stop_at_first_stale: bool,
    started: Instant,
    stale_lookups: AtomicU64,
    stale: Mutex<Vec<StaleHit>>,
    errors: AtomicU64,
    error_samples: Mutex<Vec<String>>,
}

impl World<'_> {
    fn alloc(&self, rng: &mut Rng, c: &mut Counts) -> Option<Buf> {
        let which = rng.below(3);
        // 32 KiB .. 1 MiB, spread over the powers of two around the mmap threshold.
        let size = (32usize << rng.below(5)) * 1024;
        let size = size + rng.below(size);
        let buf = match which {
            0 => {
                c.ops[OP_GLIBC] += 1;
                // SAFETY: plain malloc; freed with free below.
                let p = unsafe { libc::malloc(size) };
                (!p.is_null()).then_some(Buf {
                    ptr: p.cast(),
                    len: size,
                    kind: Kind::Glibc,
                    whole: false,
                })
            }
            1 => {
                c.ops[OP_MI] += 1;
                let layout = Layout::from_size_align(size, MI_ALIGN).ok()?;
                // SAFETY: the layout has a non-zero size; freed with the same layout.
                let p = unsafe { MiMalloc.alloc(layout) };
                (!p.is_null()).then_some(Buf {
                    ptr: p,
                    len: size,
                    kind: Kind::Mi,
                    whole: false,
                })
            }
            _ => {
                c.ops[OP_MMAP] += 1;
                let len = (1 + rng.below(16)) * self.page;
                map_anon(std::ptr::null_mut(), len).map(|p| {
                    let mut b = Buf {
                        ptr: p,
                        len,
                        kind: Kind::Mmap,
                        whole: false,
                    };
                    self.maybe_watch_whole(&mut b, rng);
                    b
                })
            }
        };
        if buf.is_none() {
            c.ops[OP_ALLOC_FAIL] += 1;
        }
        buf
    }

    fn free(&self, b: Buf, c: &mut Counts) {
        c.ops[OP_FREE] += 1;
        match b.kind {
            // SAFETY: allocated with malloc by this worker, no reference into it remains.
            Kind::Glibc => unsafe { libc::free(b.ptr.cast()) },
            Kind::Mi => {
                if let Ok(layout) = Layout::from_size_align(b.len, MI_ALIGN) {
                    // SAFETY: allocated by MiMalloc with this layout, no reference remains.
                    unsafe { MiMalloc.dealloc(b.ptr, layout) }
                }
            }
            // SAFETY: this worker's own mapping; no reference into it remains.
            Kind::Mmap => unsafe {
                libc::munmap(b.ptr.cast(), b.len);
            },
        }
    }

    /// Half the time, watches all of a new raw mapping, so that the cache's watches of
    /// parts of it do not split it.
    fn maybe_watch_whole(&self, b: &mut Buf, rng: &mut Rng) {
        b.whole = rng.below(2) == 0 && self.monitor.watch(b.ptr, b.len).is_ok();
    }

    /// One change of a raw mapping's memory (the buffer may move or change size). Returns
    /// false if the buffer must be abandoned (a move failed half-way).
    fn mutate(&self, b: &mut Buf, rng: &mut Rng, c: &mut Counts) -> bool {
        let page = self.page;
        let pages = b.len / page;
        match rng.below(5) {
            0 => {
                c.ops[OP_FIXED] += 1;
                if map_anon(b.ptr, b.len).is_none() {
                    c.ops[OP_ALLOC_FAIL] += 1;
                }
                // New memory: not watched until someone watches it.
                self.maybe_watch_whole(b, rng);
            }
            1 if b.whole => {
                // Move away: reserve a target range, then move the mapping onto it. The
                // old address becomes free for anyone.
                c.ops[OP_MOVE] += 1;
                // SAFETY: a new inaccessible mapping, only used as the target below.
                let t = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        b.len,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if t == libc::MAP_FAILED {
                    c.ops[OP_ALLOC_FAIL] += 1;
                    return true;
                }
                // SAFETY: moves this worker's own mapping over the reservation just made.
                let q = unsafe {
                    libc::mremap(
                        b.ptr.cast(),
                        b.len,
                        b.len,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        t,
                    )
                };
                if q == libc::MAP_FAILED {
                    // The kernel may have moved part of it before failing: both ranges are
                    // in an unknown state, and the holes may already be someone else's.
                    // Abandon (leak) the buffer rather than touch or unmap either.
                    c.ops[OP_MOVE_FAILED] += 1;
                    return false;
                }
                b.ptr = q.cast();
            }
            2 if pages < MAX_MAP_PAGES => {
                c.ops[OP_GROW] += 1;
                let len = (pages + 1 + rng.below(4)) * page;
                // SAFETY: grows this worker's own mapping (it may move).
                let q = unsafe { libc::mremap(b.ptr.cast(), b.len, len, libc::MREMAP_MAYMOVE) };
                if q == libc::MAP_FAILED {
                    c.ops[OP_RESIZE_REFUSED] += 1;
                } else {
                    b.ptr = q.cast();
                    b.len = len;
                }
            }
            3 if pages > 1 => {
                c.ops[OP_SHRINK] += 1;
                let len = (1 + rng.below(pages - 1)) * page;
                // SAFETY: shrinks this worker's own mapping in place (its tail is unmapped).
                let q = unsafe { libc::mremap(b.ptr.cast(), b.len, len, 0) };
                if q == libc::MAP_FAILED {
                    c.ops[OP_RESIZE_REFUSED] += 1;
                } else {
                    b.len = len;
                }
            }
            _ => {
                c.ops[OP_DONTNEED] += 1;
                let first = rng.below(pages);
                let n = 1 + rng.below(pages - first);
                // SAFETY: drops pages of this worker's own private anonymous mapping; they
                // read back as zeros, nothing relies on their content.
                unsafe {
                    libc::madvise(
                        b.ptr.add(first * page).cast(),
                        n * page,
                        libc::MADV_DONTNEED,
                    )
                };
            }
        }
        true
    }

    /// Writes every page of `b`, looks it (or a part) up and checks the handle's frames.
    fn use_buf(&self, w: usize, b: &Buf, rng: &mut Rng, c: &mut Counts, beat: &Beat) {
        let page = self.page;
        beat.at(Phase::Touch, b);
        let mut off = 0;
        while off < b.len {
            // SAFETY: `b` is this worker's live buffer of `b.len` bytes; nobody else reads
            // or writes it.
            unsafe { b.ptr.add(off).write_volatile(off as u8) };
            off += page;
        }
        // SAFETY: as above (the last byte, which may be on a page of its own).
        unsafe { b.ptr.add(b.len - 1).write_volatile(1) };
        let (p, len) = if rng.below(4) == 0 {
            c.ops[OP_SUB] += 1;
            let o = rng.below(b.len);
            (b.ptr as usize + o, 1 + rng.below(b.len - o))
        } else {
            (b.ptr as usize, b.len)
        };
        let own = (
            b.ptr as usize & !(page - 1),
            (b.ptr as usize + b.len).next_multiple_of(page),
        );
        beat.at(Phase::Get, b);
        OWN.with(|o| o.set(own));
        let got = self.cache.get(p as *const u8, len);
        OWN.with(|o| o.set((0, 0)));
        beat.lookups.fetch_add(1, Relaxed);
        let h = match got {
            Ok(h) => h,
            Err(e) => {
                self.errors.fetch_add(1, Relaxed);
                if let Ok(mut v) = self.error_samples.lock() {
                    if v.len() < KEEP_ERRORS {
                        v.push(format!("thread {w} get({p:#x}, {len:#x}): {e}"));
                    }
                }
                return;
            }
        };
        beat.at(Phase::Check, b);
        let (hs, he) = (h.start() as usize, h.start() as usize + h.len());
        if hs > p || p + len > he {
            c.bad += 1;
            if let Ok(mut v) = self.error_samples.lock() {
                if v.len() < KEEP_ERRORS {
                    v.push(format!(
                        "thread {w} get({p:#x}, {len:#x}) returned {hs:#x}..{he:#x}, which does not cover it"
                    ));
                }
            }
            return;
        }
        let first = p & !(page - 1);
        let n = (p + len).next_multiple_of(page).saturating_sub(first) / page;
        let mut now = Vec::new();
        if let Err(e) = self.pagemap.read(first, n, &mut now) {
            self.errors.fetch_add(1, Relaxed);
            if let Ok(mut v) = self.error_samples.lock() {
                if v.len() < KEEP_ERRORS {
                    v.push(format!("thread {w} pagemap read: {e}"));
                }
            }
            return;
        }
        let mut stale: Option<StaleHit> = None;
        for (i, entry) in now.iter().enumerate() {
            let addr = first + i * page;
            let registered = h.frames.get((addr - hs) / page).copied().unwrap_or(UNKNOWN);
            let mapped = frame(*entry);
            match mapped {
                Some(m) if registered != UNKNOWN => {
                    c.checked += 1;
                    if m != registered && stale.is_none() {
                        stale = Some(StaleHit {
                            thread: w,
                            addr,
                            mapped: m,
                            registered,
                            reg_start: hs,
                            reg_end: he,
                            serial: h.serial(),
                            kind: b.kind.name(),
                            at: self.started.elapsed(),
                        });
                    }
                }
                _ => c.unverified += 1,
            }
        }
        drop(h);
        if let Some(s) = stale {
            self.stale_lookups.fetch_add(1, Relaxed);
            if let Ok(mut v) = self.stale.lock() {
                if v.len() < KEEP_STALE {
                    v.push(s);
                }
            }
            if self.stop_at_first_stale {
                self.stop.store(true, Relaxed);
            }
        }
    }

    fn worker(&self, w: usize, seed: u64, beat: &Beat) -> Counts {
        beat.tid.store(gettid(), Relaxed);
        let mut rng = Rng(seed);
        let mut c = Counts::default();
        let mut pool: Vec<Buf> = Vec::new();
        while !self.stop.load(Relaxed) {
            beat.steps.fetch_add(1, Relaxed);
            if pool.is_empty() || (pool.len() < POOL && rng.below(3) == 0) {
                beat.phase.store(Phase::Alloc as u8, Relaxed);
                if let Some(b) = self.alloc(&mut rng, &mut c) {
                    self.use_buf(w, &b, &mut rng, &mut c, beat);
                    pool.push(b);
                }
                continue;
            }
            let i = rng.below(pool.len());
            match rng.below(8) {
                0..=2 => {
                    let b = pool.swap_remove(i);
                    beat.at(Phase::Free, &b);
                    self.free(b, &mut c);
                }
                3..=5 if pool[i].kind == Kind::Mmap => {
                    beat.at(Phase::Mutate, &pool[i]);
                    if self.mutate(&mut pool[i], &mut rng, &mut c) {
                        self.use_buf(w, &pool[i], &mut rng, &mut c, beat);
                    } else {
                        pool.swap_remove(i);
                    }
                }
                _ => self.use_buf(w, &pool[i], &mut rng, &mut c, beat),
            }
        }
        for b in pool {
            self.free(b, &mut c);
        }
        beat.phase.store(Phase::Done as u8, Relaxed);
        c
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
}

/// Whether pagemap shows frame numbers here (root): the frame of a page just written.
fn frames_visible(pagemap: &Pagemap) -> Result<(), String> {
    let v = vec![1u8; pagemap.page];
    let start = (v.as_ptr() as usize) & !(pagemap.page - 1);
    let mut e = Vec::new();
    pagemap
        .read(start, 1, &mut e)
        .map_err(|err| format!("cannot read /proc/self/pagemap: {err}"))?;
    match e.first().copied().and_then(frame) {
        Some(_) => Ok(()),
        None => Err("/proc/self/pagemap shows no page frame numbers (they need \
             CAP_SYS_ADMIN: run as root)"
            .into()),
    }
}

/// Runs the torture. Exits the process with status 2 (after saying which worker) if a
/// worker makes no progress for [`STUCK_AFTER`].
pub fn run(o: &RealOptions) -> Result<RealReport, NotRun> {
    let page = page_size();
    let monitor = match Monitor::new() {
        Ok(m) => m,
        Err(e @ (Error::Unavailable { .. } | Error::MissingFeature { .. })) => {
            return Err(NotRun::Skipped(e.to_string()))
        }
        Err(e) => return Err(NotRun::Failed(format!("cannot start the monitor: {e}"))),
    };
    let pagemap = Arc::new(
        Pagemap::open(page).map_err(|e| NotRun::Skipped(format!("/proc/self/pagemap: {e}")))?,
    );
    frames_visible(&pagemap).map_err(NotRun::Skipped)?;
    let threads = o.threads.max(1);
    // Every registration alive at once: the index's, plus per worker the handle it holds,
    // the fill it is making and entries it has taken out of the index but not yet dropped.
    let slots = CAPACITY + 4 * threads + 32;
    let slots16 = u16::try_from(slots)
        .map_err(|_| NotRun::Failed(format!("too many threads for {slots} slots")))?;
    let ring = IoUring::new(4).map_err(|e| NotRun::Skipped(format!("io_uring: {e}")))?;
    let buffers = FixedBuffers::new(Arc::new(ring), u32::from(slots16)).map_err(|e| {
        NotRun::Skipped(format!(
            "io_uring has no sparse fixed-buffer table here: {e}"
        ))
    })?;
    let buffers = Arc::new(Pins {
        buffers,
        pagemap: pagemap.clone(),
        raced_pages: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        registered: AtomicU64::new(0),
    });
    let mut config = CacheConfig::default().with_capacity(CAPACITY);
    match o.broken {
        None => {}
        Some(BrokenCache::Gate) => config = config.with_gate_skipped(),
        Some(BrokenCache::ReuseCheck) => config = config.with_reuse_check(false),
    }
    // Keep glibc's mmap threshold fixed: by default it rises to the size of the largest
    // mapped block freed, after which every buffer here would come from an arena.
    // SAFETY: mallopt only changes a tunable of the allocator.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    let world = World {
        monitor: &monitor,
        cache: RegCache::new(&monitor, config, Shared(buffers.clone())),
        pagemap,
        page,
        stop: AtomicBool::new(false),
        stop_at_first_stale: o.broken.is_some(),
        started: Instant::now(),
        stale_lookups: AtomicU64::new(0),
        stale: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        error_samples: Mutex::new(Vec::new()),
    };
    let watch = Arc::new(Watch {
        beats: (0..=threads).map(|_| Beat::default()).collect(),
        others: other_threads(),
        finished: AtomicBool::new(false),
    });
    let beats = &watch.beats[..threads];
    let main_beat = &watch.beats[threads];
    main_beat.tid.store(gettid(), Relaxed);
    main_beat.phase.store(Phase::Supervise as u8, Relaxed);
    let watchdog_thread = {
        let watch = watch.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watchdog(&watch))
            .map_err(|e| NotRun::Failed(format!("cannot start the watchdog: {e}")))?
    };
    // No progress bar (nor its allocations) unless someone watches it.
    let bar = (o.progress && std::io::stderr().is_terminal()).then(|| progress_bar(o.secs));
    let mut totals = Counts::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|w| {
                let (world, beat) = (&world, &beats[w]);
                let seed = o.seed.wrapping_mul(0x9E37_79B9).wrapping_add(w as u64);
                std::thread::Builder::new()
                    .name(format!("torture-{w}"))
                    .spawn_scoped(s, move || world.worker(w, seed, beat))
            })
            .collect();
        // The supervisor: time budget and progress (the watchdog thread watches for hangs).
        loop {
            std::thread::sleep(Duration::from_millis(50));
            main_beat.steps.fetch_add(1, Relaxed);
            let elapsed = world.started.elapsed();
            if elapsed.as_secs_f64() >= o.secs {
                world.stop.store(true, Relaxed);
            }
            if let Some(bar) = &bar {
                let lookups: u64 = beats.iter().map(|b| b.lookups.load(Relaxed)).sum();
                bar.set_position(elapsed.as_millis() as u64);
                bar.set_message(format!(
                    "{lookups} lookups, {} stale",
                    world.stale_lookups.load(Relaxed)
                ));
            }
            if beats
                .iter()
                .all(|b| b.phase.load(Relaxed) == Phase::Done as u8)
            {
                break;
            }
        }
        for h in handles.into_iter().flatten() {
            if let Ok(c) = h.join() {
                for (t, x) in totals.ops.iter_mut().zip(c.ops) {
                    *t += x;
                }
                totals.checked += c.checked;
                totals.unverified += c.unverified;
                totals.bad += c.bad;
            }
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let elapsed = world.started.elapsed();
    let cache = world.cache.stats();
    let report = RealReport {
        ops: OPS.iter().copied().zip(totals.ops).collect(),
        lookups: beats.iter().map(|b| b.lookups.load(Relaxed)).sum(),
        checked_pages: totals.checked,
        unverified_pages: totals.unverified,
        stale_lookups: world.stale_lookups.load(Relaxed),
        stale: world.stale.lock().map(|v| v.clone()).unwrap_or_default(),
        bad_handles: totals.bad,
        errors: world.errors.load(Relaxed),
        error_samples: world
            .error_samples
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default(),
        cache,
        monitor: monitor.stats(),
        raced_pages: buffers.raced_pages.load(Relaxed),
        registrations: buffers.registered.load(Relaxed),
        register_failures: buffers.failures.load(Relaxed),
        elapsed,
    };
    // Deregisters every cached registration (on this thread), then the ring goes; the
    // monitor stops last. The watchdog watches this too.
    main_beat.phase.store(Phase::Teardown as u8, Relaxed);
    main_beat.steps.fetch_add(1, Relaxed);
    drop(world);
    drop(monitor);
    watch.finished.store(true, Relaxed);
    let _ = watchdog_thread.join();
    Ok(report)
}

fn progress_bar(secs: f64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new((secs * 1000.0) as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
