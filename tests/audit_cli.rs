//! `residency-proxy audit verify` run as a user would: on a log written by the real writer,
//! untouched and tampered with.

use residency_proxy::audit::LogWriter;
use residency_proxy::audit::record::{Record, RequestContext, failure_record};
use residency_proxy::policy::Reason;
use residency_proxy::policy::model::LogTarget;
use std::path::Path;
use std::process::{Command, Output};

/// Writes `n` decision records to `path` through the writer.
async fn write_log(path: &Path, n: usize) {
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
            id: format!("r{i}"),
            ts: jiff::Timestamp::UNIX_EPOCH,
            method: "GET",
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
    assert_eq!(text(&out.stdout), "ok: 4 records, 0 checkpoints\n");
    // The folder holding it verifies the same.
    let out = verify(dir.path());
    assert_eq!(text(&out.stdout), "ok: 4 records, 0 checkpoints\n");
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
