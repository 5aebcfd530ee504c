//! `mmn bench`: the benchmark suite in one command.
//!
//! Four groups, each figure measured beside a baseline that does the same work without
//! the machinery under test:
//!
//! - `core`: `invalidate_range_start` + end with 0..64 list subscribers against calling
//!   the subscribers' own callbacks directly; `read_begin` + `read_retry` on an interval
//!   subscription against a bare sequence count; an invalidation hitting one of 10^2 ..
//!   10^6 non-overlapping interval subscriptions against the tree lookup alone;
//! - `itree`: insert, 2 MiB query and remove at 10^3 .. 10^6 entries against the `iset`
//!   crate, with Linux's own interval tree (compiled in user space, measured once on this
//!   machine kind) as a fixed reference;
//! - `sim`: a fault + munmap cycle of the simulated primary MMU with the notifier calls
//!   (no subscriber, one subscriber) against the same address space built without them;
//! - `uffd`: the registration cache on real memory: hits against an empty system call,
//!   misses against the bare `UFFDIO_REGISTER` they make, and munmap-to-invalidated latency
//!   against a bare userfaultfd reader (skipped with a printed reason where userfaultfd is
//!   unavailable).
//!
//! Measurement protocol: every figure and its baseline are measured in the same process,
//! interleaved round by round (the order rotating each round, so that frequency scaling,
//! cache and allocator state favour neither), after one untimed warm-up call of each.
//! A round of a cheap operation is a batch calibrated to a fixed duration; the figure is
//! the median over the rounds of the time per operation, the spread their quartiles.
//! Where the difference sought is smaller than what the run-to-run drift moves a figure
//! by (`sim`: a few percent), the figure is also *paired*: each round's sample is divided
//! by its baseline's sample of the same round, over hundreds of short rounds, and
//! `paired_ratio` gives the median and quartiles of those ratios (`ratio` stays the
//! ratio of the medians).
//! Work done on the measuring thread alone (`core`, `itree`, `sim`) is timed on that
//! thread's CPU clock, so that on a shared, loaded machine the time the thread spends
//! preempted does not count (on a quiet one the two clocks agree); the `uffd` group, whose
//! work waits on other threads, is timed on the wall clock.
//!
//! Output: tables (figure, baseline, ratio, spread), or with `--json` one JSON object
//! whose keys are stable snake_case identifiers:
//!
//! ```text
//! { "format": "mmn-bench/1", "quick": bool, "rounds": int,
//!   "machine": { "cpus": int, "kernel": str },
//!   "figures": [ { "group": str, "id": str, "label": str,
//!                  "median_ns": num, "p25_ns": num, "p75_ns": num,
//!                  "baseline": null | { "label": str, "median_ns": num, "p25_ns": num,
//!                                       "p75_ns": num },
//!                  "ratio": null | num,
//!                  "paired_ratio": null | { "median": num, "p25": num, "p75": num },
//!                  "linux_ns": null | num } ],
//!   "curves": [ { "id": str, "label": str, "x": str, "points": [[num, num]] } ],
//!   "distributions": [ { "id": str, "label": str, "samples": int,
//!                        "percentiles_ns": { "p1": num, ..., "p99": num, "max": num } } ],
//!   "skipped": [ { "group": str, "reason": str } ],
//!   "failures": [ str ],
//!   "plots": [ str ] }
//! ```
//!
//! Figure ids: `start_end_list_{0,1,8}`, `start_end_list_1_vs_linux`, `least_section_list_1`,
//! `read_begin_read_retry`, `start_end_interval_N`
//! (N subscriptions), `itree_{insert,query_2mib,remove}_N` (N entries),
//! `start_end_miss_N` (an invalidation missing all of N interval subscriptions),
//! `fault_munmap_notifier_no_subscribers`, `fault_munmap_notifier_1_list_subscriber`,
//! `cache_hit_reuse_check`, `cache_hit_no_reuse_check`, `cache_miss`,
//! `munmap_to_callback`, `munmap_to_handle_invalid`. Curve ids:
//! `itree_{insert,query_2mib,remove}_{ours,iset,linux}`,
//! `invalidate_list_{subscribers,direct_calls}`,
//! `invalidate_interval_{subscriptions,tree_lookup}`. Distribution ids:
//! `munmap_to_callback`, `munmap_to_handle_invalid`, `munmap_to_bare_read`.
//!
//! A group that cannot run here (no userfaultfd) is skipped with its reason; a measurement
//! that fails (events that never arrive, a panic) is reported and makes the exit status 1.
//!
//! `--quick` (for CI) uses smaller sizes and fewer, shorter rounds: the whole suite in
//! well under 30 s. `--plots DIR` writes SVG plots: `itree.svg` (tree cost against size),
//! `invalidate.svg` (invalidation cost against the number of subscribers) and
//! `latency.svg` (munmap-to-invalidated latency distribution).

