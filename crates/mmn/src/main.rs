//! `mmn`: the mmu-notifier command.

mod attach;
mod demo;
mod real;
mod strace;
mod torture;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use clap::{error::ErrorKind, CommandFactory, Parser, Subcommand};
use mmu_secondary::broken::Broken;

#[derive(Parser)]
#[command(
    name = "mmn",
    version,
    about = "MMU notifiers: demo, checks and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Random primary operations and device accesses on several workers, with the
    /// secondaries attached and every access checked. Prints a summary; exits 1 on any
    /// violation, after writing a replay file (`mmn replay FILE` re-runs the run exactly).
    ///
    /// The workers take turns at the start of each operation and inside each device
    /// fault (between its read of the primary and its install), in an order drawn from
    /// the seed and recorded; three page choices in four fall in a small hot window, so
    /// faults and invalidations keep colliding. The run stops at the first violation.
    /// Ctrl-C stops it early with a partial report (and a replay file).
    ///
    /// With --real: the registration cache of mmu-uffd on this process's real memory
    /// (glibc and mimalloc buffers, raw mappings replaced, moved, resized and advised away),
    /// every lookup checked against the physical frames the kernel maps (needs root,
    /// userfaultfd and io_uring; prints SKIPPED and exits 0 without them). Exits 1 on any
    /// stale hit, 2 on lookup errors or a worker stuck for 10 s.
    Torture {
        /// Torture the real-memory registration cache (mmu-uffd) instead of the simulation.
        #[arg(long, conflicts_with_all = ["ops", "secondaries", "json", "hot", "parallel", "keep_going", "replay_file"])]
        real: bool,
        /// How long to run, in seconds (the default budget: 10 s).
        #[arg(long, conflicts_with = "ops", value_parser = parse_secs)]
        secs: Option<f64>,
        /// How many operations to run in total (all workers), instead of a time budget.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        ops: Option<u64>,
        /// Worker threads [default: 2, with --real 4].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
        threads: Option<u64>,
        /// Seed of every random choice: any 64-bit value, decimal or 0x hex (a negative
        /// decimal is taken modulo 2^64).
        #[arg(long, default_value = "1", value_parser = parse_seed, allow_hyphen_values = true)]
        seed: u64,
        /// Secondaries to attach, comma separated, each at most once ('' for none).
        #[arg(long, value_delimiter = ',', default_value = attach::ALL)]
        secondaries: Vec<String>,
        /// Also attach a deliberately broken secondary; the run must then fail:
        /// never-tears-down, ignores-retry, installs-during-invalidation, never-flushes.
        /// With --real, break the cache instead (the run stops at the first stale hit):
        /// gate, reuse-check.
        #[arg(long)]
        broken: Option<String>,
        /// Pages of the hot window that three page choices in four fall in (0: choose
        /// uniformly).
        #[arg(long, default_value_t = torture::DEFAULT_HOT, value_parser = clap::value_parser!(u64).range(0..=torture::REGION_PAGES))]
        hot: u64,
        /// Run the workers truly in parallel (real races, no exact replay).
        #[arg(long)]
        parallel: bool,
        /// Run the whole budget instead of stopping at the first violation.
        #[arg(long)]
        keep_going: bool,
        /// Where to write the replay file of a failed or interrupted run [default: a
        /// file in the temporary directory].
        #[arg(long)]
        replay_file: Option<PathBuf>,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Replays FILE on the simulation. Two kinds of file:
    ///
    /// A replay file written by a failing or interrupted `mmn torture` (first line
    /// `# mmn replay v1`): re-runs that run exactly, the same operations in the same order,
    /// to the same first violation. Exits 1 when it reproduces the recorded violations, 0
    /// when it reproduces a clean run, 2 when the replay does not match the recording.
    ///
    /// A real program's memory system calls, as `strace -f -y -e trace=%memory,%process -o
    /// FILE PROGRAM` recorded them: replays them with every secondary attached to each of
    /// the program's address spaces and every access checked. Prints the trace's size, the
    /// operations, invalidation events and violations; exits 1 on any violation.
    Replay {
        /// The replay file or the strace output.
        file: PathBuf,
        /// Strace traces only: secondaries to attach, comma separated [default: all].
        #[arg(long, value_delimiter = ',')]
        secondaries: Option<Vec<String>>,
        /// Strace traces only: also attach a deliberately broken secondary (the replay
        /// must then fail).
        #[arg(long)]
        broken: Option<String>,
        /// Strace traces only: most pages touched per call [default: 8].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
        touch_pages: Option<u64>,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// A toy primary MMU remaps pages while threads fault them into a KVM-style secondary;
    /// every access is checked against the primary. Exits 1 on any violation.
    Demo {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 3.0, value_parser = parse_secs)]
        secs: f64,
        /// Pages in the toy address space.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        pages: u64,
        /// Threads faulting pages into the secondary (the primary has one more).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=256))]
        fillers: u64,
        /// Seed of the random page choices (decimal or 0x hex).
        #[arg(long, default_value = "1", value_parser = parse_seed, allow_hyphen_values = true)]
        seed: u64,
        /// Make the secondary skip its retry check (the demo must then report violations).
        #[arg(long)]
        broken: bool,
    },
}

