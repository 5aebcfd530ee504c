//! Registration-cache benchmarks: hit, miss, madvise on once-cached memory, and
//! munmap-to-invalidated latency.
//!
//! `cargo bench -p mmu-uffd --bench cache`. Hit and miss are criterion benchmarks; the hit
//! cost group puts the default cache (address-reuse check on), the opt-out, and an empty
//! system call side by side. The madvise part times `madvise(MADV_DONTNEED)` of 16 pages on
//! memory never cached, cached (an entry whose handle was dropped), and cached once and
//! then cleared, in alternating rounds, and prints medians and ratios (`MMU_UFFD_MADVISE_ONLY=1` runs only that). The
//! latency part measures, per munmap, the time from just before the call to the moment the
//! invalidation callback runs on the monitor thread, side by side with a bare userfaultfd
//! reader (a thread blocked in `read()`, timestamping when the event arrives: what a C
//! monitor does), and the time until the unmapper sees its cache handle invalid, for two
//! placements (`sched_setaffinity`): the monitor's threads and the bare reader on another
//! CPU than the unmapper, and everything on one CPU. It prints medians, p99 and the ratios
//! to the bare reader (`MMU_UFFD_LATENCY_ONLY=1` runs only that part,
//! `MMU_UFFD_PLACEMENT=other` or `same` only one placement).
//!
//! Each placement runs in processes of its own (the bench starts itself again,
//! `MMU_UFFD_LATENCY_PROCS` processes per placement, default 6, the placements
//! alternating; `MMU_UFFD_LATENCY_ROUNDS` rounds each, default 2000), and inside a process
//! the bare reader's munmap and the monitor's alternate, each first every other round. Both
//! are needed for a fair comparison. A one-CPU munmap right after a measurement of the
//! other placement (whose threads just ran on the other CPU) is slower, by a few
//! microseconds, than one after another one-CPU measurement. With both placements
//! interleaved in one process in a fixed rotation, the monitor's munmap always came right
//! after the other placement and the bare reader's one time in four: measured, 1.64 times
//! the bare reader; with the two swapped in the rotation, 1.23. In a process of its own
//! the one-CPU placement never runs a thread on the other CPU (the children start pinned
//! to CPU 0), and the alternation makes each side follow the other as often as itself.
//!
//! The floor part (`MMU_UFFD_READERS_ONLY=1`, not run otherwise) shows what the one-CPU
//! ratio is made of: on CPU 0, in processes of their own, the bare reader, two threads
//! that wait in epoll and read as the monitor does (without its work after the read), two
//! threads both blocked in `read()`, two threads blocked in `read()` one at a time under a
//! lock, and the monitor, in a shuffled order every round.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use mmu_uffd::{CacheConfig, Monitor, MonitorConfig, RegCache};

const PAGE: usize = 4096;

fn anon(len: usize) -> *mut u8 {
    bare_reader::anon(len).expect("mmap")
}

fn noop_cache(
    monitor: &Monitor,
    capacity: usize,
) -> RegCache<impl mmu_uffd::Registrar<Registration = usize>> {
    cache_with(monitor, CacheConfig::default().with_capacity(capacity))
}

fn cache_with(
    monitor: &Monitor,
    config: CacheConfig,
) -> RegCache<impl mmu_uffd::Registrar<Registration = usize>> {
    RegCache::with_fns(
        monitor,
        config,
        |p: *mut u8, _len: usize| Ok::<usize, std::io::Error>(p as usize),
        |r: usize| {
            black_box(r);
        },
    )
}

