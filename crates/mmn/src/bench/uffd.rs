//! The registration cache of `mmu_uffd` on this process's real memory:
//!
//! - a hit (`get` + drop of a 64-entry cache) with the address-reuse check (one system
//!   call per lookup) and without it, against an empty system call (`getppid`) and
//!   against the floor of an ioctl on a userfaultfd (an unknown command, answered at
//!   once): the check is one ioctl, which costs more than `getppid` (file lookup,
//!   security hook, dispatch);
//! - a miss (64 watched buffers cycled through a 16-entry cache: every lookup registers
//!   and evicts; the monitor already vouches for the memory, so the miss makes no system
//!   call), against the `UFFDIO_REGISTER` of already-registered memory that a monitor
//!   without that knowledge makes (libfabric's does), issued on a bare userfaultfd;
//! - a miss on never-seen memory (a fresh mapping per lookup: registration and hole
//!   check), against a bare `UFFDIO_REGISTER` of a fresh mapping, alternating one by one.
//!   (libfabric 1.17's own cache is measured on the same workloads, side by side, by
//!   `cargo bench -p mmu-uffd-capi --bench miss_vs_libfabric`.)
//! - the latency from a munmap call to the monitor's invalidation callback, and to the
//!   cached handle reading invalid, against a bare userfaultfd reader (a thread blocked in
//!   `read()`, timestamping the event when it arrives: what a C monitor does), in
//!   alternating rounds; the whole distributions are kept for the plot.
//!
//! Placement, as the criterion bench does it: the monitor and bare reader threads are
//! created on CPU 1, the unmapping thread then runs on CPU 0 (where there are two CPUs).
//! The group runs on a thread of its own so that the pinning does not outlive it.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmu_uffd::{CacheConfig, Monitor, RegCache};

use super::bare::{pin, Bare, Stamp};
use super::{batched_on, interleaved, Clock, Distribution, Plan, Report, Stat};

const PAGE: usize = 4096;

/// A fresh private anonymous read-write mapping of `len` bytes.
fn anon(len: usize) -> Result<*mut u8, String> {
    super::bare::anon(len).map_err(|e| format!("mmap: {e}"))
}

fn unmap(p: *mut u8, len: usize) {
    // SAFETY: every caller unmaps a mapping it made with `anon` and holds no reference
    // into it any more.
    unsafe { libc::munmap(p.cast(), len) };
}

/// A cache whose registrations cost nothing of their own.
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

pub(super) fn run(plan: &Plan, report: &mut Report) {
    let two = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let mut part = Report::default();
    // Outer Err: userfaultfd cannot be used here (skip); inner Err: a measurement failed.
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            let pinned = two && pin(1);
            let monitor = Monitor::new().map_err(|e| format!("no userfaultfd monitor: {e}"))?;
            let epoch = Instant::now();
            let bare = Bare::new(epoch).map_err(|e| format!("no bare userfaultfd reader: {e}"))?;
            if pinned {
                pin(0);
            }
            Ok(measure(plan, &monitor, &bare, epoch, &mut part))
        })
        .join()
    });
    match outcome {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(why))) => part.failures.push(format!("uffd: {why}")),
        Ok(Err(why)) => part.skipped.push(("uffd", why)),
        Err(_) => part
            .failures
            .push("uffd: the measuring thread panicked".to_string()),
    }
    report.figures.append(&mut part.figures);
    report.distributions.append(&mut part.distributions);
    report.skipped.append(&mut part.skipped);
    report.failures.append(&mut part.failures);
}

