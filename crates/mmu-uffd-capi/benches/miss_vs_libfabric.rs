//! A registration-cache miss of `mmu_uffd::RegCache` side by side with libfabric 1.17's
//! own cache (`ofi_mr_cache_search` with libfabric's userfaultfd monitor, linked
//! statically from the installed `libfabric.a`: `benches/c/libfabric_miss.c`), with the
//! floors of the same run, on a bare userfaultfd: `UFFDIO_REGISTER` of memory registered
//! already (the one system call of libfabric's miss in the cycle), `UFFDIO_REGISTER` +
//! `UFFDIO_UNREGISTER` (what a miss costs that registers memory unregistered after its
//! eviction), `UFFDIO_REGISTER` of a fresh mapping without and with the `msync` hole check
//! (mmu-uffd's two system calls on memory never seen), and an empty system call.
//!
//! `cargo bench -p mmu-uffd-capi --bench miss_vs_libfabric` (release build; about a
//! minute). Every variant runs in its own process, one after the other in a rotating
//! order, for `MISS_ROUNDS` rounds (default 32); each process prints the median of its
//! batches (ns per operation), and the table gives, per variant, the median over the
//! rounds with the 10th and 90th percentiles, and the per-round ratio ours / libfabric.
//! With `strace` installed it also counts the system calls per operation of each
//! variant: every call of every thread (the monitor's included) between two markers
//! around the timed loop of one batch, divided by the operations.
//!
//! The workloads (the registrar is a no-op on both sides):
//!
//! - `cycle`: 64 buffers of 16 pages through a 16-entry cache in a cycle, so that every
//!   lookup misses and evicts the least recently used entry; each handle is dropped at
//!   once. The criterion bench `cargo bench -p mmu-uffd --bench cache -- "cache miss"`
//!   runs the same loop (there another cache keeps all 64 buffers leased). libfabric
//!   1.17 never unregisters an evicted range: its miss here is one `UFFDIO_REGISTER` of
//!   memory registered already. Ours keeps the watch leases of recently evicted entries
//!   (`CacheConfig::retained`), so its miss finds the memory registered and verified and
//!   makes no system call; with `with_retained(0)` every miss would register, check and
//!   (in batches) unregister again, splitting and merging the kernel's mappings: the
//!   `bare-register+unregister` row, and the `ours-cycle-unretained` one.
//! - `fresh`: a miss on a fresh 4-page mapping each time (all mapped before the timed
//!   loop) in a cache of 4096 entries, nothing evicted: 2000 misses per process (one
//!   batch of warm-up, then `MISS_BATCHES` of `MISS_FRESH_OPS`), as the criterion bench's
//!   "miss on unwatched memory" (4096 entries, 2000 misses).
//!
//! **The layout shift.** What `UFFDIO_REGISTER` and `msync` of a fresh mapping cost depends
//! on where the buffers land among the process's mappings, not on who calls them: on the
//! bare userfaultfd, in a process with nothing else (Linux 6.18, a 2-vCPU KVM guest), the
//! same register + check loop took
//! 1.28-1.49 us or 2.6-2.9 us per buffer depending only on how many one-page mappings were
//! made before the buffers (0-2 and 7-19: fast; 3-6 and 20: slow, twice as long, every
//! run; the kernel's tree of mappings, presumably). The two caches' processes have
//! different mappings (monitor threads' stacks and malloc arenas), so a comparison at one
//! layout compares the kernel's luck. Round `r` therefore maps `r % MISS_SHIFTS` (default
//! 16) such pages, alternately read-only and inaccessible so that none merges, just before
//! the buffers, the same number for every variant of the round: over the rounds each side
//! runs at every shift, the per-round ratio compares equal shifts, and a table by shift
//! shows the kernel's steps (`MISS_SHIFTS=1`: no shift).
//!
//! libfabric's cache cannot be reached through libfabric's public API on a machine
//! without RDMA hardware: in 1.17 only the verbs and efa providers (and the shm
//! provider's cache of GPU memory handles) call `ofi_mr_cache_search`, and tcp, udp,
//! sockets, shm and rxm's `fi_mr_reg` on host memory never touch it. So the C side calls
//! the cache's own entry points, as those providers' `fi_mr_reg` does.
//!
//! Prints `SKIPPED: ...` and exits 0 without `libfabric.a` (package libfabric-dev) or a
//! C compiler.

#[path = "../tests/c_support/mod.rs"]
mod c_support;

/// The benches' shared helpers (only the mapping helper is used here).
#[path = "../../mmn/src/bench/bare.rs"]
#[allow(dead_code)]
mod bench_support;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use c_support::*;
use mmu_uffd::{CacheConfig, Monitor, RegCache};

