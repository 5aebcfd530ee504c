//! `mmn torture`: random primary operations and secondary accesses on several threads,
//! with the secondaries attached and every access checked by the coherence checker.
//!
//! Each worker draws from its own seeded generator (worker `i` of seed `S` uses
//! `S * 0x9E37_79B9 + i`): half its steps are primary operations (every operation of SPEC
//! 4), half are device faults and accesses of a randomly chosen secondary. With one
//! worker the sequence of operations is a pure function of the seed, so a run replays
//! exactly (`--threads 1 --seed S --ops N`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mmu_notifier::{Event, ListSubscriber, OwnerToken, Range, WouldBlock};
use mmu_secondary::broken::{Broken, BrokenSecondary};
use mmu_secondary::{SecondaryMmu, SecondaryStats};
use mmu_sim::{
    AddressSpace, Advice, Checker, File, FrameAllocator, MapKind, MremapFlags, Prot, Violation,
    PAGE_SIZE,
};

/// Pages in the private anonymous region every operation works on.
pub const REGION_PAGES: u64 = 128;
/// Pages in the shared file region.
pub const FILE_PAGES: u64 = 16;
/// The owner token of migrations made by the torture itself (not a device's own).
pub const TORTURE_OWNER: OwnerToken = OwnerToken(0x7047);

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
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// What happened.
#[derive(Debug)]
pub struct TortureReport {
    /// Operations by kind.
    pub ops: BTreeMap<&'static str, u64>,
    /// `invalidate_range_start` calls by event, plus `release`.
    pub events: BTreeMap<String, u64>,
    /// Per secondary: name and counters.
    pub secondaries: Vec<(String, SecondaryStats)>,
    /// The violations kept (the first thousand).
    pub violations: Vec<Violation>,
    /// All violations.
    pub violation_count: u64,
    /// Checks the checker made.
    pub checks: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
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

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
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
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct World {
    mm: Arc<AddressSpace>,
    base: u64,
    file_base: u64,
    devices: Vec<(String, Arc<dyn SecondaryMmu>)>,
    ops: Mutex<BTreeMap<&'static str, u64>>,
    done: AtomicU64,
}

impl World {
    fn count(&self, kind: &'static str, local: &mut BTreeMap<&'static str, u64>) {
        *local.entry(kind).or_default() += 1;
        self.done.fetch_add(1, Relaxed);
    }

    /// One primary operation; returns its name.
    fn primary(&self, rng: &mut Rng) -> &'static str {
        let mm = &self.mm;
        let i = rng.below(REGION_PAGES);
        let p = self.base + i * PAGE_SIZE;
        let n = 1 + rng.below(8).min(REGION_PAGES - 1 - i);
        let len = n * PAGE_SIZE;
        let remap = |a: u64, l: u64| {
            let _ = mm.mmap(l, Prot::READ_WRITE, MapKind::AnonPrivate, Some(a));
        };
        match rng.below(100) {
            0..=7 => {
                let _ = mm.munmap(p, len);
                remap(p, len);
                "munmap"
            }
            8..=13 => {
                let _ = mm.madvise(p, len, Advice::DontNeed);
                "madvise dontneed"
            }
            14..=17 => {
                let _ = mm.madvise(p, len, Advice::Free);
                "madvise free"
            }
            18..=23 => {
                let _ = mm.mprotect(p, len, Prot::READ);
                let _ = mm.mprotect(p, len, Prot::READ_WRITE);
                "mprotect"
            }
            24..=31 => {
                let _ = mm.reclaim(p, p + len);
                "reclaim"
            }
            32..=37 => {
                let _ = mm.migrate(p);
                "migrate"
            }
            38..=40 => {
                let _ = mm.migrate_range(p, p + len, TORTURE_OWNER);
                "migrate range"
            }
            60 => {
                // A device migrates pages to itself (the HMM mirror: its Migrate carries
                // its owner token, and it keeps its translations through it).
                let (_, d) = &self.devices[rng.below(self.devices.len() as u64) as usize];
                let _ = d.migrate_to_device(p, n);
                "device migrate"
            }
            41..=44 => {
                let child = mm.fork();
                let _ = child.write(p, rng.next());
                let _ = mm.write(p, rng.next());
                child.exit();
                "fork"
            }
            45..=46 => {
                mm.clear_soft_dirty();
                "soft-dirty reset"
            }
            47..=51 => {
                let _ = mm.make_exclusive(p, OwnerToken(0xE));
                "make exclusive"
            }
            52..=55 => {
                let _ = mm.age(p, p + len);
                let _ = mm.test_young(p);
                "age"
            }
            56..=58 => {
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
                "mremap"
            }
            59 => {
                let _ = mm.oom_reap();
                "oom reap"
            }
            61..=64 => {
                let f = self.file_base + rng.below(FILE_PAGES) * PAGE_SIZE;
                let _ = mm.write(f, rng.next());
                let _ = mm.reclaim(f, f + PAGE_SIZE);
                "file write"
            }
            65..=82 => {
                let _ = mm.write(p, rng.next());
                "cpu write"
            }
            _ => {
                let _ = mm.read(p);
                "cpu read"
            }
        }
    }

