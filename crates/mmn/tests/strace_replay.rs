//! `mmn replay` of strace traces: traces of real programs recorded now (a Python startup,
//! a C compiler run, a multi-threaded C program) replay with every secondary attached and
//! no violation; a broken secondary is caught on the same traces; a hand-written trace
//! with split calls, forks, threads, a `vfork` + `execve`, failures and junk replays to
//! exactly the operations it names.
//!
//! The real-program tests print `SKIPPED: reason` and pass when strace cannot trace here
//! (not installed, or ptrace not permitted) or the program is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mmn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(args)
        .output()
        .expect("run mmn")
}

/// A fresh directory for this test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmn-strace-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

fn works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why strace cannot record here, if it cannot.
fn strace_missing() -> Option<String> {
    if !works("strace", &["-V"]) {
        return Some("strace is not installed (scripts/test.sh installs it)".into());
    }
    if !works("strace", &["-f", "-o", "/dev/null", "true"]) {
        return Some("strace cannot trace here (ptrace not permitted)".into());
    }
    None
}

/// Records `program args` with the flags `mmn replay` documents; returns the trace.
fn record(dir: &Path, name: &str, program: &str, args: &[&str]) -> PathBuf {
    let trace = dir.join(format!("{name}.strace"));
    let out = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=%memory,%process", "-o"])
        .arg(&trace)
        .arg(program)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run strace");
    assert!(
        out.status.success(),
        "{program} {args:?} under strace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    trace
}

/// The value after `"key":` inside the object at `path` of a JSON text (numbers and
/// booleans; the report's keys are unique within each object).
fn json_at<'a>(json: &'a str, path: &[&str]) -> Option<&'a str> {
    let mut scope = json;
    for (i, key) in path.iter().enumerate() {
        let pat = format!("\"{key}\":");
        let at = find_top(scope, &pat)?;
        let rest = &scope[at + pat.len()..];
        let value = &rest[..value_end(rest)];
        if i + 1 == path.len() {
            return Some(value.trim());
        }
        scope = value;
    }
    None
}

/// The length of the JSON value at the start of `s` (an object or array whole).
fn value_end(s: &str) -> usize {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut prev = ' ';
    for (j, c) in s.char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '{' | '[' if !in_str => depth += 1,
            '}' | ']' if !in_str => {
                if depth == 0 {
                    return j;
                }
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            ',' if !in_str && depth == 0 => return j,
            _ => {}
        }
        prev = c;
    }
    s.len()
}

/// The position of `pat` at nesting depth 1 of `obj` (its own keys, not nested ones).
fn find_top(obj: &str, pat: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut prev = ' ';
    for (i, c) in obj.char_indices() {
        if !in_str && depth == 1 && obj[i..].starts_with(pat) {
            return Some(i);
        }
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '{' | '[' if !in_str => depth += 1,
            '}' | ']' if !in_str => depth -= 1,
            _ => {}
        }
        prev = c;
    }
    None
}

fn num(json: &str, path: &[&str]) -> u64 {
    json_at(json, path).map_or(0, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{path:?} is not a number: {v}"))
    })
}

/// Replays `trace` with every secondary; requires exit 0 and no violation; returns the
/// JSON report.
fn replay_clean(trace: &Path) -> String {
    let out = mmn(&["replay", "--json", trace.to_str().expect("utf-8 path")]);
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}: {}\n{json}",
        trace.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(num(&json, &["violation_count"]), 0, "{json}");
    assert_eq!(num(&json, &["trace", "unparsed_lines"]), 0, "{json}");
    assert_eq!(num(&json, &["untranslatable"]), 0, "{json}");
    assert_eq!(json_at(&json, &["sim_errors"]), Some("{}"), "{json}");
    assert_eq!(json_at(&json, &["device_errors"]), Some("{}"), "{json}");
    for s in ["kvm", "sva", "hmm", "xpmem", "odp"] {
        assert!(
            num(&json, &["secondaries", s, "accesses"]) > 0,
            "{s} made no access: {json}"
        );
        assert!(
            num(&json, &["secondaries", s, "invalidations"]) > 0,
            "{s} saw no invalidation: {json}"
        );
    }
    assert!(num(&json, &["checks"]) > 0, "{json}");
    assert!(num(&json, &["events", "unmap"]) > 0, "{json}");
    assert!(num(&json, &["events", "protection_vma"]) > 0, "{json}");
    println!(
        "{}: {} bytes, {} lines, {} calls; {} operations, {} checks, {} violations, {} calls/s",
        trace.display(),
        num(&json, &["trace", "bytes"]),
        num(&json, &["trace", "lines"]),
        num(&json, &["trace", "calls"]),
        num(&json, &["total_ops"]),
        num(&json, &["checks"]),
        num(&json, &["violation_count"]),
        num(&json, &["calls_per_sec"]),
    );
    json
}

