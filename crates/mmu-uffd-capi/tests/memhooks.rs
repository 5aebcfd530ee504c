//! The harness of `tests/libfabric.rs` (libfabric's cache order, every kind of change to
//! the memory, per-page tokens, stale hits counted) against libfabric 1.17's OWN memory
//! monitors: `tests/c/memhooks_harness.c`, linked statically with the installed
//! `libfabric.a` (its monitors are not exported by `libfabric.so`). Prints one table:
//! stale hits / hits / misses per monitor:
//!
//! - `none`: no monitor (valid always true), the baseline;
//! - `memhooks`: libfabric's monitor that patches libc's munmap, mmap, mremap, madvise,
//!   ... (the harness's raw `syscall(SYS_munmap)` + `syscall(SYS_mmap)` bypass it), and the
//!   same with that change made through libc (`noraw`);
//! - `libfabric uffd`: libfabric's userfaultfd monitor (MISSING mode: a thread touching
//!   registered memory without pages may wait forever; the harness's watchdog then prints
//!   the counts so far and `hang=1`), run several times;
//! - `mmu-uffd`: this library's monitor through the import interface
//!   (`tests/c/libfabric_harness.c`), without and with `unsubscribe` inside `notify`.
//!
//! Asserted: zero stale hits with mmu-uffd, and that every row either ran or printed why
//! not. The other monitors' numbers are printed only. Skipped (printing why) without
//! libfabric's headers or `libfabric.a`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const THREADS: &str = "4";
const ITERATIONS: &str = "10000";
/// The C watchdog (seconds) for libfabric's monitors; the Rust one is twice that.
const WATCHDOG: u64 = 10;
const UFFD_RUNS: usize = 3;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cc() -> std::ffi::OsString {
    std::env::var_os("CC").unwrap_or_else(|| "cc".into())
}

/// `target/<profile>`, with `libmmu_uffd_capi.so` built (as in `tests/libfabric.rs`).
fn libs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps/<test>")
            .to_path_buf();
        if !dir.join("libmmu_uffd_capi.so").is_file() {
            let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
            let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cmd.args(["build", "-p", "mmu-uffd-capi", "--lib", "--target-dir"])
                .arg(dir.parent().expect("<target dir>/<profile>"))
                .current_dir(crate_dir());
            if profile != "debug" {
                cmd.args(["--profile", profile]);
            }
            assert!(cmd.status().expect("run cargo").success(), "{cmd:?} failed");
        }
        assert!(dir.join("libmmu_uffd_capi.so").is_file());
        dir
    })
}

fn work_dir() -> PathBuf {
    let d = libs().join("mmu-uffd-capi-memhooks");
    std::fs::create_dir_all(&d).expect("create the work directory");
    d
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pkg_config(args: &[&str]) -> Option<String> {
    let out = Command::new("pkg-config").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The linker arguments for libfabric.a and what it needs, or why there are none.
/// `pkg-config --libs --static libfabric` names the libraries libfabric.a needs; a
/// distribution may install only their run-time `lib<name>.so.<N>` (no development link),
/// so each is passed by its path when `lib<name>.so` is not there.
fn static_libfabric() -> Result<Vec<String>, String> {
    let libdir = pkg_config(&["--variable=libdir", "libfabric"])
        .ok_or("pkg-config does not know libfabric (install libfabric-dev)")?;
    let archive = Path::new(&libdir).join("libfabric.a");
    if !archive.is_file() {
        return Err(format!("{} is missing", archive.display()));
    }
    let libs = pkg_config(&["--libs", "--static", "libfabric"])
        .ok_or("pkg-config --libs --static libfabric failed")?;
    let dirs = [
        PathBuf::from(&libdir),
        PathBuf::from("/lib/x86_64-linux-gnu"),
        PathBuf::from("/usr/lib64"),
        PathBuf::from("/usr/lib"),
    ];
    let mut args = vec![archive.display().to_string()];
    for word in libs.split_whitespace() {
        let Some(name) = word.strip_prefix("-l") else {
            continue; // -L: libfabric's own directory, searched above
        };
        if name == "fabric" {
            continue;
        }
        let prefix = format!("lib{name}.so");
        let found = dirs.iter().find_map(|d| {
            if d.join(&prefix).exists() {
                return Some(format!("-l{name}"));
            }
            let mut versioned: Vec<PathBuf> = std::fs::read_dir(d)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{prefix}.")))
                })
                .collect();
            versioned.sort();
            versioned.first().map(|p| p.display().to_string())
        });
        args.push(found.unwrap_or_else(|| word.to_string()));
    }
    Ok(args)
}