fn measure(
    plan: &Plan,
    monitor: &Monitor,
    bare: &Bare,
    epoch: Instant,
    report: &mut Report,
) -> Result<(), String> {
    let buf_len = 16 * PAGE;
    let bufs: Vec<*mut u8> = (0..64).map(|_| anon(buf_len)).collect::<Result<_, _>>()?;
    let bare_bufs: Vec<*mut u8> = (0..64).map(|_| anon(buf_len)).collect::<Result<_, _>>()?;

    // Hits: both caches hold all 64 buffers.
    let checked = cache_with(monitor, CacheConfig::default().with_capacity(1024));
    let unchecked = cache_with(
        monitor,
        CacheConfig::default()
            .with_capacity(1024)
            .with_reuse_check(false),
    );
    for &b in &bufs {
        let lookup = |c: &RegCache<_>| c.get(b, buf_len).map(drop).map_err(|e| e.to_string());
        lookup(&checked)?;
        lookup(&unchecked)?;
    }
    let (mut i, mut j) = (0, 0);
    let hits = interleaved(
        plan.rounds,
        &mut [
            batched_on(Clock::Wall, plan.batch, || {
                i = (i + 7) & 63;
                black_box(checked.get(black_box(bufs[i]), 8 * PAGE).expect("a hit"));
            }),
            batched_on(Clock::Wall, plan.batch, || {
                j = (j + 7) & 63;
                black_box(unchecked.get(black_box(bufs[j]), 8 * PAGE).expect("a hit"));
            }),
            batched_on(Clock::Wall, plan.batch, || {
                // SAFETY: getppid takes no arguments and cannot fail.
                black_box(unsafe { libc::syscall(libc::SYS_getppid) });
            }),
            batched_on(Clock::Wall, plan.batch, || {
                black_box(bare.unknown_ioctl());
            }),
        ],
    );
    for st in [checked.stats(), unchecked.stats()] {
        assert_eq!(st.misses, 64, "every timed lookup must have hit: {st:?}");
    }
    drop((checked, unchecked));
    report.pair(
        "uffd",
        "cache_hit_reuse_check",
        "hit (address-reuse check on)",
        hits[0],
        "getppid system call",
        hits[2],
    );
    report.pair(
        "uffd",
        "cache_hit_reuse_check_vs_ioctl",
        "hit (address-reuse check on)",
        hits[0],
        "unknown ioctl on a userfaultfd",
        hits[3],
    );
    report.pair(
        "uffd",
        "cache_hit_no_reuse_check",
        "hit (reuse check off)",
        hits[1],
        "getppid system call",
        hits[2],
    );

    // Misses: a 16-entry cache cycling through the 64 buffers, watched explicitly (else
    // the evicted ranges would be unregistered in batches and registered again: that is
    // the cost of the kernel splitting and merging the mappings, not of a miss).
    for &b in &bufs {
        monitor.watch(b, buf_len).map_err(|e| e.to_string())?;
    }
    let small = cache_with(monitor, CacheConfig::default().with_capacity(16));
    for &b in &bare_bufs {
        bare.watch(b, buf_len);
    }
    let (mut i, mut j) = (0, 0);
    let misses = interleaved(
        plan.rounds,
        &mut [
            batched_on(Clock::Wall, plan.batch, || {
                i = (i + 1) & 63;
                black_box(small.get(black_box(bufs[i]), buf_len).expect("a miss"));
            }),
            batched_on(Clock::Wall, plan.batch, || {
                j = (j + 1) & 63;
                bare.watch(black_box(bare_bufs[j]), buf_len);
            }),
        ],
    );
    let st = small.stats();
    assert!(
        st.hits == 0 && st.misses > 0,
        "every lookup must miss: {st:?}"
    );
    drop(small);
    report.pair(
        "uffd",
        "cache_miss",
        "miss (register + evict)",
        misses[0],
        "bare UFFDIO_REGISTER",
        misses[1],
    );
    never_seen(plan, monitor, bare, report)?;
    for b in bufs.into_iter().chain(bare_bufs) {
        unmap(b, buf_len);
    }

    latency(plan, monitor, bare, epoch, report)
}

