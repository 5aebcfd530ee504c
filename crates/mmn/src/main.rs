//! `mmn`: the mmu-notifier command.

mod demo;

use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;

use clap::{Parser, Subcommand};

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

fn main() -> ExitCode {
    match Cli::parse().command {
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