/// What a hit costs with the address-reuse check (one system call per lookup), without it,
/// and the floors: an empty system call, and an ioctl on a userfaultfd that it refuses at
/// once (the check is an ioctl on the monitor's).
fn bench_hit_cost(c: &mut Criterion, monitor: &Monitor, bare: Option<&Bare>) {
    let checked = cache_with(monitor, CacheConfig::default().with_capacity(1024));
    let unchecked = cache_with(
        monitor,
        CacheConfig::default()
            .with_capacity(1024)
            .with_reuse_check(false),
    );
    let bufs: Vec<*mut u8> = (0..64).map(|_| anon(16 * PAGE)).collect();
    for &b in &bufs {
        drop(checked.get(b, 16 * PAGE).unwrap());
        drop(unchecked.get(b, 16 * PAGE).unwrap());
    }
    let mut g = c.benchmark_group("hit cost (get + drop, 64 entries)");
    let mut i = 0;
    g.bench_function("default (reuse check on)", |b| {
        b.iter(|| {
            i = (i + 7) & 63;
            black_box(checked.get(black_box(bufs[i]), 8 * PAGE).unwrap());
        })
    });
    g.bench_function("with_reuse_check(false)", |b| {
        b.iter(|| {
            i = (i + 7) & 63;
            black_box(unchecked.get(black_box(bufs[i]), 8 * PAGE).unwrap());
        })
    });
    g.bench_function("floor: getppid system call", |b| {
        // SAFETY: getppid takes no arguments and cannot fail.
        b.iter(|| black_box(unsafe { libc::syscall(libc::SYS_getppid) }))
    });
    if let Some(bare) = bare {
        g.bench_function("floor: unknown ioctl on a userfaultfd", |b| {
            b.iter(|| black_box(bare.unknown_ioctl()))
        });
    }
    g.finish();
    for cache in [checked.stats(), unchecked.stats()] {
        assert_eq!(cache.misses, 64, "{cache:?}");
    }
    drop((checked, unchecked));
    for b in bufs {
        // SAFETY: unmaps the buffers made above; no handle to them is left.
        unsafe { libc::munmap(b.cast(), 16 * PAGE) };
    }
}

/// Writes one byte to each of the `pages` pages at `p`, so that an madvise has pages to drop.
fn touch(p: *mut u8, pages: usize) {
    for i in 0..pages {
        // SAFETY: `p` is a live read-write mapping of at least `pages` pages.
        unsafe { p.add(i * PAGE).write_volatile(1) };
    }
}