/// A positive, finite number of seconds.
fn parse_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("expected a positive number of seconds".into()),
    }
}

/// Any u64: decimal, `0x` hex, or a negative decimal taken modulo 2^64.
fn parse_seed(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("expected a 64-bit seed, decimal or 0x hex, got {t:?}");
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(&hex.replace('_', ""), 16).map_err(|_| bad());
    }
    if t.starts_with('-') {
        return t.parse::<i64>().map(|v| v as u64).map_err(|_| bad());
    }
    t.parse::<u64>().map_err(|_| bad())
}

/// A usage error of the subcommand `sub`, in clap's style (`error: ...`, its usage, exit
/// status 2), like the errors clap itself reports.
fn usage_error(sub: &str, msg: impl std::fmt::Display) -> ExitCode {
    let mut cli = Cli::command();
    let mut cmd = match cli.find_subcommand_mut(sub) {
        Some(c) => c.clone().bin_name(format!("mmn {sub}")),
        None => cli,
    };
    let _ = cmd.error(ErrorKind::ValueValidation, msg).print();
    ExitCode::from(2)
}

/// A failure that is not the user's (`error: ...`, exit status 2).
fn failure(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

/// Set by the SIGINT handler; the torture stops at its next operation.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // A second Ctrl-C ends the process at once. Only async-signal-safe calls here: an
    // atomic swap and _exit.
    if INTERRUPTED.swap(true, Relaxed) {
        // SAFETY: _exit is async-signal-safe and takes no pointer.
        unsafe { libc::_exit(130) };
    }
}

/// Routes SIGINT to [`INTERRUPTED`].
fn catch_sigint() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: installs a handler that only makes async-signal-safe calls; the handler is a
    // plain function that lives as long as the process.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

