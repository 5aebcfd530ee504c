//! The demo's checker passes a correct secondary and catches a broken one.

use std::process::Command;

fn mmn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mmn"))
        .args(args)
        .output()
        .expect("run mmn")
}

#[test]
fn demo_with_a_correct_secondary_reports_no_violation() {
    let out = mmn(&["demo", "--secs", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("violations 0"), "{stdout}");
}

#[test]
fn demo_catches_a_secondary_that_ignores_its_retry_check() {
    // Few pages and several fillers make the lost race frequent; give it a few tries.
    for _ in 0..5 {
        let out = mmn(&[
            "demo",
            "--secs",
            "2",
            "--pages",
            "4",
            "--fillers",
            "3",
            "--broken",
        ]);
        if out.status.code() == Some(1) {
            assert!(String::from_utf8_lossy(&out.stderr).contains("changed"));
            return;
        }
    }
    panic!("the broken secondary was never caught");
}

#[test]
fn demo_rejects_bad_options() {
    assert_eq!(mmn(&["demo", "--secs", "-1"]).status.code(), Some(2));
    assert_eq!(mmn(&["demo", "--pages", "0"]).status.code(), Some(2));
}
