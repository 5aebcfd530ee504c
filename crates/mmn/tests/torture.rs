//! `mmn torture` end to end: every deliberately broken secondary is caught with all five
//! secondaries attached, in every one of 20 seeds; all five stay coherent and see every
//! event and retry; and the report (JSON keys, counts, plurals) is what it says.

use std::process::{Command, Output};

use serde_json::Value;

fn mmn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(args)
        .output()
        .expect("run mmn")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const BROKEN: [&str; 4] = [
    "never-tears-down",
    "ignores-retry",
    "installs-during-invalidation",
    "never-flushes",
];

#[test]
fn every_broken_secondary_is_caught_in_every_one_of_20_seeds_with_all_five_attached() {
    // 80 runs, each stopping at its first violation (a few hundred operations), on two
    // threads of the test.
    let cases: Vec<(&str, u64)> = BROKEN
        .iter()
        .flat_map(|b| (1..=20).map(move |s| (*b, s)))
        .collect();
    let failures: Vec<String> = std::thread::scope(|s| {
        let halves = cases.chunks(cases.len() / 2 + 1).map(|chunk| {
            s.spawn(move || {
                let mut bad = Vec::new();
                for &(broken, seed) in chunk {
                    let dir = std::env::temp_dir();
                    let file = dir.join(format!("mmn-test-{broken}-{seed}-{}", std::process::id()));
                    let file = file.to_str().unwrap();
                    let seed_s = seed.to_string();
                    let out = mmn(&[
                        "torture",
                        "--secs",
                        "3",
                        "--seed",
                        &seed_s,
                        "--broken",
                        broken,
                        "--replay-file",
                        file,
                        "--json",
                    ]);
                    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
                    let ok = out.status.code() == Some(1)
                        && json(&out)["violation_count"].as_u64() > Some(0)
                        && stderr.contains("coherence violation")
                        && stderr.contains(&format!("mmn replay {file}"))
                        && std::fs::read_to_string(file)
                            .is_ok_and(|t| t.starts_with("# mmn replay v1\n"));
                    let _ = std::fs::remove_file(file);
                    if !ok {
                        bad.push(format!("{broken} seed {seed}: {stderr}"));
                    }
                }
                bad
            })
        });
        halves
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "not caught:\n{}", failures.join("\n"));
}

#[test]
fn all_five_secondaries_stay_coherent_and_every_event_and_retry_happens() {
    let out = mmn(&["torture", "--secs", "3", "--seed", "3", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{v}");
    assert_eq!(v["violation_count"], 0, "{v}");
    assert_eq!(
        v["replay_file"],
        Value::Null,
        "a clean run writes no replay file"
    );
    for event in [
        "unmap",
        "unmap_non_blockable",
        "clear",
        "protection_vma",
        "protection_page",
        "soft_dirty",
        "migrate",
        "exclusive",
        "release_list",
    ] {
        assert!(v["events"][event].as_u64() > Some(0), "no {event}: {v}");
    }
    for secondary in ["kvm", "sva", "hmm", "xpmem", "odp"] {
        let s = &v["secondaries"][secondary];
        // Every secondary loses races: invalidations land between a fault's read of
        // the primary and its install, at the schedule points.
        for counter in ["fills", "retries", "invalidations", "accesses"] {
            assert!(s[counter].as_u64() > Some(0), "{secondary} {counter}: {v}");
        }
    }
}

#[test]
fn json_keys_are_snake_case_and_addresses_hex() {
    let out = mmn(&[
        "torture",
        "--ops",
        "3000",
        "--broken",
        "never-tears-down",
        "--keep-going",
        "--json",
        "--replay-file",
        std::env::temp_dir()
            .join(format!("mmn-test-keys-{}", std::process::id()))
            .to_str()
            .unwrap(),
    ]);
    let v = json(&out);
    let _ = std::fs::remove_file(v["replay_file"].as_str().unwrap());
    let snake = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    for section in ["ops", "events", "secondaries"] {
        for k in v[section].as_object().unwrap().keys() {
            assert!(snake(k), "{section} key {k:?}");
        }
    }
    for k in v.as_object().unwrap().keys() {
        assert!(snake(k), "top-level key {k:?}");
    }
    assert!(v["ops"]["cpu_read"].as_u64() > Some(0), "{v}");
    assert!(v["secondaries"]["never_tears_down"].is_object(), "{v}");
    let first = &v["violations"][0];
    assert!(first["addr"].as_str().unwrap().starts_with("0x"), "{first}");
    assert!(snake(first["kind"].as_str().unwrap()), "{first}");
    assert!(snake(first["op"].as_str().unwrap()), "{first}");
    assert_eq!(v["first_violation"]["addr"], first["addr"]);
}

#[test]
fn kept_violations_are_marked_truncated() {
    let file = std::env::temp_dir().join(format!("mmn-test-trunc-{}", std::process::id()));
    let out = mmn(&[
        "torture",
        "--ops",
        "20000",
        "--secondaries",
        "",
        "--broken",
        "never-tears-down",
        "--keep-going",
        "--replay-file",
        file.to_str().unwrap(),
        "--json",
    ]);
    let _ = std::fs::remove_file(&file);
    let v = json(&out);
    let count = v["violation_count"].as_u64().unwrap();
    let kept = v["violations"].as_array().unwrap().len() as u64;
    assert!(count > kept, "{count} found, {kept} kept");
    assert_eq!(v["truncated"], true);
    assert_eq!(v["total_ops"], 20000, "--keep-going runs the whole budget");
    // The text report says so too.
    let out = mmn(&[
        "torture",
        "--ops",
        "20000",
        "--secondaries",
        "",
        "--broken",
        "never-tears-down",
        "--keep-going",
        "--replay-file",
        file.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("violations: {count} (the first {kept} kept)")),
        "{text}"
    );
    // An untruncated report is not marked.
    let out = mmn(&["torture", "--ops", "200", "--json"]);
    assert_eq!(json(&out)["truncated"], false);
}

#[test]
fn ops_is_exact_whatever_the_number_of_workers() {
    for (threads, ops) in [
        ("1", "10"),
        ("2", "10"),
        ("2", "11"),
        ("7", "3"),
        ("4", "1000"),
    ] {
        let out = mmn(&["torture", "--threads", threads, "--ops", ops, "--json"]);
        assert_eq!(out.status.code(), Some(0));
        let v = json(&out);
        assert_eq!(v["total_ops"].to_string(), ops, "--threads {threads}: {v}");
        let sum: u64 = v["ops"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(sum.to_string(), ops);
    }
    // The same with truly parallel workers.
    let out = mmn(&[
        "torture",
        "--parallel",
        "--threads",
        "4",
        "--ops",
        "500",
        "--json",
    ]);
    assert_eq!(json(&out)["total_ops"], 500);
}

#[test]
fn the_broken_mirror_counts_its_invalidations() {
    let file = std::env::temp_dir().join(format!("mmn-test-inval-{}", std::process::id()));
    let out = mmn(&[
        "torture",
        "--ops",
        "2000",
        "--secondaries",
        "",
        "--broken",
        "ignores-retry",
        "--keep-going",
        "--replay-file",
        file.to_str().unwrap(),
        "--json",
    ]);
    let _ = std::fs::remove_file(&file);
    let v = json(&out);
    assert!(
        v["secondaries"]["ignores_retry"]["invalidations"].as_u64() > Some(0),
        "{v}"
    );
    let text = String::from_utf8_lossy(
        &mmn(&[
            "torture",
            "--ops",
            "2000",
            "--secondaries",
            "",
            "--broken",
            "never-tears-down",
            "--replay-file",
            file.to_str().unwrap(),
        ])
        .stdout,
    )
    .to_string();
    let _ = std::fs::remove_file(&file);
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("never-tears-down"))
        .unwrap_or_else(|| panic!("{text}"))
        .split_whitespace()
        .collect();
    assert_ne!(row[4], "0", "invalidate column: {row:?}");
}

#[test]
fn plurals_are_right() {
    let out = mmn(&["torture", "--ops", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("1 operation in "), "{text}");
    let out = mmn(&["torture", "--ops", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("2 operations in "), "{text}");
}

#[test]
fn any_u64_seed_is_accepted_in_decimal_or_hex() {
    for (arg, want) in [
        ("--seed=-1", u64::MAX),
        ("--seed=0xffffffffffffffff", u64::MAX),
        ("--seed=18446744073709551615", u64::MAX),
        ("--seed=0X2A", 42),
        ("--seed=0", 0),
    ] {
        let out = mmn(&["torture", arg, "--ops", "20", "--json"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{arg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json(&out)["seed"].as_u64(), Some(want), "{arg}");
    }
    // The two spellings of one seed are one run.
    let strip = |out: Output| {
        let mut v = json(&out);
        v["elapsed_secs"] = Value::Null;
        v
    };
    assert_eq!(
        strip(mmn(&["torture", "--seed", "-1", "--ops", "300", "--json"])),
        strip(mmn(&[
            "torture",
            "--seed",
            "0xFFFF_FFFF_FFFF_FFFF",
            "--ops",
            "300",
            "--json"
        ]))
    );
}

#[test]
fn bad_options_are_usage_errors_in_one_style() {
    for (args, says) in [
        (
            &["torture", "--secs", "0"][..],
            "positive number of seconds",
        ),
        (&["torture", "--broken", "nope"], "one of: never-tears-down"),
        (&["torture", "--secondaries", "gpu"], "unknown secondary"),
        (&["torture", "--secondaries", "kvm,kvm"], "twice"),
        (&["torture", "--secondaries", "kvm,hmm,kvm"], "twice"),
        (&["torture", "--threads", "0"], "--threads"),
        (&["torture", "--seed", "abc"], "64-bit seed"),
        (&["torture", "--seed", "0x1ffffffffffffffff"], "64-bit seed"),
        (&["torture", "--secondaries", ""], "nothing to torture"),
        (&["demo", "--fillers", "0"], "--fillers"),
        (&["demo", "--secs=-1"], "seconds"),
        (&["demo", "--pages", "0"], "--pages"),
    ] {
        let out = mmn(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            stderr.contains("For more information, try '--help'"),
            "{args:?}: {stderr}"
        );
    }
}