#[allow(clippy::too_many_arguments)]
fn torture_main(
    budget: torture::Budget,
    threads: u64,
    seed: u64,
    secondaries: Vec<String>,
    broken: Option<String>,
    hot: u64,
    parallel: bool,
    keep_going: bool,
    replay_file: Option<PathBuf>,
    json: bool,
) -> ExitCode {
    let broken = match broken.as_deref().map(|b| (b, Broken::from_name(b))) {
        None => None,
        Some((_, Some(b))) => Some(b),
        Some((name, None)) => {
            let names: Vec<&str> = Broken::ALL.iter().map(|b| b.name()).collect();
            return usage_error(
                "torture",
                format!("unknown --broken {name:?}; one of: {}", names.join(", ")),
            );
        }
    };
    let secondaries: Vec<String> = secondaries
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for (i, s) in secondaries.iter().enumerate() {
        if !attach::ALL.split(',').any(|k| k == s) {
            return usage_error(
                "torture",
                format!(
                    "unknown secondary {s:?} in --secondaries; known: {}",
                    attach::ALL
                ),
            );
        }
        if secondaries[..i].contains(s) {
            return usage_error(
                "torture",
                format!(
                    "--secondaries names {s:?} twice (each secondary is attached at most once)"
                ),
            );
        }
    }
    if secondaries.is_empty() && broken.is_none() {
        return usage_error(
            "torture",
            "nothing to torture: --secondaries is empty and no --broken",
        );
    }
    let mut options = torture::TortureOptions::new(budget, seed, secondaries);
    options.threads = threads as usize;
    options.broken = broken;
    options.hot = hot;
    options.parallel = parallel;
    options.keep_going = keep_going;
    options.progress = !json;
    catch_sigint();
    options.interrupt = Some(&INTERRUPTED);
    let report = match torture::run(&options, attach::attach) {
        Ok(r) => r,
        Err(e) => return failure(e),
    };
    let failed = report.violation_count > 0;
    let written = if failed || report.interrupted {
        match torture::replay::write(&options, &report) {
            Some(text) => {
                let path = replay_file.unwrap_or_else(|| {
                    std::env::temp_dir()
                        .join(format!("mmn-replay-seed{seed}-{}.txt", std::process::id()))
                });
                match std::fs::write(&path, text) {
                    Ok(()) => Some(path.display().to_string()),
                    Err(e) => {
                        eprintln!(
                            "error: cannot write the replay file {}: {e}",
                            path.display()
                        );
                        None
                    }
                }
            }
            None => None,
        }
    } else {
        None
    };
    if json {
        println!("{}", report.json(&options, written.as_deref()));
    } else {
        print!("{}", report.table());
        let missing = report.missing_events();
        if !missing.is_empty() && !failed && !report.interrupted {
            println!("events that did not occur: {}", missing.join(", "));
        }
    }
    let replay_hint = match (&written, parallel) {
        (Some(path), _) => format!("Replay exactly with:\n  mmn replay {path}"),
        (None, true) => "A --parallel run cannot be replayed exactly; without --parallel \
                         the workers take recorded turns and a failing run writes a replay file."
            .into(),
        (None, false) => "No replay file was written.".into(),
    };
    if failed {
        eprintln!(
            "mmn torture: {} (seed {seed}). {replay_hint}",
            torture::plural(report.violation_count, "coherence violation")
        );
        return ExitCode::from(1);
    }
    if report.interrupted {
        eprintln!(
            "mmn torture: interrupted after {}, no violation (seed {seed}). {replay_hint}",
            torture::plural(report.total_ops(), "operation")
        );
        return ExitCode::from(130);
    }
    ExitCode::SUCCESS
}

/// `mmn replay FILE` for a file that is not an mmn replay file (its first line is not
/// the replay magic). Other trace formats are dispatched from here.
/// The options of `mmn replay` that only apply to strace traces.
struct StraceArgs {
    secondaries: Option<Vec<String>>,
    broken: Option<String>,
    touch_pages: Option<u64>,
}

/// A file that is not a torture replay file: a strace trace of a real program.
fn replay_other_format(path: &std::path::Path, args: StraceArgs, json: bool) -> ExitCode {
    let secondaries = args
        .secondaries
        .unwrap_or_else(|| attach::ALL.split(',').map(String::from).collect());
    strace::cli(
        path,
        secondaries,
        args.broken,
        args.touch_pages.unwrap_or(8),
        json,
    )
}

fn replay_main(path: PathBuf, strace_args: StraceArgs, json: bool) -> ExitCode {
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return failure(format!("cannot read {}: {e}", path.display())),
    };
    if text.lines().next().map(str::trim_end) != Some(torture::replay::MAGIC) {
        return replay_other_format(&path, strace_args, json);
    }
    if strace_args.secondaries.is_some()
        || strace_args.broken.is_some()
        || strace_args.touch_pages.is_some()
    {
        return usage_error(
            "replay",
            "--secondaries, --broken and --touch-pages apply to strace traces only: a torture \
             replay file records its own options",
        );
    }
    let recorded = match torture::replay::parse(&text) {
        Ok(r) => r,
        Err(e) => return failure(format!("{}: {e}", path.display())),
    };
    let mut options = recorded.options.clone();
    options.progress = !json;
    catch_sigint();
    options.interrupt = Some(&INTERRUPTED);
    let report = match torture::run(&options, attach::attach) {
        Ok(r) => r,
        Err(e) => return failure(e),
    };
    let first = report.first.as_ref().map(torture::replay::Recorded::of);
    let same = report.diverged.is_none() && first == recorded.first && !report.interrupted;
    if json {
        let mut v = report.json(&options, Some(&path.display().to_string()));
        v["reproduced"] = serde_json::json!(same);
        println!("{v}");
    } else {
        print!("{}", report.table());
    }
    if let Some(why) = &report.diverged {
        eprintln!("mmn replay: the run did not follow the recorded schedule: {why}");
    }
    if !same {
        let show = |f: &Option<torture::replay::Recorded>| {
            f.as_ref()
                .map_or("no violation".to_string(), |f| f.to_string())
        };
        eprintln!(
            "mmn replay: not reproduced: recorded first violation {}, replayed {}",
            show(&recorded.first),
            show(&first)
        );
        return ExitCode::from(2);
    }
    match &first {
        Some(f) => {
            eprintln!(
                "mmn replay: reproduced the first violation, {f} ({} in all, {} recorded)",
                torture::plural(report.violation_count, "violation"),
                recorded.violations
            );
            ExitCode::from(1)
        }
        None => {
            eprintln!(
                "mmn replay: reproduced: {} and no violation",
                torture::plural(report.total_ops(), "operation")
            );
            ExitCode::SUCCESS
        }
    }
}