pub mod bare;
mod core;
pub mod fault_munmap;
mod itree;
mod plot;
mod sim;
mod uffd;
#[allow(dead_code)] // Shared with the criterion bench, which uses all of it.
pub mod workload;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The groups, in the order they run.
const GROUPS: [&str; 4] = ["core", "itree", "sim", "uffd"];

/// Arguments of `mmn bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Smaller sizes and fewer, shorter rounds (for CI: the whole suite in well under 30 s).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object (stable snake_case keys) instead of tables.
    #[arg(long)]
    json: bool,
    /// Write SVG plots into this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Run only these groups, comma separated: core, itree, sim, uffd.
    #[arg(long, value_delimiter = ',', value_name = "GROUPS")]
    only: Vec<String>,
}

/// How long and how often to measure.
pub(crate) struct Plan {
    /// Quick mode (CI).
    pub quick: bool,
    /// Samples per variant.
    pub rounds: usize,
    /// Target duration of one sample of a cheap operation.
    pub batch: Duration,
}

/// Order statistics of the samples of one variant, in nanoseconds per operation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stat {
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
}

impl Stat {
    /// The statistics of `samples` (at least one).
    pub fn of(samples: &mut [f64]) -> Stat {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Stat {
            median: at(0.5),
            p25: at(0.25),
            p75: at(0.75),
        }
    }

    /// Half the interquartile range, relative to the median, in percent.
    fn spread_pct(&self) -> f64 {
        (self.p75 - self.p25) / 2.0 / self.median * 100.0
    }
}

/// One measured figure and what it is compared with.
pub(crate) struct Figure {
    pub group: &'static str,
    /// Stable snake_case identifier.
    pub id: String,
    /// What a person reads in the table.
    pub label: String,
    pub value: Stat,
    /// The baseline's label and statistics.
    pub baseline: Option<(String, Stat)>,
    /// Linux's figure for the same operation, where there is one.
    pub linux_ns: Option<f64>,
}

/// A curve for the plots (and the JSON).
pub(crate) struct Curve {
    pub id: String,
    pub label: String,
    /// What x counts.
    pub x: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A latency distribution: all samples, in nanoseconds.
pub(crate) struct Distribution {
    pub id: String,
    pub label: String,
    pub samples: Vec<f64>,
}

/// Percentiles reported for a distribution.
const PERCENTILES: [u32; 7] = [1, 10, 25, 50, 75, 90, 99];

impl Distribution {
    /// A distribution of `samples` (at least one).
    pub fn new(id: &str, label: &str, mut samples: Vec<f64>) -> Distribution {
        samples.sort_by(f64::total_cmp);
        Distribution {
            id: id.into(),
            label: label.into(),
            samples,
        }
    }

    /// The `q`-quantile (0..=1) of the samples (sorted).
    pub fn quantile(&self, q: f64) -> f64 {
        self.samples[((self.samples.len() - 1) as f64 * q).round() as usize]
    }
}

/// Everything one run measured.
#[derive(Default)]
pub(crate) struct Report {
    pub figures: Vec<Figure>,
    pub curves: Vec<Curve>,
    pub distributions: Vec<Distribution>,
    /// Groups (or parts) not run, and why.
    pub skipped: Vec<(&'static str, String)>,
    /// Measurements that failed (the run then exits 1).
    pub failures: Vec<String>,
    /// Figures measured as paired rounds (figure and baseline side by side, round by
    /// round): the figure's id and the statistics of its per-round ratios.
    pub paired: Vec<(String, Stat)>,
    pub plots: Vec<PathBuf>,
}

impl Report {
    /// Records the per-round ratios of figure `id` to its baseline (see `paired`): its
    /// reported ratio is then their median, with their quartiles.
    pub fn paired_ratio(&mut self, id: &str, ratios: Stat) {
        self.paired.push((id.to_string(), ratios));
    }

