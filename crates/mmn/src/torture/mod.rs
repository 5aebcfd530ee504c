//! `mmn torture`: random primary operations and secondary accesses on several workers,
//! with the secondaries attached and every access checked by the coherence checker.
//!
//! # What runs
//!
//! Each worker draws from its own seeded generator (worker `i` of seed `S` uses
//! `S * 0x9E37_79B9 + i`): half its steps are primary operations (munmap, madvise,
//! mprotect, reclaim, migration, fork, soft-dirty reset, device-exclusive access, aging,
//! mremap, the OOM reaper, file writes, CPU reads and writes), half are device faults and
//! accesses of a randomly chosen secondary. Each is drawn from a weighted table of
//! [`TortureOp`]s ([`PRIMARY`], [`SECONDARY`]). Operations are numbered in the order they
//! start (tickets): with `--ops N` exactly `N` tickets are handed out, whatever the number
//! of workers.
//!
//! # Collisions
//!
//! A broken secondary shows only when an invalidation lands on the page it is faulting,
//! between its read of the primary and its install. By default three choices in four of
//! a page fall in a hot window of `--hot` pages (4) at the start of the region, the rest
//! anywhere: faults and invalidations keep colliding, while every operation still reaches
//! the whole region. `--hot 0` spreads the choices uniformly.
//!
//! # Scheduled runs and exact replay
//!
//! By default the workers run one at a time under a [`schedule::Baton`]: a worker passes
//! the baton at the start of each operation and at the schedule points inside the
//! secondaries' faults (between the read of the primary and the install, see
//! `mmu_secondary::sched`), and the baton decides, from the seed, which worker goes on.
//! Everything else is deterministic, so the decisions (recorded, run-length encoded), the
//! seed and the options fix the run: a replay file holding them re-runs it to the same
//! first violation (same operation number, kind, address and secondary). `--parallel`
//! runs the workers truly in parallel instead (real races in the core's memory ordering,
//! but no exact replay).
//!
//! A run stops at its first violation (`--keep-going` runs the whole budget): the
//! operations in flight then finish and the report is made.

pub mod replay;
pub mod schedule;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mmu_notifier::{Event, ListSubscriber, OwnerToken, Range, WouldBlock};
use mmu_secondary::broken::{Broken, BrokenSecondary};
use mmu_secondary::sched::{self, Task};
use mmu_secondary::{SecondaryMmu, SecondaryStats};
use mmu_sim::{
    AddressSpace, Advice, Checker, File, FrameAllocator, MapKind, MremapFlags, Prot, Violation,
    PAGE_SIZE,
};

use schedule::{Baton, Runs};

/// Pages in the private anonymous region every operation works on.
pub const REGION_PAGES: u64 = 128;
/// Pages in the shared file region.
pub const FILE_PAGES: u64 = 16;
/// The owner token of migrations made by the torture itself (not a device's own).
pub const TORTURE_OWNER: OwnerToken = OwnerToken(0x7047);
/// The default size of the hot window, in pages.
pub const DEFAULT_HOT: u64 = 4;

/// How long to run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Wall-clock seconds.
    Secs(f64),
    /// Total operations (primary and secondary, all workers).
    Ops(u64),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct TortureOptions {
    /// How long.
    pub budget: Budget,
    /// Worker threads.
    pub threads: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Secondaries to attach, by name.
    pub secondaries: Vec<String>,
    /// A deliberately broken secondary to attach too.
    pub broken: Option<Broken>,
    /// Pages in the hot window (0: uniform choices).
    pub hot: u64,
    /// Run the workers truly in parallel (no schedule, no exact replay).
    pub parallel: bool,
    /// Run the whole budget instead of stopping at the first violation.
    pub keep_going: bool,
    /// A recorded schedule to follow (replay).
    pub schedule: Option<Runs>,
    /// Set asynchronously to stop the run early (Ctrl-C).
    pub interrupt: Option<&'static AtomicBool>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

impl TortureOptions {
    /// Options with the defaults of the command line.
    pub fn new(budget: Budget, seed: u64, secondaries: Vec<String>) -> Self {
        TortureOptions {
            budget,
            threads: 2,
            seed,
            secondaries,
            broken: None,
            hot: DEFAULT_HOT,
            parallel: false,
            keep_going: false,
            schedule: None,
            interrupt: None,
            progress: false,
        }
    }
}

/// The first violation of a run and the operation during which it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstViolation {
    /// The operation's number (its ticket: operations are numbered as they start, from
    /// 0); the number of operations if it was found at the final exit.
    pub op_index: u64,
    /// The worker that ran it.
    pub worker: usize,
    /// What the checker reported.
    pub violation: Violation,
}