fn dontneed(p: *mut u8, len: usize) {
    // SAFETY: `p` is a live private anonymous mapping of `len` bytes this bench owns.
    let r = unsafe { libc::madvise(p.cast(), len, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

/// madvise(MADV_DONTNEED) of 16 pages on memory never cached, cached (the entry's lease
/// keeps the memory registered with userfaultfd, so every madvise waits for the monitor to
/// read its REMOVE event, as it would with a lease retained after an eviction), and cached
/// once then cleared (`clear` drops the entries and the retained leases, and the monitor
/// unregisters what no lease covers); alternating rounds, pages re-touched before every
/// call.
fn madvise(monitor: &Monitor) {
    const PAGES: usize = 16;
    let len = PAGES * PAGE;
    let cache = noop_cache(monitor, 64);
    let never = anon(len);
    let cached = anon(len);
    drop(cache.get(cached, len).unwrap());
    let cleared = anon(len);
    let other = noop_cache(monitor, 64);
    drop(other.get(cleared, len).unwrap());
    other.clear();
    let cases = [
        ("never cached", never),
        ("cached, handle dropped", cached),
        ("cached once, then cache.clear()", cleared),
    ];
    // Whether the monitor sees (and the madvise waits for) an event, one call per case.
    let seen: Vec<bool> = cases
        .iter()
        .map(|&(_, p)| {
            let before = monitor.stats().removes;
            touch(p, PAGES);
            dontneed(p, len);
            monitor.stats().removes > before
        })
        .collect();
    let rounds = 2000;
    let mut times: Vec<Vec<u64>> = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (k, &(_, p)) in cases.iter().enumerate() {
            touch(p, PAGES);
            let t0 = Instant::now();
            dontneed(p, len);
            times[k].push(t0.elapsed().as_nanos() as u64);
        }
    }
    println!(
        "madvise(MADV_DONTNEED) of {PAGES} pages, all re-touched before each call, \
         {rounds} rounds alternating, median (p99), ratio to never cached:"
    );
    let medians: Vec<u64> = times.iter_mut().map(|t| median(t)).collect();
    for (k, (name, _)) in cases.iter().enumerate() {
        println!(
            "  {name:<44} {:6.2} us ({:6.2})  x{:<6.2} monitor event: {}",
            medians[k] as f64 / 1e3,
            p99(&mut times[k]) as f64 / 1e3,
            medians[k] as f64 / medians[0] as f64,
            if seen[k] { "yes" } else { "no" }
        );
    }
    drop(cache);
    for (_, p) in cases {
        // SAFETY: unmaps the buffers made above; no handle to them is left.
        unsafe { libc::munmap(p.cast(), len) };
    }
}

fn bench_hit_miss(c: &mut Criterion, monitor: &Monitor) {
    // Hit: 64 cached 16-page buffers, look one up and drop the handle.
    let cache = noop_cache(monitor, 1024);
    let bufs: Vec<*mut u8> = (0..64).map(|_| anon(16 * PAGE)).collect();
    for &b in &bufs {
        drop(cache.get(b, 16 * PAGE).unwrap());
    }
    let mut i = 0;
    c.bench_function("cache hit (get + drop, 64 entries)", |b| {
        b.iter(|| {
            i = (i + 7) & 63;
            black_box(cache.get(black_box(bufs[i]), 8 * PAGE).unwrap());
        })
    });
    assert!(cache.stats().misses == 64);

    // Miss: 64 watched buffers through a 16-entry cache, in a cycle, so every lookup misses
    // and evicts (deregisters) the least recently used entry. The memory is already
    // registered with userfaultfd and checked (the hit run above leased it all, and evicted
    // entries' leases are retained), so the monitor vouches for it: the miss makes no
    // system call.
    let small = noop_cache(monitor, 16);
    let mut j = 0;
    c.bench_function(
        "cache miss (register + evict, memory already registered)",
        |b| {
            b.iter(|| {
                j = (j + 1) & 63;
                black_box(small.get(black_box(bufs[j]), 16 * PAGE).unwrap());
            })
        },
    );
    let st = small.stats();
    assert!(st.hits == 0 && st.misses > 0, "{st:?}");
    println!(
        "  (miss run: {} misses, {} evictions, 0 hits)",
        st.misses, st.evictions
    );
}

/// The bare userfaultfd reader and the pinning, shared with `mmn bench`.
#[path = "../../mmn/src/bench/bare.rs"]
mod bare_reader;

use bare_reader::{pin, Bare, Stamp};

fn bare(epoch: Instant) -> Option<Bare> {
    Bare::new(epoch).ok()
}

/// A child process's readers, timestamped from one epoch: a monitor with `busy` polling
/// and a bare reader; `None` (and a `SKIPPED` line for the parent) if either cannot start.
fn child_readers(busy: Duration) -> Option<(Instant, Monitor, Bare)> {
    let epoch = Instant::now();
    let monitor = match Monitor::with_config(MonitorConfig::default().with_busy_poll(busy)) {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED {e}");
            return None;
        }
    };
    let Some(bare) = bare(epoch) else {
        println!("SKIPPED bare userfaultfd reader unavailable");
        return None;
    };
    Some((epoch, monitor, bare))
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn p99(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() * 99 / 100]
}

/// Where the readers run relative to the unmapping thread (which runs on CPU 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// The monitor's threads and the bare reader on CPU 1.
    Other,
    /// Everything on CPU 0; no thread of the process ever runs on CPU 1.
    Same,
}

impl Placement {
    fn key(self) -> &'static str {
        match self {
            Placement::Other => "other",
            Placement::Same => "same",
        }
    }

    fn parse(s: &str) -> Option<Placement> {
        [Placement::Other, Placement::Same]
            .into_iter()
            .find(|p| p.key() == s)
    }

    fn title(self) -> &'static str {
        match self {
            Placement::Other => "monitor threads and bare reader on another CPU",
            Placement::Same => "everything on one CPU",
        }
    }

    fn readers_cpu(self) -> usize {
        match self {
            Placement::Other => 1,
            Placement::Same => 0,
        }
    }
}