const PAGE: usize = 4096;
const NBUFS: usize = 64;
const ENTRIES: usize = 16;
const BUF_PAGES: usize = 16;
const FRESH_PAGES: usize = 4;
/// The capacity of both caches in the fresh workload (libfabric_miss.c's too).
const FRESH_CAPACITY: usize = 4096;

fn anon(len: usize) -> *mut u8 {
    bench_support::anon(len).expect("mmap")
}

/// The layout shift: `MISS_SHIFT` one-page mappings, read-only and inaccessible in turn
/// so that none merges with its neighbours, mapped just before the buffers (see the
/// module docs; libfabric_miss.c does the same).
fn shift_layout() {
    let n: usize = std::env::var("MISS_SHIFT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for i in 0..n {
        let prot = if i % 2 == 1 {
            libc::PROT_NONE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh anonymous private mapping, never accessed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) * p / 100]
}

/// Runs `op` in `batches` timed batches of `ops` calls after one batch of warm-up; the
/// median ns per call.
fn batched(batches: usize, ops: usize, mut op: impl FnMut()) -> f64 {
    let mut samples = Vec::with_capacity(batches);
    for b in 0..=batches {
        if b == 1 {
            marker();
        }
        let t0 = Instant::now();
        for _ in 0..ops {
            op();
        }
        if b > 0 {
            samples.push(t0.elapsed().as_nanos() as f64 / ops as f64);
        }
    }
    marker();
    median(&mut samples)
}

/// Marks the start and the end of the timed batches for the system call count
/// (`getpgid(0)`, which nothing else here calls; libfabric_miss.c does the same).
fn marker() {
    // SAFETY: getpgid(0) reads the calling process's group; no memory is involved.
    unsafe { libc::getpgid(0) };
}

/// The child process of our variants: `MISS_CHILD=ours-cycle|ours-cycle-unretained|ours-fresh`
/// (`unretained`: `CacheConfig::with_retained(0)`, what the cache did before it retained
/// the leases of evicted entries).
fn child(mode: &str, batches: usize, ops: usize) {
    let monitor = match Monitor::new() {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED: no monitor: {e}");
            return;
        }
    };
    let new_cache = |capacity: usize| {
        let retained = if mode == "ours-cycle-unretained" {
            0
        } else {
            CacheConfig::default().retained
        };
        RegCache::with_fns(
            &monitor,
            CacheConfig::default()
                .with_capacity(capacity)
                .with_retained(retained),
            |p: *mut u8, _len: usize| Ok::<usize, std::io::Error>(p as usize),
            |r: usize| {
                black_box(r);
            },
        )
    };
    match mode {
        "ours-cycle" | "ours-cycle-unretained" => {
            let cache = new_cache(ENTRIES);
            shift_layout();
            let bufs: Vec<*mut u8> = (0..NBUFS).map(|_| anon(BUF_PAGES * PAGE)).collect();
            let mut j = 0;
            let ns = batched(batches, ops, || {
                j = (j + 1) % NBUFS;
                black_box(cache.get(black_box(bufs[j]), BUF_PAGES * PAGE).unwrap());
            });
            let st = cache.stats();
            assert!(st.hits == 0 && st.misses > 0, "{st:?}");
            println!("{mode} {ns:.1}");
        }
        "ours-fresh" => {
            let n = (batches + 1) * ops;
            assert!(n < FRESH_CAPACITY, "more fresh misses than entries");
            let cache = new_cache(FRESH_CAPACITY);
            let mut bufs: Vec<*mut u8> = Vec::with_capacity(n);
            shift_layout();
            bufs.extend((0..n).map(|_| anon(FRESH_PAGES * PAGE)));
            let mut k = 0;
            let ns = batched(batches, ops, || {
                black_box(cache.get(black_box(bufs[k]), FRESH_PAGES * PAGE).unwrap());
                k += 1;
            });
            let st = cache.stats();
            assert!(st.hits == 0 && st.misses == n as u64, "{st:?}");
            println!("ours-fresh {ns:.1}");
        }
        other => panic!("unknown MISS_CHILD={other}"),
    }
}

/// One variant: how to start its process.
struct Variant {
    name: &'static str,
    exe: PathBuf,
    args: Vec<String>,
    env: Option<&'static str>,
}