    /// One device fault or access of a random secondary.
    fn secondary(&self, rng: &mut Rng) -> &'static str {
        let (_, d) = &self.devices[rng.below(self.devices.len() as u64) as usize];
        let p = if rng.below(8) == 0 {
            self.file_base + rng.below(FILE_PAGES) * PAGE_SIZE
        } else {
            self.base + rng.below(REGION_PAGES) * PAGE_SIZE
        };
        match rng.below(4) {
            0 => {
                let _ = d.fault(p, rng.below(2) == 0);
                "device fault"
            }
            1 => {
                let _ = d.access(p, Some(rng.next()));
                "device write"
            }
            _ => {
                let _ = d.access(p, None);
                "device read"
            }
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
        devices,
        ops: Mutex::new(BTreeMap::new()),
        done: AtomicU64::new(0),
    };
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let bar = o.progress.then(|| progress_bar(o.budget));
    std::thread::scope(|s| {
        for w in 0..o.threads.max(1) as u64 {
            let (world, stop) = (&world, &stop);
            let seed = o.seed.wrapping_mul(0x9E37_79B9).wrapping_add(w);
            let budget = o.budget;
            s.spawn(move || {
                let mut rng = Rng::new(seed);
                let mut local = BTreeMap::new();
                while !stop.load(Relaxed) {
                    if let Budget::Ops(n) = budget {
                        if world.done.load(Relaxed) >= n {
                            break;
                        }
                    }
                    let kind = if rng.below(2) == 0 {
                        world.primary(&mut rng)
                    } else {
                        world.secondary(&mut rng)
                    };
                    world.count(kind, &mut local);
                }
                let mut all = world.ops.lock().unwrap();
                for (k, v) in local {
                    *all.entry(k).or_default() += v;
                }
            });
        }
        // The supervisor: progress and the time budget.
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let done = world.done.load(Relaxed);
            let finished = match o.budget {
                Budget::Secs(secs) => started.elapsed().as_secs_f64() >= secs,
                Budget::Ops(n) => done >= n,
            };
            if let Some(bar) = &bar {
                match o.budget {
                    Budget::Secs(_) => bar.set_position(started.elapsed().as_millis() as u64),
                    Budget::Ops(_) => bar.set_position(done),
                }
                bar.set_message(format!(
                    "{done} ops, {} violations",
                    checker.violation_count()
                ));
            }
            if finished {
                stop.store(true, Relaxed);
                break;
            }
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Exit: the release, then the Unmap over everything.
    mm.exit();
    let elapsed = started.elapsed();
    let secondaries = world
        .devices
        .iter()
        .map(|(n, d)| (n.clone(), d.stats()))
        .collect();
    let events = counter.counts.lock().unwrap().clone();
    let ops = world.ops.lock().unwrap().clone();
    drop(world);
    drop(reg);
    Ok(TortureReport {
        ops,
        events,
        secondaries,
        violations: checker.violations(),
        violation_count: checker.violation_count(),
        checks: checker.checks(),
        elapsed,
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

/// Every event kind of SPEC 4 that a torture run should produce.
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

    /// The events of SPEC 4 that never occurred.
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
            "{} operations in {:.1} s ({:.0}/s), {} checks\n\n",
            self.total_ops(),
            secs,
            self.total_ops() as f64 / secs.max(1e-9),
            self.checks
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
        out.push_str(&format!("\nviolations: {}\n", self.violation_count));
        for v in self.violations.iter().take(10) {
            out.push_str(&format!("  {v}\n"));
        }
        out
    }

    /// The report as JSON.
    pub fn json(&self, o: &TortureOptions) -> String {
        let map = |m: Vec<(String, u64)>| {
            m.iter()
                .map(|(k, v)| format!("{}:{v}", json_str(k)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let ops = map(self.ops.iter().map(|(k, v)| (k.to_string(), *v)).collect());
        let events = map(self.events.iter().map(|(k, v)| (k.clone(), *v)).collect());
        let secs = self
            .secondaries
            .iter()
            .map(|(n, s)| {
                format!(
                    "{}:{{\"fills\":{},\"retries\":{},\"would_blocks\":{},\"invalidations\":{},\"accesses\":{}}}",
                    json_str(n),
                    s.fills,
                    s.retries,
                    s.would_blocks,
                    s.invalidations,
                    s.accesses
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let violations = self
            .violations
            .iter()
            .map(|v| {
                format!(
                    "{{\"kind\":{},\"op\":{},\"addr\":{},\"secondary\":{},\"seed\":{},\"detail\":{}}}",
                    json_str(&format!("{:?}", v.kind)),
                    json_str(v.op),
                    v.addr,
                    json_str(&v.secondary),
                    v.seed,
                    json_str(&v.detail)
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "{{\"seed\":{},\"threads\":{},\"elapsed_secs\":{:.3},\"total_ops\":{},\"checks\":{},\"ops\":{{{ops}}},\"events\":{{{events}}},\"secondaries\":{{{secs}}},\"violation_count\":{},\"violations\":[{violations}],\"reproduce\":{}}}",
            o.seed,
            o.threads,
            self.elapsed.as_secs_f64(),
            self.total_ops(),
            self.checks,
            self.violation_count,
            json_str(&reproduce(o, self.total_ops()))
        )
    }
}

/// The command that replays a run deterministically.
pub fn reproduce(o: &TortureOptions, ops: u64) -> String {
    let secondaries = if o.secondaries.is_empty() {
        "\"\"".to_string()
    } else {
        o.secondaries.join(",")
    };
    let mut cmd = format!(
        "mmn torture --threads 1 --seed {} --ops {ops} --secondaries {secondaries}",
        o.seed
    );
    if let Some(b) = o.broken {
        cmd.push_str(&format!(" --broken {}", b.name()));
    }
    cmd
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
