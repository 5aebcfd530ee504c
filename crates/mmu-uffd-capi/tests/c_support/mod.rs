//! Shared by this crate's C tests (`c_api.rs`, `libfabric.rs`, `memhooks.rs`) and
//! `benches/c_costs.rs`: the library found (and rebuilt when stale) in the target
//! directory, work directories, compiling and running C harnesses with a watchdog.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// The C watchdog (seconds) for libfabric's monitors; the Rust one is twice that.
pub const WATCHDOG: u64 = 10;

pub const LIB: &str = "mmu_uffd_capi";

pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`: this test runs as `target/<profile>/deps/c_api-<hash>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The newest modification time of the files under `dir` (recursively).
pub fn newest(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return t;
    };
    for e in entries.flatten() {
        let p = e.path();
        let m = if p.is_dir() {
            newest(&p)
        } else {
            mtime(&p).unwrap_or(SystemTime::UNIX_EPOCH)
        };
        t = t.max(m);
    }
    t
}

pub fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The profile directory, with `libmmu_uffd_capi.{so,a}` built and up to date.
pub fn libs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = profile_dir();
        let crates = crate_dir().parent().expect("crates/");
        let sources = [
            crate_dir().join("src"),
            crate_dir().join("Cargo.toml"),
            crates.join("mmu-uffd/src"),
            crates.join("mmu-notifier/src"),
        ]
        .iter()
        .map(|p| {
            if p.is_dir() {
                newest(p)
            } else {
                mtime(p).unwrap_or(SystemTime::UNIX_EPOCH)
            }
        })
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
        let fresh = |name: String| mtime(&dir.join(name)).is_some_and(|t| t >= sources);
        if !(fresh(format!("lib{LIB}.so")) && fresh(format!("lib{LIB}.a"))) {
            build(&dir);
        }
        for name in [format!("lib{LIB}.so"), format!("lib{LIB}.a")] {
            assert!(
                dir.join(&name).is_file(),
                "{name} missing in {}",
                dir.display()
            );
        }
        dir
    })
}

/// `cargo build -p mmu-uffd-capi --lib` into `dir` (`<target dir>/<profile>`).
pub fn build(dir: &Path) {
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let target_dir = dir.parent().expect("<target dir>/<profile>");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "mmu-uffd-capi", "--lib", "--target-dir"])
        .arg(target_dir)
        .current_dir(crate_dir());
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("building the C libraries: {cmd:?}");
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "{cmd:?} failed");
}

/// Where the C programs and files of this test binary go: one directory per test binary
/// (its file name) and `name`, so binaries never overwrite each other's programs.
pub fn work_dir(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let binary = exe.file_stem().map(|s| s.to_owned()).unwrap_or_default();
    let d = libs().join("mmu-uffd-capi-c").join(binary).join(name);
    std::fs::create_dir_all(&d).expect("create the work directory");
    d
}

pub fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cc -Wall -Wextra -Werror -std=c11 <extra> src <link> -o exe`.
pub fn cc() -> std::ffi::OsString {
    std::env::var_os("CC").unwrap_or_else(|| "cc".into())
}

pub fn pkg_config(args: &[&str]) -> Option<String> {
    let out = Command::new("pkg-config").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The linker arguments for libfabric.a and what it needs, or why there are none.
/// `pkg-config --libs --static libfabric` names the libraries libfabric.a needs; a
/// distribution may install only their run-time `lib<name>.so.<N>` (no development link),
/// so each is passed by its path when `lib<name>.so` is not there.
pub fn static_libfabric() -> Result<Vec<String>, String> {
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
pub fn compile(src: &str, link: &[String]) -> PathBuf {
    let exe = work_dir("harnesses").join(src.trim_end_matches(".c"));
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
pub fn run(exe: &Path, args: &[&str]) -> String {
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

/// `target/release` with `libmmu_uffd_capi.so` built by `cargo build --release` (the
/// costs are measured against the optimized library whatever profile runs the test).
pub fn release_libs() -> PathBuf {
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
