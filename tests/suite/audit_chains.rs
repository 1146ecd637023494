//! `audit verify|query|report|subject|export` over the log folder of a sidecar with several
//! workers (one chain per worker: `decisions.jsonl`, `decisions.w1.jsonl`, …), run as a user
//! runs them: every chain verified on its own and named, a tampered one failing by name,
//! every reader seeing the records of all chains in time order; and a folder written by one
//! worker upgraded in place, its chain continued by worker 0 beside a new chain.

use residency_proxy::audit::files::worker_path;
use residency_proxy::audit::keys::SigningKey;
use residency_proxy::audit::record::{Record, RequestContext, failure_record};
use residency_proxy::audit::{LogWriter, Pseudonymizer};
use residency_proxy::policy::Reason;
use residency_proxy::policy::model::LogTarget;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_residency-proxy");

/// Exit code, stdout, stderr of the binary run with `args`.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A sidecar's log folder and the key its writers sign (and pseudonymise) with.
struct Sidecar {
    _dir: tempfile::TempDir,
    logs: PathBuf,
    key_file: String,
    key: Arc<SigningKey>,
}

impl Sidecar {
    fn new() -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let pem = SigningKey::generate_pem();
        let key_path = dir.path().join("log-signing.key");
        std::fs::write(&key_path, &pem).unwrap();
        let key = Arc::new(SigningKey::from_pem(pem.as_bytes(), &key_path).unwrap());
        Sidecar {
            logs,
            key_file: key_path.display().to_string(),
            key,
            _dir: dir,
        }
    }

    /// Worker `k`'s active file.
    fn chain(&self, k: usize) -> PathBuf {
        worker_path(&self.logs.join("decisions.jsonl"), k)
    }

    fn folder(&self) -> String {
        self.logs.display().to_string()
    }

    /// Opens worker `k`'s chain (instance `side`, or `side-wK`) as the writer does at start
    /// (continuing what the file holds), appends a decision per `(id, seconds after
    /// 2026-11-28T04:00:00Z, subject, allowed)`, and closes it with a final checkpoint.
    async fn write(&self, k: usize, decisions: &[(&str, i64, &str, bool)]) {
        // Subjects are pseudonymised below, as the proxy does before its writer.
        let policy = residency_proxy::policy::compile::from_str(
            "t.toml",
            "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n",
        )
        .unwrap();
        let mut settings = policy.log.clone();
        settings.target = LogTarget::File(self.chain(k));
        settings.instance = Arc::from(match k {
            0 => "side".to_string(),
            k => format!("side-w{k}"),
        });
        let writer = LogWriter::open(&settings, Some(self.key.clone())).unwrap();
        let pseudo = Pseudonymizer::new(&self.key.pseudonym_key());
        let headers = http::HeaderMap::new();
        for &(id, secs, subject, allowed) in decisions {
            let subject = pseudo.pseudonym(subject);
            let path = format!("/payments/{subject}/2026-11.json");
            let cx = RequestContext {
                id: id.into(),
                ts: jiff::Timestamp::from_second(1_795_838_400 + secs).unwrap(),
                method: &http::Method::GET,
                host: Some("store.example"),
                raw_path: &path,
                query: None,
                headers: &headers,
                peer: "203.0.113.9".parse().unwrap(),
            };
            let reason = if allowed {
                Reason::Consented
            } else {
                Reason::ConsentMissing
            };
            let mut d = failure_record(&policy, &cx, reason, "datasets.payments.cross_border");
            d.decision = if allowed { "allow" } else { "deny" };
            d.status = Some(if allowed { 200 } else { 451 });
            d.subject = Some(subject);
            d.dataset = Some("payments".into());
            d.purpose = Some("credit_scoring".into());
            d.recipient.id = Some("credit-bureau-us".into());
            writer.append(Record::Decision(Box::new(d))).await.unwrap();
        }
        writer.close().await;
    }
}

/// Edits the first `from` in line `line` (1-based) of `path`, leaving its hash as it was.
fn edit(path: &Path, line: usize, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    let edited = lines[line - 1].replacen(from, to, 1);
    assert_ne!(edited, lines[line - 1], "{from} not in line {line}");
    lines[line - 1] = edited;
    std::fs::write(path, lines.concat()).unwrap();
}

