//! `mmn bench` end to end: the quick suite runs, every figure it reports is a finite,
//! positive time beside a finite, positive baseline, the JSON has the documented keys and
//! figure ids, and the plots it writes are well-formed SVG. No assertion on speed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn mmn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(args)
        .output()
        .expect("run mmn")
}

/// A fresh, empty directory under the target directory's temporary space.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A finite positive number at `v[key]`.
fn positive(v: &Value, key: &str, what: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {key} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what}: {key} = {x}");
    x
}

/// Checks a median with its quartiles: all positive and ordered.
fn check_stat(v: &Value, what: &str) -> f64 {
    let m = positive(v, "median_ns", what);
    let lo = positive(v, "p25_ns", what);
    let hi = positive(v, "p75_ns", what);
    assert!(lo <= m && m <= hi, "{what}: quartiles {lo} {m} {hi}");
    m
}

fn is_snake(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with('_')
}

/// A small well-formedness check of an XML document whose root must be `<svg>` with a
/// width and a height: tags balance, attributes are quoted, entities are complete, and
/// nothing but white space follows the root.
fn check_svg(text: &str) -> Result<(), String> {
    let b = text.as_bytes();
    let mut stack: Vec<String> = Vec::new();
    let mut i = 0;
    let mut root_seen = false;
    let mut elements = 0;
    while i < b.len() {
        match b[i] {
            b'<' if text[i..].starts_with("<?") => {
                i += text[i..].find("?>").ok_or("unterminated <?")? + 2;
            }
            b'<' if text[i..].starts_with("<!--") => {
                i += text[i..].find("-->").ok_or("unterminated comment")? + 3;
            }
            b'<' => {
                // Find the end of the tag, outside quoted attribute values.
                let mut j = i + 1;
                let mut quote = None;
                while j < b.len() {
                    match (quote, b[j]) {
                        (None, b'"' | b'\'') => quote = Some(b[j]),
                        (Some(q), c) if c == q => quote = None,
                        (None, b'>') => break,
                        (None, b'<') => return Err(format!("'<' inside a tag at {i}")),
                        _ => {}
                    }
                    j += 1;
                }
                if j == b.len() {
                    return Err(format!("unterminated tag at {i}"));
                }
                let tag = &text[i + 1..j];
                if let Some(name) = tag.strip_prefix('/') {
                    let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                    if open != name.trim() {
                        return Err(format!("<{open}> closed by </{name}>"));
                    }
                } else {
                    let self_closing = tag.ends_with('/');
                    let body = tag.trim_end_matches('/');
                    let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
                    if name.is_empty() {
                        return Err(format!("empty tag name at {i}"));
                    }
                    if stack.is_empty() {
                        if root_seen {
                            return Err("a second root element".into());
                        }
                        root_seen = true;
                        if name != "svg" || !body.contains("width=") || !body.contains("height=") {
                            return Err(format!("root is not a sized <svg>: <{body}>"));
                        }
                    }
                    // Every attribute is name="value".
                    let attrs = &body[name.len()..];
                    let quotes = attrs.matches('"').count();
                    if quotes % 2 != 0 || attrs.matches('=').count() > quotes / 2 {
                        return Err(format!("unquoted attribute in <{body}>"));
                    }
                    elements += 1;
                    if !self_closing {
                        stack.push(name);
                    }
                }
                i = j + 1;
            }
            b'&' => {
                let end = text[i..].find(';').ok_or("'&' without ';'")?;
                let ent = &text[i + 1..i + end];
                let ok = matches!(ent, "amp" | "lt" | "gt" | "quot" | "apos")
                    || (ent.starts_with('#') && ent.len() > 1);
                if !ok {
                    return Err(format!("unknown entity &{ent};"));
                }
                i += end + 1;
            }
            c => {
                if stack.is_empty() && !c.is_ascii_whitespace() {
                    return Err(format!("text outside the root at {i}"));
                }
                i += 1;
            }
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed elements: {stack:?}"));
    }
    if !root_seen || elements < 10 {
        return Err(format!("only {elements} elements"));
    }
    Ok(())
}

#[test]
fn the_svg_check_rejects_broken_documents() {
    let good = format!(
        "<svg width=\"1\" height=\"1\" xmlns=\"x\">{}<text x=\"0\">a -&gt; b</text></svg>\n",
        "<rect x=\"0\"/>".repeat(10)
    );
    check_svg(&good).unwrap();
    for bad in [
        good.replace("</svg>", ""),
        good.replace("</text>", "</rect>"),
        good.replace("x=\"0\"/>", "x=0/>"),
        good.replace("&gt;", "&gt"),
        good.replace("<svg width=\"1\"", "<g width=\"1\"")
            .replace("</svg>", "</g>"),
        format!("{good}<svg width=\"1\" height=\"1\"></svg>"),
    ] {
        assert!(check_svg(&bad).is_err(), "accepted: {bad}");
    }
}

#[test]
fn quick_suite_reports_every_figure_and_writes_the_plots() {
    let dir = scratch("bench_plots");
    let out = mmn(&[
        "bench",
        "--quick",
        "--json",
        "--plots",
        dir.to_str().expect("a UTF-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mmn bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));

    // Top-level keys.
    assert_eq!(v["format"], "mmn-bench/1");
    assert_eq!(v["quick"], true);
    assert!(
        v["rounds"].as_u64().is_some_and(|r| r >= 3),
        "{}",
        v["rounds"]
    );
    assert!(v["machine"]["cpus"].as_u64().is_some_and(|c| c >= 1));
    assert!(v["machine"]["kernel"].is_string());
    assert_eq!(v["failures"], serde_json::json!([]), "failed measurements");
    let skipped = v["skipped"].as_array().expect("skipped: an array");
    let uffd_skipped = skipped.iter().any(|s| s["group"] == "uffd");
    for s in skipped {
        let reason = s["reason"].as_str().expect("a reason");
        assert!(!reason.is_empty());
        println!("SKIPPED: mmn bench group {}: {reason}", s["group"]);
    }

    // Figures: stable snake_case ids, each once, finite positive times, the ratio.
    let figures = v["figures"].as_array().expect("figures: an array");
    let mut ids = HashSet::new();
    for f in figures {
        let id = f["id"].as_str().expect("an id");
        assert!(is_snake(id), "id {id:?} is not snake_case");
        assert!(ids.insert(id.to_string()), "id {id} twice");
        let group = f["group"].as_str().expect("a group");
        assert!(
            ["core", "itree", "sim", "uffd"].contains(&group),
            "{id}: group {group}"
        );
        assert!(f["label"].as_str().is_some_and(|l| !l.is_empty()), "{id}");
        let m = check_stat(f, id);
        let b = &f["baseline"];
        assert!(b["label"].as_str().is_some_and(|l| !l.is_empty()), "{id}");
        let bm = check_stat(b, &format!("{id} baseline"));
        let ratio = positive(f, "ratio", id);
        assert!(
            (ratio - m / bm).abs() <= 1e-3 * ratio.max(1.0),
            "{id}: ratio {ratio} is not {m} / {bm}"
        );
        match &f["linux_ns"] {
            Value::Null => {}
            _ => {
                positive(f, "linux_ns", id);
                assert_eq!(
                    group, "itree",
                    "{id}: a Linux figure outside the tree group"
                );
            }
        }
    }
    let mut expected: Vec<String> = [
        "start_end_list_0",
        "start_end_list_1",
        "start_end_list_8",
        "start_end_list_1_vs_linux",
        "least_section_list_1",
        "read_begin_read_retry",
        "start_end_interval_100",
        "start_end_interval_10000",
        "fault_munmap_notifier_no_subscribers",
        "fault_munmap_notifier_1_list_subscriber",
        "start_end_miss_100000",
    ]
    .map(String::from)
    .to_vec();
    for op in ["insert", "query_2mib", "remove"] {
        for n in [1_000, 100_000] {
            expected.push(format!("itree_{op}_{n}"));
        }
    }
    if !uffd_skipped {
        for id in [
            "cache_hit_reuse_check",
            "cache_hit_no_reuse_check",
            "cache_miss",
            "munmap_to_callback",
            "munmap_to_handle_invalid",
        ] {
            expected.push(id.into());
        }
    }
    for id in &expected {
        assert!(ids.contains(id), "figure {id} missing; have {ids:?}");
    }
    // The Linux reference is where it was measured: the tree at 10^3 and 10^5 (and 10^6),
    // the invalidation miss at 10^6 only.
    for f in figures.iter().filter(|f| f["group"] == "itree") {
        let id = f["id"].as_str().unwrap();
        let measured = id.starts_with("itree_")
            && (id.ends_with("_1000") || id.ends_with("_100000"))
            || id == "start_end_miss_1000000";
        assert_eq!(!f["linux_ns"].is_null(), measured, "{id}");
    }

    // Curves: the plotted series, positive and in increasing x.
    let curves = v["curves"].as_array().expect("curves: an array");
    let curve_ids: HashSet<&str> = curves.iter().filter_map(|c| c["id"].as_str()).collect();
    for id in [
        "itree_insert_ours",
        "itree_insert_iset",
        "itree_insert_linux",
        "itree_query_2mib_ours",
        "itree_remove_iset",
        "invalidate_list_subscribers",
        "invalidate_list_direct_calls",
        "invalidate_interval_subscriptions",
        "invalidate_interval_tree_lookup",
    ] {
        assert!(curve_ids.contains(id), "curve {id} missing");
    }
    for c in curves {
        let id = c["id"].as_str().expect("a curve id");
        assert!(is_snake(id), "{id}");
        assert!(c["x"].is_string() && c["label"].is_string(), "{id}");
        let pts = c["points"].as_array().expect("points");
        assert!(pts.len() >= 3, "{id}: {} points", pts.len());
        let mut last = f64::NEG_INFINITY;
        for p in pts {
            let (x, y) = (p[0].as_f64().unwrap(), p[1].as_f64().unwrap());
            assert!(x > last && y.is_finite() && y > 0.0, "{id}: point {p}");
            last = x;
        }
    }

    // Distributions: with the uffd group, three, percentiles non-decreasing.
    let ds = v["distributions"]
        .as_array()
        .expect("distributions: an array");
    assert_eq!(ds.len(), if uffd_skipped { 0 } else { 3 });
    for d in ds {
        let id = d["id"].as_str().expect("an id");
        assert!(d["samples"].as_u64().is_some_and(|n| n >= 100), "{id}");
        let ps = &d["percentiles_ns"];
        let mut last = 0.0;
        for p in ["p1", "p10", "p25", "p50", "p75", "p90", "p99", "max"] {
            let x = positive(ps, p, id);
            assert!(x >= last, "{id}: {p} = {x} < {last}");
            last = x;
        }
    }

    // Plots: the files the JSON names, well-formed SVG.
    let plots: Vec<&str> = v["plots"]
        .as_array()
        .expect("plots: an array")
        .iter()
        .map(|p| p.as_str().expect("a path"))
        .collect();
    let mut names = vec!["itree.svg", "invalidate.svg"];
    if !uffd_skipped {
        names.push("latency.svg");
    }
    assert_eq!(plots.len(), names.len(), "{plots:?}");
    for name in names {
        let path = dir.join(name);
        assert!(
            plots.contains(&path.to_str().unwrap()),
            "{name} not in {plots:?}"
        );
        let text = std::fs::read_to_string(&path).expect("the plot is readable");
        if let Err(e) = check_svg(&text) {
            panic!("{name} is not well-formed SVG: {e}");
        }
        assert!(
            text.contains("<polyline") || text.contains("<path"),
            "{name}: no lines"
        );
    }
}

#[test]
fn tables_show_each_figure_beside_its_baseline() {
    let out = mmn(&["bench", "--quick", "--only", "sim"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("baseline") && stdout.contains("ratio"),
        "{stdout}"
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("fault+munmap"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        assert!(row.contains("no notifier"), "no baseline in {row:?}");
        let ratio: f64 = row
            .split_whitespace()
            .last()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no ratio at the end of {row:?}"));
        assert!(ratio.is_finite() && ratio > 0.0, "{row}");
    }
    assert!(
        !stdout.contains("itree"),
        "--only sim ran other groups: {stdout}"
    );
}

#[test]
fn unknown_group_is_refused() {
    let out = mmn(&["bench", "--only", "core,nope"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nope") && stderr.contains("itree"),
        "{stderr}"
    );
}

#[test]
fn linux_figures_measured_in_the_same_period_replace_the_fixed_ones() {
    let dir = scratch("bench_linux_ref");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("linux.txt");
    // What the user-space build of Linux's tree prints (one size left out: it keeps the
    // fixed figure).
    std::fs::write(
        &good,
        "linux n=1000 insert 11.5 [11.0-12.0] query 22.5 [22.0-23.0] remove 33.5 [33.0-34.0] ns\n\
         linux start+end missing 1e6: 444.0 ns\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(["bench", "--quick", "--json", "--only", "itree"])
        .env("MMN_LINUX_ITREE", &good)
        .output()
        .expect("run mmn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 lines of"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let linux = |id: &str| {
        v["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .unwrap_or_else(|| panic!("no {id}"))["linux_ns"]
            .as_f64()
    };
    assert_eq!(linux("itree_insert_1000"), Some(11.5));
    assert_eq!(linux("itree_query_2mib_1000"), Some(22.5));
    assert_eq!(linux("itree_remove_1000"), Some(33.5));
    // The fixed figure where the file has none.
    assert_eq!(linux("itree_insert_100000"), Some(154.0));

    // A file that is not the anchor's output is a failed measurement, not a silent
    // fall-back to the fixed figures.
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "linux n=1000 insert fast\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(["bench", "--quick", "--only", "itree"])
        .env("MMN_LINUX_ITREE", &bad)
        .output()
        .expect("run mmn");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad line"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