/// One process's samples (ns): bare reader, monitor callback, handle seen invalid.
#[derive(Default)]
struct Samples {
    raw: Vec<u64>,
    ours: Vec<u64>,
    to_invalid: Vec<u64>,
}

/// One watched munmap through the monitor: (call -> callback ran, call -> seen invalid).
fn monitored_munmap<R: mmu_uffd::Registrar<Registration = usize>>(
    monitor: &Monitor,
    cache: &RegCache<R>,
    epoch: Instant,
) -> (u64, u64) {
    let p = anon(4 * PAGE);
    // SAFETY: touches the first page of the fresh mapping.
    unsafe { p.write_volatile(1) };
    let stamp = Arc::new(AtomicU64::new(0));
    let sub = monitor
        .subscriptions()
        .insert_interval(
            p as u64..p as u64 + 4 * PAGE as u64,
            Stamp(stamp.clone(), epoch),
        )
        .unwrap();
    let h = cache.get(p, 4 * PAGE).unwrap();
    let t0 = epoch.elapsed().as_nanos() as u64;
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(p.cast(), 4 * PAGE) };
    // What a caller observes: the handle invalid right after munmap returned.
    let valid = h.is_valid();
    let t2 = epoch.elapsed().as_nanos() as u64;
    assert!(!valid, "stale handle after munmap returned");
    let deadline = Instant::now() + Duration::from_secs(1);
    while stamp.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
        std::hint::spin_loop();
    }
    let ours = stamp.load(Ordering::Acquire).saturating_sub(t0);
    drop(h);
    drop(sub);
    (ours, t2 - t0)
}

/// One watched munmap through the bare reader: call -> event read.
fn bare_munmap(bare: &Bare, epoch: Instant) -> u64 {
    let p = anon(4 * PAGE);
    // SAFETY: touches the first page of the fresh mapping.
    unsafe { p.write_volatile(1) };
    bare.watch(p, 4 * PAGE);
    bare.seen.store(0, Ordering::Release);
    let t0 = epoch.elapsed().as_nanos() as u64;
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(p.cast(), 4 * PAGE) };
    let deadline = Instant::now() + Duration::from_secs(1);
    while bare.seen.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
        // On the reader's own CPU a spin would keep it off: let it run.
        std::thread::yield_now();
    }
    bare.seen.load(Ordering::Acquire).saturating_sub(t0)
}

/// Runs this bench again as a child process with `env` set (and this process's CPU mask)
/// and returns the rest of its output line that starts with `tag` and a space; `None` if
/// the child printed `SKIPPED <why>` (said here, for `what`). Panics if the child failed.
fn child_line(
    exe: &std::path::Path,
    env: &[(&str, String)],
    tag: &str,
    what: &str,
) -> Option<String> {
    let out = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running a child process of the bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} process failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(why) = text.lines().find_map(|l| l.strip_prefix("SKIPPED ")) {
        println!("SKIPPED {what}: {why}");
        return None;
    }
    let prefix = format!("{tag} ");
    let line = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
    Some(line.unwrap_or_else(|| panic!("a {tag} line")).to_string())
}