#[tokio::test]
async fn every_reader_sees_every_workers_chain_and_verify_names_each() {
    let s = Sidecar::new();
    // u1 is allowed on worker 0 and 2, refused on worker 1; times interleave across chains.
    s.write(0, &[("a", 0, "u1", true), ("d", 3, "u2", true)])
        .await;
    s.write(
        1,
        &[
            ("b", 1, "u2", true),
            ("e", 4, "u1", false),
            ("g", 6, "u2", true),
        ],
    )
    .await;
    s.write(2, &[("c", 2, "u1", true), ("f", 5, "u2", false)])
        .await;
    let folder = s.folder();

    // verify: a line per chain, each named by its file.
    let (code, out, err) = run(&["audit", "verify", &folder]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, want) in lines.iter().zip([
        "decisions.jsonl: ok, 2 records, 1 checkpoints, last seq 3 at ",
        "decisions.w1.jsonl: ok, 3 records, 1 checkpoints, last seq 4 at ",
        "decisions.w2.jsonl: ok, 2 records, 1 checkpoints, last seq 3 at ",
    ]) {
        assert!(line.starts_with(want), "{line}");
        assert!(
            line.ends_with("(the key the log carries; pass --key)"),
            "{line}"
        );
    }
    // Naming one chain's file verifies that chain alone, as a single log is.
    let (code, out, err) = run(&["audit", "verify", &s.chain(1).display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().next(), Some("ok: 3 records, 1 checkpoints"));
    assert!(out.contains("signatures: 1 verified"), "{out}");

    // query: every chain's decisions, merged by time.
    let (code, out, err) = run(&["audit", "query", &folder]);
    assert_eq!(code, 0, "{err}");
    let got: Vec<(String, String)> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["instance"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("a", "side"),
        ("b", "side-w1"),
        ("c", "side-w2"),
        ("d", "side"),
        ("e", "side-w1"),
        ("f", "side-w2"),
        ("g", "side-w1"),
    ];
    assert_eq!(
        got,
        want.map(|(i, n)| (i.to_string(), n.to_string())),
        "{out}"
    );
    let (_, table, _) = run(&["audit", "query", "--format", "table", &folder]);
    // Each chain numbers its own records: the table says whose each row's is.
    let rows: Vec<&str> = table.lines().collect();
    assert!(
        rows[0].contains(" SEQ      INSTANCE         DECISION "),
        "{table}"
    );
    assert!(
        rows[2].contains(" 1        side-w1          allow "),
        "{table}"
    );
    assert_eq!(
        table.lines().last(),
        Some("7 of 10 records matched (3 files)"),
        "{table}"
    );

    // report: the counts of all chains.
    let (code, out, err) = run(&["audit", "report", "--format", "json", &folder]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["total"], 7, "{r}");
    assert_eq!(r["by_decision"]["deny"], 2, "{r}");

    // subject: every chain verified first, then u1's records wherever they were logged.
    let (code, out, err) = run(&[
        "audit",
        "subject",
        "u1",
        "--signing-key",
        &s.key_file,
        &folder,
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let verified: Vec<&str> = v["verified"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(verified.len(), 3, "{v}");
    assert!(verified[2].starts_with("decisions.w2.jsonl: ok, "), "{v}");
    let shown: Vec<(&str, &str)> = v["report"]["disclosures"]["credit-bureau-us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap(), d["instance"].as_str().unwrap()))
        .collect();
    assert_eq!(shown, [("a", "side"), ("c", "side-w2")], "{v}");
    let refused = v["report"]["refusals"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{v}");
    assert_eq!(refused[0]["instance"], "side-w1");

    // export: every record of every chain, checkpoints included.
    let parquet = s.logs.parent().unwrap().join("side.parquet");
    let (code, _, err) = run(&["audit", "export", &folder, &parquet.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.trim_end(), format!("{}: 10 records", parquet.display()));

    // One chain tampered with: it fails by name, the others are still listed as verified.
    edit(&s.chain(2), 1, "\"status\":200", "\"status\":204");
    let (code, out, err) = run(&["audit", "verify", &folder]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("decisions.jsonl: ok, "), "{out}");
    assert!(lines[1].starts_with("decisions.w1.jsonl: ok, "), "{out}");
    assert_eq!(
        lines[2],
        format!(
            "decisions.w2.jsonl: {}:1: hash mismatch: record was edited",
            s.chain(2).display()
        )
    );
    assert_eq!(err, "audit verify: 1 of 3 chains failed\n");
    // ... and no subject report is made from the folder.
    let (code, out, err) = run(&[
        "audit",
        "subject",
        "u1",
        "--signing-key",
        &s.key_file,
        &folder,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with("decisions.w2.jsonl: ") && err.contains("did not verify"),
        "{err}"
    );

    // A file of another log beside the chains is still another log.
    std::fs::write(s.logs.join("consents.jsonl"), "").unwrap();
    let (code, _, err) = run(&["audit", "verify", &folder]);
    assert_eq!(code, 2);
    assert!(err.contains("several logs (consents, decisions)"), "{err}");
}

/// A folder written by one worker, then by two after an upgrade: worker 0 continues the
/// existing chain in the same file, worker 1 starts its own at seq 1, and verify shows both.
#[tokio::test]
async fn a_single_chain_folder_upgrades_to_several_workers_without_a_break() {
    let s = Sidecar::new();
    s.write(
        0,
        &[
            ("a", 0, "u1", true),
            ("b", 1, "u2", false),
            ("c", 2, "u1", true),
        ],
    )
    .await;
    let folder = s.folder();
    let (code, before, err) = run(&["audit", "verify", &folder]);
    assert_eq!(code, 0, "{err}");
    // One chain: the output of a single log, unchanged.
    let want = format!(
        "ok: 3 records, 1 checkpoints\nsignatures: 1 verified against the public key the log carries ({}); pass --key to check it is yours\n",
        s.key.fingerprint()
    );
    assert_eq!(before, want);

    // Restarted with two workers.
    s.write(0, &[("d", 10, "u1", true)]).await;
    s.write(1, &[("e", 11, "u2", true), ("f", 12, "u1", true)])
        .await;
    let (code, out, err) = run(&["audit", "verify", &folder]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    // The first run's 3 records and final checkpoint, then the second's record and its own.
    assert!(
        lines[0].starts_with("decisions.jsonl: ok, 4 records, 2 checkpoints, last seq 6 at "),
        "{out}"
    );
    assert!(
        lines[1].starts_with("decisions.w1.jsonl: ok, 2 records, 1 checkpoints, last seq 3 at "),
        "{out}"
    );
    let (_, out, _) = run(&["audit", "query", &folder]);
    let got: Vec<(String, u64)> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            (
                format!(
                    "{}@{}",
                    v["id"].as_str().unwrap(),
                    v["instance"].as_str().unwrap()
                ),
                v["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("a@side", 1),
        ("b@side", 2),
        ("c@side", 3),
        ("d@side", 5),
        ("e@side-w1", 1),
        ("f@side-w1", 2),
    ];
    assert_eq!(got, want.map(|(i, s)| (i.to_string(), s)));
}
