//! Decisions joined to the applications' traces: a request's W3C `traceparent` is kept in its
//! decision record (and passed upstream untouched), a malformed one is not logged, `audit query
//! --trace` finds a trace's decisions, and the proxy's own request span carries the decision
//! id and the trace id, so that either leads to the other.

use crate::support::client::{self, empty, request};
use crate::support::proxy::{APP, BUREAU, HOME_IP, PolicySpec, payments_spec};
use crate::support::upstream::{Reply as Serve, Upstream};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

#[tokio::test]
async fn a_traceparent_is_kept_in_the_decision_record_and_passed_on_unchanged() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = payments_spec(&home.url()).start().await;
    let header = traceparent(TRACE, SPAN);
    let r = client::get(
        APP,
        proxy.addr,
        "/payments/u1/2026-01.json",
        &[("traceparent", &header), ("tracestate", "vendor=opaque")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The response names the decision, the record names the trace.
    let id = r.decision_id();
    let record = proxy.log.decision(&id);
    assert_eq!(record["trace"], json!({"trace_id": TRACE, "span_id": SPAN}));
    // The application's trace goes on upstream as it came.
    let seen = home.last();
    assert_eq!(seen.headers["traceparent"], header.as_str());
    assert_eq!(seen.headers["tracestate"], "vendor=opaque");

    // A refusal is joined to its trace too: the bureau has no consent for u2.
    let other = "0af7651916cd43dd8448eb211c80319c";
    let r = client::get(
        BUREAU,
        proxy.addr,
        "/payments/u2/2026-01.json",
        &[
            ("traceparent", &traceparent(other, "b7ad6b7169203331")),
            ("x-purpose", "credit_scoring"),
        ],
    )
    .await;
    assert_eq!(r.status, 451, "{}", r.text());
    let record = proxy.log.decision(&r.decision_id());
    assert_eq!(record["trace"]["trace_id"], other);
    assert_eq!(record["decision"], "deny");

    // Without the header the record has no trace at all.
    let r = client::get(APP, proxy.addr, "/payments/u1/2026-01.json", &[]).await;
    let record = proxy.log.decision(&r.decision_id());
    assert!(record.get("trace").is_none(), "{record}");
}

#[tokio::test]
async fn malformed_traceparents_are_not_logged_and_still_passed_on() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = payments_spec(&home.url()).start().await;
    let malformed = [
        // Upper case, a version this proxy does not read, the forbidden version, all-zero
        // ids, a short id, a missing part, something else entirely.
        format!("00-{}-{SPAN}-01", TRACE.to_ascii_uppercase()),
        format!("01-{TRACE}-{SPAN}-01"),
        format!("ff-{TRACE}-{SPAN}-01"),
        format!("00-{}-{SPAN}-01", "0".repeat(32)),
        format!("00-{TRACE}-{}-01", "0".repeat(16)),
        format!("00-{}-{SPAN}-01", &TRACE[..31]),
        format!("00-{TRACE}-{SPAN}"),
        "not a trace".to_string(),
    ];
    for value in &malformed {
        let r = client::get(
            APP,
            proxy.addr,
            "/payments/u1/2026-01.json",
            &[("traceparent", value)],
        )
        .await;
        assert_eq!(r.status, 200, "{value}: {}", r.text());
        let record = proxy.log.decision(&r.decision_id());
        assert!(record.get("trace").is_none(), "{value}: {record}");
        assert_eq!(home.last().headers["traceparent"], value.as_str());
    }
    // Two headers contradict each other: neither is believed.
    let req = request("GET", "/payments/u1/2026-01.json")
        .header("traceparent", traceparent(TRACE, SPAN))
        .header("traceparent", traceparent(TRACE, "b7ad6b7169203331"))
        .body(empty())
        .unwrap();
    let r = client::send(APP, proxy.addr, req).await;
    assert_eq!(r.status, 200);
    let record = proxy.log.decision(&r.decision_id());
    assert!(record.get("trace").is_none(), "{record}");
    assert_eq!(home.last().headers.get_all("traceparent").iter().count(), 2);
}

