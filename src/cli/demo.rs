//! `demo`: the motivating case, replayed on loopback against the real proxy. Two storage
//! servers (one at home, one abroad), the proxy with `policies/demo.toml`, and callers bound
//! to source addresses that the policy places in different countries. One step is the bulk
//! case: a month's export of many users' purchases, of which only the consented users'
//! records leave, with the log naming them. The proxy's own log goes to a file in the demo's
//! folder, so that the story reads on its own. It stops as `serve` does: on SIGTERM or SIGINT,
//! with the decision log closed by its final checkpoint.

use super::certs::{SigningKeyFiles, signing_key_pair};
use super::serve::Signals;
use super::{CliError, CliResult, Exit, LogFormat, fail};
use crate::admin::Sidecar;
use crate::consent::ConsentRecord;
use crate::policy::model::{LogTarget, Policy};
use crate::proxy::snapshot::Overrides;
use crate::proxy::{RunningProxy, ServeConfig};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};

/// The demo policy, embedded so that the demo also runs outside the repository.
const DEMO_POLICY: &str = include_str!("../../policies/demo.toml");

/// The user's spending records that every step asks for.
const OBJECT: &str = "/payments/u123/2026-01.json";

/// The month's spending export: every user's purchases in one object.
const EXPORT: &str = "/exports/spending/2026-11.jsonl";

/// The export's lines: twelve purchases of five users (u123 consents explicitly in an earlier
/// step, u456 only through a pre-ticked box, u789 withdrew, u901 and u902 never consented), a
/// purchase that names no user, and a line cut off in the middle.
const EXPORT_LINES: [&str; 14] = [
    r#"{"user_id":"u123","date":"2026-11-02","merchant":"Grocery","amount":"231.50 CNY"}"#,
    r#"{"user_id":"u456","date":"2026-11-02","merchant":"Electronics","amount":"2999.00 CNY"}"#,
    r#"{"user_id":"u901","date":"2026-11-03","merchant":"Pharmacy","amount":"45.20 CNY"}"#,
    r#"{"user_id":"u789","date":"2026-11-04","merchant":"Rail tickets","amount":"553.00 CNY"}"#,
    r#"{"user_id":"u123","date":"2026-11-05","merchant":"Pharmacy","amount":"88.00 CNY"}"#,
    r#"{"date":"2026-11-06","merchant":"Cash withdrawal","amount":"500.00 CNY"}"#,
    r#"{"user_id":"u902","date":"2026-11-07","merchant":"Restaurant","amount":"312.00 CNY"}"#,
    r#"{"user_id":"u456","date":"2026-11-09","merchant":"Grocery","amount":"176.40 CNY"}"#,
    r#"{"user_id":"u901","date":"2026-11-11","merchant":"Fuel","amount":"350.00 CNY"}"#,
    r#"{"user_id":"u123","date":"2026-11-12","merchant":"Taxi","amou"#,
    r#"{"user_id":"u789","date":"2026-11-14","merchant":"Grocery","amount":"98.70 CNY"}"#,
    r#"{"user_id":"u123","date":"2026-11-18","merchant":"Online shop","amount":"129.00 CNY"}"#,
    r#"{"user_id":"u901","date":"2026-11-21","merchant":"Grocery","amount":"264.10 CNY"}"#,
    r#"{"user_id":"u902","date":"2026-11-25","merchant":"Fuel","amount":"410.00 CNY"}"#,
];

/// What the export step must show: the lines of `EXPORT_LINES` that leave (u123's whole
/// records, in order), and the records dropped, by reason, as the outcome record counts them.
const EXPORT_KEPT: [usize; 3] = [0, 4, 11];
const EXPORT_DROPPED: [(&str, u64); 5] = [
    ("consent_missing", 5),
    ("consent_method_invalid", 2),
    ("consent_revoked", 2),
    ("no_subject", 1),
    ("unparsable", 1),
];

