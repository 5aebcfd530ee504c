//! The oracle: the simulation against the running kernel.
//!
//! - The hand-written scripts (`scripts/*.txt`, one per difference found between the
//!   two, minimised) against their recorded kernel results (`scripts/*.expected`):
//!   runs everywhere.
//! - The same scripts and 40 seeded random scripts of 100 operations on the running
//!   kernel, which must give identical results operation by operation (and confirm the
//!   recorded results). Needs root, `/dev/kvm` and tracefs; prints SKIPPED otherwise.
//! - The runner leaves nothing behind (tracing instance, mount, swap file), also when a
//!   run panics, and removes what a killed runner left.

use std::path::{Path, PathBuf};

use mmu_oracle::kernel::{Kernel, PREFIX};
use mmu_oracle::{script, sim, Comparison};

fn scripts() -> Vec<(PathBuf, Vec<script::Op>, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scripts directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        let ops = script::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let expected =
            std::fs::read_to_string(f.with_extension("expected")).expect("expected results");
        out.push((f, ops, expected));
    }
    assert!(out.len() >= 11, "the minimised scripts are all there");
    out
}

fn render(ops: &[script::Op], steps: &[mmu_oracle::Step]) -> String {
    ops.iter()
        .zip(steps)
        .map(|(o, s)| format!("{:<40} {s}", o.to_string()).trim_end().to_string() + "\n")
        .collect()
}

/// One kernel runner at a time in this process: runners share the machine's swap (each
/// adds its own swap file and removes it when dropped) and pin their workers to the same
/// CPU, so a runner dropped by one test would change what `MADV_PAGEOUT` does in another's.
static ONE_RUNNER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_runner() -> std::sync::MutexGuard<'static, ()> {
    ONE_RUNNER.lock().unwrap_or_else(|e| e.into_inner())
}

fn kernel() -> Option<Kernel> {
    match Kernel::open(Path::new(env!("CARGO_BIN_EXE_mmu-oracle"))) {
        Ok(k) => Some(k),
        Err(e) => {
            println!("SKIPPED: the kernel side is unavailable: {e}");
            None
        }
    }
}

#[test]
fn the_simulation_gives_the_recorded_kernel_results_of_the_minimised_scripts() {
    for (f, ops, expected) in scripts() {
        let got = render(&ops, &sim::run(&ops));
        let want: String = expected
            .lines()
            .map(|l| l.trim_end().to_string() + "\n")
            .collect();
        assert_eq!(got, want, "{}", f.display());
    }
}

#[test]
fn the_kernel_and_the_simulation_agree_on_every_operation() {
    let _one = one_runner();
    let Some(k) = kernel() else { return };
    let mut failures = Vec::new();
    for (f, ops, expected) in scripts() {
        let steps = k.run(&ops).expect("kernel run");
        let want: String = expected
            .lines()
            .map(|l| l.trim_end().to_string() + "\n")
            .collect();
        assert_eq!(
            render(&ops, &steps),
            want,
            "{}: the recorded results are the kernel's",
            f.display()
        );
        let c = Comparison {
            sim: sim::run(&ops),
            ops,
            kernel: steps,
        };
        if !c.differences().is_empty() {
            failures.push(format!("{}:\n{}", f.display(), c.report(false)));
        }
    }
    let (mut total, mut notes) = (0, 0);
    for seed in 0..40 {
        let ops = script::random(seed, 100);
        let kernel = k.run(&ops).expect("kernel run");
        notes += kernel.iter().map(|s| s.notes.len()).sum::<usize>();
        let c = Comparison {
            sim: sim::run(&ops),
            ops,
            kernel,
        };
        total += c.len();
        if !c.differences().is_empty() {
            failures.push(format!("seed {seed}:\n{}", c.report(false)));
        }
    }
    assert!(
        notes > total / 10,
        "the kernel side saw notifier calls ({notes} over {total} operations)"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("{total} random operations, all identical; {notes} notifier calls");
}

#[test]
fn the_comparison_catches_a_simulation_that_diverges() {
    let _one = one_runner();
    let Some(k) = kernel() else { return };
    // The simulation as it was before new mappings merged: the second mapping is made
    // incompatible, which splits the range the way the old simulation did.
    let ops = script::parse("mmap 0 4 anon rw\nmmap 4 4 anon rw\nmadvise 0 8 dontneed\n").unwrap();
    let broken =
        script::parse("mmap 0 4 anon rw\nmmap 4 4 anon ro\nmadvise 0 8 dontneed\n").unwrap();
    let c = Comparison {
        kernel: k.run(&ops).expect("kernel run"),
        sim: sim::run(&broken),
        ops,
    };
    assert_eq!(c.differences(), [2], "{c}");
    assert_eq!(c.kernel[2].to_string(), "ok P[0,8)");
    assert_eq!(c.sim[2].to_string(), "ok P[0,4) P[4,8)");
    assert!(c.report(false).contains("! madvise 0 8 dontneed"));
}

fn ours_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn nothing_is_left_behind_even_after_a_panic_or_a_killed_runner() {
    let _one = one_runner();
    let Some(k) = kernel() else { return };
    let instance = k.instance().to_path_buf();
    let instances = instance.parent().expect("instances dir").to_path_buf();
    assert!(instance.is_dir());
    k.run(&script::random(7, 20)).expect("kernel run");
    // A panic in the middle of a run still drops the guards.
    let r = std::thread::spawn(move || {
        let _k = k;
        panic!("deliberate");
    })
    .join();
    assert!(r.is_err());
    assert!(!instance.exists(), "instance removed after the panic");

    // What a killed runner left: an instance named after a pid that no longer exists.
    let mut gone = std::process::Command::new("true").spawn().expect("spawn");
    let dead = gone.id();
    gone.wait().expect("wait");
    if instances.is_dir() {
        let stale = instances.join(format!("{PREFIX}{dead}-0"));
        std::fs::create_dir(&stale).expect("make a stale instance");
        let k2 = kernel().expect("available a moment ago");
        assert!(!stale.exists(), "the stale instance was removed");
        drop(k2);
    }
    let mine = format!("{PREFIX}{}-", std::process::id());
    // Other tests of this binary may hold a runner: only ours must be gone.
    let left: Vec<String> = ours_in(&instances)
        .into_iter()
        .filter(|n| n.starts_with(&mine) && *n == instance.file_name().unwrap().to_string_lossy())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
