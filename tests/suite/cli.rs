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
        "request.client",
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

/// The client's step once read "located nowhere by none", under `proxy.trusted_proxies` in a
/// policy that has none.
#[test]
fn explain_says_how_the_client_was_located_and_by_what() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, _) = setup(dir.path());
    let trace = |policy: &str, client: &str, headers: &[&str]| {
        let mut cmd = bin();
        cmd.args(["explain", "--policy", policy, "--path", "/payments/u1/a"])
            .args(["--client-ip", client]);
        for h in headers {
            cmd.args(["--header", h]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let step = text
            .lines()
            .find(|l| l.trim_start().starts_with("2. "))
            .unwrap_or_else(|| panic!("no step 2:\n{text}"))
            .to_string();
        step.split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        trace(&policy, "127.0.0.9", &[]),
        "request.client client 127.0.0.9 not located (no override or database entry)"
    );
    assert_eq!(
        trace(&policy, "127.0.0.20", &[]),
        "request.client client 127.0.0.20 located US by override networks.127.0.0.20/32"
    );
    // Forwarded by a trusted proxy: the step is that rule's.
    let proxied = dir.path().join("proxied.toml");
    std::fs::write(
        &proxied,
        POLICY.replace(
            "[log]",
            "[proxy]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[log]",
        ),
    )
    .unwrap();
    assert_eq!(
        trace(
            proxied.to_str().unwrap(),
            "127.0.0.1",
            &["X-Forwarded-For: 127.0.0.20"]
        ),
        "proxy.trusted_proxies client 127.0.0.20 (forwarded by trusted proxy 127.0.0.1) \
         located US by override networks.127.0.0.20/32"
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

/// The demo's storage servers listen on the fixed addresses of its policy: one demo at a time.
static DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_demo() -> std::sync::MutexGuard<'static, ()> {
    DEMO.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn demo_replays_the_motivating_case_and_its_log_verifies() {
    let _one = one_demo();
    // The demo writes its state relative to the working directory: give it a fresh one.
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args([
            "--log-format",
            "json",
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{stderr}");
    assert!(text.contains("summary: 8 of 8 steps as expected"), "{text}");
    assert!(text.contains("451 deny consent_method_invalid"), "{text}");
    assert!(
        text.contains("requests that reached the foreign server: 0"),
        "{text}"
    );
    // The bulk export: only the consented user's records left, and the log names them.
    assert!(
        text.contains(
            "3 of 14 records left: those of u123 (consent c-explicit-1); dropped: consent_missing 5, consent_method_invalid 2, consent_revoked 2, no_subject 1, unparsable 1"
        ),
        "{text}"
    );
    let disclosure = text
        .lines()
        .find(|l| l.contains(r#""kind":"disclosure""#))
        .unwrap_or_else(|| panic!("no disclosure record printed:\n{text}"));
    assert!(disclosure.contains(r#""c-explicit-1""#), "{disclosure}");
    assert!(
        !disclosure.contains("u123"),
        "not pseudonymised: {disclosure}"
    );
    // The proxy's own log went to its file, as JSON lines, not into the story.
    assert!(!text.contains("residency-proxy serving"), "{text}");
    assert!(stderr.is_empty(), "{stderr}");
    let own = std::fs::read_to_string(dir.path().join("demo/proxy.log")).unwrap();
    assert!(text.contains("proxy's log   demo/proxy.log"), "{text}");
    let events: Vec<serde_json::Value> = own
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "INFO" && e["fields"]["message"] == "residency-proxy serving"),
        "{own}"
    );
    let verify = bin()
        .current_dir(dir.path())
        .args([
            "audit",
            "verify",
            "--key",
            "demo/certs/log-signing.pub",
            "demo/logs/",
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let report = String::from_utf8_lossy(&verify.stdout);
    // Eight decisions, their outcomes, and the export's one disclosure.
    assert!(report.starts_with("ok: 17 records"), "{report}");
    assert!(report.contains("disclosures: 1 records"), "{report}");
}

/// `demo --no-wait` is a check: with a policy that lets the month's export leave whole, the
/// export step does not decide as the story says, and the demo exits 1 naming what it expected.
#[test]
fn demo_fails_when_the_export_leaves_unfiltered() {
    let _one = one_demo();
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/demo.toml"))
            .unwrap();
    let filtered = "records = { format = \"jsonl\", subject = \"user_id\" }\ncross_border = \"consent\"\nthird_party = \"consent\"";
    assert!(shipped.contains(filtered), "{shipped}");
    let leaky = shipped.replace(
        filtered,
        "records = { format = \"jsonl\", subject = \"user_id\" }\ncross_border = \"allow\"\nthird_party = \"allow\"",
    );
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/demo.toml"), leaky).unwrap();
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
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("14 of 14 records left"), "{text}");
    assert!(
        text.contains("expected: consent_filtered, 3 of 14 records left: those of u123"),
        "{text}"
    );
    assert!(text.contains("summary: 7 of 8 steps as expected"), "{text}");
}

/// The arguments of the `residency-proxy …` command on the first line of `lines` holding
/// `marker`, as the demo prints it for the user to paste.
fn printed_command(lines: &[String], marker: &str) -> Vec<String> {
    let line = lines
        .iter()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no line with {marker:?} in:\n{}", lines.join("\n")));
    let mut words = line.split_whitespace().map(str::to_string);
    assert_eq!(words.next().as_deref(), Some("residency-proxy"), "{line}");
    words.collect()
}

/// A child process that does not outlive its test, failed or not (a demo left running would
/// hold the fixed addresses of the next one).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_stopped_by_sigterm_closes_its_log_in_its_own_folder() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let _one = one_demo();
    let dir = tempfile::tempdir().unwrap();
    let mut demo = KillOnDrop(
        bin()
            .current_dir(dir.path())
            .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = demo.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Up and waiting once it has printed the commands to try.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines.iter().any(|l: &String| l.contains("Edit ")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(e) => {
                let _ = demo.0.kill();
                panic!("the demo did not come up ({e}):\n{}", lines.join("\n"));
            }
        }
    }
    let text = lines.join("\n");
    assert!(text.contains("summary: 8 of 8 steps as expected"), "{text}");
    assert!(text.contains("demo files, under demo/"), "{text}");
    // The command it prints for the running proxy's log works as printed.
    let open = bin()
        .current_dir(dir.path())
        .args(printed_command(&lines, "audit verify --open"))
        .output()
        .unwrap();
    assert!(
        open.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&open.stderr)
    );
    // So does the one for the user's report, which lists the export among what the bureau got.
    let subject = bin()
        .current_dir(dir.path())
        .args(printed_command(&lines, "audit subject --open"))
        .output()
        .unwrap();
    assert!(
        subject.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&subject.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&subject.stdout).unwrap();
    let to_bureau = report["report"]["disclosures"]["credit-bureau-us"]
        .as_array()
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        to_bureau.iter().any(|d| d["dataset"] == "spending-exports"
            && d["consent_id"] == "c-explicit-1"
            && d["bulk"]["export_records"] == 3),
        "{report}"
    );

    let killed = Command::new("kill")
        .args(["-s", "TERM", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    lines.extend(rx.iter());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut demo.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{}\n{stderr}", lines.join("\n"));
    // Piped, neither the story nor the proxy's own log (in its file) carries colour escapes.
    let own = std::fs::read_to_string(dir.path().join("demo/proxy.log")).unwrap();
    for shown in [&lines.join("\n"), &stderr, &own] {
        assert!(!shown.contains("\x1b["), "colour escapes:\n{shown}");
    }
    assert!(own.contains(" INFO "), "{own}");

    // The log is closed by a signed final checkpoint: the command printed last passes,
    // against the public key the demo wrote.
    let verify_args = printed_command(&lines, "audit verify --key");
    assert_eq!(
        verify_args,
        [
            "audit",
            "verify",
            "--key",
            "demo/certs/log-signing.pub",
            "demo/logs/decisions.jsonl"
        ]
    );
    let verify = bin()
        .current_dir(dir.path())
        .args(&verify_args)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(report.starts_with("ok: "), "{report}");
    assert!(report.contains("verified with the given key"), "{report}");
    // Its files stay out of the folders a proxy of one's own writes to.
    for theirs in ["logs", "data", "certs"] {
        assert!(
            !dir.path().join(theirs).exists(),
            "the demo wrote {theirs}/"
        );
    }
}

/// Runs the real binary with its standard output a pipe whose reader has already gone, as
/// in `… | head -1` once `head` has its line; returns its exit code and standard error.
fn with_reader_gone(args: &[&str], cwd: &Path) -> (Option<i32>, String) {
    use std::process::Stdio;
    let mut child = bin()
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the command writes its first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn no_command_panics_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, consents) = setup(dir.path());
    let log = dir.path().join("decisions.jsonl");
    crate::audit_cli::write_log(&log, 3).await;
    let log = log.display().to_string();
    let db = format!("sqlite:{}", dir.path().join("consent.db").display());
    let granted = bin()
        .args(["consent", "grant", "--store", &db, "--subject", "u1"])
        .args([
            "--recipient",
            "credit-bureau-us",
            "--purpose",
            "credit_scoring",
        ])
        .args(["--category", "user.financial", "--destination", "US"])
        .args([
            "--method",
            "explicit",
            "--expires-at",
            "2099-01-01T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(
        granted.status.success(),
        "{}",
        String::from_utf8_lossy(&granted.stderr)
    );
    let commands: Vec<Vec<&str>> = vec![
        vec![
            "explain",
            "--policy",
            &policy,
            "--path",
            "/payments/u123/2026-01.json",
            "--client-ip",
            "127.0.0.20",
            "--purpose",
            "credit_scoring",
            "--consents",
            &consents,
        ],
        vec!["check", &policy],
        vec!["audit", "verify", &log],
        vec!["audit", "report", &log],
        vec!["audit", "query", "--format", "table", &log],
        vec!["consent", "list", "--store", &db],
        vec![
            "geo",
            "lookup",
            "127.0.0.2",
            "127.0.0.20",
            "--policy",
            &policy,
        ],
        vec!["--help"],
        vec!["audit", "--help"],
    ];
    let mut failed = Vec::new();
    for args in &commands {
        let (code, stderr) = with_reader_gone(args, dir.path());
        if code != Some(0) || stderr.contains("panicked") || stderr.contains("Broken pipe") {
            failed.push(format!("{args:?}: exit {code:?}, stderr {stderr:?}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