    fn paired_of(&self, id: &str) -> Option<&Stat> {
        self.paired.iter().find(|(i, _)| i == id).map(|(_, s)| s)
    }

    /// Adds a figure with a baseline.
    pub fn pair(
        &mut self,
        group: &'static str,
        id: impl Into<String>,
        label: impl Into<String>,
        value: Stat,
        baseline_label: impl Into<String>,
        baseline: Stat,
    ) {
        self.figures.push(Figure {
            group,
            id: id.into(),
            label: label.into(),
            value,
            baseline: Some((baseline_label.into(), baseline)),
            linux_ns: None,
        });
    }
}

/// A sample source: each call runs the operation (or a batch of it) once and returns the
/// time per operation in nanoseconds.
pub(crate) type Sampler<'a> = Box<dyn FnMut() -> f64 + 'a>;

/// Measures the variants interleaved: one untimed warm-up call each, then `rounds` rounds
/// calling every variant once, starting each round one variant further on (so no variant
/// always runs first or after the same one). Returns each variant's statistics.
pub(crate) fn interleaved(rounds: usize, variants: &mut [Sampler<'_>]) -> Vec<Stat> {
    for v in variants.iter_mut() {
        v();
    }
    let k = variants.len();
    let mut samples = vec![Vec::with_capacity(rounds); k];
    for r in 0..rounds {
        for j in 0..k {
            let i = (r + j) % k;
            samples[i].push(variants[i]());
        }
    }
    samples.iter_mut().map(|s| Stat::of(s)).collect()
}

/// The clock a sampler reads.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Clock {
    /// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, user and system): time
    /// the thread spends preempted by other processes does not count. For work done
    /// entirely on the measuring thread.
    Cpu,
    /// Wall time: for work that waits on other threads (the real-memory cache, latencies).
    Wall,
}

impl Clock {
    /// Now, in nanoseconds from an arbitrary start fixed per clock (and, for `Cpu`, per
    /// thread).
    pub fn now(self) -> u64 {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let wall = || EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64;
        match self {
            Clock::Wall => wall(),
            Clock::Cpu => {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: clock_gettime writes one timespec into a live local.
                let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                // The thread CPU clock exists on every Linux this runs on; should it not,
                // it fails on every call alike and the wall clock stands in throughout.
                if r != 0 {
                    return wall();
                }
                ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
            }
        }
    }
}

/// A sampler for a cheap operation on the thread CPU clock; see [`batched_on`].
pub(crate) fn batched<'a>(target: Duration, op: impl FnMut() + 'a) -> Sampler<'a> {
    batched_on(Clock::Cpu, target, op)
}

/// A sampler for a cheap operation: calibrates a batch size so that one batch takes about
/// `target` on `clock`, then each call runs one batch and returns the time per operation.
pub(crate) fn batched_on<'a>(
    clock: Clock,
    target: Duration,
    mut op: impl FnMut() + 'a,
) -> Sampler<'a> {
    let target = target.as_nanos() as u64;
    let mut n: u64 = 1;
    loop {
        let t0 = clock.now();
        for _ in 0..n {
            op();
        }
        let t = clock.now().saturating_sub(t0);
        if t >= target / 4 || n >= 1 << 30 {
            let scale = target as f64 / t.max(1) as f64;
            n = ((n as f64 * scale) as u64).max(1);
            break;
        }
        n *= 4;
    }
    Box::new(move || {
        let t0 = clock.now();
        for _ in 0..n {
            op();
        }
        clock.now().saturating_sub(t0) as f64 / n as f64
    })
}

