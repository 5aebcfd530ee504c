//! What the C API costs per call, side by side in one run (`cargo bench -p mmu-uffd-capi
//! --bench c_costs`): `tests/c/memhooks_costs.c` against the release library.

#[path = "../tests/c_support/mod.rs"]
mod c_support;

use c_support::*;
use std::path::Path;

/// What the C API costs per call (`tests/c/memhooks_costs.c` against the release
/// library): a hit + put with and without the reuse check, a miss, libfabric's `valid`
/// through the import monitor, and an empty system call as the floor. Medians of 201
/// rounds of 1000 calls; prints a table, asserts only that everything was measured.
fn main() {
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
