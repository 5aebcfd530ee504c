//! `mmu-oracle`: runs scripts of memory operations on the running kernel and on the
//! simulation and prints both, operation by operation.
//!
//! ```text
//! mmu-oracle run --seed S [--ops N]     a random script
//! mmu-oracle run FILE                   a script file (see the crate docs for the format)
//! mmu-oracle sim FILE | --seed S        the simulation only (no root needed)
//! mmu-oracle measure --scripts N [--ops M] [--seed S]
//!                                       identical-operation rate over N random scripts
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use mmu_oracle::kernel::{self, Kernel};
use mmu_oracle::{script, sim, Comparison};

fn usage() -> ExitCode {
    eprintln!(
        "usage: mmu-oracle run (--seed S [--ops N] | FILE)\n       \
         mmu-oracle sim (--seed S [--ops N] | FILE)\n       \
         mmu-oracle measure --scripts N [--ops M] [--seed S] [--show]"
    );
    ExitCode::from(2)
}

struct Args {
    seed: Option<u64>,
    ops: usize,
    scripts: u64,
    file: Option<PathBuf>,
    show: bool,
}

fn parse_args(args: &[String]) -> Option<Args> {
    let mut a = Args {
        seed: None,
        ops: 100,
        scripts: 100,
        file: None,
        show: false,
    };
    let mut it = args.iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "--seed" => a.seed = Some(it.next()?.parse().ok()?),
            "--ops" => a.ops = it.next()?.parse().ok()?,
            "--scripts" => a.scripts = it.next()?.parse().ok()?,
            "--show" => a.show = true,
            f if !f.starts_with('-') => a.file = Some(f.into()),
            _ => return None,
        }
    }
    Some(a)
}

fn load(a: &Args) -> Result<Vec<script::Op>, String> {
    match (&a.file, a.seed) {
        (Some(f), _) => {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            script::parse(&text).map_err(|e| format!("{}: {e}", f.display()))
        }
        (None, Some(seed)) => Ok(script::random(seed, a.ops)),
        (None, None) => Err("a script file or --seed".into()),
    }
}

fn open_kernel() -> Result<Kernel, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Kernel::open(&exe).map_err(|e| format!("kernel side unavailable: {e}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    if cmd == "worker" {
        kernel::worker_main();
    }
    let Some(a) = parse_args(&args[1..]) else {
        return usage();
    };
    let result = match cmd.as_str() {
        "sim" => load(&a).map(|ops| {
            for (op, step) in ops.iter().zip(sim::run(&ops)) {
                println!("{:<40} {step}", op.to_string());
            }
            true
        }),
        "run" => load(&a).and_then(|ops| {
            let k = open_kernel()?;
            let kernel = k.run(&ops)?;
            let c = Comparison {
                sim: sim::run(&ops),
                ops,
                kernel,
            };
            print!("{c}");
            let d = c.differences().len();
            println!(
                "{} operations, {} identical, {d} different",
                c.len(),
                c.len() - d
            );
            Ok(d == 0)
        }),
        "measure" => (|| {
            let k = open_kernel()?;
            let seed = a.seed.unwrap_or(1);
            let (mut total, mut same) = (0usize, 0usize);
            let mut classes: std::collections::BTreeMap<String, usize> = Default::default();
            for s in seed..seed + a.scripts {
                let ops = script::random(s, a.ops);
                let kernel = k.run(&ops)?;
                let c = Comparison {
                    sim: sim::run(&ops),
                    ops,
                    kernel,
                };
                let d = c.differences();
                total += c.len();
                same += c.len() - d.len();
                for &i in &d {
                    let class = c
                        .explain(i)
                        .map_or("UNEXPLAINED".to_string(), |k| k.to_string());
                    println!(
                        "seed {s} op {i}: {}\n    kernel: {}\n    sim:    {}\n    class:  {class}",
                        c.ops[i], c.kernel[i], c.sim[i]
                    );
                    *classes.entry(class).or_default() += 1;
                }
                if a.show && !d.is_empty() {
                    println!("{}", c.report(false));
                }
            }
            println!(
                "{} scripts x {} operations: {same} of {total} identical ({:.2}%)",
                a.scripts,
                a.ops,
                100.0 * same as f64 / total.max(1) as f64
            );
            for (class, n) in &classes {
                println!("  {n} differences: {class}");
            }
            Ok(same == total)
        })(),
        _ => return usage(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mmu-oracle: {e}");
            ExitCode::from(2)
        }
    }
}