fn audit_query(log: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["audit", "query"])
        .arg(log)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn audit_query_finds_the_decisions_of_a_trace() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = payments_spec(&home.url()).start().await;
    let other = "0af7651916cd43dd8448eb211c80319c";
    let mut ids_of_trace = Vec::new();
    // Two calls of one trace (two spans of the application), one of another, one of none.
    for (trace, span) in [
        (Some(TRACE), SPAN),
        (Some(other), SPAN),
        (None, SPAN),
        (Some(TRACE), "b7ad6b7169203331"),
    ] {
        let header = trace.map(|t| traceparent(t, span));
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| vec![("traceparent", h)])
            .unwrap_or_default();
        let r = client::get(APP, proxy.addr, "/payments/u1/2026-01.json", &headers).await;
        assert_eq!(r.status, 200);
        if trace == Some(TRACE) {
            ids_of_trace.push(r.decision_id());
        }
    }
    proxy.shutdown().await;
    let log = &proxy.log.path;
    // The records with a trace chain and verify as every record does.
    let verified = Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["audit", "verify"])
        .arg(log)
        .output()
        .unwrap();
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );

    let (code, out, err) = audit_query(log, &["--trace", TRACE]);
    assert_eq!(code, 0, "{err}");
    let found: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = found.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ids_of_trace);
    assert!(found.iter().all(|r| r["trace"]["trace_id"] == TRACE));
    let spans: Vec<&str> = found
        .iter()
        .map(|r| r["trace"]["span_id"].as_str().unwrap())
        .collect();
    assert_eq!(spans, [SPAN, "b7ad6b7169203331"]);

    // A header pasted whole from an application's log, in capitals, names its trace too.
    let pasted = traceparent(other, SPAN);
    let (code, out, _) = audit_query(log, &["--trace", &pasted]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (code, out, _) = audit_query(log, &["--trace", &other.to_ascii_uppercase()]);
    assert_eq!((code, out.lines().count()), (0, 1));
    // Combined with other filters, as every filter is.
    let (_, out, _) = audit_query(log, &["--trace", TRACE, "--decision", "deny"]);
    assert_eq!(out.lines().count(), 0, "{out}");

    let (code, out, err) = audit_query(log, &["--trace", "not-a-trace"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains("--trace \"not-a-trace\" is not a trace id"),
        "{err}"
    );
}

/// The proxy's own log, as JSON lines on standard error, with the request span enabled
/// (`residency_proxy::proxy::pipeline=debug`), collected as they come.
struct OwnLog {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl OwnLog {
    fn start(policy: &Path, dir: &Path) -> OwnLog {
        let mut child = Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
            .args([
                "--log-format",
                "json",
                "serve",
                "--workers",
                "1",
                "--policy",
            ])
            .arg(policy)
            .current_dir(dir)
            .env("RUST_LOG", "info,residency_proxy::proxy::pipeline=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        OwnLog { child, lines }
    }

    async fn event(&self, message: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|e| e["fields"]["message"] == message)
            {
                return e.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no event \"{message}\" in {:?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for OwnLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_proxy_s_own_request_span_carries_the_decision_id_and_the_trace_id() {
    // A store at home that is down: the proxy logs the failure inside the request's span.
    let closed = std::net::TcpListener::bind((HOME_IP, 0)).unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let spec = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &down)
        .toml(&crate::support::proxy::payments_dataset(
            "cn-store", "consent", "consent",
        ));
    let dir = tempfile::tempdir().unwrap();
    let (policy, _) = spec.write_files(dir.path());
    let own = OwnLog::start(&policy, dir.path());
    let serving = own.event("residency-proxy serving").await;
    let addr = serving["fields"]["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let r = client::get(
        APP,
        addr,
        "/payments/u1/2026-01.json",
        &[("traceparent", &traceparent(TRACE, SPAN))],
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let id = r.decision_id();
    let failed = own.event("upstream request failed").await;
    let span = &failed["span"];
    assert_eq!(span["name"], "request", "{failed}");
    assert_eq!(span["decision.id"], id.as_str(), "{failed}");
    assert_eq!(span["trace_id"], TRACE, "{failed}");
    // The decision record, found by the id the span carries, names the same trace.
    let log = dir.path().join("decisions.jsonl");
    let record = crate::support::log::DecisionLog::new(log).decision(&id);
    assert_eq!(record["trace"]["trace_id"], TRACE);
}
