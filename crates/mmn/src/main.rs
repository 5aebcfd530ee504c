//! `mmn`: the mmu-notifier command.

mod attach;
mod demo;
mod real;
mod strace;
mod torture;

use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;

use clap::{Parser, Subcommand};
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
    /// Random primary operations and device accesses on several threads, with the
    /// secondaries attached and every access checked. Prints a summary; exits 1 on any
    /// violation, with the command that replays the run.
    ///
    /// With --real: the registration cache of mmu-uffd on this process's real memory
    /// (glibc and mimalloc buffers, raw mappings replaced, moved, resized and advised away),
    /// every lookup checked against the physical frames the kernel maps (needs root,
    /// userfaultfd and io_uring; prints SKIPPED and exits 0 without them). Exits 1 on any
    /// stale hit, 2 on lookup errors or a worker stuck for 10 s.
    Torture {
        /// Torture the real-memory registration cache (mmu-uffd) instead of the simulation.
        #[arg(long, conflicts_with_all = ["ops", "secondaries", "json"])]
        real: bool,
        /// How long to run, in seconds (the default budget: 10 s).
        #[arg(long, conflicts_with = "ops")]
        secs: Option<f64>,
        /// How many operations to run in total, instead of a time budget.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        ops: Option<u64>,
        /// Worker threads; with 1 the run is a pure function of the seed [default: 2, with
        /// --real 4].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
        threads: Option<u64>,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Secondaries to attach, comma separated.
        #[arg(long, value_delimiter = ',', default_value = attach::ALL)]
        secondaries: Vec<String>,
        /// Also attach a deliberately broken secondary; the run must then fail:
        /// never-tears-down, ignores-retry, installs-during-invalidation, never-flushes.
        /// With --real, break the cache instead (the run stops at the first stale hit):
        /// gate, reuse-check.
        #[arg(long)]
        broken: Option<String>,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Replays a real program's memory system calls, as `strace -f -y -e
    /// trace=%memory,%process -o FILE PROGRAM` recorded them, on the simulation with every
    /// secondary attached to each of its address spaces and every access checked. Prints
    /// the trace's size, the operations, invalidation events and violations; exits 1 on
    /// any violation.
    Replay {
        /// The strace output.
        file: std::path::PathBuf,
        /// Secondaries to attach, comma separated.
        #[arg(long, value_delimiter = ',', default_value = attach::ALL)]
        secondaries: Vec<String>,
        /// Also attach a deliberately broken secondary (the replay must then fail).
        #[arg(long)]
        broken: Option<String>,
        /// Most pages touched per call.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
        touch_pages: u64,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// A toy primary MMU remaps pages while threads fault them into a KVM-style secondary;
    /// every access is checked against the primary. Exits 1 on any violation.
    Demo {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Pages in the toy address space.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        pages: u64,
        /// Threads faulting pages into the secondary (the primary has one more).
        #[arg(long, default_value_t = 2)]
        fillers: usize,
        /// Seed of the random page choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Make the secondary skip its retry check (the demo must then report violations).
        #[arg(long)]
        broken: bool,
    },
}

fn torture_main(
    secs: Option<f64>,
    ops: Option<u64>,
    threads: u64,
    seed: u64,
    secondaries: Vec<String>,
    broken: Option<String>,
    json: bool,
) -> ExitCode {
    let budget = match (secs, ops) {
        (_, Some(n)) => torture::Budget::Ops(n),
        (Some(s), None) if s.is_finite() && s > 0.0 => torture::Budget::Secs(s),
        (Some(_), None) => {
            eprintln!("mmn torture: --secs must be a positive number of seconds");
            return ExitCode::from(2);
        }
        (None, None) => torture::Budget::Secs(10.0),
    };
    let broken = match broken.as_deref().map(|b| (b, Broken::from_name(b))) {
        None => None,
        Some((_, Some(b))) => Some(b),
        Some((name, None)) => {
            let names: Vec<&str> = Broken::ALL.iter().map(|b| b.name()).collect();
            eprintln!(
                "mmn torture: unknown --broken {name:?}; one of: {}",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
    };
    let secondaries: Vec<String> = secondaries
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let options = torture::TortureOptions {
        budget,
        threads: threads as usize,
        seed,
        secondaries,
        broken,
        progress: !json,
    };
    let report = match torture::run(&options, attach::attach) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mmn torture: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", report.json(&options));
    } else {
        print!("{}", report.table());
        let missing = report.missing_events();
        if !missing.is_empty() {
            println!("events that did not occur: {}", missing.join(", "));
        }
    }
    if report.violation_count > 0 {
        eprintln!(
            "mmn torture: {} coherence violations (seed {}). Replay with:\n  {}",
            report.violation_count,
            seed,
            torture::reproduce(&options, report.total_ops())
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn real_main(
    secs: Option<f64>,
    threads: Option<u64>,
    seed: u64,
    broken: Option<String>,
) -> ExitCode {
    let secs = match secs {
        None => 10.0,
        Some(s) if s.is_finite() && s > 0.0 => s,
        Some(_) => {
            eprintln!("mmn torture --real: --secs must be a positive number of seconds");
            return ExitCode::from(2);
        }
    };
    let broken = match broken
        .as_deref()
        .map(|b| (b, real::BrokenCache::from_name(b)))
    {
        None => None,
        Some((_, Some(b))) => Some(b),
        Some((name, None)) => {
            let names: Vec<&str> = real::BrokenCache::ALL.iter().map(|b| b.name()).collect();
            eprintln!(
                "mmn torture --real: unknown --broken {name:?}; one of: {}",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
    };
    let options = real::RealOptions {
        secs,
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
        Err(real::NotRun::Failed(why)) => {
            eprintln!("mmn torture --real: {why}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table(&options));
    if report.failed() {
        eprintln!(
            "mmn torture --real: {} stale hits, {} handles not covering the request (seed {seed}{})",
            report.stale_lookups,
            report.bad_handles,
            broken
                .map(|b| format!(", broken {}: expected", b.name()))
                .unwrap_or_default()
        );
        return ExitCode::from(1);
    }
    if report.errors > 0 {
        eprintln!(
            "mmn torture --real: {} lookups failed (no stale hit seen)",
            report.errors
        );
        return ExitCode::from(2);
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
            json,
        } => torture_main(
            secs,
            ops,
            threads.unwrap_or(2),
            seed,
            secondaries,
            broken,
            json,
        ),
        Command::Replay {
            file,
            secondaries,
            broken,
            touch_pages,
            json,
        } => strace::cli(&file, secondaries, broken, touch_pages, json),
        Command::Demo {
            secs,
            pages,
            fillers,
            seed,
            broken,
        } => {
            if !(secs.is_finite() && secs > 0.0) {
                eprintln!("mmn demo: --secs must be a positive number of seconds");
                return ExitCode::from(2);
            }
            let r = demo::run(&demo::DemoOptions {
                secs,
                pages,
                fillers,
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