/// Compiles a C harness; `link` are the arguments after the source.
fn compile(src: &str, link: &[String]) -> PathBuf {
    let exe = work_dir().join(src.trim_end_matches(".c"));
    let mut cmd = Command::new(cc());
    cmd.args([
        "-Wall", "-Wextra", "-Werror", "-std=c11", "-g", "-O2", "-pthread",
    ])
    .arg(crate_dir().join("tests/c").join(src))
    .args(link)
    .arg("-o")
    .arg(&exe);
    let out = cmd.output().expect("run cc");
    assert!(out.status.success(), "{cmd:?}\n{}", show(&out));
    exe
}

/// Runs a harness with a watchdog of `2 * WATCHDOG` seconds (the C one should fire
/// first); its stdout.
fn run(exe: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env_remove("FI_MR_CACHE_MONITOR")
        .env_remove("MMU_UFFD_FI_IMPORT")
        // (cargo's LD_LIBRARY_PATH names target/<profile>: it would win over the
        // programs' run path, which names the library they were linked with.)
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run the harness");
    let start = Instant::now();
    let killed = loop {
        if child.try_wait().expect("wait for the harness").is_some() {
            break false;
        }
        if start.elapsed() > Duration::from_secs(2 * WATCHDOG) {
            child.kill().expect("kill the harness");
            break true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("the harness's output");
    assert!(
        killed || out.status.success(),
        "{cmd:?} failed\n{}",
        show(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "{cmd:?}{}:\n{stdout}",
        if killed { " (killed)" } else { "" }
    );
    if killed && !stdout.contains("mode=") {
        return format!("SKIPPED: killed after {}s without a summary", 2 * WATCHDOG);
    }
    stdout
}

struct Row {
    monitor: String,
    /// `(stale, hits, misses, hang)`, or why the row did not run.
    result: Result<(u64, u64, u64, bool), String>,
    extra: String,
}

fn parse(monitor: &str, out: &str) -> Row {
    let Some(line) = out.lines().find(|l| l.starts_with("mode=")) else {
        let why = out
            .lines()
            .find(|l| l.starts_with("SKIPPED"))
            .unwrap_or_else(|| panic!("{monitor}: neither a summary nor a reason:\n{out}"));
        return Row {
            monitor: monitor.into(),
            result: Err(why.into()),
            extra: String::new(),
        };
    };
    let get =
        |key: &str| -> Option<&str> { line.split_whitespace().find_map(|w| w.strip_prefix(key)) };
    let num = |key: &str| -> u64 {
        get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {line}"))
    };
    Row {
        monitor: monitor.into(),
        result: Ok((
            num("stale="),
            num("hits="),
            num("misses="),
            get("hang=") == Some("1"),
        )),
        extra: get("stale_after=").unwrap_or("").to_string(),
    }
}

#[test]
fn libfabric_monitors() {
    let link = match static_libfabric() {
        Ok(l) => l,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let ours_link = [
        format!("-L{}", libs().display()),
        "-lmmu_uffd_capi".into(),
        format!("-Wl,-rpath,{}", libs().display()),
        "-lfabric".into(),
    ];
    // (The harness of tests/libfabric.rs: only its "uffd" and "uffd2" modes are used.)
    let ours = compile("libfabric_harness.c", &ours_link);
    // libfabric's monitors report to ofi_mr_cache_notify(): the harness takes those calls.
    let mut theirs_link = vec!["-Wl,--wrap=ofi_mr_cache_notify".to_string()];
    theirs_link.extend(link);
    let theirs = compile("memhooks_harness.c", &theirs_link);

    let wd = WATCHDOG.to_string();
    let common = [THREADS, ITERATIONS, wd.as_str()];
    let theirs_run = |mode: &str, extra: &[&str]| -> String {
        let mut args = vec![mode];
        args.extend(common);
        args.extend(extra);
        run(&theirs, &args)
    };
    let mut rows = vec![
        parse("none (baseline)", &theirs_run("none", &[])),
        parse("libfabric memhooks", &theirs_run("memhooks", &[])),
        parse(
            "libfabric memhooks, libc only",
            &theirs_run("memhooks", &["noraw"]),
        ),
    ];
    for i in 0..UFFD_RUNS {
        rows.push(parse(
            &format!("libfabric uffd (run {})", i + 1),
            &theirs_run("lfuffd", &[]),
        ));
    }
    let mmu = ["uffd", "uffd2"].map(|mode| run(&ours, &[mode, THREADS, ITERATIONS]));
    rows.push(parse("mmu-uffd", &mmu[0]));
    rows.push(parse("mmu-uffd, unsubscribe in notify", &mmu[1]));

    println!("\n{THREADS} threads x {ITERATIONS} iterations (2 lookups each)");
    println!(
        "{:<34} {:>8} {:>8} {:>8}  notes",
        "monitor", "stale", "hits", "misses"
    );
    for r in &rows {
        match &r.result {
            Ok((stale, hits, misses, hang)) => println!(
                "{:<34} {stale:>8} {hits:>8} {misses:>8}  {}{}",
                r.monitor,
                if *hang {
                    "HANGS (watchdog; counts until then) "
                } else {
                    ""
                },
                if *stale > 0 {
                    format!("stale after {}", r.extra)
                } else {
                    String::new()
                }
            ),
            Err(why) => println!("{:<34} not run: {why}", r.monitor),
        }
    }
    println!();

    for r in rows.iter().filter(|r| r.monitor.starts_with("mmu-uffd")) {
        match &r.result {
            // Without userfaultfd the mmu-uffd harness skips (and says so).
            Err(why) => println!("{}: {why}", r.monitor),
            Ok((stale, hits, misses, hang)) => {
                assert_eq!(*stale, 0, "stale hits with {}", r.monitor);
                assert!(*hits > 0 && *misses > 0 && !hang, "{}", r.monitor);
            }
        }
    }
    // The baseline needs nothing but the harness: it must have run, and seen stale hits.
    match &rows[0].result {
        Ok((stale, ..)) => assert!(*stale > 0, "the baseline should see stale hits"),
        Err(why) => panic!("the baseline did not run: {why}"),
    }
}

/// `target/release` with `libmmu_uffd_capi.so` built by `cargo build --release` (the
/// costs are measured against the optimized library whatever profile runs the test).
fn release_libs() -> PathBuf {
    let target = libs().parent().expect("<target dir>").to_path_buf();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "build",
        "--release",
        "-p",
        "mmu-uffd-capi",
        "--lib",
        "--target-dir",
    ])
    .arg(&target)
    .current_dir(crate_dir());
    assert!(cmd.status().expect("run cargo").success(), "{cmd:?} failed");
    let dir = target.join("release");
    assert!(dir.join("libmmu_uffd_capi.so").is_file());
    dir
}

/// What the C API costs per call (`tests/c/memhooks_costs.c` against the release
/// library): a hit + put with and without the reuse check, a miss, libfabric's `valid`
/// through the import monitor, and an empty system call as the floor. Medians of 201
/// rounds of 1000 calls; prints a table, asserts only that everything was measured.
/// A measurement, so not run by default:
/// `cargo test -p mmu-uffd-capi --test memhooks -- --ignored --nocapture costs`.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn costs() {
    if let Err(why) = static_libfabric() {
        println!("SKIPPED: {why}");
        return;
    }
    let release = release_libs();
    let link = [
        format!("-I{}", crate_dir().join("include").display()),
        format!("-L{}", release.display()),
        "-lmmu_uffd_capi".into(),
        format!("-Wl,-rpath,{}", release.display()),
        "-lfabric".into(),
    ];
    let exe = compile("memhooks_costs.c", &link);
    let out = run(&exe, &[]);
    if out.contains("SKIPPED") {
        return;
    }
    let lib = release.join("libmmu_uffd_capi.so");
    assert!(
        out.lines()
            .any(|l| l.strip_prefix("library: ").map(Path::new) == Some(lib.as_path())),
        "not run against {}:\n{out}",
        lib.display()
    );
    let mut rows: Vec<(String, [f64; 3])> = Vec::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let [name, med, p10, p90] = w[..] {
            if let (Ok(a), Ok(b), Ok(c)) = (med.parse(), p10.parse(), p90.parse()) {
                rows.push((name.to_string(), [a, b, c]));
            }
        }
    }
    let floor = rows
        .iter()
        .find(|(n, _)| n == "getppid")
        .map(|r| r.1[0])
        .expect("the getppid floor");
    println!(
        "\n{:<34} {:>10} {:>10} {:>10} {:>10}",
        "per call (ns)", "median", "p10", "p90", "/getppid"
    );
    for (name, [med, p10, p90]) in &rows {
        println!(
            "{name:<34} {med:>10.1} {p10:>10.1} {p90:>10.1} {:>10.2}",
            med / floor
        );
    }
    for name in [
        "hit+put(default)",
        "hit+put(reuse_check=false)",
        "miss+put(64bufs,16entries)",
        "getppid",
    ] {
        assert!(rows.iter().any(|(n, _)| n == name), "{name} not measured");
    }
    assert!(
        rows.iter().any(|(n, _)| n == "libfabric-valid") || out.contains("not measured ("),
        "libfabric-valid neither measured nor explained"
    );
}