/// The deliberately broken secondaries a sequential replay can catch. (`ignores-retry`
/// only loses a race, which a replay in one thread never runs.)
const CAUGHT: [&str; 3] = [
    "never-tears-down",
    "installs-during-invalidation",
    "never-flushes",
];

fn replay_broken(trace: &Path, broken: &str) {
    let out = mmn(&[
        "replay",
        "--json",
        "--broken",
        broken,
        trace.to_str().expect("utf-8 path"),
    ]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{broken}: {json}");
    assert!(num(&json, &["violation_count"]) > 0, "{broken}: {json}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("coherence violations"),
        "{broken}"
    );
}

#[test]
fn python_startup_replays_cleanly() {
    if let Some(why) = strace_missing() {
        println!("SKIPPED: {why}");
        return;
    }
    if !works("python3", &["-c", "pass"]) {
        println!("SKIPPED: python3 is not installed");
        return;
    }
    let dir = scratch("python");
    let trace = record(&dir, "python", "python3", &["-c", "import json, os"]);
    let json = replay_clean(&trace);
    assert!(num(&json, &["ops", "mmap_file_private"]) >= 10, "{json}");
    assert!(num(&json, &["ops", "mmap_anon_private"]) >= 1, "{json}");
    assert!(num(&json, &["ops", "mprotect"]) >= 3, "{json}");
    assert!(num(&json, &["ops", "execve"]) >= 1, "{json}");
    assert!(num(&json, &["ops", "brk_grow"]) >= 1, "{json}");
    for b in CAUGHT {
        replay_broken(&trace, b);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_c_compiler_run_replays_cleanly() {
    if let Some(why) = strace_missing() {
        println!("SKIPPED: {why}");
        return;
    }
    if !works("cc", &["--version"]) {
        println!("SKIPPED: no C compiler (cc)");
        return;
    }
    let dir = scratch("cc");
    std::fs::write(
        dir.join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n",
    )
    .expect("write hello.c");
    let trace = record(&dir, "cc", "cc", &["-O1", "-o", "hello", "hello.c"]);
    let json = replay_clean(&trace);
    // The driver starts the compiler proper, the assembler and the linker: each a task
    // (vfork, sharing the driver's memory until its execve) with a fresh address space.
    assert!(num(&json, &["trace", "address_spaces"]) >= 3, "{json}");
    assert!(num(&json, &["ops", "thread_or_vfork"]) >= 2, "{json}");
    assert!(num(&json, &["ops", "execve"]) >= 3, "{json}");
    assert!(num(&json, &["ops", "mmap_file_private"]) >= 10, "{json}");
    let _ = std::fs::remove_dir_all(dir);
}

const THREADS_C: &str = r#"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Each thread grows a large block (malloc serves it with mmap, realloc may use mremap)
   and maps, writes, protects, advises away and unmaps a small region of its own. */
static void *work(void *arg) {
    for (int i = 0; i < 20; i++) {
        size_t n = (size_t)(i % 5 + 1) * 256 * 1024;
        char *p = malloc(n);
        if (!p) return 0;
        memset(p, i, n);
        char *r = realloc(p, 2 * n);
        if (!r) { free(p); return 0; }
        memset(r, i + 1, 2 * n);
        free(r);
        char *q = mmap(0, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (q == MAP_FAILED) return 0;
        memset(q, i, 65536);
        mprotect(q, 65536, PROT_READ);
        madvise(q, 4096, MADV_DONTNEED);
        munmap(q, 65536);
    }
    return arg;
}

int main(void) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], 0, work, 0);
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    return 0;
}
"#;

#[test]
fn a_multi_threaded_program_replays_cleanly() {
    if let Some(why) = strace_missing() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = scratch("threads");
    std::fs::write(dir.join("threads.c"), THREADS_C).expect("write threads.c");
    if !works(
        "cc",
        &[
            "-O1",
            "-pthread",
            "-o",
            dir.join("threads").to_str().expect("utf-8"),
            dir.join("threads.c").to_str().expect("utf-8"),
        ],
    ) {
        println!("SKIPPED: no C compiler (cc) able to build a pthread program");
        return;
    }
    let program = dir.join("threads");
    let trace = record(&dir, "threads", program.to_str().expect("utf-8"), &[]);
    let json = replay_clean(&trace);
    // Four threads, one address space; each thread's 20 rounds are in the trace.
    assert_eq!(num(&json, &["trace", "tasks"]), 5, "{json}");
    assert_eq!(num(&json, &["trace", "address_spaces"]), 1, "{json}");
    assert_eq!(num(&json, &["ops", "thread_or_vfork"]), 4, "{json}");
    assert!(num(&json, &["ops", "madvise_dontneed"]) >= 80, "{json}");
    assert!(num(&json, &["ops", "munmap"]) >= 80, "{json}");
    assert!(num(&json, &["ops", "mprotect"]) >= 80, "{json}");
    assert!(num(&json, &["events", "clear"]) >= 80, "{json}");
    for b in CAUGHT {
        replay_broken(&trace, b);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A trace written by hand: every case of the parser and the replay, with the
/// operations and events it must produce.
const HAND_WRITTEN: &str = r#"100 execve("/bin/prog", ["prog"], 0x7ffd0 /* 3 vars */) = 0
100 brk(NULL)                         = 0x555555559000
100 mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000000000
100 mmap(NULL, 1099511627776, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = -1 ENOMEM (Cannot allocate memory)
100 mmap(NULL, 16384, PROT_READ, MAP_PRIVATE, 3</lib/libx.so>, 0) = 0x7f0000010000
100 mmap(0x7f0000011000, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_FIXED|MAP_DENYWRITE, 3</lib/libx.so>, 0x1000) = 0x7f0000011000
100 mprotect(0x555555557000, 4096, PROT_READ) = 0
100 brk(0x55555557a000)               = 0x55555557a000
100 brk(0x555555569000)               = 0x555555569000
this line is not strace output
100 madvise(0x7f0000000000, 4096, MADV_DONTNEED) = 0
100 madvise(0x7f0000000000, 8192, MADV_HUGEPAGE) = 0
100 mremap(0x7f0000000000, 8192, 65536, MREMAP_MAYMOVE <unfinished ...>
101 exit_group(0)                     = ?
100 <... mremap resumed>)             = 0x7f0000100000
100 shmat(7, NULL, 0)                 = 0x7f0000200000
100 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, child_tid=0x7f38, exit_signal=0, stack=0x7f38166d3000, stack_size=0x7fff80} => {parent_tid=[102]}, 88) = 102
102 munmap(0x7f0000010000, 16384)     = 0
100 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x7f) = 103
103 mmap(NULL, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000300000
103 exit_group(0)                     = ?
103 +++ exited with 0 +++
100 vfork( <unfinished ...>
104 execve("/bin/true", ["true"], 0x7ffd0 /* 3 vars */ <unfinished ...>
100 <... vfork resumed>)              = 104
104 <... execve resumed>)             = 0
104 brk(NULL)                         = 0x560000000000
104 brk(0x560000021000)               = 0x560000021000
104 +++ exited with 0 +++
102 +++ exited with 0 +++
100 mmap(NULL, 4096, PROT_READ, MAP_SHARED, 4, 0 <unfinished ...>
100 +++ killed by SIGKILL +++
"#;

#[test]
fn a_hand_written_trace_replays_to_exactly_its_operations() {
    let dir = scratch("hand");
    let trace = dir.join("hand.strace");
    std::fs::write(&trace, HAND_WRITTEN).expect("write the trace");
    let out = mmn(&["replay", "--json", trace.to_str().expect("utf-8")]);
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{json}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = |k: &str| num(&json, &["ops", k]);
    assert_eq!(ops("mmap_anon_private"), 2, "{json}"); // 100's, and 103's in its fork
    assert_eq!(ops("mmap_file_private"), 2, "{json}");
    assert_eq!(ops("image_map"), 1, "{json}"); // the program's data, relocated
    assert_eq!(ops("mprotect"), 1, "{json}");
    assert_eq!(ops("brk_query"), 2, "{json}"); // 100's and 104's (after its execve)
    assert_eq!(ops("brk_grow"), 2, "{json}");
    assert_eq!(ops("brk_shrink"), 1, "{json}");
    assert_eq!(ops("madvise_dontneed"), 1, "{json}");
    assert_eq!(ops("mremap_move"), 1, "{json}");
    assert_eq!(ops("munmap"), 1, "{json}");
    assert_eq!(ops("thread_or_vfork"), 2, "{json}"); // the thread 102 and the vfork 104
    assert_eq!(ops("fork"), 1, "{json}");
    assert_eq!(ops("execve"), 2, "{json}");
    assert_eq!(num(&json, &["total_ops"]), 19, "{json}");
    // 100 (after its execve, and with 102 and 104 until 104's execve), 103 (a fork),
    // 104 (after its execve).
    assert_eq!(num(&json, &["trace", "address_spaces"]), 3, "{json}");
    assert_eq!(num(&json, &["trace", "tasks"]), 5, "{json}");
    assert_eq!(num(&json, &["trace", "unparsed_lines"]), 1, "{json}");
    assert_eq!(num(&json, &["trace", "never_resumed"]), 1, "{json}");
    assert_eq!(num(&json, &["failed_in_trace", "mmap ENOMEM"]), 1, "{json}");
    assert_eq!(num(&json, &["unsupported", "shmat"]), 1, "{json}");
    assert_eq!(
        num(&json, &["no_effect", "madvise MADV_HUGEPAGE"]),
        1,
        "{json}"
    );
    assert_eq!(num(&json, &["untranslatable"]), 0, "{json}");
    assert_eq!(json_at(&json, &["sim_errors"]), Some("{}"), "{json}");
    // Invalidations: MAP_FIXED over the library's second page, brk's shrink, the munmap,
    // the move (two over the old range): Unmap; the RELRO mprotect; Clear for the
    // DONTNEED and for the copy-on-write break of the zero page there (the probes after
    // the DONTNEED read it back as the zero page, the touch after the move writes it);
    // the fork's copy-on-write protection of 100's written private memory.
    let ev = |k: &str| num(&json, &["events", k]);
    assert_eq!(ev("unmap"), 5, "{json}");
    assert_eq!(ev("protection_vma"), 1, "{json}");
    assert_eq!(ev("clear"), 2, "{json}");
    assert!(ev("protection_page") >= 1, "{json}");
    assert_eq!(ev("release"), 3, "{json}");
    assert_eq!(num(&json, &["violation_count"]), 0, "{json}");
    // Every secondary touched the pages the calls imply.
    for s in ["kvm", "sva", "hmm", "xpmem", "odp"] {
        assert!(
            num(&json, &["secondaries", s, "accesses"]) > 0,
            "{s}: {json}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn errors_are_reported_in_one_style() {
    let out = mmn(&["replay", "/nonexistent/trace"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot read /nonexistent/trace"),
        "{err}"
    );
    let dir = scratch("errors");
    let trace = dir.join("t");
    std::fs::write(&trace, "1 brk(NULL) = 0x1000\n").expect("write");
    let t = trace.to_str().expect("utf-8");
    let out = mmn(&["replay", "--secondaries", "kvm,kvm", t]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("named twice"));
    let out = mmn(&["replay", "--broken", "nope", t]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown --broken"));
    let out = mmn(&["replay", "--secondaries", "", t]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secondary"));
    let _ = std::fs::remove_dir_all(dir);
}
