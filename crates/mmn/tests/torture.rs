//! `mmn torture` end to end: each deliberately broken secondary is caught (exit status 1
//! and a replay command), and a one-thread run replays exactly from its seed.

use std::process::Command;

fn mmn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(args)
        .output()
        .expect("run mmn")
}

#[test]
fn each_broken_secondary_is_caught_within_ten_seconds() {
    for broken in [
        "never-tears-down",
        "ignores-retry",
        "installs-during-invalidation",
        "never-flushes",
    ] {
        let start = std::time::Instant::now();
        let out = mmn(&[
            "torture",
            "--secs",
            "3",
            "--secondaries",
            "",
            "--broken",
            broken,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{broken}: {stderr}");
        assert!(
            stderr.contains("coherence violations"),
            "{broken}: {stderr}"
        );
        assert!(
            stderr.contains("--threads 1 --seed 1 --ops") && stderr.contains(broken),
            "{broken}: no replay command in {stderr}"
        );
        assert!(
            start.elapsed().as_secs() < 10,
            "{broken} took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn a_one_thread_run_replays_exactly_from_its_seed() {
    let args = [
        "torture",
        "--threads",
        "1",
        "--seed",
        "42",
        "--ops",
        "3000",
        "--secondaries",
        "",
        "--broken",
        "ignores-retry",
        "--json",
    ];
    let strip = |o: std::process::Output| {
        let s = String::from_utf8(o.stdout).unwrap();
        // Everything but the timing.
        let t = s.find("\"elapsed_secs\"").unwrap();
        let u = s[t..].find(',').unwrap() + t;
        format!("{}{}", &s[..t], &s[u..])
    };
    let a = strip(mmn(&args));
    let b = strip(mmn(&args));
    assert!(a.contains("\"total_ops\":3000"), "{a}");
    assert_eq!(a, b, "two runs of one seed differ");
}

#[test]
fn bad_options_are_usage_errors() {
    for args in [
        &["torture", "--secs", "0"][..],
        &["torture", "--broken", "nope"],
        &["torture", "--secondaries", "gpu"],
        &["torture", "--threads", "0"],
    ] {
        let out = mmn(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn all_five_secondaries_stay_coherent_and_every_event_and_retry_happens() {
    let out = mmn(&["torture", "--secs", "4", "--seed", "3", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{stdout}");
    assert!(stdout.contains("\"violation_count\":0"), "{stdout}");
    for event in [
        "Unmap",
        "Clear",
        "ProtectionVma",
        "ProtectionPage",
        "SoftDirty",
        "Migrate",
        "Exclusive",
        "Release (list)",
    ] {
        assert!(
            stdout.contains(&format!("\"{event}\":")),
            "no {event}: {stdout}"
        );
    }
    for secondary in ["kvm", "sva", "hmm", "xpmem", "odp"] {
        let at = stdout
            .find(&format!("\"{secondary}\":{{"))
            .unwrap_or_else(|| panic!("no {secondary}: {stdout}"));
        let rest = &stdout[at..];
        let fills: u64 = field(rest, "fills");
        assert!(fills > 0, "{secondary} never filled: {rest}");
        // The SVA TLB's race window (a flush between its table walk and its insert) is a
        // few instructions wide: it retries a few dozen times a minute, so a short run
        // may see none. The others retry thousands of times in seconds.
        if secondary != "sva" {
            assert!(
                field(rest, "retries") > 0,
                "{secondary} never retried: {rest}"
            );
        }
    }
}

fn field(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let at = json.find(&key).unwrap() + key.len();
    json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}