/// Runs `mmn bench`.
pub fn main(args: BenchArgs) -> ExitCode {
    for g in &args.only {
        if !GROUPS.contains(&g.trim()) {
            eprintln!(
                "mmn bench: unknown group {:?} in --only; one of: {}",
                g,
                GROUPS.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let plan = Plan {
        quick: args.quick,
        rounds: if args.quick { 9 } else { 21 },
        batch: Duration::from_millis(if args.quick { 1 } else { 2 }),
    };
    let wanted = |g: &str| args.only.is_empty() || args.only.iter().any(|o| o.trim() == g);
    let mut report = Report::default();
    let started = Instant::now();
    for g in GROUPS {
        if !wanted(g) {
            continue;
        }
        if !args.json {
            eprintln!("mmn bench: {g}...");
        }
        let before = report.figures.len();
        match g {
            "core" => core::run(&plan, &mut report),
            "itree" => itree::run(&plan, &mut report),
            "sim" => sim::run(&plan, &mut report),
            _ => uffd::run(&plan, &mut report),
        }
        if !args.json {
            print!("{}", table(g, &report.figures[before..], &report));
        }
        for (group, why) in report.skipped.iter().filter(|s| s.0 == g) {
            if args.json {
                eprintln!("SKIPPED {group}: {why}");
            } else {
                println!("SKIPPED {group}: {why}");
            }
        }
    }
    if let Some(dir) = &args.plots {
        match plot::write_all(dir, &report) {
            Ok(paths) => report.plots = paths,
            Err(e) => {
                eprintln!(
                    "mmn bench: cannot write the plots into {}: {e}",
                    dir.display()
                );
                return ExitCode::from(2);
            }
        }
    }
    if args.json {
        println!("{}", json(&plan, &report));
    } else {
        if !report.distributions.is_empty() {
            print!("{}", distribution_table(&report.distributions));
        }
        for p in &report.plots {
            println!("wrote {}", p.display());
        }
        println!(
            "{} figures in {:.1} s ({} rounds each{})",
            report.figures.len(),
            started.elapsed().as_secs_f64(),
            plan.rounds,
            if plan.quick { ", --quick" } else { "" }
        );
    }
    if !report.failures.is_empty() {
        for f in &report.failures {
            eprintln!("mmn bench: {f}");
        }
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// A time for a table: ns below 10 µs, µs below 10 ms, ms above.
fn fmt_ns(ns: f64) -> String {
    if ns < 10_000.0 {
        format!("{ns:.1} ns")
    } else if ns < 10_000_000.0 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// The table of one group's figures.
fn table(group: &str, figures: &[Figure], report: &Report) -> String {
    let mut s = String::new();
    if figures.is_empty() {
        return s;
    }
    let linux = figures.iter().any(|f| f.linux_ns.is_some());
    let w = figures.iter().map(|f| f.label.len()).max().unwrap_or(0);
    let bw = figures
        .iter()
        .filter_map(|f| f.baseline.as_ref().map(|b| b.0.len()))
        .max()
        .unwrap_or(8)
        .max(8);
    let _ = writeln!(
        s,
        "\n{group}: median per operation (± half the interquartile range)"
    );
    let _ = write!(
        s,
        "  {:<w$}  {:>11} {:>6}   {:<bw$}  {:>11} {:>6}  {:>7}",
        "figure", "time", "±", "baseline", "time", "±", "ratio"
    );
    if linux {
        let _ = write!(s, "  {:>10}  {:>7}", "Linux", "/Linux");
    }
    s.push('\n');
    for f in figures {
        let _ = write!(
            s,
            "  {:<w$}  {:>11} {:>5.1}%",
            f.label,
            fmt_ns(f.value.median),
            f.value.spread_pct()
        );
        match &f.baseline {
            Some((label, b)) => {
                let _ = write!(
                    s,
                    "   {:<bw$}  {:>11} {:>5.1}%  {:>7.2}",
                    label,
                    fmt_ns(b.median),
                    b.spread_pct(),
                    f.value.median / b.median
                );
                if let Some(r) = report.paired_of(&f.id) {
                    let _ = write!(
                        s,
                        "   paired ratio [{:.3}-{:.3}] {:.3}",
                        r.p25, r.p75, r.median
                    );
                }
            }
            None => {
                let _ = write!(s, "   {:<bw$}  {:>11} {:>6}  {:>7}", "-", "", "", "");
            }
        }
        if let Some(l) = f.linux_ns {
            let _ = write!(s, "  {:>10}  {:>7.2}", fmt_ns(l), f.value.median / l);
        }
        s.push('\n');
    }
    s
}

/// The percentile table of the latency distributions.
fn distribution_table(ds: &[Distribution]) -> String {
    let mut s = String::new();
    let w = ds.iter().map(|d| d.label.len()).max().unwrap_or(0);
    let _ = write!(s, "\nlatency distributions\n  {:<w$}", "");
    for p in PERCENTILES {
        let _ = write!(s, " {:>10}", format!("p{p}"));
    }
    s.push('\n');
    for d in ds {
        let _ = write!(s, "  {:<w$}", d.label);
        for p in PERCENTILES {
            let _ = write!(s, " {:>10}", fmt_ns(d.quantile(p as f64 / 100.0)));
        }
        let _ = writeln!(s, "   ({} samples)", d.samples.len());
    }
    s
}

/// A JSON string literal.
fn js(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A JSON number (non-finite values, which no measurement should produce, become null).
fn jn(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

fn stat_fields(st: &Stat) -> String {
    format!(
        "\"median_ns\": {}, \"p25_ns\": {}, \"p75_ns\": {}",
        jn(st.median),
        jn(st.p25),
        jn(st.p75)
    )
}

/// The kernel release, from uname.
fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The report as one JSON object (keys documented in the module docs).
fn json(plan: &Plan, r: &Report) -> String {
    let mut s = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "{{\n  \"format\": \"mmn-bench/1\",\n  \"quick\": {},\n  \"rounds\": {},\n  \
         \"machine\": {{\"cpus\": {cpus}, \"kernel\": {}}},",
        plan.quick,
        plan.rounds,
        js(&kernel())
    );
    let figures: Vec<String> = r
        .figures
        .iter()
        .map(|f| {
            let baseline = match &f.baseline {
                Some((label, b)) => format!("{{\"label\": {}, {}}}", js(label), stat_fields(b)),
                None => "null".into(),
            };
            let ratio = f
                .baseline
                .as_ref()
                .map_or("null".into(), |(_, b)| jn(f.value.median / b.median));
            let paired = r.paired_of(&f.id).map_or("null".into(), |p| {
                format!(
                    "{{\"median\": {}, \"p25\": {}, \"p75\": {}}}",
                    jn(p.median),
                    jn(p.p25),
                    jn(p.p75)
                )
            });
            format!(
                "    {{\"group\": {}, \"id\": {}, \"label\": {}, {}, \"baseline\": {baseline}, \
                 \"ratio\": {ratio}, \"paired_ratio\": {paired}, \"linux_ns\": {}}}",
                js(f.group),
                js(&f.id),
                js(&f.label),
                stat_fields(&f.value),
                f.linux_ns.map_or("null".into(), jn)
            )
        })
        .collect();
    let _ = writeln!(s, "  \"figures\": [\n{}\n  ],", figures.join(",\n"));
    let curves: Vec<String> = r
        .curves
        .iter()
        .map(|c| {
            let pts: Vec<String> = c
                .points
                .iter()
                .map(|&(x, y)| format!("[{}, {}]", jn(x), jn(y)))
                .collect();
            format!(
                "    {{\"id\": {}, \"label\": {}, \"x\": {}, \"points\": [{}]}}",
                js(&c.id),
                js(&c.label),
                js(c.x),
                pts.join(", ")
            )
        })
        .collect();
    let _ = writeln!(s, "  \"curves\": [\n{}\n  ],", curves.join(",\n"));
    let ds: Vec<String> = r
        .distributions
        .iter()
        .map(|d| {
            let mut ps: Vec<String> = PERCENTILES
                .iter()
                .map(|&p| format!("\"p{p}\": {}", jn(d.quantile(p as f64 / 100.0))))
                .collect();
            ps.push(format!("\"max\": {}", jn(d.quantile(1.0))));
            format!(
                "    {{\"id\": {}, \"label\": {}, \"samples\": {}, \"percentiles_ns\": {{{}}}}}",
                js(&d.id),
                js(&d.label),
                d.samples.len(),
                ps.join(", ")
            )
        })
        .collect();
    let _ = writeln!(s, "  \"distributions\": [\n{}\n  ],", ds.join(",\n"));
    let sk: Vec<String> = r
        .skipped
        .iter()
        .map(|(g, why)| format!("    {{\"group\": {}, \"reason\": {}}}", js(g), js(why)))
        .collect();
    let _ = writeln!(s, "  \"skipped\": [\n{}\n  ],", sk.join(",\n"));
    let failures: Vec<String> = r.failures.iter().map(|f| js(f)).collect();
    let _ = writeln!(s, "  \"failures\": [{}],", failures.join(", "));
    let plots: Vec<String> = r
        .plots
        .iter()
        .map(|p| js(&p.display().to_string()))
        .collect();
    let _ = write!(s, "  \"plots\": [{}]\n}}", plots.join(", "));
    s
}
