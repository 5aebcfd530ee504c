//! `mmn torture --real` end to end: a run of the real registration cache finds no stale
//! hit, each deliberately broken cache configuration is caught, and options that do not
//! apply to the real torture are refused. A machine without userfaultfd, io_uring or
//! frame numbers in pagemap skips (the binary prints `SKIPPED`).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mmn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(args)
        .output()
        .expect("run mmn")
}

/// The report line `name   count` as a number.
fn count(stdout: &str, name: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.trim().parse().ok()
    })
}

/// Whether the run was skipped (then says so for the test).
fn skipped(test: &str, out: &Output) -> bool {
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find(|l| l.starts_with("SKIPPED")) {
        Some(line) => {
            let reason = line.trim_start_matches("SKIPPED").trim_start_matches(':');
            println!("SKIPPED {test}:{reason}");
            assert_eq!(out.status.code(), Some(0), "a skipped run exits 0");
            true
        }
        None => false,
    }
}

#[test]
fn a_real_run_finds_no_stale_hit() {
    let out = mmn(&["torture", "--real", "--secs", "3", "--threads", "4"]);
    if skipped("a_real_run_finds_no_stale_hit", &out) {
        return;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("stale hits: 0"), "{stdout}");
    for name in ["lookups", "hits", "misses", "unmaps", "pages compared"] {
        let n = count(&stdout, name).unwrap_or_else(|| panic!("no {name} in {stdout}"));
        assert!(n > 0, "{name} is 0:\n{stdout}");
    }
}

#[test]
fn each_broken_cache_is_caught() {
    for broken in ["gate", "reuse-check"] {
        let start = Instant::now();
        let out = mmn(&["torture", "--real", "--secs", "10", "--broken", broken]);
        if skipped("each_broken_cache_is_caught", &out) {
            return;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{broken}: {stdout}\n{stderr}");
        assert!(stderr.contains("stale hit"), "{broken}: {stderr}");
        assert!(
            stdout.contains("stale: thread") && stdout.contains("pinned frame"),
            "{broken}: the first stale hit is not shown: {stdout}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{broken} took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn options_of_the_simulation_are_refused_with_real() {
    for extra in [
        &["--ops", "10"][..],
        &["--json"][..],
        &["--secondaries", "kvm"][..],
    ] {
        let mut args = vec!["torture", "--real"];
        args.extend_from_slice(extra);
        let out = mmn(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("cannot be used with"),
            "{extra:?}: {stderr}"
        );
    }
    let out = mmn(&[
        "torture",
        "--real",
        "--broken",
        "never-flushes",
        "--secs",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("gate, reuse-check"), "{stderr}");
    let out = mmn(&["torture", "--real", "--secs", "-1"]);
    assert_eq!(out.status.code(), Some(2));
}
