//! The C API from C: the programs in `tests/c/` (`cache_test.c`, `cache_parity_test.c`,
//! `readme_example.c`) compiled with `cc -Wall -Wextra -Werror
//! -std=c11` and run, linked
//!
//! - statically against `libmmu_uffd_capi.a`,
//! - dynamically against `libmmu_uffd_capi.so`, with the flags `pkg-config` gives for
//!   `mmu_uffd.pc` (filled in for a prefix made in the target directory),
//! - statically again with `-fsanitize=address,undefined` (skipped, saying why, where the
//!   compiler has no sanitizer runtime).
//!
//! Where userfaultfd is unavailable the C programs print `SKIPPED` and so do these tests.
//!
//! The libraries are taken from this test's own profile directory (`target/<profile>`,
//! wherever the target directory is); if they are missing or older than the sources they
//! are built first with `cargo build -p mmu-uffd-capi --lib` for the same profile.

mod c_support;

use c_support::*;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn compile(src: &str, exe: &Path, extra: &[&str], link: &[String]) {
    let mut cmd = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()));
    cmd.args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-g"])
        .args(extra)
        .arg(crate_dir().join("tests/c").join(src))
        .args(link)
        .arg("-o")
        .arg(exe);
    let out = run(&mut cmd);
    assert!(out.status.success(), "{cmd:?}\n{}", show(&out));
}

/// Runs a C test program; false if it skipped (userfaultfd unavailable).
fn run_c(exe: &Path, env: &[(&str, &str)]) -> bool {
    // One C program at a time: each starts threads of its own, on a small machine.
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(exe);
    cmd.envs(env.iter().copied());
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed\n{}",
        exe.display(),
        show(&out)
    );
    print!("{}: {stdout}", exe.display());
    if stdout.starts_with("SKIPPED") {
        println!("SKIPPED: userfaultfd is unavailable here");
        return false;
    }
    assert!(
        stdout.contains("OK"),
        "{} printed no OK\n{}",
        exe.display(),
        show(&out)
    );
    true
}

fn include_flag() -> String {
    format!("-I{}", crate_dir().join("include").display())
}

/// The system libraries the Rust standard library needs in a static link.
fn static_libs() -> Vec<String> {
    let mut v = vec![libs().join(format!("lib{LIB}.a")).display().to_string()];
    v.extend(["-lpthread", "-ldl", "-lm"].map(String::from));
    v
}

#[test]
fn c_static() {
    let dir = work_dir("static");
    for src in ["cache_test.c", "cache_parity_test.c", "readme_example.c"] {
        let exe = dir.join(src.trim_end_matches(".c"));
        compile(src, &exe, &[&include_flag()], &static_libs());
        run_c(&exe, &[]);
    }
}

#[test]
fn c_dynamic_pkg_config() {
    let dir = work_dir("dynamic");
    // An installation prefix: lib/ (the shared library, lib/pkgconfig/mmu_uffd.pc) and
    // include/ (the header).
    let prefix = dir.join("prefix");
    let libdir = prefix.join("lib");
    let pcdir = libdir.join("pkgconfig");
    let incdir = prefix.join("include");
    for d in [&pcdir, &incdir] {
        std::fs::create_dir_all(d).expect("create the prefix");
    }
    let so = format!("lib{LIB}.so");
    std::fs::copy(libs().join(&so), libdir.join(&so)).expect("copy the shared library");
    std::fs::copy(
        crate_dir().join("include/mmu_uffd.h"),
        incdir.join("mmu_uffd.h"),
    )
    .expect("copy the header");
    let template =
        std::fs::read_to_string(crate_dir().join("mmu_uffd.pc.in")).expect("mmu_uffd.pc.in");
    let pc = template
        .replace("@PREFIX@", &prefix.display().to_string())
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    std::fs::write(pcdir.join("mmu_uffd.pc"), pc).expect("write mmu_uffd.pc");

    let out = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "mmu_uffd"])
        .env("PKG_CONFIG_PATH", &pcdir));
    assert!(out.status.success(), "pkg-config failed\n{}", show(&out));
    let flags: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert!(flags.iter().any(|f| f == &format!("-l{LIB}")), "{flags:?}");
    let version = run(Command::new("pkg-config")
        .args(["--modversion", "mmu_uffd"])
        .env("PKG_CONFIG_PATH", &pcdir));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        env!("CARGO_PKG_VERSION")
    );

    let mut link = flags;
    link.push(format!("-Wl,-rpath,{}", libdir.display()));
    let libdir_s = libdir.display().to_string();
    for src in ["cache_test.c", "cache_parity_test.c", "readme_example.c"] {
        let exe = dir.join(src.trim_end_matches(".c"));
        compile(src, &exe, &[], &link);
        // The program must load the shared library, not contain it.
        if let Ok(ldd) = Command::new("ldd").arg(&exe).output() {
            let ldd = String::from_utf8_lossy(&ldd.stdout);
            assert!(
                ldd.contains(&so),
                "{} does not load {so}:\n{ldd}",
                exe.display()
            );
        }
        run_c(&exe, &[("LD_LIBRARY_PATH", &libdir_s)]);
    }
}

/// Why the compiler cannot build and run a program with ASan and UBSan, if it cannot.
fn sanitizers_missing(dir: &Path) -> Option<String> {
    let src = dir.join("probe.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").expect("write probe.c");
    let exe = dir.join("probe");
    let out = run(
        Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
            .args(["-fsanitize=address,undefined"])
            .arg(&src)
            .arg("-o")
            .arg(&exe),
    );
    if !out.status.success() {
        return Some(format!(
            "the compiler has no sanitizer runtime: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let out = run(&mut Command::new(&exe));
    if !out.status.success() {
        return Some(format!(
            "a sanitized program cannot run here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    None
}

#[test]
fn c_sanitizers() {
    let dir = work_dir("sanitizers");
    if let Some(why) = sanitizers_missing(&dir) {
        println!("SKIPPED (sanitizers): {why}");
        return;
    }
    for src in ["cache_test.c", "cache_parity_test.c"] {
        let exe = dir.join(src.trim_end_matches(".c"));
        compile(
            src,
            &exe,
            &[
                &include_flag(),
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer",
            ],
            &static_libs(),
        );
        run_c(
            &exe,
            &[
                ("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1"),
                ("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"),
            ],
        );
    }
}

/// The README's C example is `tests/c/readme_example.c` (compiled above), word for word.
#[test]
fn readme_example_is_the_tested_one() {
    let readme = std::fs::read_to_string(crate_dir().join("../../README.md")).expect("README");
    let example = std::fs::read_to_string(crate_dir().join("tests/c/readme_example.c"))
        .expect("readme_example.c");
    assert!(
        readme.contains(&format!("```c\n{example}```")),
        "README.md's C example differs from crates/mmu-uffd-capi/tests/c/readme_example.c: \
         copy the file into the ```c block of the \"From C\" section"
    );
}
