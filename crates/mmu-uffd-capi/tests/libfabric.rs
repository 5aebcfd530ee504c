//! The libfabric import monitor from C (`tests/c/libfabric_*.c`, compiled with
//! `cc -Wall -Wextra -Werror -std=c11` against the installed `rdma/*.h`, linked with
//! `libmmu_uffd_capi.so`):
//!
//! - `layout`: the `#[repr(C)]` declarations of `src/libfabric.rs` against the header
//!   (static asserts), and what the library fills in.
//! - `ops`: each operation deterministically (valid right after munmap returned, notify
//!   later and on another thread, a re-subscription while a notify is pending, unsubscribe
//!   inside notify / late / twice / never subscribed, nothing notified before `start` or
//!   after `stop`).
//! - `import`: into the installed libfabric: 0 after `fi_getinfo`, 0 before it, a second
//!   import is libfabric's `-FI_EBUSY`, refused (`-EPERM`) with `FI_MR_CACHE_MONITOR` set.
//! - `preload`: a program that links libfabric only, run with the library in `LD_PRELOAD`
//!   and `MMU_UFFD_FI_IMPORT=1`: libfabric then refuses the program's own monitor.
//! - `harness`: the monitor driven in libfabric's cache order through munmap/mmap (libc
//!   and raw system calls), `MAP_FIXED` over, `MADV_DONTNEED`, mremap and address reuse
//!   across threads: zero stale hits, with and without `unsubscribe` inside `notify`; the
//!   same harness without a monitor counts stale hits (the baseline).
//! - `sanitizers`: `ops`, `import` and `harness` again with `-fsanitize=address,undefined`.
//!
//! Skipped (printing `SKIPPED` and why) without libfabric's headers (`libfabric-dev`;
//! `scripts/test.sh` installs it) or where userfaultfd is unavailable.

mod c_support;

