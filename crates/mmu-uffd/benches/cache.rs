//! Registration-cache benchmarks: hit, miss, madvise on once-cached memory, and
//! munmap-to-invalidated latency.
//!
//! `cargo bench -p mmu-uffd --bench cache`. Hit and miss are criterion benchmarks; the hit
//! cost group puts the default cache (address-reuse check on), the opt-out, and an empty
//! system call side by side. The madvise part times `madvise(MADV_DONTNEED)` of 16 pages on
//! memory never cached, cached once and released, and explicitly unwatched, in alternating
//! rounds, and prints medians and ratios (`MMU_UFFD_MADVISE_ONLY=1` runs only that). The
//! latency part measures, per munmap, the time from just before the call to the moment the
//! invalidation callback runs on the monitor thread, side by side with a bare userfaultfd
//! reader (a thread blocked in `read()`, timestamping when the event arrives: what a C
//! monitor does) in alternating rounds of one run, and prints medians and the ratio.

use std::hint::black_box;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::Criterion;
use mmu_notifier::{IntervalContext, IntervalSubscriber, Range, WouldBlock};
use mmu_uffd::{CacheConfig, Monitor, MonitorConfig, RegCache};

const PAGE: usize = 4096;

fn anon(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous private mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
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
/// and the floor: an empty system call.
fn bench_hit_cost(c: &mut Criterion, monitor: &Monitor) {
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

/// madvise(MADV_DONTNEED) of 16 pages on memory never cached, cached once and released
/// (today still registered with userfaultfd, so every madvise waits for the monitor to read
/// its REMOVE event), and explicitly unwatched; alternating rounds, pages re-touched before
/// every call.
fn madvise(monitor: &Monitor) {
    const PAGES: usize = 16;
    let len = PAGES * PAGE;
    let cache = noop_cache(monitor, 64);
    let never = anon(len);
    let once = anon(len);
    drop(cache.get(once, len).unwrap());
    cache.clear();
    let unwatched = anon(len);
    drop(cache.get(unwatched, len).unwrap());
    cache.clear();
    monitor.unwatch(unwatched, len).unwrap();
    let cases = [
        ("never cached", never),
        ("cached once, handle dropped, cache.clear()", once),
        ("cached once, then monitor.unwatch", unwatched),
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
    // and evicts (deregisters) the least recently used entry. The memory is already registered
    // with userfaultfd; the monitor registers it again (idempotent) on every miss.
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

/// An interval subscriber that records when its invalidation ran.
struct Stamp(Arc<AtomicU64>, Instant);

impl IntervalSubscriber for Stamp {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0
            .store(self.1.elapsed().as_nanos() as u64, Ordering::Release);
        Ok(())
    }
}

/// A bare reader: a userfaultfd registered like the monitor's, a thread blocked in read().
struct Bare {
    fd: RawFd,
    seen: Arc<AtomicU64>,
}

fn bare(epoch: Instant) -> Option<Bare> {
    const API: u64 = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F;
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | 1) } as RawFd;
    if fd < 0 {
        return None;
    }
    // features: PAGEFAULT_FLAG_WP | EVENT_UNMAP
    let mut api = [0xAAu64, 1 | (1 << 6), 0];
    // SAFETY: UFFDIO_API reads and writes three u64.
    if unsafe { libc::ioctl(fd, API as _, api.as_mut_ptr()) } < 0 {
        return None;
    }
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    std::thread::spawn(move || loop {
        let mut msg = [0u8; 32];
        // SAFETY: reads one 32-byte message into a live buffer.
        let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), 32) };
        if n == 32 {
            s2.store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    });
    Some(Bare { fd, seen })
}