/// The number an environment variable holds, or `default`.
fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// A child process of the latency part: one placement, `rounds` rounds, each one munmap
/// through the bare reader and one through the monitor, in an order that alternates from
/// round to round (each kind follows the other as often as itself). Prints one
/// `LATENCY <placement> <pinned> <9 numbers>` line for the parent: bare reader, monitor
/// callback and handle seen invalid (median, p99), then the floors: a miss on unwatched
/// memory and an unwatched munmap (medians).
fn latency_child(placement: Placement, busy: Duration) {
    let rounds = env_number("MMU_UFFD_LATENCY_ROUNDS", 2000);
    // The readers' threads inherit the mask of the thread that creates them.
    let mut pinned = pin(placement.readers_cpu());
    let Some((epoch, monitor, bare)) = child_readers(busy) else {
        return;
    };
    pinned &= pin(0);
    let cache = noop_cache(&monitor, 64);
    let mut s = Samples::default();
    for r in 0..rounds {
        for k in 0..2 {
            if (r + k) % 2 == 0 {
                let (ours, to_invalid) = monitored_munmap(&monitor, &cache, epoch);
                s.ours.push(ours);
                s.to_invalid.push(to_invalid);
            } else {
                s.raw.push(bare_munmap(&bare, epoch));
            }
        }
    }
    // A miss on memory nobody watched yet: the monitor's UFFDIO_REGISTER system call is
    // part of it. Buffers are unmapped after the timed loop.
    let fresh_cache = noop_cache(&monitor, 4096);
    let fresh: Vec<*mut u8> = (0..rounds).map(|_| anon(4 * PAGE)).collect();
    let mut first_miss: Vec<u64> = fresh
        .iter()
        .map(|&p| {
            let t0 = Instant::now();
            black_box(fresh_cache.get(p, 4 * PAGE).unwrap());
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    assert_eq!(fresh_cache.stats().misses, rounds as u64);
    drop(fresh_cache);
    for p in fresh {
        // SAFETY: unmaps the buffers made above.
        unsafe { libc::munmap(p.cast(), 4 * PAGE) };
    }
    // The floor: munmap of the same kind of mapping, not watched by anyone.
    let mut plain: Vec<u64> = (0..rounds)
        .map(|_| {
            let p = anon(4 * PAGE);
            // SAFETY: touches the first page of the fresh mapping.
            unsafe { p.write_volatile(1) };
            let t0 = Instant::now();
            // SAFETY: unmaps the mapping made above.
            unsafe { libc::munmap(p.cast(), 4 * PAGE) };
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    println!(
        "LATENCY {} {} {} {} {} {} {} {} {} {}",
        placement.key(),
        pinned as u8,
        median(&mut s.raw),
        p99(&mut s.raw),
        median(&mut s.ours),
        p99(&mut s.ours),
        median(&mut s.to_invalid),
        p99(&mut s.to_invalid),
        median(&mut first_miss),
        median(&mut plain),
    );
}

/// The latency part: `MMU_UFFD_LATENCY_PROCS` processes per placement (default 6), the
/// placements alternating, each process `MMU_UFFD_LATENCY_ROUNDS` rounds (default 2000).
/// Prints, per placement, the medians over the processes of each process's medians (and
/// p99), and the ratio monitor / bare reader: median over the processes, [lowest,
/// highest].
fn latency() {
    let placements: Vec<Placement> = match std::env::var("MMU_UFFD_PLACEMENT") {
        Ok(p) => match Placement::parse(&p) {
            Some(p) => vec![p],
            None => panic!("MMU_UFFD_PLACEMENT={p}: expected other or same"),
        },
        Err(_) => vec![Placement::Other, Placement::Same],
    };
    let procs = env_number("MMU_UFFD_LATENCY_PROCS", 6);
    let rounds = env_number("MMU_UFFD_LATENCY_ROUNDS", 2000);
    let exe = std::env::current_exe().expect("the bench's own path");
    // The children inherit the mask: they start on CPU 0, so a process of the one-CPU
    // placement never runs a thread on CPU 1, not even while it starts.
    let mut pinned = pin(0);
    let mut results: Vec<Vec<[u64; 8]>> = vec![Vec::new(); placements.len()];
    for i in 0..procs {
        for k in 0..placements.len() {
            let j = (i + k) % placements.len();
            let Some(line) = child_line(
                &exe,
                &[
                    ("MMU_UFFD_LATENCY_CHILD", placements[j].key().to_string()),
                    ("MMU_UFFD_LATENCY_ROUNDS", rounds.to_string()),
                ],
                "LATENCY",
                "munmap latency",
            ) else {
                return;
            };
            let f: Vec<&str> = line.split_whitespace().collect();
            pinned &= f[1] == "1";
            let mut v = [0u64; 8];
            for (d, s) in v.iter_mut().zip(&f[2..]) {
                *d = s.parse().expect("a number");
            }
            results[j].push(v);
        }
    }
    let us = |ns: u64| ns as f64 / 1e3;
    println!(
        "munmap latency: {procs} processes per placement, alternating, {rounds} rounds each \
         (bare reader and monitor alternating); medians over the processes of each \
         process's median (p99){}:",
        if pinned {
            ", unmapper on CPU 0"
        } else {
            ", NOT PINNED (sched_setaffinity failed)"
        }
    );
    for (p, runs) in placements.iter().zip(&mut results) {
        let col = |runs: &[[u64; 8]], i: usize| -> u64 {
            let mut v: Vec<u64> = runs.iter().map(|r| r[i]).collect();
            median(&mut v)
        };
        let mut ratios: Vec<f64> = runs.iter().map(|r| r[2] as f64 / r[0] as f64).collect();
        ratios.sort_by(f64::total_cmp);
        let mut inv: Vec<f64> = runs.iter().map(|r| r[4] as f64 / r[0] as f64).collect();
        inv.sort_by(f64::total_cmp);
        println!("  [{}]", p.title());
        println!(
            "  unwatched munmap, call -> return (the floor)            {:6.2} us",
            us(col(runs, 7))
        );
        println!(
            "  miss on unwatched memory (watch syscall + register)     {:6.2} us",
            us(col(runs, 6))
        );
        println!(
            "  bare reader: munmap call -> event read                 {:6.2} us ({:.2})",
            us(col(runs, 0)),
            us(col(runs, 1))
        );
        println!(
            "  monitor:     munmap call -> invalidation callback ran   {:6.2} us ({:.2})",
            us(col(runs, 2)),
            us(col(runs, 3))
        );
        println!(
            "  cache:       munmap call -> handle seen invalid         {:6.2} us ({:.2})",
            us(col(runs, 4)),
            us(col(runs, 5))
        );
        println!(
            "  ratio monitor / bare: {:.3} [{:.3}, {:.3}]; seen invalid / bare: {:.3} \
             [{:.3}, {:.3}]",
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1],
            inv[inv.len() / 2],
            inv[0],
            inv[inv.len() - 1]
        );
    }
}

/// How a pair of threads can read a userfaultfd (the floor part, see [`readers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// Each thread waits in an epoll instance of its own (`EPOLLEXCLUSIVE`), then reads
    /// without blocking: the monitor's way, without its work after the read.
    Epoll,
    /// Both threads block in `read()`: every event wakes both (the kernel's readers do not
    /// wait exclusively). Not usable by the monitor: a batch is numbered before its read,
    /// and two reads in progress at once could complete out of order (see `gate`).
    Read,
    /// Both threads block in `read()` under a lock, the other one waiting for the lock
    /// (a futex): the only shape of blocking reads that keeps one read in progress at a
    /// time. The lock is released (waking the other thread) right after the read, before
    /// the timestamp, as it would have to be before any callback runs.
    LockedRead,
}

/// Opens a userfaultfd like the monitor's (user-mode faults only, write-protect faults and
/// unmap events).
fn open_uffd(nonblock: bool) -> std::os::fd::RawFd {
    // _IOWR(0xAA, 0x3F, struct uffdio_api): 24 bytes.
    const API: u64 = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F;
    let flags = libc::O_CLOEXEC | 1 | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as std::os::fd::RawFd;
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    let mut api = [0xAAu64, 1 | (1 << 6), 0];
    // SAFETY: UFFDIO_API reads and writes three u64 in a live array.
    let r = unsafe { libc::ioctl(fd, API as _, api.as_mut_ptr()) };
    assert_eq!(r, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    fd
}

/// Asks for the shortest scheduler slice, as the monitor's threads do.
fn short_slice() {
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    let attr = SchedAttr {
        size: 48,
        runtime: 100_000,
        ..Default::default()
    };
    // SAFETY: sched_setattr reads 48 bytes of `attr`, a live local; failure changes nothing.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
}

/// Two reader threads on a userfaultfd of their own, timestamping every event they read.
struct Pair {
    fd: std::os::fd::RawFd,
    seen: Arc<AtomicU64>,
}

impl Pair {
    fn start(how: Reading, epoch: Instant) -> Pair {
        let fd = open_uffd(how == Reading::Epoll);
        let seen = Arc::new(AtomicU64::new(0));
        let lock = Arc::new(std::sync::Mutex::new(()));
        for _ in 0..2 {
            let (seen, lock) = (seen.clone(), lock.clone());
            // The threads live as long as the process, like the bare reader's.
            std::thread::spawn(move || {
                short_slice();
                let epoll = (how == Reading::Epoll).then(|| {
                    // SAFETY: plain system calls on descriptors this thread owns or shares.
                    unsafe {
                        let e = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                        let mut ev = libc::epoll_event {
                            events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                            u64: 1,
                        };
                        assert_eq!(libc::epoll_ctl(e, libc::EPOLL_CTL_ADD, fd, &mut ev), 0);
                        e
                    }
                });
                // The monitor's buffer: 64 messages.
                let mut buf = [0u8; 64 * 32];
                let read = |buf: &mut [u8]| {
                    // SAFETY: reads into a live buffer of `buf.len()` bytes.
                    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
                };
                loop {
                    let n = match how {
                        Reading::Epoll => {
                            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
                            // SAFETY: `evs` is a live array of two entries.
                            unsafe { libc::epoll_wait(epoll.unwrap(), evs.as_mut_ptr(), 2, -1) };
                            read(&mut buf)
                        }
                        Reading::Read => read(&mut buf),
                        Reading::LockedRead => {
                            let _g = lock.lock().unwrap();
                            read(&mut buf)
                        }
                    };
                    if n > 0 {
                        // Release: pairs with the unmapping thread's Acquire load.
                        seen.store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
                    }
                }
            });
        }
        Pair { fd, seen }
    }

    /// One watched munmap: call -> event read.
    fn munmap(&self, epoch: Instant) -> u64 {
        // _IOWR(0xAA, 0x00, struct uffdio_register): 32 bytes.
        const REGISTER: u64 = (3 << 30) | (32 << 16) | (0xAA << 8);
        let p = anon(4 * PAGE);
        // SAFETY: touches the first page of the fresh mapping.
        unsafe { p.write_volatile(1) };
        let mut reg = [p as u64, 4 * PAGE as u64, 2, 0];
        // SAFETY: UFFDIO_REGISTER reads and writes four u64 in a live array.
        let r = unsafe { libc::ioctl(self.fd, REGISTER as _, reg.as_mut_ptr()) };
        assert_eq!(r, 0, "UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
        self.seen.store(0, Ordering::Release);
        let t0 = epoch.elapsed().as_nanos() as u64;
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(p.cast(), 4 * PAGE) };
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.seen.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        self.seen.load(Ordering::Acquire).saturating_sub(t0)
    }
}

/// What the floor part compares, in its columns.
const READINGS: [&str; 5] = [
    "bare reader: one thread blocked in read()",
    "two threads, epoll (EPOLLEXCLUSIVE) + read (the monitor's waiting and reading)",
    "two threads blocked in read() (both woken; breaks the gate)",
    "two threads blocked in read() under a lock (one read at a time)",
    "the monitor: munmap call -> invalidation callback ran",
];

/// A child process of the floor part: everything on CPU 0, `rounds` rounds, each one
/// munmap per column in a shuffled order. Prints `READERS` and the five medians (ns).
fn readers_child(busy: Duration) {
    let rounds = env_number("MMU_UFFD_LATENCY_ROUNDS", 2000);
    pin(0);
    let Some((epoch, monitor, bare)) = child_readers(busy) else {
        return;
    };
    let pairs = [
        Pair::start(Reading::Epoll, epoch),
        Pair::start(Reading::Read, epoch),
        Pair::start(Reading::LockedRead, epoch),
    ];
    let cache = noop_cache(&monitor, 64);
    let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(rounds); READINGS.len()];
    let mut order: Vec<usize> = (0..READINGS.len()).collect();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..rounds {
        // A fresh shuffle every round (xorshift, Fisher-Yates): each column follows every
        // other as often.
        for i in (1..order.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        for &k in &order {
            let t = match k {
                0 => bare_munmap(&bare, epoch),
                1..=3 => pairs[k - 1].munmap(epoch),
                _ => monitored_munmap(&monitor, &cache, epoch).0,
            };
            samples[k].push(t);
        }
    }
    let medians: Vec<String> = samples.iter_mut().map(|v| median(v).to_string()).collect();
    println!("READERS {}", medians.join(" "));
}

/// The floor part (`MMU_UFFD_READERS_ONLY=1`): on one CPU, what waiting for and reading
/// the event costs in each way two threads can read (without any work after the read),
/// side by side with the bare reader and the monitor; `MMU_UFFD_LATENCY_PROCS` processes
/// (default 6) of `MMU_UFFD_LATENCY_ROUNDS` rounds. Prints the medians over the processes
/// of each process's median, and the ratios to the bare reader: median [lowest, highest].
fn readers() {
    let procs = env_number("MMU_UFFD_LATENCY_PROCS", 6);
    let exe = std::env::current_exe().expect("the bench's own path");
    pin(0);
    let mut runs: Vec<Vec<u64>> = Vec::new();
    for _ in 0..procs {
        let Some(line) = child_line(
            &exe,
            &[("MMU_UFFD_READERS_CHILD", "1".to_string())],
            "READERS",
            "reading floor",
        ) else {
            return;
        };
        runs.push(
            line.split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect(),
        );
    }
    println!(
        "reading floor, everything on CPU 0: {procs} processes, munmap call -> event read \
         (the monitor: -> callback ran); medians over the processes, ratio to the bare \
         reader median [lowest, highest]:"
    );
    for (k, name) in READINGS.iter().enumerate() {
        let mut m: Vec<u64> = runs.iter().map(|r| r[k]).collect();
        let mut ratios: Vec<f64> = runs.iter().map(|r| r[k] as f64 / r[0] as f64).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "  {name:<80} {:6.2} us  x{:.3} [{:.3}, {:.3}]",
            median(&mut m) as f64 / 1e3,
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
}

fn main() {
    // MMU_UFFD_BUSY_POLL_US=N: the monitor keeps polling N us after each event.
    let busy = std::env::var("MMU_UFFD_BUSY_POLL_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_micros)
        .unwrap_or(Duration::ZERO);
    if std::env::var_os("MMU_UFFD_READERS_CHILD").is_some() {
        readers_child(busy);
        return;
    }
    if let Ok(p) = std::env::var("MMU_UFFD_LATENCY_CHILD") {
        let p = Placement::parse(&p).expect("MMU_UFFD_LATENCY_CHILD=other|same");
        latency_child(p, busy);
        return;
    }
    println!("monitor busy polling after each event: {busy:?}");
    if std::env::var_os("MMU_UFFD_LATENCY_ONLY").is_some() {
        latency();
        return;
    }
    if std::env::var_os("MMU_UFFD_READERS_ONLY").is_some() {
        readers();
        return;
    }
    let monitor = match Monitor::with_config(MonitorConfig::default().with_busy_poll(busy)) {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED cache benchmarks: {e}");
            return;
        }
    };
    if std::env::var_os("MMU_UFFD_MADVISE_ONLY").is_some() {
        madvise(&monitor);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_hit_miss(&mut c, &monitor);
    let floor = bare(Instant::now());
    bench_hit_cost(&mut c, &monitor, floor.as_ref());
    c.final_summary();
    madvise(&monitor);
    drop(monitor);
    latency();
}
