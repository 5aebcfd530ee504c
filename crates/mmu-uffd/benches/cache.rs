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
//! monitor does), and the time until the unmapper sees its cache handle invalid, for two
//! placements interleaved in one run: the monitor's threads on another CPU than the
//! unmapper, and everything on one CPU (`sched_setaffinity`); it prints medians, p99 and
//! the ratios to the bare reader (`MMU_UFFD_LATENCY_ONLY=1` runs only that part,
//! `MMU_UFFD_PLACEMENT=other` or `same` only one placement).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::Criterion;
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

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn p99(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() * 99 / 100]
}

/// One placement of the monitor threads relative to the unmapper: a monitor and a bare
/// reader whose threads were created (and stay) on the same CPU.
struct Placement {
    name: &'static str,
    monitor: Monitor,
    bare: Bare,
}

/// Per-placement samples (ns): bare reader, monitor callback, handle seen invalid.
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

fn latency(placements: &[Placement], epoch: Instant) {
    let rounds = 2000;
    let caches: Vec<_> = placements
        .iter()
        .map(|p| noop_cache(&p.monitor, 64))
        .collect();
    let mut samples: Vec<Samples> = placements.iter().map(|_| Samples::default()).collect();
    // Every round runs each placement's bare reader and monitor once, in a rotating
    // order, so that drifting machine load hits all of them alike.
    let variants = placements.len() * 2;
    for r in 0..rounds {
        for k in 0..variants {
            let v = (r + k) % variants;
            let (i, monitored) = (v / 2, v % 2 == 0);
            let s = &mut samples[i];
            if monitored {
                let (ours, to_invalid) =
                    monitored_munmap(&placements[i].monitor, &caches[i], epoch);
                s.ours.push(ours);
                s.to_invalid.push(to_invalid);
            } else {
                s.raw.push(bare_munmap(&placements[i].bare, epoch));
            }
        }
    }
    let monitor = &placements[0].monitor;
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
    println!("munmap latency, {rounds} rounds each, interleaved, median (p99):");
    for (p, s) in placements.iter().zip(&mut samples) {
        let (mo, mr, mi) = (
            median(&mut s.ours),
            median(&mut s.raw),
            median(&mut s.to_invalid),
        );
        println!("  [{}]", p.name);
        println!(
            "  bare reader: munmap call -> event read                 {:6.2} us ({:.2})",
            mr as f64 / 1e3,
            p99(&mut s.raw) as f64 / 1e3
        );
        println!(
            "  monitor:     munmap call -> invalidation callback ran   {:6.2} us ({:.2})",
            mo as f64 / 1e3,
            p99(&mut s.ours) as f64 / 1e3
        );
        println!(
            "  cache:       munmap call -> handle seen invalid         {:6.2} us ({:.2})",
            mi as f64 / 1e3,
            p99(&mut s.to_invalid) as f64 / 1e3
        );
        println!(
            "  ratio monitor / bare: {:.3}; seen invalid / bare: {:.3}",
            mo as f64 / mr as f64,
            mi as f64 / mr as f64
        );
    }
}

fn main() {
    // The latency depends on where the reader threads run relative to the unmapper; pin
    // them like the C reference: for "other CPU" the monitor and a bare reader are created
    // while this thread is on CPU 1 (their threads inherit the mask), for "same CPU"
    // another pair is created on CPU 0; the unmapping thread then moves to CPU 0 and the
    // latency part runs both placements interleaved in one run.
    let cross = pin(1);
    // MMU_UFFD_BUSY_POLL_US=N: the monitor keeps polling N us after each event.
    let busy = std::env::var("MMU_UFFD_BUSY_POLL_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_micros)
        .unwrap_or(Duration::ZERO);
    let new_monitor = || Monitor::with_config(MonitorConfig::default().with_busy_poll(busy));
    let monitor = match new_monitor() {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED cache benchmarks: {e}");
            return;
        }
    };
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let bare_cross = bare(epoch);
    let pinned = pin(0);
    let same = if pinned {
        new_monitor().ok().zip(bare(epoch))
    } else {
        None
    };
    println!("monitor busy polling after each event: {busy:?}");
    println!(
        "placement: {}",
        match (cross && pinned, &same) {
            (false, _) => "not pinned (sched_setaffinity failed)",
            (true, None) => "readers on CPU 1, unmapper on CPU 0 (no second monitor)",
            (true, Some(_)) => "readers on CPU 1 or on CPU 0, unmapper on CPU 0",
        }
    );
    let run_latency = |monitor: Monitor| {
        let Some(bare_cross) = bare_cross else {
            println!("bare userfaultfd reader unavailable: latency comparison skipped");
            return;
        };
        let mut placements = vec![Placement {
            name: if cross && pinned {
                "monitor threads on another CPU"
            } else {
                "unpinned"
            },
            monitor,
            bare: bare_cross,
        }];
        if let Some((monitor, bare)) = same {
            placements.push(Placement {
                name: "everything on one CPU",
                monitor,
                bare,
            });
        }
        // MMU_UFFD_PLACEMENT=other|same: only that placement (e.g. to count context
        // switches per munmap with `perf stat -e context-switches`).
        match std::env::var("MMU_UFFD_PLACEMENT").as_deref() {
            Ok("other") => placements.truncate(1),
            Ok("same") if placements.len() > 1 => {
                placements.remove(0);
            }
            _ => {}
        }
        latency(&placements, epoch);
    };
    if std::env::var_os("MMU_UFFD_LATENCY_ONLY").is_some() {
        run_latency(monitor);
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
    let floor = bare(epoch);
    bench_hit_cost(&mut c, &monitor, floor.as_ref());
    c.final_summary();
    madvise(&monitor);
    run_latency(monitor);
}