/// Misses on never-seen memory: each lookup gets a fresh mapping (registration and hole
/// check), alternating with a bare `UFFDIO_REGISTER` of another fresh mapping; each call
/// timed on its own (the mappings are made and unmapped outside the timing).
fn never_seen(
    plan: &Plan,
    monitor: &Monitor,
    bare: &Bare,
    report: &mut Report,
) -> Result<(), String> {
    let n = if plan.quick { 300 } else { 3000 };
    let len = 4 * PAGE;
    let fresh: Vec<*mut u8> = (0..2 * n).map(|_| anon(len)).collect::<Result<_, _>>()?;
    // Room for every entry: no eviction (nor its lazy unwatching) inside the timing.
    let cache = cache_with(monitor, CacheConfig::default().with_capacity(2 * n));
    let (mut ours, mut raw) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for k in 0..n {
        let (a, b) = (fresh[2 * k], fresh[2 * k + 1]);
        let t0 = Instant::now();
        let h = cache.get(black_box(a), len).map_err(|e| e.to_string())?;
        ours.push(t0.elapsed().as_nanos() as f64);
        drop(h);
        let t0 = Instant::now();
        bare.watch(black_box(b), len);
        raw.push(t0.elapsed().as_nanos() as f64);
    }
    let st = cache.stats();
    assert!(
        st.hits == 0 && st.misses == n as u64,
        "every lookup must miss: {st:?}"
    );
    drop(cache);
    for p in fresh {
        unmap(p, len);
    }
    report.pair(
        "uffd",
        "cache_miss_never_seen",
        "miss on never-seen memory",
        Stat::of(&mut ours),
        "bare UFFDIO_REGISTER, fresh memory",
        Stat::of(&mut raw),
    );
    Ok(())
}

/// Spins until `flag` is set or a second has passed; returns its value (0: never set).
fn wait_stamp(flag: &AtomicU64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        // Acquire: pairs with the Release store of the thread that saw the event.
        let v = flag.load(Ordering::Acquire);
        if v != 0 || Instant::now() >= deadline {
            return v;
        }
        std::hint::spin_loop();
    }
}

fn latency(
    plan: &Plan,
    monitor: &Monitor,
    bare: &Bare,
    epoch: Instant,
    report: &mut Report,
) -> Result<(), String> {
    let rounds = if plan.quick { 300 } else { 3000 };
    let len = 4 * PAGE;
    let cache = cache_with(monitor, CacheConfig::default().with_capacity(64));
    let now = || epoch.elapsed().as_nanos() as u64;
    let (mut ours, mut raw, mut to_invalid) = (Vec::new(), Vec::new(), Vec::new());
    let mut lost = 0;
    for r in 0..rounds * 2 {
        let p = anon(len)?;
        // SAFETY: touches the first page of the fresh mapping.
        unsafe { p.write_volatile(1) };
        if r % 2 == 0 {
            let stamp = Arc::new(AtomicU64::new(0));
            let sub = monitor
                .subscriptions()
                .insert_interval(
                    p as u64..(p as u64 + len as u64),
                    Stamp(stamp.clone(), epoch),
                )
                .map_err(|e| e.to_string())?;
            let h = cache.get(p, len).map_err(|e| e.to_string())?;
            let t0 = now();
            unmap(p, len);
            // What a caller observes: the handle invalid right after munmap returned.
            let valid = h.is_valid();
            let t2 = now();
            assert!(!valid, "stale handle after munmap returned");
            match wait_stamp(&stamp) {
                0 => lost += 1,
                t => ours.push(t.saturating_sub(t0) as f64),
            }
            to_invalid.push((t2 - t0) as f64);
            drop(h);
            drop(sub);
        } else {
            bare.watch(p, len);
            bare.seen.store(0, Ordering::Release);
            let t0 = now();
            unmap(p, len);
            match wait_stamp(&bare.seen) {
                0 => lost += 1,
                t => raw.push(t.saturating_sub(t0) as f64),
            }
        }
    }
    if ours.is_empty() || raw.is_empty() || lost > rounds / 10 {
        return Err(format!(
            "{lost} of {} unmap events never arrived",
            rounds * 2
        ));
    }
    let (so, sr, si) = (
        Stat::of(&mut ours),
        Stat::of(&mut raw),
        Stat::of(&mut to_invalid),
    );
    report.pair(
        "uffd",
        "munmap_to_callback",
        "munmap -> monitor callback ran",
        so,
        "munmap -> bare reader read it",
        sr,
    );
    report.pair(
        "uffd",
        "munmap_to_handle_invalid",
        "munmap -> cached handle invalid",
        si,
        "munmap -> bare reader read it",
        sr,
    );
    for (id, label, samples) in [
        ("munmap_to_callback", "monitor callback", ours),
        (
            "munmap_to_handle_invalid",
            "cached handle invalid",
            to_invalid,
        ),
        ("munmap_to_bare_read", "bare userfaultfd reader", raw),
    ] {
        report
            .distributions
            .push(Distribution::new(id, label, samples));
    }
    Ok(())
}
