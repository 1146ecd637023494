//! The commands around the proxy, run as the real binary: `explain` decides with the same code
//! as `serve` and shows its trace; `demo` replays the motivating case end to end.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
}

const POLICY: &str = r#"
[policy]
name = "explain-test"
home = "CN"
[log]
pseudonymize = false
[[networks]]
cidr = "127.0.0.2/32"
country = "CN"
[[networks]]
cidr = "127.0.0.20/32"
country = "US"
[[upstreams]]
name = "cn-store"
url = "http://127.0.0.2:9000"
[[recipients]]
id = "credit-bureau-us"
relation = "third_party"
country = "US"
networks = ["127.0.0.20/32"]
[[datasets]]
name = "payments"
match = { path_prefix = "/payments/" }
upstream = "cn-store"
category = "user.financial"
subject = { path_segment = 2 }
"#;

const CONSENTS: &str = r#"{"id":"c-pre","subject":"u123","recipient":"credit-bureau-us","purposes":["credit_scoring"],"categories":["user"],"destinations":["US"],"method":"pre_ticked","granted_at":"2026-01-01T00:00:00Z","expires_at":"2027-01-01T00:00:00Z"}
{"id":"c-ok","subject":"u777","recipient":"credit-bureau-us","purposes":["credit_scoring"],"categories":["user"],"destinations":["US"],"method":"explicit","granted_at":"2026-01-01T00:00:00Z","expires_at":"2027-01-01T00:00:00Z"}
"#;

fn setup(dir: &Path) -> (String, String) {
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let consents = dir.join("consents.jsonl");
    std::fs::write(&consents, CONSENTS).unwrap();
    (policy.display().to_string(), consents.display().to_string())
}

#[test]
fn explain_prints_the_decision_its_trace_and_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, consents) = setup(dir.path());
    let out = bin()
        .args([
            "explain",
            "--policy",
            &policy,
            "--method",
            "GET",
            "--path",
            "/payments/u123/2026-01.json",
        ])
        .args([
            "--client-ip",
            "127.0.0.20",
            "--purpose",
            "credit_scoring",
            "--consents",
            &consents,
        ])
        .args(["--now", "2026-06-01T00:00:00Z"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("decision: deny  reason: consent_method_invalid  status: 451"),
        "{text}"
    );
    assert!(
        text.contains("rule:     datasets.payments.cross_border"),
        "{text}"
    );
    // The trace walks the steps in order, naming the rules it passed.
    let steps = [
        "request.path",
        "proxy.trusted_proxies",
        "recipients.credit-bureau-us",
        "datasets.payments.match",
        "datasets.payments.upstream",
        "datasets.payments.cross_border",
    ];
    let mut at = 0;
    for s in steps {
        let found = text[at..]
            .find(s)
            .unwrap_or_else(|| panic!("trace lacks {s} after byte {at}:\n{text}"));
        at += found;
    }
    assert!(
        text.contains("consent c-pre: consent_method_invalid"),
        "{text}"
    );
    assert!(
        text.contains("\"result\": \"consent_method_invalid\""),
        "{text}"
    );
}

#[test]
fn explain_json_matches_what_the_proxy_would_log() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, consents) = setup(dir.path());
    let run = |subject: &str, now: &str| {
        let out = bin()
            .args([
                "explain",
                "--json",
                "--policy",
                &policy,
                "--path",
                &format!("/payments/{subject}/x.json"),
            ])
            .args([
                "--client-ip",
                "127.0.0.20",
                "--purpose",
                "credit_scoring",
                "--consents",
                &consents,
                "--now",
                now,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = run("u777", "2026-06-01T00:00:00Z");
    assert_eq!(v["record"]["reason"], "consented");
    assert_eq!(v["record"]["consent"]["id"], "c-ok");
    assert_eq!(v["record"]["upstream"]["country"], "CN");
    assert!(v["trace"].as_array().unwrap().len() >= 6);
    // The same consent, after it expired.
    let v = run("u777", "2027-06-01T00:00:00Z");
    assert_eq!(v["record"]["reason"], "consent_expired");
}

#[test]
fn explain_refuses_bad_input_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, _) = setup(dir.path());
    let out = bin()
        .args([
            "explain",
            "--policy",
            &policy,
            "--path",
            "/x",
            "--client-ip",
            "127.0.0.1",
            "--header",
            "no-colon",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-colon"));
    let out = bin()
        .args([
            "explain",
            "--policy",
            "/nonexistent.toml",
            "--path",
            "/x",
            "--client-ip",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));
}

#[test]
fn demo_replays_the_motivating_case_and_its_log_verifies() {
    // The demo writes its state relative to the working directory: give it a fresh one.
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args([
            "demo",
            "--no-wait",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("summary: 7 of 7 steps as expected"), "{text}");
    assert!(text.contains("451 deny consent_method_invalid"), "{text}");
    assert!(
        text.contains("requests that reached the foreign server: 0"),
        "{text}"
    );
    let verify = bin()
        .current_dir(dir.path())
        .args(["audit", "verify", "logs/demo-decisions.jsonl"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).starts_with("ok: 14 records"));
}
