//! Fixtures for the tests of the log's writer and readers: a policy, a signing key, realistic
//! records, and logs written by the real writer (a reader is tested on what the writer
//! writes, never on hand-made lines alone). Compiled for tests only.

use crate::audit::chain::GENESIS;
use crate::audit::files;
use crate::audit::keys::SigningKey;
use crate::audit::read::verify::{VerifyOptions, verify};
use crate::audit::record::{
    ConsentRec, DecisionRecord, DisclosureRecord, OutcomeRecord, Record, RecordCounts,
    RequestContext, Stamp, VERSION, failure_record,
};
use crate::audit::write::{LogFailed, LogWriter};
use crate::policy::model::{Durability, LogSettings, LogTarget};
use crate::policy::{Policy, Reason};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A minimal policy (home CN, one upstream, subjects logged as they are).
pub(crate) fn policy() -> Policy {
    crate::policy::compile::from_str(
        "t.toml",
        "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n[[upstreams]]\nname='u'\nurl='http://127.0.0.1:1'\n",
    )
    .unwrap()
}

/// A fresh Ed25519 signing key.
pub(crate) fn test_key() -> Arc<SigningKey> {
    let pem = SigningKey::generate_pem();
    Arc::new(SigningKey::from_pem(pem.as_bytes(), Path::new("test.key")).unwrap())
}

/// Options that trust only `key`.
pub(crate) fn trusting(key: &SigningKey) -> VerifyOptions {
    VerifyOptions {
        keys: vec![key.public_key().to_vec()],
        ..VerifyOptions::default()
    }
}

/// A realistic decision record whose id and path name `n`.
pub(crate) fn record(policy: &Policy, n: usize) -> Record {
    let headers = http::HeaderMap::new();
    let path = format!("/payments/u{n}/2026-01.json");
    let cx = RequestContext {
        id: format!("r{n}").as_str().into(),
        ts: jiff::Timestamp::UNIX_EPOCH,
        method: &http::Method::GET,
        host: Some("store.example"),
        raw_path: &path,
        query: None,
        headers: &headers,
        peer: "203.0.113.9".parse().unwrap(),
    };
    Record::Decision(Box::new(failure_record(
        policy,
        &cx,
        Reason::LogUnavailable,
        "log.on_failure",
    )))
}

/// The policy's log settings, writing to `path` in `durability`.
pub(crate) fn settings(policy: &Policy, path: &Path, durability: Durability) -> LogSettings {
    let mut s = policy.log.clone();
    s.target = LogTarget::File(path.into());
    s.durability = durability;
    s
}

/// The lines of the file at `path`, parsed.
pub(crate) fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The lines of `kind`.
pub(crate) fn of_kind(lines: &[Value], kind: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l["kind"] == kind)
        .cloned()
        .collect()
}

/// Opens the log at `path`, appends records `ids` one by one, and closes it.
pub(crate) async fn write_log(path: &Path, ids: std::ops::Range<usize>) {
    write_log_with(path, ids, None, |_| {}).await;
}

/// [`write_log`] with a signing key and settings changed by `tweak`.
pub(crate) async fn write_log_with(
    path: &Path,
    ids: std::ops::Range<usize>,
    key: Option<Arc<SigningKey>>,
    tweak: impl FnOnce(&mut LogSettings),
) {
    let p = policy();
    let mut s = settings(&p, path, Durability::Write);
    tweak(&mut s);
    let w = LogWriter::open(&s, key).unwrap();
    for n in ids {
        w.append(record(&p, n)).await.unwrap();
    }
    w.close().await;
}

/// Asserts the file is one chain from the genesis, that it verifies, and that it holds
/// `n` decision records; returns them.
pub(crate) fn assert_chain(path: &Path, n: usize) -> Vec<Value> {
    let lines = lines(path);
    let mut prev = GENESIS.to_string();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as u64 + 1, "line {}", i + 1);
        assert_eq!(l["prev"], prev.as_str(), "line {}", i + 1);
        prev = l["hash"].as_str().unwrap().to_string();
    }
    verify(path).unwrap_or_else(|e| panic!("the log does not verify: {e}"));
    let decisions = of_kind(&lines, "decision");
    assert_eq!(decisions.len(), n);
    decisions
}

