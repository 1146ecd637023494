//! Every policy shipped in `policies/` passes `check` and its own test suite in
//! `policies/tests/`, run as a user runs them; and `test` reports a failing case with the
//! expected and actual decision and the trace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The policies the repository ships: those git tracks in `policies/`, so that a user's own
/// `policies/my-policy.toml` (as the README suggests) is not taken for one; every `.toml` file
/// there when the tree is not a git checkout.
fn shipped() -> Vec<PathBuf> {
    let tracked = std::process::Command::new("git")
        .args(["ls-files", "-z", "--", "policies/*.toml"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success() && !o.stdout.is_empty());
    let mut found: Vec<PathBuf> = match tracked {
        Some(o) => o
            .stdout
            .split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| root().join(String::from_utf8_lossy(f).as_ref()))
            // `policies/*.toml` also matches deeper paths: the suites are not policies.
            .filter(|p| p.parent() == Some(root().join("policies").as_path()))
            .collect(),
        None => std::fs::read_dir(root().join("policies"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
    };
    found.sort();
    found
}

#[test]
fn the_expected_policies_are_shipped() {
    let names: Vec<String> = shipped()
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["cn-pipl", "demo", "eu-gdpr", "template", "vn-decree53"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
}

#[test]
fn every_shipped_policy_passes_check_and_its_test_suite() {
    for policy in shipped() {
        let rel = policy
            .strip_prefix(root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        // `--offline`: the keys, consent files and databases these policies name belong to a
        // deployment, not to the repository.
        let out = run(&["check", "--offline", &rel]);
        assert_eq!(out.status.code(), Some(0), "check {rel}:\n{}", text(&out));

        let name = policy.file_name().unwrap().to_str().unwrap();
        let suite = format!("policies/tests/{name}");
        assert!(
            root().join(&suite).is_file(),
            "{rel} has no test suite {suite}"
        );
        let out = run(&["test", &suite]);
        let report = text(&out);
        assert_eq!(out.status.code(), Some(0), "test {suite}:\n{report}");
        let summary = report
            .lines()
            .find(|l| l.ends_with(" passed, 0 failed"))
            .unwrap_or_else(|| panic!("no summary line:\n{report}"));
        let passed: usize = summary.split(' ').next().unwrap().parse().unwrap();
        assert!(passed >= 5, "{suite} tests too little: {summary}");
        // The suite tests this policy, not another one.
        let head = std::fs::read_to_string(root().join(&suite)).unwrap();
        assert!(head.contains(&format!("policy = \"../{name}\"")), "{suite}");
    }
}

#[test]
fn every_shipped_policy_cites_what_it_encodes() {
    for (name, cites) in [
        (
            "cn-pipl",
            &["art. 37", "art. 38", "art. 39", "art. 40", "art. 23"][..],
        ),
        (
            "vn-decree53",
            &["Decree 53/2022/ND-CP", "Decree 13/2023/ND-CP"][..],
        ),
        (
            "eu-gdpr",
            &[
                "art. 45",
                "art. 49(1)(a)",
                "Data Privacy Framework",
                "Brazil",
            ][..],
        ),
    ] {
        let text = std::fs::read_to_string(root().join(format!("policies/{name}.toml"))).unwrap();
        for c in cites {
            assert!(text.contains(c), "{name}.toml does not cite {c}");
        }
    }
}

#[test]
fn the_default_run_covers_every_suite() {
    let out = run(&["test", "--quiet"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.trim_end().ends_with(" passed, 0 failed"), "{report}");
}

#[test]
fn a_failing_case_shows_expected_and_actual_with_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("wrong.toml");
    std::fs::write(
        &suite,
        format!(
            r#"policy = "{}"
now = 2026-06-01T00:00:00Z

[[cases]]
name = "right"
request = {{ path = "/payments/u123/2026-01.json", client_ip = "127.0.0.10" }}
expect = {{ decision = "allow", reason = "domestic" }}

[[cases]]
name = "the bureau is wrongly expected to get through"
request = {{ path = "/payments/u123/2026-01.json", client_ip = "127.0.0.20", purpose = "credit_scoring" }}
expect = {{ decision = "allow", reason = "consented" }}
"#,
            root().join("policies/demo.toml").display()
        ),
    )
    .unwrap();
    let out = run(&["test", suite.to_str().unwrap()]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("ok    right"), "{report}");
    assert!(
        report.contains("FAIL") && report.contains("the bureau is wrongly expected"),
        "{report}"
    );
    assert!(report.contains("expected: allow consented"), "{report}");
    assert!(
        report.contains(
            "actual:   deny consent_missing (rule datasets.payments.cross_border, status 451"
        ),
        "{report}"
    );
    assert!(report.contains("differs:  decision, reason"), "{report}");
    assert!(report.contains("trace:"), "{report}");
    assert!(report.contains("recipients.credit-bureau-us"), "{report}");
    assert!(report.contains("1 passed, 1 failed"), "{report}");
}

#[test]
fn a_suite_that_cannot_run_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("broken.toml");
    std::fs::write(&suite, "policy = \"missing.toml\"\n").unwrap();
    let out = run(&["test", suite.to_str().unwrap()]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(2), "{report}");
    assert!(report.contains("missing.toml"), "{report}");
}
