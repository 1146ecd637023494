//! `residency-proxy audit verify|query|report` run as a user would: on a log written by the
//! real writer, untouched and tampered with, and on a real proxy's log, open and rotated.

use crate::support::client;
use crate::support::proxy::{APP, BUREAU, HOME_IP, TestProxy, payments_spec};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::audit::LogWriter;
use residency_proxy::audit::record::{Record, RequestContext, failure_record};
use residency_proxy::policy::Reason;
use residency_proxy::policy::model::LogTarget;
use serde_json::Value;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// Writes `n` decision records to `path` through the writer.
pub(crate) async fn write_log(path: &Path, n: usize) {
    let policy = residency_proxy::policy::compile::from_str(
        "t.toml",
        "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n",
    )
    .unwrap();
    let mut settings = policy.log.clone();
    settings.target = LogTarget::File(path.into());
    let writer = LogWriter::open(&settings, None).unwrap();
    let headers = http::HeaderMap::new();
    for i in 0..n {
        let cx = RequestContext {
            id: format!("r{i}").as_str().into(),
            ts: jiff::Timestamp::UNIX_EPOCH,
            method: &http::Method::GET,
            host: None,
            raw_path: "/payments/u1/2026-01.json",
            query: None,
            headers: &headers,
            peer: "203.0.113.9".parse().unwrap(),
        };
        let rec = failure_record(&policy, &cx, Reason::NoRoute, "policy.unmatched");
        writer
            .append(Record::Decision(Box::new(rec)))
            .await
            .unwrap();
    }
    writer.close().await;
}

fn verify(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn an_untouched_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 4).await;
    let out = verify(&path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Written without a signing key: its final checkpoint is unsigned, and it says so
    // without claiming to know why.
    let want = "ok: 4 records, 1 checkpoints\nNOT SIGNED: none of the 1 checkpoints carries a signature, so nothing shows who wrote this log (written without [log] signing_key, or its signatures were all removed); pass --key to require them\n";
    assert_eq!(text(&out.stdout), want);
    // The folder holding it verifies the same.
    let out = verify(dir.path());
    assert_eq!(text(&out.stdout), want);
}

#[tokio::test]
async fn an_edited_record_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 4).await;
    let log = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = log.split_inclusive('\n').collect();
    let edited = lines[2].replace("\"status\":404", "\"status\":200");
    assert_ne!(edited, lines[2]);
    lines[2] = &edited;
    std::fs::write(&path, lines.concat()).unwrap();

    let out = verify(&path);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("{}:3: hash mismatch: record was edited\n", path.display())
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn an_unreadable_path_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.jsonl");
    let out = verify(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("missing.jsonl"), "{err}");
    assert!(err.contains("cannot read decision log"), "{err}");
}

#[tokio::test]
async fn an_empty_log_is_named_without_a_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.jsonl");
    std::fs::write(&path, "").unwrap();
    let out = verify(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "{}: the file is empty: no records",
            path.display()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn query_limit_counts_every_match_and_says_how_many_it_shows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 5).await;
    let table = |extra: &[&str]| {
        let out = run(
            ["audit", "query", "--kind", "decision", "--format", "table"]
                .iter()
                .copied()
                .chain(extra.iter().copied())
                .chain([path.to_str().unwrap()]),
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    // 5 decisions and the final checkpoint.
    let limited = table(&["--limit", "2"]);
    let rows: Vec<&str> = limited.lines().collect();
    assert_eq!(rows.len(), 4, "header, 2 rows, summary: {limited}");
    assert_eq!(
        rows[3],
        "5 of 6 records matched (1 file); the first 2 shown (--limit 2)"
    );
    let all = table(&[]);
    assert_eq!(all.lines().last(), Some("5 of 6 records matched (1 file)"));
    let roomy = table(&["--limit", "9"]);
    assert_eq!(
        roomy.lines().last(),
        Some("5 of 6 records matched (1 file)")
    );
}

/// Runs the binary with `args`.
fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(args)
        .output()
        .unwrap()
}

/// A proxy with `payments` (enforced: consent needed abroad) and `profiles` (audit mode:
/// transfers abroad would be denied, but are only logged).
async fn start(home: &Upstream) -> TestProxy {
    payments_spec(&home.url())
        .toml(
            r#"
[[datasets]]
name = 'profiles'
match = { path_prefix = '/profiles/' }
upstream = 'cn-store'
category = 'user.contact'
subject = { path_segment = 2 }
cross_border = 'deny'
third_party = 'allow'
mode = 'audit'
"#,
        )
        .log("checkpoint_interval = '1h'")
        .start()
        .await
}

/// A request: from, target, headers, the status it must get.
type Ask<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16);