/// Prints a line of the demo's narration. Unlike `println!`, it does not end the demo when
/// nobody reads standard output any more (`demo | head`): the proxy keeps serving until a
/// signal stops it, and then closes its log as it should.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The demo policy (written from the built-in copy if it does not exist).
    #[arg(long, value_name = "FILE", default_value = "policies/demo.toml")]
    pub policy: PathBuf,
    /// Proxy listen address, overriding the policy's.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Admin listen address, overriding the policy's.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Exit after the replay instead of staying up for your own calls.
    #[arg(long)]
    pub no_wait: bool,
}

/// A stand-in storage server that counts what reaches it.
struct Store {
    name: &'static str,
    requests: AtomicU64,
}

async fn store_service(
    store: Arc<Store>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    store.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let received = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let (status, body) = match method.as_str() {
        "PUT" | "POST" => (
            StatusCode::CREATED,
            format!(
                "{{\"stored\":\"{path}\",\"bytes\":{received},\"server\":\"{}\"}}\n",
                store.name
            ),
        ),
        _ if path.starts_with("/exports/spending/") => {
            let mut export = EXPORT_LINES.join("\n");
            export.push('\n');
            (StatusCode::OK, export)
        }
        _ if path.starts_with("/public/") => (
            StatusCode::OK,
            "{\"USD/CNY\":7.12,\"EUR/CNY\":7.71}\n".to_string(),
        ),
        _ => (
            StatusCode::OK,
            format!(
                "{{\"server\":\"{}\",\"object\":\"{path}\",\"records\":[{{\"date\":\"2026-01-03\",\"merchant\":\"Grocery\",\"amount\":\"231.50 CNY\"}},{{\"date\":\"2026-01-09\",\"merchant\":\"Pharmacy\",\"amount\":\"88.00 CNY\"}}]}}\n",
                store.name
            ),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let content_type = if path.ends_with(".jsonl") {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    resp.headers_mut()
        .insert("content-type", http::HeaderValue::from_static(content_type));
    Ok(resp)
}

async fn start_store(addr: SocketAddr, name: &'static str) -> Result<Arc<Store>, super::CliError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| fail(format!("cannot start the demo storage server \"{name}\" on {addr}: {e} (is another demo running?)")))?;
    let store = Arc::new(Store {
        name,
        requests: AtomicU64::new(0),
    });
    let s = store.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| store_service(s.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(store)
}

/// One HTTP exchange from a chosen source address.
pub async fn call(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, http::HeaderMap, String)> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let stream = socket.connect(to).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "storage.demo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(std::io::Error::other)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

fn consent(id: &str, subject: &str, method: &str, evidence: &str) -> ConsentRecord {
    let now = jiff::Timestamp::now();
    ConsentRecord {
        id: id.into(),
        subject: subject.into(),
        recipient: "credit-bureau-us".into(),
        purposes: vec!["credit_scoring".into()],
        categories: vec!["user.financial".into()],
        destinations: vec!["US".into()],
        method: method.into(),
        granted_at: now - jiff::SignedDuration::from_secs(60),
        expires_at: now + jiff::SignedDuration::from_hours(24 * 365),
        revoked_at: None,
        evidence: Some(evidence.into()),
    }
}

/// Rewrites the consent file atomically (write, then rename), as a GitOps tool would.
fn write_consents(path: &Path, records: &[ConsentRecord]) -> std::io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Waits until the running proxy's consent index holds exactly `ids` for `subject`.
async fn wait_for_consents(running: &RunningProxy, subject: &str, ids: &[&str]) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<String> = running
            .shared
            .consents
            .get(subject)
            .map(|c| c.iter().map(|c| c.id.to_string()).collect())
            .unwrap_or_default();
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        let mut got = now.clone();
        got.sort();
        if got == want {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Caller {
    label: &'static str,
    ip: IpAddr,
}

#[allow(clippy::too_many_arguments)]
async fn step(
    n: usize,
    what: &str,
    who: &Caller,
    proxy: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), super::CliError> {
    say!("\n[{n}] {what}");
    let purpose = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-purpose"))
        .map(|(_, v)| format!(" purpose={v}"))
        .unwrap_or_default();
    say!("    {} ({}) {method} {path}{purpose}", who.label, who.ip);
    let (status, hdrs, text) = call(who.ip, proxy, method, path, headers, body)
        .await
        .map_err(|e| fail(format!("demo call failed: {e}")))?;
    let id = hdrs
        .get("x-residency-decision")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let (decision, reason, message) = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) if v.get("error").is_some() => (
            "deny",
            v["error"].as_str().unwrap_or("").to_string(),
            v["message"].as_str().unwrap_or("").to_string(),
        ),
        _ => (
            "allow",
            String::new(),
            text.trim().chars().take(110).collect(),
        ),
    };
    say!(
        "    -> {status} {decision}{}  decision {id}",
        if reason.is_empty() {
            String::new()
        } else {
            format!(" {reason}")
        }
    );
    say!("       {message}");
    Ok((status, reason))
}

pub fn run(args: DemoArgs, log_format: LogFormat) -> CliResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(demo(args, log_format))
}

fn upstream_addr(policy: &Policy, name: &str) -> Result<SocketAddr, CliError> {
    let u = policy
        .upstream(name)
        .ok_or_else(|| fail(format!("the demo policy has no upstream \"{name}\"")))?;
    let ip: IpAddr = u.host.parse().map_err(|_| {
        fail(format!(
            "the demo upstream \"{name}\" must be an IP address"
        ))
    })?;
    Ok(SocketAddr::new(ip, u.port))
}

/// What the demo writes, as its policy names it, and the proxy's own log beside them.
struct Files {
    consents: PathBuf,
    log: PathBuf,
    key: SigningKeyFiles,
    /// The folder holding them all, if they have one in common but the root.
    folder: Option<PathBuf>,
    own_log: PathBuf,
}

/// Creates the demo's state: a log-signing key pair (kept between runs, so that pseudonyms
/// stay stable, and made as `certs init` makes it) and a consent file that starts empty on
/// every run.
fn prepare(policy: &Policy) -> Result<Files, CliError> {
    let key = policy
        .log
        .signing_key
        .as_deref()
        .ok_or_else(|| fail("the demo policy must name a [log] signing_key"))?;
    if let Some(dir) = key.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let key = signing_key_pair(key, false)?;
    let consents = match &policy.consent.store {
        crate::policy::model::ConsentStore::File(p) => p.clone(),
        _ => return Err(fail("the demo policy must use a file: consent store")),
    };
    if let Some(dir) = consents.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_consents(&consents, &[])?;
    let log = match &policy.log.target {
        LogTarget::File(p) => p.clone(),
        LogTarget::Stdout => return Err(fail("the demo policy must log to a file")),
    };
    let folder = common_folder(&[&log, &consents, &key.key_path]);
    // Not beside the decision log when there is no common folder: `audit verify DIR` reads
    // the decision log's folder.
    let own_log = match (&folder, log.parent()) {
        (Some(dir), _) => dir.join("proxy.log"),
        (None, Some(dir)) => dir.with_file_name("proxy.log"),
        (None, None) => PathBuf::from("proxy.log"),
    };
    Ok(Files {
        consents,
        log,
        key,
        folder,
        own_log,
    })
}

/// The folder holding every file the demo writes (`demo/` with the shipped policy), unless
/// they have none in common but the root.
fn common_folder(paths: &[&Path]) -> Option<PathBuf> {
    let (first, rest) = paths.split_first()?;
    let mut common = first.parent()?.to_path_buf();
    for p in rest {
        while !p.starts_with(&common) {
            if !common.pop() {
                return None;
            }
        }
    }
    (common.parent().is_some()).then_some(common)
}

async fn demo(args: DemoArgs, log_format: LogFormat) -> CliResult {
    if !args.policy.exists() {
        if let Some(dir) = args.policy.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&args.policy, DEMO_POLICY)?;
    }
    let policy = super::load_policy(&args.policy)?;
    let files = prepare(&policy)?;
    // The proxy's own messages would interleave with the story on the terminal.
    crate::telemetry::init_to_file(log_format, &files.own_log).map_err(|e| {
        fail(format!(
            "cannot open the proxy's own log {}: {e}",
            files.own_log.display()
        ))
    })?;
    // Installed before anything starts, as `serve` does: from here on SIGTERM or Ctrl-C ends
    // the demo with its decision log closed, never halfway.
    let mut signals =
        Signals::install().map_err(|e| fail(format!("cannot install signal handlers: {e}")))?;

    let cn = start_store(upstream_addr(&policy, "cn-store")?, "cn-store").await?;
    let us = start_store(upstream_addr(&policy, "us-store")?, "us-store").await?;
    let running = crate::admin::start(ServeConfig {
        policy_path: args.policy.clone(),
        overrides: Overrides {
            listen: args.listen,
            admin: args.admin,
            // One worker: the story reads, and tells the reader to verify, one chain.
            workers: Some(1),
            ..Overrides::default()
        },
    })
    .await?;
    let addr = running.addr;
    say!(
        "residency-proxy demo: policy {} ({}), proxy on http://{addr}",
        args.policy.display(),
        running.shared.snapshot.load().policy.hash
    );
    say!(
        "storage at home: cn-store {}  |  storage abroad: us-store {}",
        upstream_addr(&policy, "cn-store")?,
        upstream_addr(&policy, "us-store")?
    );
    match &files.folder {
        Some(dir) => say!(
            "demo files, under {}/ (delete it to start afresh):",
            dir.display()
        ),
        None => say!("demo files:"),
    }
    say!("  decision log  {}", files.log.display());
    say!("  consents      {}", files.consents.display());
    say!(
        "  signing key   {} (public half {})",
        files.key.key_path.display(),
        files.key.public_path.display()
    );
    say!(
        "  proxy's log   {} (the proxy's own messages, kept out of this story)",
        files.own_log.display()
    );

    let replayed = tokio::select! {
        r = replay(&running, &args.policy, &files, &cn, &us) => Some(r),
        () = signals.wait(&running) => None,
    };
    match replayed {
        Some(Ok(as_expected)) if args.no_wait => {
            let exit = if as_expected { Exit::Ok } else { Exit::Failed };
            return stop(running, &files, exit).await;
        }
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            running.shutdown().await;
            return Err(e);
        }
        // Stopped during the replay.
        None => return stop(running, &files, Exit::Ok).await,
    }
    say!("\nThe proxy stays up. Try it yourself (Ctrl-C stops it and closes the decision log):");
    say!("  curl -i --interface 127.0.0.20 -H 'X-Purpose: credit_scoring' http://{addr}{OBJECT}");
    say!(
        "  curl -i --interface 127.0.0.20 -H 'X-Purpose: credit_scoring' http://{addr}/payments/u999/2026-01.json"
    );
    say!("  curl -i --interface 127.0.0.10 http://{addr}{OBJECT}");
    say!(
        "  curl -i --interface 127.0.0.20 -H 'X-Purpose: credit_scoring' http://{addr}{EXPORT}   (u123 withdrew: none of it leaves now)"
    );
    say!(
        "  curl -i --interface 127.0.0.10 -X PUT --data '{{}}' http://{addr}/backup/payments/u123/2026-01.json"
    );
    say!("  curl -i http://{addr}/public/rates.json");
    say!(
        "  residency-proxy explain --policy {} --method GET --path {OBJECT} --client-ip 127.0.0.20 --purpose credit_scoring",
        args.policy.display()
    );
    // While the proxy writes it, the log ends in records no checkpoint signs yet.
    say!(
        "  residency-proxy audit verify --open --key {} {}",
        files.key.public_path.display(),
        files.log.display()
    );
    // The subject's report, bulk disclosures included: where u123's data went, and under what.
    say!(
        "  residency-proxy audit subject --open --policy {} u123 {}",
        args.policy.display(),
        files.log.display()
    );
    say!(
        "Edit {} (JSON lines) to grant or revoke consent; the proxy reloads it within a second.",
        files.consents.display()
    );
    signals.wait(&running).await;
    stop(running, &files, Exit::Ok).await
}