/// What happened.
#[derive(Debug)]
pub struct TortureReport {
    /// Operations by kind (display labels, [`TortureOp::name`]).
    pub ops: BTreeMap<&'static str, u64>,
    /// `invalidate_range_start` calls by event (display labels), plus `release`.
    pub events: BTreeMap<String, u64>,
    /// Per secondary: name and counters.
    pub secondaries: Vec<(String, SecondaryStats)>,
    /// The violations kept (the checker keeps the first thousand).
    pub violations: Vec<Violation>,
    /// All violations.
    pub violation_count: u64,
    /// The first violation, with its operation.
    pub first: Option<FirstViolation>,
    /// Checks the checker made.
    pub checks: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// The decisions of a scheduled run.
    pub schedule: Option<Runs>,
    /// Why a replayed schedule could not be followed, if it could not.
    pub diverged: Option<String>,
    /// Stopped early by the interrupt flag.
    pub interrupted: bool,
}

/// Counts every invalidation by event (registered first, so it sees all of them).
#[derive(Default)]
struct EventCounter {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl EventCounter {
    fn bump(&self, what: String) {
        *self.counts.lock().unwrap().entry(what).or_default() += 1;
    }
}

impl ListSubscriber for EventCounter {
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        let mut name = format!("{:?}", r.event());
        if !r.blockable() {
            name.push_str(" (non-blockable)");
        }
        self.bump(name);
        Ok(())
    }
    fn release(&self) {
        self.bump("Release (list)".into());
    }
}

/// Attaches a secondary by name over `[start, start + len)` of `mm`.
pub type Attach = fn(&str, &Arc<AddressSpace>, u64, u64) -> Result<Arc<dyn SecondaryMmu>, String>;

/// xorshift64 seeded through splitmix64.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        // splitmix64 to spread small seeds.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An operation of a torture worker: a primary operation (from [`PRIMARY`]) or a device
/// fault or access (from [`SECONDARY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TortureOp {
    /// `munmap` of a few pages, mapped again at once.
    Munmap,
    /// `madvise(MADV_DONTNEED)`.
    MadviseDontNeed,
    /// `madvise(MADV_FREE)`.
    MadviseFree,
    /// `mprotect` to read-only and back.
    Mprotect,
    /// Reclaim of a few pages.
    Reclaim,
    /// Migration of one page.
    Migrate,
    /// Migration of a range, with the torture's own owner token.
    MigrateRange,
    /// A device migrates pages to itself.
    DeviceMigrate,
    /// `fork`, a write in each process, the child's exit.
    Fork,
    /// Soft-dirty reset.
    SoftDirtyReset,
    /// Device-exclusive access to a page.
    MakeExclusive,
    /// Aging, then `test_young`.
    Age,
    /// `mremap` away and back.
    Mremap,
    /// One pass of the OOM reaper.
    OomReap,
    /// A write to the shared file mapping, then reclaim of the page.
    FileWrite,
    /// A CPU write.
    CpuWrite,
    /// A CPU read.
    CpuRead,
    /// A device fault (for reading or writing).
    DeviceFault,
    /// A device write through its translation.
    DeviceWrite,
    /// A device read through its translation.
    DeviceRead,
}

impl TortureOp {
    /// The label of the report's tables (its JSON key is the snake_case of it).
    pub const fn name(self) -> &'static str {
        match self {
            TortureOp::Munmap => "munmap",
            TortureOp::MadviseDontNeed => "madvise dontneed",
            TortureOp::MadviseFree => "madvise free",
            TortureOp::Mprotect => "mprotect",
            TortureOp::Reclaim => "reclaim",
            TortureOp::Migrate => "migrate",
            TortureOp::MigrateRange => "migrate range",
            TortureOp::DeviceMigrate => "device migrate",
            TortureOp::Fork => "fork",
            TortureOp::SoftDirtyReset => "soft-dirty reset",
            TortureOp::MakeExclusive => "make exclusive",
            TortureOp::Age => "age",
            TortureOp::Mremap => "mremap",
            TortureOp::OomReap => "oom reap",
            TortureOp::FileWrite => "file write",
            TortureOp::CpuWrite => "cpu write",
            TortureOp::CpuRead => "cpu read",
            TortureOp::DeviceFault => "device fault",
            TortureOp::DeviceWrite => "device write",
            TortureOp::DeviceRead => "device read",
        }
    }
}