impl Bare {
    fn watch(&self, p: *mut u8, len: usize) {
        const REGISTER: u64 = (3 << 30) | (32 << 16) | (0xAA << 8);
        let mut reg = [p as u64, len as u64, 2, 0];
        // SAFETY: UFFDIO_REGISTER reads and writes four u64.
        let r = unsafe { libc::ioctl(self.fd, REGISTER as _, reg.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn p99(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() * 99 / 100]
}

fn latency(monitor: &Monitor, bare: Option<Bare>, epoch: Instant) {
    let Some(bare) = bare else {
        println!("bare userfaultfd reader unavailable: latency comparison skipped");
        return;
    };
    let cache = noop_cache(monitor, 64);
    let rounds = 2000;
    let (mut ours, mut raw, mut to_invalid) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds * 2 {
        let p = anon(4 * PAGE);
        // SAFETY: touches the first page of the fresh mapping.
        unsafe { p.write_volatile(1) };
        if r % 2 == 0 {
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
            ours.push(stamp.load(Ordering::Acquire).saturating_sub(t0));
            to_invalid.push(t2 - t0);
            drop(h);
            drop(sub);
        } else {
            bare.watch(p, 4 * PAGE);
            bare.seen.store(0, Ordering::Release);
            let t0 = epoch.elapsed().as_nanos() as u64;
            // SAFETY: unmaps the mapping made above.
            unsafe { libc::munmap(p.cast(), 4 * PAGE) };
            let deadline = Instant::now() + Duration::from_secs(1);
            while bare.seen.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
                std::hint::spin_loop();
            }
            raw.push(bare.seen.load(Ordering::Acquire).saturating_sub(t0));
        }
    }
    // A miss on memory nobody watched yet: the monitor's UFFDIO_REGISTER system call is
    // part of it. Buffers are unmapped after the timed loop.
    let fresh_cache = noop_cache(monitor, 4096);
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
    println!(
        "  miss on unwatched memory (watch syscall + register)     {:6.2} us ({:.2})",
        median(&mut first_miss) as f64 / 1e3,
        p99(&mut first_miss) as f64 / 1e3
    );
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
        "  unwatched munmap, call -> return (the floor)            {:6.2} us ({:.2})",
        median(&mut plain) as f64 / 1e3,
        p99(&mut plain) as f64 / 1e3
    );
    let (mo, mr, mi) = (median(&mut ours), median(&mut raw), median(&mut to_invalid));
    println!("munmap latency, {rounds} rounds each, alternating, median (p99):");
    println!(
        "  bare reader: munmap call -> event read                 {:6.2} us ({:.2})",
        mr as f64 / 1e3,
        p99(&mut raw) as f64 / 1e3
    );
    println!(
        "  monitor:     munmap call -> invalidation callback ran   {:6.2} us ({:.2})",
        mo as f64 / 1e3,
        p99(&mut ours) as f64 / 1e3
    );
    println!(
        "  cache:       munmap call -> handle seen invalid         {:6.2} us ({:.2})",
        mi as f64 / 1e3,
        p99(&mut to_invalid) as f64 / 1e3
    );
    println!("  ratio monitor / bare: {:.3}", mo as f64 / mr as f64);
}

/// Pins the calling thread to `cpu` (threads it creates afterwards inherit the mask).
fn pin(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it;
    // sched_setaffinity(0, ...) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

fn main() {
    // The latency depends on where the reader threads run relative to the unmapper; pin
    // them like the C reference ("other core"): the monitor and bare reader threads are
    // created on CPU 1, the unmapping thread then moves to CPU 0. MMU_UFFD_SAME_CPU=1
    // keeps everything on CPU 0 instead.
    let same = std::env::var_os("MMU_UFFD_SAME_CPU").is_some();
    let pinned = pin(if same { 0 } else { 1 });
    // MMU_UFFD_BUSY_POLL_US=N: the monitor keeps polling N us after each event.
    let busy = std::env::var("MMU_UFFD_BUSY_POLL_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_micros)
        .unwrap_or(Duration::ZERO);
    let monitor = match Monitor::with_config(MonitorConfig::default().with_busy_poll(busy)) {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED cache benchmarks: {e}");
            return;
        }
    };
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let bare = bare(epoch);
    let pinned = pinned && pin(0);
    println!("monitor busy polling after each event: {busy:?}");
    println!(
        "placement: {}",
        match (pinned, same) {
            (false, _) => "not pinned (sched_setaffinity failed)",
            (true, false) => "readers on CPU 1, unmapper on CPU 0",
            (true, true) => "everything on CPU 0",
        }
    );
    if std::env::var_os("MMU_UFFD_LATENCY_ONLY").is_some() {
        latency(&monitor, bare, epoch);
        return;
    }
    if std::env::var_os("MMU_UFFD_MADVISE_ONLY").is_some() {
        madvise(&monitor);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_hit_miss(&mut c, &monitor);
    bench_hit_cost(&mut c, &monitor);
    c.final_summary();
    madvise(&monitor);
    latency(&monitor, bare, epoch);
}
