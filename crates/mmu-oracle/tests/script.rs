//! The script format, the generator and the comparison, without a kernel.

use mmu_oracle::script::{self, Op, Who};
use mmu_oracle::{Comparison, KernelOnly, Note, Step, BASE, PAGE};

#[test]
fn random_scripts_print_and_parse_back_and_cover_every_operation() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let ops = script::random(seed, 100);
        assert_eq!(ops.len(), 100);
        assert_eq!(
            script::parse(&script::format(&ops)).unwrap(),
            ops,
            "seed {seed}"
        );
        assert_eq!(ops, script::random(seed, 100), "deterministic");
        for op in &ops {
            seen.insert(match op {
                Op::Mmap { kind, .. } => format!("mmap {kind}")
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string(),
                Op::Madvise { advice, .. } => format!("madvise {advice}"),
                Op::Mremap {
                    fixed, old, new, ..
                } => format!(
                    "mremap {}",
                    match (fixed, new.cmp(old)) {
                        (Some(_), std::cmp::Ordering::Equal) => "move",
                        (Some(_), _) => "move-resize",
                        (None, std::cmp::Ordering::Greater) => "grow",
                        (None, _) => "shrink",
                    }
                ),
                Op::Write { who, .. } => format!("write {who:?}"),
                Op::ClearRefs { who } => format!("clear-refs {who:?}"),
                other => other.to_string().split(' ').next().unwrap().to_string(),
            });
        }
    }
    for want in [
        "mmap anon",
        "mmap shm",
        "mmap memfd-shared",
        "mmap memfd-private",
        "munmap",
        "mprotect",
        "madvise dontneed",
        "madvise free",
        "madvise pageout",
        "mremap move",
        "mremap move-resize",
        "mremap grow",
        "mremap shrink",
        "fork",
        "write Parent",
        "write Child",
        "clear-refs Parent",
        "clear-refs Child",
        "child",
    ] {
        assert!(seen.contains(want), "{want} missing from {seen:?}");
    }
}

#[test]
fn bad_scripts_are_refused_with_their_line() {
    for (text, line) in [
        ("mmap 0 4 anon rw\nchild write 0\n", 2),
        ("fork\nfork\n", 2),
        ("mmap 0 4 anon rwx\n", 1),
        ("# comment\nmadvise 0 1 cold\n", 2),
        ("mremap 0 1 2 sideways\n", 1),
        ("mmap 0 4 memfd-shared:9:0 rw\n", 1),
        ("munmap 0 99999999\n", 1),
    ] {
        let e = script::parse(text).unwrap_err();
        assert_eq!(e.line, line, "{text:?}: {e}");
    }
}

fn step(result: &str, notes: &[Note]) -> Step {
    Step {
        result: result.into(),
        notes: notes.to_vec(),
    }
}

fn page(n: u64) -> Note {
    Note::Invalidate(Who::Parent, BASE + n * PAGE, BASE + (n + 1) * PAGE)
}

#[test]
fn differences_are_explained_only_by_the_mechanism_that_can_cause_them() {
    let ops = script::parse("mmap 0 4 anon rw\nwrite 0\nfork\nmadvise 0 4 pageout\n").unwrap();
    let sim = vec![
        step("ok", &[]),
        step("ok", &[]),
        step(
            "ok",
            &[Note::Invalidate(Who::Parent, BASE, BASE + 4 * PAGE)],
        ),
        step("ok", &[page(0)]),
    ];
    let mut kernel = sim.clone();
    // A live child maps the page's offset at the same address: a second one-page range.
    kernel[3] = step("ok", &[page(0), page(0)]);
    let c = Comparison {
        ops: ops.clone(),
        kernel: kernel.clone(),
        sim: sim.clone(),
    };
    assert_eq!(c.differences(), [3]);
    assert_eq!(c.explain(3), Some(KernelOnly::RmapWalk));
    // A page elsewhere needs a mapping there that can alias: a moved mapping, another
    // mapping of the same file, or a child; without one it is unexplained.
    let alone = script::parse("mmap 0 4 anon rw\nwrite 0\nmmap 8 4 anon rw\nmadvise 0 4 pageout\n");
    let moved =
        script::parse("mmap 0 4 anon rw\nwrite 0\nmremap 0 1 1 fixed=9\nmadvise 0 4 pageout\n");
    for (ops, cause) in [
        (alone.unwrap(), None),
        (moved.unwrap(), Some(KernelOnly::RmapWalk)),
    ] {
        let sim = vec![
            step("ok", &[]),
            step("ok", &[]),
            step("ok", &[]),
            step("ok", &[page(1)]),
        ];
        let mut kernel = sim.clone();
        kernel[3] = step("ok", &[page(1), page(9)]);
        let c = Comparison { ops, kernel, sim };
        assert_eq!(c.explain(3), cause, "{c}");
    }
    // A wider range is never the reverse-map walk; nor is a different result.
    kernel[3] = step(
        "ok",
        &[Note::Invalidate(Who::Parent, BASE, BASE + 2 * PAGE)],
    );
    let c = Comparison {
        ops: ops.clone(),
        kernel: kernel.clone(),
        sim: sim.clone(),
    };
    assert_eq!(c.explain(3), None);
    kernel[3] = step("ENOMEM", &[page(0), page(0)]);
    let c = Comparison { ops, kernel, sim };
    assert_eq!(c.explain(3), None);
    assert!(c.report(false).contains("! madvise 0 4 pageout"));
}