/// The primary operations a worker draws from, each with its weight: one draw below the
/// sum of the weights, taken by the entries in this order (see [`pick_weighted`]).
///
/// Replay files record the seed and the schedule, not the operations, so a change here
/// (a new entry, a weight, the order) makes the same seed draw other operations: replay
/// files written before it no longer replay. A new operation is one more entry (at the
/// end); nothing else is renumbered.
pub const PRIMARY: &[(TortureOp, u64)] = &[
    (TortureOp::Munmap, 8),
    (TortureOp::MadviseDontNeed, 6),
    (TortureOp::MadviseFree, 4),
    (TortureOp::Mprotect, 6),
    (TortureOp::Reclaim, 8),
    (TortureOp::Migrate, 6),
    (TortureOp::MigrateRange, 3),
    (TortureOp::Fork, 4),
    (TortureOp::SoftDirtyReset, 2),
    (TortureOp::MakeExclusive, 5),
    (TortureOp::Age, 4),
    (TortureOp::Mremap, 3),
    (TortureOp::OomReap, 1),
    (TortureOp::DeviceMigrate, 1),
    (TortureOp::FileWrite, 4),
    (TortureOp::CpuWrite, 18),
    (TortureOp::CpuRead, 17),
];

/// The device operations, with their weights (as [`PRIMARY`]).
pub const SECONDARY: &[(TortureOp, u64)] = &[
    (TortureOp::DeviceFault, 1),
    (TortureOp::DeviceWrite, 1),
    (TortureOp::DeviceRead, 2),
];

/// The entry of `table` that the draw `x` (below the sum of the weights) falls in: the
/// entries share the draws in their order, each as many as its weight. A draw past the
/// sum falls in the last entry.
pub fn pick_weighted(table: &[(TortureOp, u64)], mut x: u64) -> TortureOp {
    for &(op, weight) in table {
        if x < weight {
            return op;
        }
        x -= weight;
    }
    table.last().map_or(TortureOp::CpuRead, |&(op, _)| op)
}

/// One draw from `table`, in proportion to the weights.
fn choose(rng: &mut Rng, table: &[(TortureOp, u64)]) -> TortureOp {
    let total: u64 = table.iter().map(|&(_, w)| w).sum();
    pick_weighted(table, rng.below(total.max(1)))
}

struct World {
    mm: Arc<AddressSpace>,
    base: u64,
    file_base: u64,
    hot: u64,
    devices: Vec<(String, Arc<dyn SecondaryMmu>)>,
}

impl World {
    /// A page index of `pages`: in the hot window three times in four.
    fn pick(&self, rng: &mut Rng, pages: u64) -> u64 {
        if self.hot > 0 && rng.below(4) != 0 {
            rng.below(self.hot.min(pages))
        } else {
            rng.below(pages)
        }
    }