impl Variant {
    fn command(&self, batches: usize, ops: usize, shift: usize) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .arg(batches.to_string())
            .arg(ops.to_string())
            .env("MISS_SHIFT", shift.to_string())
            .env_remove("FI_MR_CACHE_MONITOR")
            .env_remove("LD_LIBRARY_PATH");
        if let Some(mode) = self.env {
            cmd.env("MISS_CHILD", mode);
        }
        cmd
    }

    /// The operations per batch: fewer for the fresh workloads (each needs a mapping).
    fn ops(&self, ops: usize, fresh_ops: usize) -> usize {
        if self.name.contains("fresh") {
            fresh_ops
        } else {
            ops
        }
    }

    /// Runs it once; its number (ns per operation), or the line explaining why none.
    fn run(&self, batches: usize, ops: usize, shift: usize) -> Result<f64, String> {
        let out = self
            .command(batches, ops, shift)
            .output()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(skip) = stdout.lines().find(|l| l.starts_with("SKIPPED")) {
            return Err(skip.to_string());
        }
        assert!(out.status.success(), "{}: {}", self.name, show(&out));
        stdout
            .lines()
            .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .ok_or_else(|| format!("{}: no number in {stdout}", self.name))
    }

    /// System calls per operation, all threads (the monitor's too), between the two
    /// markers around the timed batches: `strace -f` of one batch.
    fn syscalls(&self, dir: &Path, ops: usize) -> Option<(f64, String)> {
        let file = dir.join(format!("{}.strace", self.name));
        let inner = self.command(1, ops, 0);
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-o"])
            .arg(&file)
            .arg(inner.get_program());
        cmd.args(inner.get_args());
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let out = cmd.output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = std::fs::read_to_string(&file).ok()?;
        // "PID name(args) = result", or "PID name(args <unfinished ...>" then
        // "PID <... name resumed> ...": one call each.
        let name = |line: &str| -> Option<String> {
            let call = line.split_once(' ')?.1.trim_start();
            (!call.starts_with('<') && !call.starts_with("+++") && !call.starts_with("---"))
                .then(|| call.split('(').next().unwrap_or("").to_string())
        };
        let calls: Vec<String> = text.lines().filter_map(name).collect();
        let marks: Vec<usize> = calls
            .iter()
            .enumerate()
            .filter(|(_, n)| *n == "getpgid")
            .map(|(i, _)| i)
            .collect();
        let [a, b] = marks[..] else {
            return None;
        };
        let mut per: Vec<(String, f64)> = Vec::new();
        for n in &calls[a + 1..b] {
            match per.iter_mut().find(|(m, _)| m == n) {
                Some(x) => x.1 += 1.0,
                None => per.push((n.clone(), 1.0)),
            }
        }
        per.iter_mut().for_each(|x| x.1 /= ops as f64);
        per.sort_by(|x, y| y.1.total_cmp(&x.1));
        let total = per.iter().map(|x| x.1).sum();
        let detail = per
            .iter()
            .map(|(n, x)| format!("{n} {x:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        Some((total, detail))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(mode) = std::env::var("MISS_CHILD") {
        let n = |i: usize| -> usize { args[i].parse().expect("BATCHES OPS") };
        child(&mode, n(1), n(2));
        return;
    }
    let link = match static_libfabric() {
        Ok(l) => l,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let exe = work_dir("miss").join("libfabric_miss");
    let mut cmd = Command::new(cc());
    cmd.args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-O2", "-pthread"])
        .arg(crate_dir().join("benches/c/libfabric_miss.c"))
        .args(&link)
        .arg("-o")
        .arg(&exe);
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("{cmd:?}\n{}", show(&out)),
        Err(e) => {
            println!("SKIPPED: no C compiler ({:?}: {e})", cc());
            return;
        }
    }
    let me = std::env::current_exe().expect("this bench's path");
    let ours = |name, mode| Variant {
        name,
        exe: me.clone(),
        args: vec![],
        env: Some(mode),
    };
    let theirs = |name, mode: &str| Variant {
        name,
        exe: exe.clone(),
        args: vec![mode.to_string()],
        env: None,
    };
    let variants = [
        ours("ours-cycle", "ours-cycle"),
        theirs("libfabric-cycle", "cycle"),
        theirs("bare-reregister", "bare-reregister"),
        ours("ours-cycle-unretained", "ours-cycle-unretained"),
        theirs("bare-register+unregister", "bare-wp"),
        ours("ours-fresh", "ours-fresh"),
        theirs("libfabric-fresh", "fresh"),
        theirs("bare-register-fresh", "bare-fresh"),
        theirs("bare-register+check-fresh", "bare-fresh-check"),
        theirs("getppid", "getppid"),
    ];
    let env = |k: &str, d: usize| -> usize {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rounds = env("MISS_ROUNDS", 32);
    let (batches, ops) = (env("MISS_BATCHES", 9), env("MISS_OPS", 1000));
    let fresh_ops = env("MISS_FRESH_OPS", 200);
    let shifts = env("MISS_SHIFTS", 16).max(1);
    let mut samples: Vec<Vec<f64>> = variants.iter().map(|_| Vec::new()).collect();
    // The layout shift of each sample (round r: r % shifts, the same for every variant).
    let mut shift_of: Vec<Vec<usize>> = variants.iter().map(|_| Vec::new()).collect();
    let mut skipped: Vec<Option<String>> = variants.iter().map(|_| None).collect();
    for r in 0..rounds {
        let shift = r % shifts;
        for k in 0..variants.len() {
            let i = (r + k) % variants.len();
            if skipped[i].is_some() {
                continue;
            }
            match variants[i].run(batches, variants[i].ops(ops, fresh_ops), shift) {
                Ok(ns) => {
                    samples[i].push(ns);
                    shift_of[i].push(shift);
                }
                Err(why) => skipped[i] = Some(why),
            }
        }
    }
    let syscalls: Vec<Option<(f64, String)>> = variants
        .iter()
        .map(|v| v.syscalls(&work_dir("miss"), v.ops(ops, fresh_ops)))
        .collect();
    println!(
        "\nper operation, {rounds} rounds of one process per variant (rotating order, layout \
         shift = round % {shifts}), each the median of {batches} batches of {ops} ({fresh_ops} \
         for fresh):"
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9}  system calls per operation (strace -f)",
        "variant (ns)", "median", "p10", "p90", "/getppid"
    );
    let floor = variants
        .iter()
        .position(|v| v.name == "getppid")
        .and_then(|i| (!samples[i].is_empty()).then(|| median(&mut samples[i].clone())));
    for (i, v) in variants.iter().enumerate() {
        if let Some(why) = &skipped[i] {
            println!("{:<24} {why}", v.name);
            continue;
        }
        // On a copy: `samples` stays in round order for the ratios below.
        let s = &mut samples[i].clone();
        let (m, p10, p90) = (median(s), percentile(s, 10), percentile(s, 90));
        let sys = syscalls[i]
            .as_ref()
            .map_or("(strace unavailable)".to_string(), |(t, d)| {
                if d.is_empty() {
                    "0".to_string()
                } else {
                    format!("{t:.2}: {d}")
                }
            });
        println!(
            "{:<24} {m:>9.1} {p10:>9.1} {p90:>9.1} {:>9.2}  {sys}",
            v.name,
            floor.map_or(f64::NAN, |f| m / f)
        );
    }
    // The fresh misses by layout shift: the kernel's share moves with it (module docs).
    if shifts > 1 {
        println!("\nby layout shift (median ns over the rounds with that shift):");
        println!(
            "{:<26}{}",
            "shift",
            (0..shifts).map(|k| format!("{k:>6}")).collect::<String>()
        );
        for (i, v) in variants.iter().enumerate() {
            if !v.name.contains("fresh") || samples[i].is_empty() {
                continue;
            }
            let row: String = (0..shifts)
                .map(|k| {
                    let mut at: Vec<f64> = samples[i]
                        .iter()
                        .zip(&shift_of[i])
                        .filter(|(_, &sh)| sh == k)
                        .map(|(&x, _)| x)
                        .collect();
                    if at.is_empty() {
                        format!("{:>6}", "-")
                    } else {
                        format!("{:>6.0}", median(&mut at))
                    }
                })
                .collect();
            println!("{:<26}{row}", v.name);
        }
    }
    for (ours, theirs) in [
        ("ours-cycle", "libfabric-cycle"),
        ("ours-fresh", "libfabric-fresh"),
    ] {
        let a = variants.iter().position(|v| v.name == ours).unwrap();
        let b = variants.iter().position(|v| v.name == theirs).unwrap();
        if samples[a].is_empty() || samples[b].is_empty() {
            continue;
        }
        // Round by round (the two ran next to each other, with the same layout shift): ours
        // / libfabric.
        let mut ratios: Vec<f64> = samples[a]
            .iter()
            .zip(&samples[b])
            .map(|(x, y)| x / y)
            .collect();
        println!(
            "ratio {ours} / {theirs}: median {:.3} (p10 {:.3}, p90 {:.3}) over {} rounds",
            median(&mut ratios),
            percentile(&mut ratios, 10),
            percentile(&mut ratios, 90),
            ratios.len()
        );
    }
}
