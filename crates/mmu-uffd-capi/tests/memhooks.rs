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
//!   the counts so far and `hang=1`);
//! - `mmu-uffd`: this library's monitor through the import interface
//!   (`tests/c/libfabric_harness.c`), without and with `unsubscribe` inside `notify`.
//!
//! Asserted: zero stale hits with mmu-uffd, and that every row either ran or printed why
//! not. The other monitors' numbers are printed only. Skipped (printing why) without
//! libfabric's headers or `libfabric.a`.

mod c_support;

use c_support::*;

const THREADS: &str = "4";
const ITERATIONS: &str = "10000";
/// libfabric's uffd monitor hangs in (nearly) every run: once is enough to show it.
const UFFD_RUNS: usize = 1;

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