    /// One primary operation, drawn from [`PRIMARY`]; returns it.
    fn primary(&self, rng: &mut Rng) -> TortureOp {
        let mm = &self.mm;
        let i = self.pick(rng, REGION_PAGES);
        let p = self.base + i * PAGE_SIZE;
        let n = 1 + rng.below(8).min(REGION_PAGES - 1 - i);
        let len = n * PAGE_SIZE;
        let remap = |a: u64, l: u64| {
            let _ = mm.mmap(l, Prot::READ_WRITE, MapKind::AnonPrivate, Some(a));
        };
        let op = choose(rng, PRIMARY);
        match op {
            TortureOp::Munmap => {
                let _ = mm.munmap(p, len);
                remap(p, len);
            }
            TortureOp::MadviseDontNeed => {
                let _ = mm.madvise(p, len, Advice::DontNeed);
            }
            TortureOp::MadviseFree => {
                let _ = mm.madvise(p, len, Advice::Free);
            }
            TortureOp::Mprotect => {
                let _ = mm.mprotect(p, len, Prot::READ);
                let _ = mm.mprotect(p, len, Prot::READ_WRITE);
            }
            TortureOp::Reclaim => {
                let _ = mm.reclaim(p, p + len);
            }
            TortureOp::Migrate => {
                let _ = mm.migrate(p);
            }
            TortureOp::MigrateRange => {
                let _ = mm.migrate_range(p, p + len, TORTURE_OWNER);
            }
            TortureOp::DeviceMigrate => {
                // A device migrates pages to itself (the HMM mirror: its Migrate carries
                // its owner token, and it keeps its translations through it).
                let (_, d) = &self.devices[rng.below(self.devices.len() as u64) as usize];
                let _ = d.migrate_to_device(p, n);
            }
            TortureOp::Fork => {
                let child = mm.fork();
                let _ = child.write(p, rng.next());
                let _ = mm.write(p, rng.next());
                child.exit();
            }
            TortureOp::SoftDirtyReset => {
                mm.clear_soft_dirty();
            }
            TortureOp::MakeExclusive => {
                let _ = mm.make_exclusive(p, OwnerToken(0xE));
            }
            TortureOp::Age => {
                let _ = mm.age(p, p + len);
                let _ = mm.test_young(p);
            }
            TortureOp::Mremap => {
                // Move the pages away and back (two Unmap pairs each way).
                let flags = MremapFlags {
                    may_move: true,
                    fixed: None,
                };
                if let Ok(moved) = mm.mremap(p, len, len, flags) {
                    let back = MremapFlags {
                        may_move: true,
                        fixed: Some(p),
                    };
                    let _ = mm.mremap(moved, len, len, back);
                }
                remap(p, len);
            }
            TortureOp::OomReap => {
                let _ = mm.oom_reap();
            }
            TortureOp::FileWrite => {
                let f = self.file_base + self.pick(rng, FILE_PAGES) * PAGE_SIZE;
                let _ = mm.write(f, rng.next());
                let _ = mm.reclaim(f, f + PAGE_SIZE);
            }
            TortureOp::CpuWrite => {
                let _ = mm.write(p, rng.next());
            }
            TortureOp::CpuRead => {
                let _ = mm.read(p);
            }
            // Not in the primary table.
            TortureOp::DeviceFault | TortureOp::DeviceWrite | TortureOp::DeviceRead => {}
        }
        op
    }

    /// One device fault or access of a random secondary, drawn from [`SECONDARY`].
    fn secondary(&self, rng: &mut Rng) -> TortureOp {
        let (_, d) = &self.devices[rng.below(self.devices.len() as u64) as usize];
        let p = if rng.below(8) == 0 {
            self.file_base + self.pick(rng, FILE_PAGES) * PAGE_SIZE
        } else {
            self.base + self.pick(rng, REGION_PAGES) * PAGE_SIZE
        };
        let op = choose(rng, SECONDARY);
        match op {
            TortureOp::DeviceFault => {
                let _ = d.fault(p, rng.below(2) == 0);
            }
            TortureOp::DeviceWrite => {
                let _ = d.access(p, Some(rng.next()));
            }
            _ => {
                let _ = d.access(p, None);
            }
        }
        op
    }
}

/// What the workers share besides the world: tickets, the stop flag, the first
/// violation.
struct Progress {
    checker: Arc<Checker>,
    /// Tickets handed out (operations started).
    claimed: AtomicU64,
    stop: AtomicBool,
    keep_going: bool,
    /// Per worker: the ticket of the operation it runs.
    running: Vec<AtomicU64>,
    first: Mutex<Option<FirstViolation>>,
}

impl Progress {
    /// Takes the next ticket, unless the budget of `limit` tickets is spent.
    fn claim(&self, limit: Option<u64>) -> Option<u64> {
        // Relaxed: the counter only numbers operations and bounds how many start; under
        // the baton only one worker runs at a time anyway.
        match limit {
            Some(n) => self
                .claimed
                .fetch_update(Relaxed, Relaxed, |c| (c < n).then_some(c + 1))
                .ok(),
            None => Some(self.claimed.fetch_add(1, Relaxed)),
        }
    }

    /// Attributes a new first violation to the operation `worker` runs (exact under the
    /// baton: only that worker has run since the last note), and stops the run.
    fn note(&self, worker: usize) {
        if self.checker.violation_count() == 0 {
            return;
        }
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            if let Some(v) = self.checker.violations().into_iter().next() {
                *first = Some(FirstViolation {
                    op_index: self.running[worker].load(Relaxed),
                    worker,
                    violation: v,
                });
            }
        }
        if !self.keep_going {
            self.stop.store(true, Relaxed);
        }
    }
}