fn real_main(
    secs: Option<f64>,
    threads: Option<u64>,
    seed: u64,
    broken: Option<String>,
) -> ExitCode {
    let broken = match broken
        .as_deref()
        .map(|b| (b, real::BrokenCache::from_name(b)))
    {
        None => None,
        Some((_, Some(b))) => Some(b),
        Some((name, None)) => {
            let names: Vec<&str> = real::BrokenCache::ALL.iter().map(|b| b.name()).collect();
            return usage_error(
                "torture",
                format!(
                    "unknown --broken {name:?} with --real; one of: {}",
                    names.join(", ")
                ),
            );
        }
    };
    let options = real::RealOptions {
        secs: secs.unwrap_or(10.0),
        threads: threads.unwrap_or(4) as usize,
        seed,
        broken,
        progress: true,
    };
    let report = match real::run(&options) {
        Ok(r) => r,
        Err(real::NotRun::Skipped(why)) => {
            println!("SKIPPED: {why}");
            return ExitCode::SUCCESS;
        }
        Err(real::NotRun::Failed(why)) => return failure(why),
    };
    print!("{}", report.table(&options));
    if report.failed() {
        eprintln!(
            "mmn torture --real: {}, {} not covering the request (seed {seed}{})",
            torture::plural(report.stale_lookups, "stale hit"),
            torture::plural(report.bad_handles, "handle"),
            broken
                .map(|b| format!(", broken {}: expected", b.name()))
                .unwrap_or_default()
        );
        return ExitCode::from(1);
    }
    if report.errors > 0 {
        return failure(format!(
            "{} failed (no stale hit seen)",
            torture::plural(report.errors, "lookup")
        ));
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Torture {
            real: true,
            secs,
            threads,
            seed,
            broken,
            ..
        } => real_main(secs, threads, seed, broken),
        Command::Torture {
            real: false,
            secs,
            ops,
            threads,
            seed,
            secondaries,
            broken,
            hot,
            parallel,
            keep_going,
            replay_file,
            json,
        } => {
            let budget = match (secs, ops) {
                (_, Some(n)) => torture::Budget::Ops(n),
                (Some(s), None) => torture::Budget::Secs(s),
                (None, None) => torture::Budget::Secs(10.0),
            };
            torture_main(
                budget,
                threads.unwrap_or(2),
                seed,
                secondaries,
                broken,
                hot,
                parallel,
                keep_going,
                replay_file,
                json,
            )
        }
        Command::Replay {
            file,
            secondaries,
            broken,
            touch_pages,
            json,
        } => replay_main(
            file,
            StraceArgs {
                secondaries,
                broken,
                touch_pages,
            },
            json,
        ),
        Command::Demo {
            secs,
            pages,
            fillers,
            seed,
            broken,
        } => {
            let r = demo::run(&demo::DemoOptions {
                secs,
                pages,
                fillers: fillers as usize,
                seed,
                broken,
            });
            println!(
                "remaps {}  faults {}  retries {}  checked accesses {}  violations {}",
                r.remaps.load(Relaxed),
                r.faults.load(Relaxed),
                r.retries.load(Relaxed),
                r.accesses.load(Relaxed),
                r.violations.load(Relaxed)
            );
            if r.violations.load(Relaxed) > 0 {
                eprintln!(
                    "mmn demo: the secondary used translations the primary had changed{}",
                    if broken {
                        " (expected with --broken)"
                    } else {
                        ""
                    }
                );
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
