//! Exact replay: a scheduled torture is a function of its seed, options and schedule, with
//! every secondary attached (XPMEM's consumer and fault server included); a failing
//! multi-worker run's replay file re-runs it to the same first violation; Ctrl-C leaves a
//! partial report and a replay file.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// The report without what depends on time or on the file name.
fn counters(mut v: Value) -> Value {
    for k in ["elapsed_secs", "replay_file", "reproduced"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mmn-test-{name}-{}", std::process::id()))
}

#[test]
fn runs_with_every_secondary_attached_are_deterministic() {
    // One worker, and two and three workers under the schedule: twice each, identical
    // counters down to the checker's checks and every event. One worker without the
    // schedule too: XPMEM's consumer and fault server are then free-running threads, and
    // still add no nondeterminism (a request is answered once the fault server is done).
    for threads in ["1", "2", "3", "parallel"] {
        let (threads, mode) = match threads {
            "parallel" => ("1", "--parallel"),
            t => (t, "--hot=4"),
        };
        let args = [
            "torture",
            mode,
            "--threads",
            threads,
            "--seed",
            "7",
            "--ops",
            "4000",
            "--json",
        ];
        let a = json(&mmn(&args));
        let b = json(&mmn(&args));
        assert_eq!(a["total_ops"], 4000);
        for s in ["kvm", "sva", "hmm", "xpmem", "odp"] {
            assert!(a["secondaries"][s]["fills"].as_u64() > Some(0), "{s}: {a}");
        }
        assert_eq!(
            counters(a),
            counters(b),
            "--threads {threads}: two runs differ"
        );
    }
}

#[test]
fn a_failing_multi_worker_run_replays_to_the_same_first_violation() {
    for (broken, seed, threads) in [
        ("ignores-retry", "5", "3"),
        ("installs-during-invalidation", "0x2a", "2"),
    ] {
        let file = temp(&format!("replay-{broken}"));
        let path = file.to_str().unwrap();
        let out = mmn(&[
            "torture",
            "--threads",
            threads,
            "--seed",
            seed,
            "--secs",
            "5",
            "--broken",
            broken,
            "--replay-file",
            path,
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(1), "{broken} not caught");
        let run = json(&out);
        assert_eq!(run["replay_file"], path);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# mmn replay v1\n"), "{text}");
        assert!(text.contains(&format!("threads {threads}\n")), "{text}");

        let out = mmn(&["replay", path, "--json"]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("reproduced the first violation"),
            "{stderr}"
        );
        let again = json(&out);
        assert_eq!(again["reproduced"], true);
        let first = &run["first_violation"];
        assert!(first["op_index"].is_u64(), "{run}");
        // Same operation number, kind, address, secondary, worker; and the whole report.
        assert_eq!(&again["first_violation"], first);
        assert_eq!(counters(again), counters(run.clone()), "{broken}");

        // The same run with its schedule changed is another run: the replay says so
        // (or finds another first violation), and never claims to reproduce it.
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with("schedule "))
            .unwrap();
        let mut tampered = lines[..=at].join("\n");
        tampered.push('\n');
        let body: Vec<String> = lines[at + 1..]
            .join(" ")
            .split_whitespace()
            .map(|tok| {
                // Swap every decision between the first two workers.
                let (t, n) = tok.split_once('.').unwrap();
                let t = match t {
                    "0" => "1",
                    "1" => "0",
                    t => t,
                };
                format!("{t}.{n}")
            })
            .collect();
        tampered.push_str(&body.join(" "));
        tampered.push('\n');
        std::fs::write(&file, tampered).unwrap();
        let out = mmn(&["replay", path, "--json"]);
        let v = json(&out);
        if v["first_violation"] != *first {
            assert_eq!(out.status.code(), Some(2), "{v}");
            assert_eq!(v["reproduced"], false);
        }
        let _ = std::fs::remove_file(&file);
    }
}

#[test]
fn replay_refuses_other_files() {
    let file = temp("not-replay");
    std::fs::write(&file, "hello\nworld\n").unwrap();
    let out = mmn(&["replay", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("neither an mmn replay file") && stderr.contains("nor a strace trace"),
        "{stderr}"
    );
    // Strace-only options on a torture replay file are a usage error.
    std::fs::write(&file, "# mmn replay v1\n").unwrap();
    let out = mmn(&["replay", "--touch-pages", "2", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("strace traces only"), "{stderr}");
    // A truncated replay file is refused, not half replayed.
    std::fs::write(
        &file,
        "# mmn replay v1\nseed 1\nthreads 2\nsecondaries kvm\nbroken -\nhot 4\n\
         keep_going false\nops 10\nviolations 0\nfirst none\nschedule 3\n0.1 1.1\n",
    )
    .unwrap();
    let out = mmn(&["replay", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn ctrl_c_prints_a_partial_report_and_a_replay_file_that_replays() {
    let file = temp("sigint");
    let child = Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args([
            "torture",
            "--secs",
            "60",
            "--seed",
            "11",
            "--replay-file",
            file.to_str().unwrap(),
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mmn");
    std::thread::sleep(Duration::from_millis(1500));
    let sent = Instant::now();
    // SAFETY: signals our own child, whose pid we hold (not yet waited for).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(sent.elapsed() < Duration::from_secs(20), "slow to stop");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted after"), "{stderr}");
    assert!(stderr.contains("(seed 11)"), "{stderr}");
    let v = json(&out);
    assert_eq!(v["interrupted"], true);
    assert_eq!(v["seed"], 11);
    assert!(v["total_ops"].as_u64() > Some(0), "{v}");
    assert_eq!(v["violation_count"], 0);
    assert_eq!(v["replay_file"], file.to_str().unwrap());

    // The partial run replays: the same operations, no violation.
    let out = mmn(&["replay", file.to_str().unwrap(), "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("reproduced"), "{stderr}");
    let again = json(&out);
    assert_eq!(again["total_ops"], v["total_ops"]);
    let mut a = counters(again);
    let mut b = counters(v);
    for x in [&mut a, &mut b] {
        x.as_object_mut().unwrap().remove("interrupted");
    }
    assert_eq!(a, b);
    let _ = std::fs::remove_file(&file);
}