/// Five requests, one of each outcome; returns their decision ids in order: domestic,
/// consented, consent_missing, cross_border_denied (audit mode, forwarded), no_route.
async fn five_requests(proxy: &TestProxy) -> Vec<String> {
    let p = [("x-purpose", "credit_scoring")];
    let cases: [Ask; 5] = [
        (APP, "/payments/u1/a.json", &[], 200),
        (BUREAU, "/payments/u1/a.json", &p, 200),
        (BUREAU, "/payments/u2/a.json", &p, 451),
        (BUREAU, "/profiles/u3/p.json", &p, 200),
        (APP, "/nowhere/x", &[], 404),
    ];
    let mut ids = Vec::new();
    for (from, target, headers, want) in cases {
        let r = client::get(from, proxy.addr, target, headers).await;
        assert_eq!(r.status, want, "{target}: {}", r.text());
        proxy.log.outcome(&r.decision_id()).await;
        ids.push(r.decision_id());
    }
    ids
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_log_fails_as_open_unless_open_is_given() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = start(&home).await;
    five_requests(&proxy).await;
    let log = proxy.log.path.clone();
    let out = verify(&log);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with(&format!("{}:10: open or truncated: the log ends at seq 10 without a final checkpoint (no checkpoint signs it)", log.display())), "{err}");
    let out = run([
        OsStr::new("audit"),
        "verify".as_ref(),
        "--open".as_ref(),
        log.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ok: 10 records, 0 checkpoints\nopen: 10 records from the start are not signed yet (up to seq 10)\n"
    );
    proxy.shutdown().await;
    assert_eq!(verify(&log).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_a_real_rotated_log() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = start(&home).await;
    let first = five_requests(&proxy).await;
    proxy
        .running()
        .shared
        .log
        .rotate()
        .await
        .unwrap()
        .expect("rotated");
    let second = five_requests(&proxy).await;
    proxy.shutdown().await;
    let log = proxy.log.path.clone();
    let key = proxy.dir.path().join("log-signing.key");
    let query = |args: &[&str]| {
        let mut a: Vec<&OsStr> = vec!["audit".as_ref(), "query".as_ref(), log.as_os_str()];
        a.extend(args.iter().map(OsStr::new));
        run(a)
    };

    // Both files are read, in order: ten decision records.
    let all = json_lines(&query(&[]));
    let ids: Vec<&str> = all.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        first
            .iter()
            .chain(&second)
            .map(String::as_str)
            .collect::<Vec<_>>()
    );

    let denied = json_lines(&query(&["--decision", "deny"]));
    assert!(denied.iter().all(|r| r["decision"] == "deny"));
    let reasons: Vec<&str> = denied
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "consent_missing").count(),
        2
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "cross_border_denied")
            .count(),
        2
    );
    let audit = json_lines(&query(&["--decision", "deny", "--enforced", "false"]));
    assert_eq!(audit.len(), 2);
    assert!(
        audit
            .iter()
            .all(|r| r["dataset"] == "profiles" && r["enforced"] == false)
    );

    let allowed = json_lines(&query(&["--dataset", "payments", "--decision", "allow"]));
    assert_eq!(allowed.len(), 4);
    let us = json_lines(&query(&["--country", "us"]));
    assert_eq!(us.len(), 6, "the bureau's three requests per run");
    let bureau = json_lines(&query(&["--recipient", "credit-bureau-us,payments-app"]));
    assert_eq!(bureau.len(), 10);

    // --subject: the raw identifier never appears in the log; its pseudonym does.
    let pseudonym = all[2]["subject"].as_str().unwrap().to_string();
    assert!(pseudonym.starts_with("hmac:"), "{pseudonym}");
    let by_key = json_lines(&query(&[
        "--subject",
        "u2",
        "--signing-key",
        key.to_str().unwrap(),
    ]));
    assert_eq!(by_key.len(), 2);
    assert!(by_key.iter().all(|r| r["subject"] == pseudonym.as_str()));
    let policy = proxy.policy_path.to_str().unwrap();
    assert_eq!(
        json_lines(&query(&["--subject", "u2", "--policy", policy])),
        by_key
    );
    let out = query(&["--subject", "u2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--subject needs the log's key"),
        "{}",
        text(&out.stderr)
    );

    // An exchange by id: its decision and its outcome.
    let exchange = json_lines(&query(&["--id", &first[1]]));
    let kinds: Vec<&str> = exchange
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["decision", "outcome"]);
    let checkpoints = json_lines(&query(&["--kind", "checkpoint"]));
    assert_eq!(checkpoints.len(), 2, "the rotation's and the final one");

    // Time bounds.
    assert!(json_lines(&query(&["--since", "1h"])).len() == 10);
    assert!(json_lines(&query(&["--until", "2000-01-01"])).is_empty());
    let since = all[5]["ts"].as_str().unwrap();
    assert_eq!(json_lines(&query(&["--since", since])).len(), 5);

    // A table for people, and usage errors for typos.
    let out = query(&["--reason", "consent_missing", "--format", "table"]);
    let table = text(&out.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("TIME (UTC)"), "{table}");
    assert_eq!(rows.len(), 4, "{table}");
    assert!(
        rows[1].contains("deny") && rows[1].contains("451") && rows[1].contains("credit-bureau-us"),
        "{table}"
    );
    assert_eq!(rows[3], "2 of 22 records matched (2 files)");
    let out = query(&["--reason", "consent_mising"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("\"consent_mising\" is not a reason code"));
    assert_eq!(
        query(&["--limit", "3"])
            .stdout
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_counts_decisions_and_what_audit_mode_would_have_blocked() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = start(&home).await;
    five_requests(&proxy).await;
    five_requests(&proxy).await;
    proxy.shutdown().await;
    let log = proxy.log.path.clone();

    let out = run([
        OsStr::new("audit"),
        "report".as_ref(),
        log.as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["total"], 10);
    let by_reason = &r["by_reason"];
    for reason in [
        "domestic",
        "consented",
        "consent_missing",
        "cross_border_denied",
        "no_route",
    ] {
        assert_eq!(by_reason[reason], 2, "{reason}: {r}");
    }
    assert_eq!(r["by_decision"]["allow"], 4, "{r}");
    assert_eq!(r["by_decision"]["deny_not_enforced"], 2, "{r}");
    assert_eq!(r["by_recipient"]["credit-bureau-us"], 6, "{r}");
    assert_eq!(r["by_destination_country"]["US"], 6, "{r}");
    let blocked = &r["would_have_been_blocked"];
    assert_eq!(blocked["total"], 2, "{r}");
    assert_eq!(blocked["by_dataset"]["profiles"], 2, "{r}");
    assert_eq!(blocked["by_reason"]["cross_border_denied"], 2, "{r}");

    let out = run([OsStr::new("audit"), "report".as_ref(), log.as_os_str()]);
    let report = text(&out.stdout);
    assert!(report.starts_with("10 decisions, "), "{report}");
    assert!(
        report.contains(
            "\nwould have been blocked (audit mode: denied in the log, forwarded anyway): 2\n"
        ),
        "{report}"
    );
    // Nothing before the start of the log.
    let out = run([
        OsStr::new("audit"),
        "report".as_ref(),
        log.as_os_str(),
        "--until".as_ref(),
        "2000-01-01".as_ref(),
    ]);
    assert!(
        text(&out.stdout).starts_with("0 decisions\n"),
        "{}",
        text(&out.stdout)
    );
}

/// A bulk export's log, as the proxy writes it: the decision that forwarded the export
/// filtered record by record, a disclosure naming the subjects of its batch (pseudonymised
/// under the log's key), its outcome. Every reader reads the disclosure with its decision.
#[tokio::test]
async fn a_bulk_disclosure_is_verified_queried_reported_and_exported() {
    use residency_proxy::audit::Pseudonymizer;
    use residency_proxy::audit::keys::SigningKey;
    use residency_proxy::audit::record::{DisclosureRecord, OutcomeRecord, RecordCounts, Stamp};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let pem = SigningKey::generate_pem();
    let key_file = dir.path().join("log-signing.key");
    std::fs::write(&key_file, &pem).unwrap();
    let key = Arc::new(SigningKey::from_pem(pem.as_bytes(), &key_file).unwrap());
    let pseudo = Pseudonymizer::new(&key.pseudonym_key());
    let policy = residency_proxy::policy::compile::from_str(
        "t.toml",
        "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n[[upstreams]]\nname='u'\nurl='http://127.0.0.1:1'\n",
    )
    .unwrap();
    let write = |path: std::path::PathBuf, disclosed_id: &'static str| {
        let (policy, key, pseudo) = (&policy, key.clone(), &pseudo);
        async move {
            let mut settings = policy.log.clone();
            settings.target = LogTarget::File(path);
            let writer = LogWriter::open(&settings, Some(key)).unwrap();
            let headers = http::HeaderMap::new();
            let ts = jiff::Timestamp::from_second(1_795_838_400).unwrap();
            let cx = RequestContext {
                id: "01BULK".into(),
                ts,
                method: &http::Method::GET,
                host: Some("storage.internal"),
                raw_path: "/exports/spending/2026-11.jsonl",
                query: None,
                headers: &headers,
                peer: "127.0.0.20".parse().unwrap(),
            };
            let mut d = failure_record(policy, &cx, Reason::ConsentFiltered, "datasets.exports");
            d.decision = "allow";
            d.status = Some(200);
            d.dataset = Some("spending-exports".into());
            d.purpose = Some("credit_scoring".into());
            d.recipient.id = Some("credit-bureau-us".into());
            d.recipient.country = residency_proxy::policy::country::Country::parse("US");
            let disclosure = DisclosureRecord {
                batch: 1,
                id: disclosed_id.into(),
                instance: None,
                kind: "disclosure",
                prev: Default::default(),
                records: 3,
                seq: 0,
                subjects: vec![
                    (pseudo.pseudonym("u2"), Some("c-2".into())),
                    (pseudo.pseudonym("u3"), Some("c-3".into())),
                ],
                ts: Stamp(ts),
                v: 1,
            };
            let outcome = OutcomeRecord {
                instance: None,
                bytes_in: 0,
                bytes_out: 300,
                complete: true,
                detail: None,
                duration_ms: 5.0,
                error: None,
                id: "01BULK".into(),
                kind: "outcome",
                prev: Default::default(),
                records: Some(Box::new(RecordCounts {
                    dropped: [("consent_missing", 2)].into(),
                    kept: 3,
                    kept_bytes: 240,
                    would_drop: Default::default(),
                })),
                seq: 0,
                status: 200,
                ts: Stamp(ts),
                upstream: None,
                v: 1,
            };
            for r in [
                Record::Decision(Box::new(d)),
                Record::Disclosure(Box::new(disclosure)),
                Record::Outcome(outcome),
            ] {
                writer.append(r).await.unwrap();
            }
            writer.close().await;
        }
    };
    let log = dir.path().join("decisions.jsonl");
    write(log.clone(), "01BULK").await;
    let key_arg = key_file.display().to_string();

    let out = verify(&log);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("disclosures: 1 records naming the subjects"),
        "{}",
        text(&out.stdout)
    );

    let out = run([
        OsStr::new("audit"),
        OsStr::new("query"),
        log.as_os_str(),
        OsStr::new("--subject"),
        OsStr::new("u2"),
        OsStr::new("--signing-key"),
        OsStr::new(&key_arg),
        OsStr::new("--format"),
        OsStr::new("table"),
    ]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let row = table.lines().nth(1).unwrap();
    for part in [
        "disclosure",
        "consent_filtered",
        "spending-expo…",
        "credit-bureau-us",
        "2 subjects",
        "batch 1 of 01BULK: 3 records left, 2 subjects named (GET /exports/spending/2026-11.jsonl)",
    ] {
        assert!(row.contains(part), "{part:?} in {table}");
    }
    assert_eq!(
        table.lines().last(),
        Some("1 of 4 records matched (1 file)")
    );

    let out = run([
        OsStr::new("audit"),
        OsStr::new("subject"),
        OsStr::new("u3"),
        OsStr::new("--signing-key"),
        OsStr::new(&key_arg),
        log.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v["report"]["disclosures"]["credit-bureau-us"][0];
    assert_eq!(d["id"], "01BULK");
    assert_eq!(d["consent_id"], "c-3");
    assert_eq!(d["purpose"], "credit_scoring");
    assert_eq!(d["bulk"]["path"], "/exports/spending/2026-11.jsonl");
    assert_eq!(d["bulk"]["batches"][0], 1);

    let out = run([OsStr::new("audit"), OsStr::new("report"), log.as_os_str()]);
    let report = text(&out.stdout);
    assert!(
        report.contains("bulk exports, filtered record by record"),
        "{report}"
    );
    assert!(
        report.contains("(named in 1 disclosure records)"),
        "{report}"
    );
    for (name, n) in [
        ("exchanges", 1),
        ("records kept", 3),
        ("records dropped", 2),
        ("subjects disclosed", 2),
    ] {
        let line = report
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap();
        let count = line.trim_start()[name.len()..].split_whitespace().next();
        assert_eq!(count, Some(n.to_string().as_str()), "{line}");
    }

    let parquet = dir.path().join("log.parquet");
    let out = run([
        OsStr::new("audit"),
        OsStr::new("export"),
        log.as_os_str(),
        parquet.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("4 records in 5 rows"),
        "{}",
        text(&out.stderr)
    );

    // A disclosure for a decision the chain does not hold, signed like the rest: it fails.
    let forged = dir.path().join("forged.jsonl");
    write(forged.clone(), "01OTHER").await;
    let out = verify(&forged);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(":2: disclosure for an unknown decision"),
        "{}",
        text(&out.stderr)
    );
}