/// Runs a torture with the secondaries `attach` builds.
pub fn run(o: &TortureOptions, attach: Attach) -> Result<TortureReport, String> {
    let frames = Arc::new(FrameAllocator::new(1 << 16));
    let mm = AddressSpace::new(frames.clone());
    let checker = Checker::new(o.seed);
    mm.attach_checker(checker.clone())
        .map_err(|_| "checker already attached")?;
    let counter = Arc::new(EventCounter::default());
    let reg = mm
        .notifier()
        .register(counter.clone())
        .map_err(|e| e.to_string())?;
    let base = mm
        .mmap_anon(REGION_PAGES * PAGE_SIZE, Prot::READ_WRITE)
        .map_err(|e| e.to_string())?;
    let file = File::new(frames.clone());
    let file_base = mm
        .mmap(
            FILE_PAGES * PAGE_SIZE,
            Prot::READ_WRITE,
            MapKind::File {
                file,
                offset: 0,
                shared: true,
            },
            None,
        )
        .map_err(|e| e.to_string())?;
    let span = file_base + FILE_PAGES * PAGE_SIZE - base;
    let mut devices = Vec::new();
    for name in &o.secondaries {
        devices.push((name.clone(), attach(name, &mm, base, span)?));
    }
    if let Some(b) = o.broken {
        let d = BrokenSecondary::new(&mm, b, base, span).map_err(|e| e.to_string())?;
        devices.push((b.name().to_string(), d as Arc<dyn SecondaryMmu>));
    }
    if devices.is_empty() {
        return Err("no secondary to attach".into());
    }
    let world = World {
        mm: mm.clone(),
        base,
        file_base,
        hot: o.hot,
        devices,
    };
    let threads = o.threads.max(1);
    let progress = Arc::new(Progress {
        checker: checker.clone(),
        claimed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        keep_going: o.keep_going,
        running: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        first: Mutex::new(None),
    });
    let baton = (!o.parallel).then(|| {
        let p = progress.clone();
        Arc::new(Baton::new(
            threads,
            o.seed,
            o.schedule.clone(),
            Box::new(move |worker| p.note(worker)),
        ))
    });
    let limit = match o.budget {
        Budget::Ops(n) => Some(n),
        Budget::Secs(_) => None,
    };
    let ops = Mutex::new(BTreeMap::<&'static str, u64>::new());
    let started = Instant::now();
    let mut interrupted = false;
    let bar = o.progress.then(|| progress_bar(o.budget));
    std::thread::scope(|s| {
        for w in 0..threads {
            let (world, progress, ops, baton) = (&world, &progress, &ops, baton.clone());
            let seed = o.seed.wrapping_mul(0x9E37_79B9).wrapping_add(w as u64);
            s.spawn(move || {
                let mut rng = Rng::new(seed);
                let mut local = BTreeMap::<TortureOp, u64>::new();
                let _entered = baton.as_ref().map(|b| {
                    b.wait_turn(w);
                    sched::enter(Task::new(b.clone(), w))
                });
                loop {
                    // A decision point: who starts the next operation.
                    sched::point();
                    if progress.stop.load(Relaxed) {
                        break;
                    }
                    let Some(ticket) = progress.claim(limit) else {
                        break;
                    };
                    progress.running[w].store(ticket, Relaxed);
                    let kind = if rng.below(2) == 0 {
                        world.primary(&mut rng)
                    } else {
                        world.secondary(&mut rng)
                    };
                    *local.entry(kind).or_default() += 1;
                    progress.note(w);
                }
                if let Some(b) = &baton {
                    b.leave(w);
                }
                let mut all = ops.lock().unwrap();
                for (k, v) in local {
                    *all.entry(k.name()).or_default() += v;
                }
            });
        }
        // The supervisor: progress, the time budget and the interrupt.
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let done = progress.claimed.load(Relaxed);
            if o.interrupt.is_some_and(|i| i.load(Relaxed)) {
                interrupted = true;
                progress.stop.store(true, Relaxed);
            }
            if let Budget::Secs(secs) = o.budget {
                if started.elapsed().as_secs_f64() >= secs {
                    progress.stop.store(true, Relaxed);
                }
            }
            if let Some(bar) = &bar {
                match o.budget {
                    Budget::Secs(_) => bar.set_position(started.elapsed().as_millis() as u64),
                    Budget::Ops(_) => bar.set_position(done),
                }
                bar.set_message(format!(
                    "{}, {}",
                    plural(done, "operation"),
                    plural(checker.violation_count(), "violation")
                ));
            }
            let finished = progress.stop.load(Relaxed) || limit.is_some_and(|n| done >= n);
            if finished {
                break;
            }
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let total = progress.claimed.load(Relaxed);
    // Exit: the release, then the Unmap over everything.
    mm.exit();
    let elapsed = started.elapsed();
    if checker.violation_count() > 0 {
        // Found at the exit, after every operation.
        let mut first = progress.first.lock().unwrap();
        if first.is_none() {
            *first = checker
                .violations()
                .into_iter()
                .next()
                .map(|violation| FirstViolation {
                    op_index: total,
                    worker: 0,
                    violation,
                });
        }
    }
    let (schedule, diverged) = match &baton {
        Some(b) => {
            let (runs, diverged) = b.finish();
            (Some(runs), diverged)
        }
        None => (None, None),
    };
    let secondaries = world
        .devices
        .iter()
        .map(|(n, d)| (n.clone(), d.stats()))
        .collect();
    let events = counter.counts.lock().unwrap().clone();
    let ops = ops.into_inner().unwrap();
    drop(world);
    drop(reg);
    let first = progress.first.lock().unwrap().clone();
    Ok(TortureReport {
        ops,
        events,
        secondaries,
        violations: checker.violations(),
        violation_count: checker.violation_count(),
        first,
        checks: checker.checks(),
        elapsed,
        schedule,
        diverged,
        interrupted,
    })
}

fn progress_bar(budget: Budget) -> indicatif::ProgressBar {
    let len = match budget {
        Budget::Secs(s) => (s * 1000.0) as u64,
        Budget::Ops(n) => n,
    };
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// `n thing` or `n things`.
pub fn plural(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// A display label as a stable machine-readable key: `cpu read` -> `cpu_read`,
/// `ProtectionVma` -> `protection_vma`, `Unmap (non-blockable)` -> `unmap_non_blockable`.
pub fn snake_key(label: &str) -> String {
    let mut out = String::new();
    let mut prev: Option<char> = None;
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            if c.is_ascii_uppercase() && prev.is_some_and(|p| p.is_ascii_lowercase()) {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
        prev = Some(c);
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

/// Every event kind that a torture run should produce (display labels).
pub fn expected_events() -> Vec<String> {
    Event::ALL
        .iter()
        .filter(|e| **e != Event::Release)
        .map(|e| format!("{e:?}"))
        .chain(["Release (list)".to_string()])
        .collect()
}

impl TortureReport {
    /// Total operations.
    pub fn total_ops(&self) -> u64 {
        self.ops.values().sum()
    }

    /// Whether fewer violations are kept than were found.
    pub fn truncated(&self) -> bool {
        (self.violations.len() as u64) < self.violation_count
    }

    /// The events that never occurred.
    pub fn missing_events(&self) -> Vec<String> {
        expected_events()
            .into_iter()
            .filter(|e| !self.events.keys().any(|k| k.starts_with(e.as_str())))
            .collect()
    }

    /// The summary tables, as text.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let secs = self.elapsed.as_secs_f64();
        out.push_str(&format!(
            "{} in {:.1} s ({:.0}/s), {}\n\n",
            plural(self.total_ops(), "operation"),
            secs,
            self.total_ops() as f64 / secs.max(1e-9),
            plural(self.checks, "check")
        ));
        out.push_str(&format!("{:<24}{:>12}\n", "operation", "count"));
        for (k, v) in &self.ops {
            out.push_str(&format!("{k:<24}{v:>12}\n"));
        }
        out.push_str(&format!("\n{:<32}{:>12}\n", "invalidation event", "starts"));
        for (k, v) in &self.events {
            out.push_str(&format!("{k:<32}{v:>12}\n"));
        }
        out.push_str(&format!(
            "\n{:<30}{:>10}{:>10}{:>10}{:>12}{:>12}\n",
            "secondary", "fills", "retries", "wouldblk", "invalidate", "accesses"
        ));
        for (n, s) in &self.secondaries {
            out.push_str(&format!(
                "{n:<30}{:>10}{:>10}{:>10}{:>12}{:>12}\n",
                s.fills, s.retries, s.would_blocks, s.invalidations, s.accesses
            ));
        }
        out.push_str(&format!("\nviolations: {}", self.violation_count));
        if self.truncated() {
            out.push_str(&format!(" (the first {} kept)", self.violations.len()));
        }
        out.push('\n');
        if let Some(f) = &self.first {
            out.push_str(&format!(
                "first: during operation #{} (worker {}): {}\n",
                f.op_index, f.worker, f.violation
            ));
        }
        for v in self.violations.iter().skip(1).take(9) {
            out.push_str(&format!("  {v}\n"));
        }
        if self.interrupted {
            out.push_str("interrupted: partial report\n");
        }
        out
    }

    /// The report as JSON: snake_case keys, addresses as hex strings.
    pub fn json(&self, o: &TortureOptions, replay_file: Option<&str>) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let ops: Map<String, Value> = self
            .ops
            .iter()
            .map(|(k, v)| (snake_key(k), json!(v)))
            .collect();
        let events: Map<String, Value> = self
            .events
            .iter()
            .map(|(k, v)| (snake_key(k), json!(v)))
            .collect();
        let secondaries: Map<String, Value> = self
            .secondaries
            .iter()
            .map(|(n, s)| {
                (
                    snake_key(n),
                    json!({
                        "fills": s.fills,
                        "retries": s.retries,
                        "would_blocks": s.would_blocks,
                        "invalidations": s.invalidations,
                        "accesses": s.accesses,
                    }),
                )
            })
            .collect();
        let violation = |v: &Violation| {
            json!({
                "kind": snake_key(&format!("{:?}", v.kind)),
                "op": snake_key(v.op.as_str()),
                "addr": format!("{:#x}", v.addr),
                "secondary": v.secondary,
                "detail": v.detail,
            })
        };
        let first = self.first.as_ref().map(|f| {
            let mut v = violation(&f.violation);
            v["op_index"] = json!(f.op_index);
            v["worker"] = json!(f.worker);
            v
        });
        json!({
            "seed": o.seed,
            "threads": o.threads,
            "scheduled": !o.parallel,
            "hot_pages": o.hot,
            "elapsed_secs": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "total_ops": self.total_ops(),
            "checks": self.checks,
            "ops": ops,
            "events": events,
            "secondaries": secondaries,
            "violation_count": self.violation_count,
            "violations": self.violations.iter().map(violation).collect::<Vec<_>>(),
            "truncated": self.truncated(),
            "first_violation": first,
            "interrupted": self.interrupted,
            "replay_file": replay_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each draw picks the operation the numbered `match rng.below(100)` it replaced
    /// picked, so runs (and replay files, which record the seed, not the operations)
    /// draw the same operations as before.
    #[test]
    fn the_tables_pick_what_the_numbered_draws_picked() {
        use TortureOp::*;
        let numbered = |d: u64| match d {
            0..=7 => Munmap,
            8..=13 => MadviseDontNeed,
            14..=17 => MadviseFree,
            18..=23 => Mprotect,
            24..=31 => Reclaim,
            32..=37 => Migrate,
            38..=40 => MigrateRange,
            60 => DeviceMigrate,
            41..=44 => Fork,
            45..=46 => SoftDirtyReset,
            47..=51 => MakeExclusive,
            52..=55 => Age,
            56..=58 => Mremap,
            59 => OomReap,
            61..=64 => FileWrite,
            65..=82 => CpuWrite,
            _ => CpuRead,
        };
        assert_eq!(PRIMARY.iter().map(|&(_, w)| w).sum::<u64>(), 100);
        for d in 0..100 {
            assert_eq!(pick_weighted(PRIMARY, d), numbered(d), "draw {d}");
        }
        let device = [DeviceFault, DeviceWrite, DeviceRead, DeviceRead];
        assert_eq!(SECONDARY.iter().map(|&(_, w)| w).sum::<u64>(), 4);
        for (d, op) in device.into_iter().enumerate() {
            assert_eq!(pick_weighted(SECONDARY, d as u64), op, "draw {d}");
        }
    }

    #[test]
    fn a_weight_takes_as_many_draws_and_past_the_sum_is_the_last_entry() {
        let t = [
            (TortureOp::Age, 2),
            (TortureOp::Fork, 0),
            (TortureOp::CpuRead, 3),
        ];
        let picks: Vec<TortureOp> = (0..6).map(|d| pick_weighted(&t, d)).collect();
        assert_eq!(
            picks,
            [
                TortureOp::Age,
                TortureOp::Age,
                TortureOp::CpuRead,
                TortureOp::CpuRead,
                TortureOp::CpuRead,
                TortureOp::CpuRead
            ]
        );
    }
}