/// Stops the proxy as `serve` stops it (stop accepting, drain, write the final checkpoint)
/// and says how to check the closed log.
async fn stop(running: Sidecar, files: &Files, exit: Exit) -> CliResult {
    say!("\nstopping: draining connections and closing the decision log with its final checkpoint");
    running.shutdown().await;
    say!("The decision log is closed and signed; check it with:");
    say!(
        "  residency-proxy audit verify --key {} {}",
        files.key.public_path.display(),
        files.log.display()
    );
    Ok(exit)
}

/// The eight steps; true if each decided as expected and nothing reached the foreign server.
async fn replay(
    running: &Sidecar,
    policy_path: &Path,
    files: &Files,
    cn: &Store,
    us: &Store,
) -> Result<bool, CliError> {
    let addr = running.addr;
    let consents_path = files.consents.as_path();
    let app = Caller {
        label: "payments-app, first party, CN",
        ip: "127.0.0.10".parse().expect("literal"),
    };
    let bureau = Caller {
        label: "credit-bureau-us, third party, US",
        ip: "127.0.0.20".parse().expect("literal"),
    };
    let obj = OBJECT;
    let purpose = [("X-Purpose", "credit_scoring")];
    // Whether each step decided as expected, in order.
    let mut passed = Vec::new();
    let expect = |(status, reason): (u16, String), want: (u16, &str)| (status, &*reason) == want;

    let got = step(
        1,
        "The platform reads a user's spending records at home.",
        &app,
        addr,
        "GET",
        obj,
        &[("X-Purpose", "billing")],
        "",
    )
    .await?;
    passed.push(expect(got, (200, "")));
    let got = step(
        2,
        "The foreign credit bureau asks for the same records. No consent exists.",
        &bureau,
        addr,
        "GET",
        obj,
        &purpose,
        "",
    )
    .await?;
    passed.push(expect(got, (451, "consent_missing")));

    let pre = consent(
        "c-pre-ticked-1",
        "u123",
        "pre_ticked",
        "signup form v3: box 'share with partners' ticked by default",
    );
    write_consents(consents_path, std::slice::from_ref(&pre))?;
    if !wait_for_consents(running, "u123", &["c-pre-ticked-1"]).await {
        return Err(fail(
            "the proxy did not pick up the consent file within 10 s",
        ));
    }
    let got = step(
        3,
        "The platform points at a pre-ticked checkbox from its sign-up form.",
        &bureau,
        addr,
        "GET",
        obj,
        &purpose,
        "",
    )
    .await?;
    passed.push(expect(got, (451, "consent_method_invalid")));

    let explicit = consent(
        "c-explicit-1",
        "u123",
        "explicit",
        "consent receipt 7f3a: user u123 ticked 'share with credit-bureau-us for credit scoring'",
    );
    write_consents(consents_path, &[pre.clone(), explicit.clone()])?;
    if !wait_for_consents(running, "u123", &["c-pre-ticked-1", "c-explicit-1"]).await {
        return Err(fail(
            "the proxy did not pick up the consent file within 10 s",
        ));
    }
    let got = step(
        4,
        "The user gives explicit consent for credit scoring by this bureau.",
        &bureau,
        addr,
        "GET",
        obj,
        &purpose,
        "",
    )
    .await?;
    passed.push(expect(got, (200, "")));
    let got = step(
        5,
        "The bureau asks for another purpose the user never agreed to.",
        &bureau,
        addr,
        "GET",
        obj,
        &[("X-Purpose", "marketing")],
        "",
    )
    .await?;
    passed.push(expect(got, (451, "consent_scope_mismatch")));

    // Other users of the platform, for the export: one only through the pre-ticked box, one
    // who withdrew last week; u901 and u902 never consented.
    let others = other_users_consents();
    let mut on_file = vec![pre.clone(), explicit.clone()];
    on_file.extend(others.iter().cloned());
    write_consents(consents_path, &on_file)?;
    for c in &others {
        if !wait_for_consents(running, &c.subject, &[&c.id]).await {
            return Err(fail(
                "the proxy did not pick up the consent file within 10 s",
            ));
        }
    }
    let bulk_dataset = running
        .shared
        .snapshot
        .load()
        .policy
        .datasets
        .iter()
        .any(|d| d.records.is_some() && EXPORT.starts_with(&d.path_prefix));
    if bulk_dataset {
        passed.push(export_step(6, running, &bureau, &files.log).await?);
    } else {
        // A copy of the demo policy written by an older version, kept by the user.
        say!(
            "\n[6] (skipped: {} has no records dataset for {EXPORT}; delete it and the demo writes the current one)",
            policy_path.display()
        );
    }

    let before = us.requests.load(Ordering::Relaxed);
    let got = step(
        7,
        "The platform tries to back the records up to a server abroad.",
        &app,
        addr,
        "PUT",
        "/backup/payments/u123/2026-01.json",
        &[],
        "{\"records\":[]}",
    )
    .await?;
    passed.push(expect(got, (451, "upstream_outside_jurisdiction")));
    let after = us.requests.load(Ordering::Relaxed);
    say!(
        "       requests that reached the foreign server: {}",
        after - before
    );

    let mut revoked = explicit.clone();
    revoked.revoked_at = Some(jiff::Timestamp::now());
    let mut on_file = vec![pre, revoked];
    on_file.extend(others);
    write_consents(consents_path, &on_file)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while running
        .shared
        .consents
        .get("u123")
        .is_some_and(|c| c.iter().all(|c| c.revoked_at.is_none()))
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = step(
        8,
        "The user withdraws the consent; the next request is refused.",
        &bureau,
        addr,
        "GET",
        obj,
        &purpose,
        "",
    )
    .await?;
    passed.push(expect(got, (451, "consent_revoked")));

    say!(
        "\nsummary: {} of {} steps as expected; cn-store served {} requests, us-store {} (nothing personal reached it)",
        passed.iter().filter(|p| **p).count(),
        passed.len(),
        cn.requests.load(Ordering::Relaxed),
        us.requests.load(Ordering::Relaxed)
    );
    Ok(passed.iter().all(|p| *p) && after == before)
}