/// Appends all records concurrently, so that they can share a batch.
pub(crate) async fn append_all(w: &LogWriter, records: Vec<Record>) -> Vec<Result<(), LogFailed>> {
    let tasks: Vec<_> = records
        .into_iter()
        .map(|r| {
            let w = w.clone();
            tokio::spawn(async move { w.append(r).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Runs `f` on a runtime that is then dropped without closing the writer: for a writer
/// in `write` mode, whose committer is a task of that runtime, this is a crash.
pub(crate) fn crash_after<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(f);
    drop(rt);
}

/// The rotated files of the log at `active`, oldest first.
pub(crate) fn rotated(active: &Path) -> Vec<PathBuf> {
    files::rotated_siblings(active).unwrap()
}

/// A decision record at `ts` (seconds after 2026-11-28T04:00:00Z) with id `id`, for the
/// bureau abroad (`credit-bureau-us`, US), purpose `credit_scoring`: `reason` on `path`,
/// forwarded (`allow`) unless the reason is a refusal.
pub(crate) fn decision_at(
    policy: &Policy,
    id: &str,
    ts: i64,
    reason: Reason,
    path: &str,
) -> DecisionRecord {
    let headers = http::HeaderMap::new();
    let cx = RequestContext {
        id: id.into(),
        ts: at(ts),
        method: &http::Method::GET,
        host: Some("store.example"),
        raw_path: path,
        query: None,
        headers: &headers,
        peer: "203.0.113.9".parse().unwrap(),
    };
    let mut d = failure_record(policy, &cx, reason, "datasets.exports.cross_border");
    let allowed = matches!(reason, Reason::Consented | Reason::ConsentFiltered);
    d.decision = if allowed { "allow" } else { "deny" };
    d.status = Some(if allowed { 200 } else { 451 });
    d.purpose = Some("credit_scoring".into());
    d.category = Some("user.financial".into());
    d.recipient.id = Some("credit-bureau-us".into());
    d.recipient.country = crate::policy::country::Country::parse("US");
    d.client.country = crate::policy::country::Country::parse("US");
    d
}

/// 2026-11-28T04:00:00Z and `secs` seconds.
pub(crate) fn at(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_795_838_400 + secs).unwrap()
}

/// A disclosure record of exchange `id`'s batch `batch`, carrying `records` records and
/// naming `subjects` with their consents.
pub(crate) fn disclosure(
    id: &str,
    ts: i64,
    batch: u64,
    records: u64,
    subjects: &[(&str, Option<&str>)],
) -> Record {
    Record::Disclosure(Box::new(DisclosureRecord {
        batch,
        id: id.into(),
        instance: None,
        kind: "disclosure",
        prev: Default::default(),
        records,
        seq: 0,
        subjects: subjects
            .iter()
            .map(|(s, c)| (s.to_string(), c.map(Into::into)))
            .collect(),
        ts: Stamp(at(ts)),
        v: VERSION,
    }))
}

/// The outcome record of exchange `id`: `bytes` out, status 200, complete.
pub(crate) fn outcome(id: &str, ts: i64, bytes: u64) -> Record {
    counted(id, ts, bytes, None)
}

/// [`outcome`] of a bulk exchange, with what its filter let through.
pub(crate) fn counted(id: &str, ts: i64, bytes: u64, records: Option<RecordCounts>) -> Record {
    Record::Outcome(OutcomeRecord {
        instance: None,
        bytes_in: 0,
        bytes_out: bytes,
        complete: true,
        detail: None,
        duration_ms: 12.5,
        error: None,
        id: id.into(),
        kind: "outcome",
        prev: Default::default(),
        records: records.map(Box::new),
        seq: 0,
        status: 200,
        ts: Stamp(at(ts)),
        upstream: None,
        v: VERSION,
    })
}

/// Writes a log with two bulk exports, through the real writer:
///
/// - `u1` read on its own under consent `c-1` (collected `explicit`), id `p1`;
/// - `b1`, `/exports/spending/2026-11.jsonl` of dataset `exports`, filtered: batch 1 names
///   `u1` (`c-1`) and `u2` (`c-2`) among 3 records, batch 2 names `u3` (`c-3`) among 2;
///   its outcome counts 5 records kept (400 bytes), 3 dropped `consent_missing` and 1
///   `no_subject`;
/// - `a1`, `/exports/spending/2026-12.jsonl` in audit mode: batch 1 names `u1` (`c-1`) and
///   `u4` (no consent) among 2 records; its outcome counts 2 kept and 1 that would have been
///   dropped `consent_missing`;
/// - `d1`, a refusal of `u5`.
///
/// Subjects are written as they are (`pseudonymize = false`).
pub(crate) async fn write_bulk_log(path: &Path) {
    let p = policy();
    let w = LogWriter::open(&settings(&p, path, Durability::Write), None).unwrap();
    let mut single = decision_at(&p, "p1", 0, Reason::Consented, "/payments/u1/2026-11.json");
    single.subject = Some("u1".into());
    single.dataset = Some("payments".into());
    single.consent = Some(ConsentRec {
        id: "c-1".into(),
        method: Some("explicit".into()),
        result: "valid",
        why: None,
    });
    let export = "/exports/spending/2026-11.jsonl";
    let mut b1 = decision_at(&p, "b1", 10, Reason::ConsentFiltered, export);
    b1.dataset = Some("exports".into());
    let mut a1 = decision_at(
        &p,
        "a1",
        20,
        Reason::ConsentFiltered,
        "/exports/spending/2026-12.jsonl",
    );
    a1.dataset = Some("exports".into());
    a1.enforced = false;
    let mut d1 = decision_at(
        &p,
        "d1",
        30,
        Reason::ConsentMissing,
        "/payments/u5/2026-11.json",
    );
    d1.subject = Some("u5".into());
    d1.dataset = Some("payments".into());
    let records = [
        Record::Decision(Box::new(single)),
        outcome("p1", 1, 100),
        Record::Decision(Box::new(b1)),
        disclosure("b1", 11, 1, 3, &[("u1", Some("c-1")), ("u2", Some("c-2"))]),
        Record::Decision(Box::new(a1)),
        disclosure("a1", 21, 1, 2, &[("u1", Some("c-1")), ("u4", None)]),
        disclosure("b1", 22, 2, 2, &[("u3", Some("c-3"))]),
        counted(
            "b1",
            23,
            512,
            Some(RecordCounts {
                dropped: [("consent_missing", 3), ("no_subject", 1)].into(),
                kept: 5,
                kept_bytes: 400,
                would_drop: Default::default(),
            }),
        ),
        counted(
            "a1",
            24,
            256,
            Some(RecordCounts {
                dropped: Default::default(),
                kept: 2,
                kept_bytes: 160,
                would_drop: [("consent_missing", 1)].into(),
            }),
        ),
        Record::Decision(Box::new(d1)),
        outcome("d1", 31, 0),
    ];
    for r in records {
        w.append(r).await.unwrap();
    }
    w.close().await;
}

/// Writes a sidecar's log as its workers do, through the real writer: chain `k` (worker `k`)
/// in [`files::worker_path`] of `dir/decisions.jsonl`, under instance `side` for worker 0 and
/// `side-wK` for the others, holding `chains[k]`, signed with `key` when given, and closed.
/// Returns the chains' active files.
pub(crate) async fn write_worker_chains(
    dir: &Path,
    key: Option<Arc<SigningKey>>,
    chains: Vec<Vec<Record>>,
) -> Vec<PathBuf> {
    let p = policy();
    let mut active = Vec::new();
    for (k, records) in chains.into_iter().enumerate() {
        let path = files::worker_path(&dir.join("decisions.jsonl"), k);
        let mut s = settings(&p, &path, Durability::Write);
        s.instance = Arc::from(match k {
            0 => "side".to_string(),
            k => format!("side-w{k}"),
        });
        let w = LogWriter::open(&s, key.clone()).unwrap();
        for r in records {
            w.append(r).await.unwrap();
        }
        w.close().await;
        active.push(path);
    }
    active
}

/// A decision about `subject` at `ts` (seconds after 2026-11-28T04:00:00Z) with id `id`, as
/// [`decision_at`] makes it (consented, to the bureau abroad).
pub(crate) fn subject_decision(policy: &Policy, id: &str, ts: i64, subject: &str) -> Record {
    let mut d = decision_at(
        policy,
        id,
        ts,
        Reason::Consented,
        &format!("/payments/{subject}/2026-11.json"),
    );
    d.subject = Some(subject.into());
    d.dataset = Some("payments".into());
    Record::Decision(Box::new(d))
}