use c_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Why libfabric's headers cannot be used, if they cannot.
fn libfabric_missing() -> Option<String> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        let dir = work_dir("probe");
        let src = dir.join("probe.c");
        std::fs::write(
            &src,
            "#include <rdma/fi_ext.h>\nint main(void) { return fi_version() == 0; }\n",
        )
        .expect("write probe.c");
        let out = Command::new(cc())
            .arg(&src)
            .args(["-lfabric", "-o"])
            .arg(dir.join("probe"))
            .output()
            .expect("run cc");
        (!out.status.success()).then(|| {
            format!(
                "libfabric's headers or library are missing (install libfabric-dev): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    })
    .clone()
}

macro_rules! need_libfabric {
    () => {
        if let Some(why) = libfabric_missing() {
            println!("SKIPPED: {why}");
            return;
        }
    };
}

/// Compiles `tests/c/<src>` into `dir`; `ours` links `libmmu_uffd_capi.so`.
fn compile(dir: &Path, src: &str, extra: &[&str], ours: bool) -> PathBuf {
    let exe = dir.join(src.trim_end_matches(".c"));
    let mut cmd = Command::new(cc());
    cmd.args([
        "-Wall", "-Wextra", "-Werror", "-std=c11", "-g", "-O2", "-pthread",
    ])
    .args(extra)
    .arg(crate_dir().join("tests/c").join(src));
    if ours {
        cmd.arg(format!("-L{}", libs().display()))
            .arg("-lmmu_uffd_capi")
            .arg(format!("-Wl,-rpath,{}", libs().display()));
    }
    cmd.arg("-lfabric").arg("-o").arg(&exe);
    let out = cmd.output().expect("run cc");
    assert!(out.status.success(), "{cmd:?}\n{}", show(&out));
    exe
}

/// Runs a C program (one at a time: they start threads, on a small machine); its stdout,
/// or `None` if it skipped (userfaultfd unavailable).
fn run(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Option<String> {
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env_remove("FI_MR_CACHE_MONITOR")
        .env_remove("MMU_UFFD_FI_IMPORT")
        .envs(env.iter().copied());
    let out = cmd.output().expect("run the C program");
    assert!(out.status.success(), "{cmd:?} failed\n{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{cmd:?}:\n{stdout}");
    if stdout.contains("SKIPPED") {
        println!("SKIPPED: userfaultfd is unavailable here");
        return None;
    }
    Some(stdout)
}

#[test]
fn layout() {
    need_libfabric!();
    let exe = compile(&work_dir("layout"), "libfabric_layout.c", &[], true);
    if let Some(out) = run(&exe, &[], &[]) {
        assert!(out.contains("layout ok"), "{out}");
    }
}

#[test]
fn ops() {
    need_libfabric!();
    let exe = compile(&work_dir("ops"), "libfabric_ops.c", &[], true);
    if let Some(out) = run(&exe, &[], &[]) {
        assert!(out.contains("ops ok"), "{out}");
    }
}

fn import_modes(exe: &Path) {
    for mode in ["import", "early"] {
        if let Some(out) = run(exe, &[mode], &[]) {
            assert!(out.contains(&format!("{mode} ok")), "{out}");
        }
    }
    let out = run(exe, &["refused"], &[("FI_MR_CACHE_MONITOR", "memhooks")]);
    assert!(out.is_some_and(|o| o.contains("refused ok")));
}

#[test]
fn import() {
    need_libfabric!();
    let exe = compile(&work_dir("import"), "libfabric_import.c", &[], true);
    import_modes(&exe);
}

#[test]
fn preload() {
    need_libfabric!();
    let exe = compile(&work_dir("preload"), "libfabric_preload.c", &[], false);
    let so = libs().join("libmmu_uffd_capi.so");
    let so = so.to_str().expect("a UTF-8 path");
    // Without the variable the preloaded library does nothing.
    let out = run(&exe, &["plain"], &[("LD_PRELOAD", so)]);
    assert!(out.is_some_and(|o| o.contains("plain ok")));
    let out = run(
        &exe,
        &["preload"],
        &[("LD_PRELOAD", so), ("MMU_UFFD_FI_IMPORT", "1")],
    );
    // (No SKIPPED line here: without userfaultfd the import fails and the check fails.)
    assert!(out.is_some_and(|o| o.contains("preload ok")));
}

/// `(stale, hits, misses, notified)` from the harness's summary line.
fn counts(out: &str) -> (u64, u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("mode="))
        .expect("a summary line");
    let get = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {line}"))
    };
    (
        get("stale="),
        get("hits="),
        get("misses="),
        get("notified="),
    )
}

fn harness_modes(exe: &Path, iterations: &str) {
    for mode in ["uffd", "uffd2"] {
        let Some(out) = run(exe, &[mode, "4", iterations], &[]) else {
            return;
        };
        let (stale, hits, misses, notified) = counts(&out);
        assert_eq!(
            stale, 0,
            "stale hits with the mmu-uffd monitor ({mode}):\n{out}"
        );
        assert!(hits > 0 && misses > 0 && notified > 0, "{out}");
    }
}

#[test]
fn harness() {
    need_libfabric!();
    let exe = compile(&work_dir("harness"), "libfabric_harness.c", &[], true);
    // The baseline: no monitor, valid() always true.
    let out = run(&exe, &["none", "4", "5000"], &[]).expect("the baseline needs no monitor");
    let (stale, ..) = counts(&out);
    assert!(stale > 0, "the baseline should see stale hits:\n{out}");
    harness_modes(&exe, "10000");
}

#[test]
fn sanitizers() {
    need_libfabric!();
    let dir = work_dir("sanitizers");
    let san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"];
    let probe = dir.join("probe.c");
    std::fs::write(&probe, "int main(void) { return 0; }\n").expect("write probe.c");
    let ok = Command::new(cc())
        .args(san)
        .arg(&probe)
        .arg("-o")
        .arg(dir.join("probe"))
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(dir.join("probe"))
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED (sanitizers): the compiler cannot build or run a sanitized program");
        return;
    }
    let ops = compile(&dir, "libfabric_ops.c", &san, true);
    if let Some(out) = run(&ops, &[], &[]) {
        assert!(out.contains("ops ok"), "{out}");
    }
    let import = compile(&dir, "libfabric_import.c", &san, true);
    import_modes(&import);
    let harness = compile(&dir, "libfabric_harness.c", &san, true);
    harness_modes(&harness, "3000");
}