/// The consents of the export's other users: u456 only through the pre-ticked box, u789
/// explicitly but withdrawn last week.
fn other_users_consents() -> [ConsentRecord; 2] {
    let pre = consent(
        "c-pre-ticked-2",
        "u456",
        "pre_ticked",
        "signup form v3: box 'share with partners' ticked by default",
    );
    let mut withdrawn = consent(
        "c-explicit-2",
        "u789",
        "explicit",
        "consent receipt 2c91: user u789 ticked 'share with credit-bureau-us for credit scoring'",
    );
    withdrawn.granted_at = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 60);
    withdrawn.revoked_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 7));
    [pre, withdrawn]
}

/// The bulk step: the bureau pulls the month's export of every user's purchases. Prints which
/// records left and whose, what was dropped and why (from the outcome record), and the
/// disclosure record naming the subjects; true if exactly u123's whole records left, in
/// order, each named in a disclosure under the explicit consent, and the drops are counted
/// as expected.
async fn export_step(
    n: usize,
    running: &Sidecar,
    bureau: &Caller,
    log: &Path,
) -> Result<bool, CliError> {
    say!(
        "\n[{n}] The bureau pulls the month's spending export: {} purchase records of many users in one object.",
        EXPORT_LINES.len()
    );
    say!(
        "    consents on file: u123 explicit, u456 pre-ticked only, u789 withdrawn; none for u901, u902"
    );
    say!(
        "    {} ({}) GET {EXPORT} purpose=credit_scoring",
        bureau.label,
        bureau.ip
    );
    let (status, headers, text) = call(
        bureau.ip,
        running.addr,
        "GET",
        EXPORT,
        &[("X-Purpose", "credit_scoring")],
        "",
    )
    .await
    .map_err(|e| fail(format!("demo call failed: {e}")))?;
    let id = headers
        .get("x-residency-decision")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    if status != 200 {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        say!(
            "    -> {status} deny {}  decision {id}",
            v["error"].as_str().unwrap_or("")
        );
        say!("       {}", v["message"].as_str().unwrap_or(text.trim()));
        say!("       expected: 200, with only u123's records in the body");
        return Ok(false);
    }
    let records = exchange_records(log, &id).await;
    let reason = records
        .iter()
        .find(|(_, v)| v["kind"] == "decision")
        .and_then(|(_, v)| v["reason"].as_str())
        .unwrap_or("?");
    say!("    -> {status} allow {reason}  decision {id}");

    let received: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut users: Vec<String> = Vec::new();
    for line in &received {
        let user = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["user_id"].as_str().map(str::to_string))
            .unwrap_or_else(|| "no user_id".into());
        if !users.contains(&user) {
            users.push(user);
        }
    }
    // The disclosure records name pseudonyms: the demo, holding the key, pseudonymises the
    // users it received to find the consent under which each left.
    let disclosures: Vec<&(String, serde_json::Value)> = records
        .iter()
        .filter(|(_, v)| v["kind"] == "disclosure")
        .collect();
    let named: BTreeMap<String, String> = disclosures
        .iter()
        .flat_map(|(_, v)| v["subjects"].as_array().cloned().unwrap_or_default())
        .filter_map(|pair| {
            Some((
                pair.get(0)?.as_str()?.to_string(),
                pair.get(1)?.as_str().unwrap_or("none").to_string(),
            ))
        })
        .collect();
    let pseudo = running.shared.snapshot.load().pseudo.clone();
    let whose: Vec<String> = users
        .iter()
        .map(|u| match named.get(&pseudo.pseudonym(u)) {
            Some(consent) => format!("{u} (consent {consent})"),
            None => format!("{u} (named in no disclosure record)"),
        })
        .collect();
    let dropped: BTreeMap<String, u64> = records
        .iter()
        .find(|(_, v)| v["kind"] == "outcome")
        .and_then(|(_, v)| serde_json::from_value(v["records"]["dropped"].clone()).ok())
        .unwrap_or_default();
    say!("       {}", what_left(received.len(), &whose, &dropped));
    match disclosures.as_slice() {
        [] => say!("       the log holds no disclosure record for this exchange"),
        named => {
            say!(
                "       the log named them before they left ({}, subjects pseudonymised):",
                log.display()
            );
            for (line, _) in named {
                say!("       {line}");
            }
        }
    }

    let expected_dropped: BTreeMap<String, u64> = EXPORT_DROPPED
        .iter()
        .map(|(r, n)| (r.to_string(), *n))
        .collect();
    let as_expected = reason == "consent_filtered"
        && received
            .iter()
            .copied()
            .eq(EXPORT_KEPT.iter().map(|i| EXPORT_LINES[*i]))
        && dropped == expected_dropped
        && named.len() == 1
        && named.get(&pseudo.pseudonym("u123")).map(String::as_str) == Some("c-explicit-1");
    if !as_expected {
        say!(
            "       expected: consent_filtered, {}",
            what_left(
                EXPORT_KEPT.len(),
                &["u123 (consent c-explicit-1)".to_string()],
                &expected_dropped
            )
        );
    }
    Ok(as_expected)
}

/// `3 of 14 records left: those of u123 (consent c-1); dropped: consent_missing 5, …`, the
/// reasons most frequent first.
fn what_left(kept: usize, whose: &[String], dropped: &BTreeMap<String, u64>) -> String {
    let mut by_count: Vec<(&String, &u64)> = dropped.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let dropped = if by_count.is_empty() {
        "none counted in the log".to_string()
    } else {
        by_count
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let whose = if whose.is_empty() {
        "none".to_string()
    } else {
        format!("those of {}", whose.join(", "))
    };
    format!(
        "{kept} of {} records left: {whose}; dropped: {dropped}",
        EXPORT_LINES.len()
    )
}

/// The decision log's records of exchange `id` (its line and its value), once its outcome is
/// written: the outcome follows the last byte sent, so it may lag the response by a moment.
async fn exchange_records(log: &Path, id: &str) -> Vec<(String, serde_json::Value)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = tokio::fs::read_to_string(log).await.unwrap_or_default();
        let records: Vec<(String, serde_json::Value)> = text
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["id"] == id).then(|| (l.to_string(), v))
            })
            .collect();
        if records.iter().any(|(_, v)| v["kind"] == "outcome")
            || tokio::time::Instant::now() > deadline
        {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
