//! `demo`: the motivating case, replayed on loopback against the real proxy. Two storage
//! servers (one at home, one abroad), the proxy with `policies/demo.toml`, and callers bound
//! to source addresses that the policy places in different countries. It stops as `serve`
//! does: on SIGTERM or SIGINT, with the decision log closed by its final checkpoint.

use super::certs::{SigningKeyFiles, signing_key_pair};
use super::serve::Signals;
use super::{CliError, CliResult, Exit, fail};
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
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
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

fn consent(id: &str, method: &str, evidence: &str) -> ConsentRecord {
    let now = jiff::Timestamp::now();
    ConsentRecord {
        id: id.into(),
        subject: "u123".into(),
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

/// Waits until the running proxy's consent index holds exactly `ids` for subject u123.
async fn wait_for_consents(running: &RunningProxy, ids: &[&str]) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<String> = running
            .shared
            .consents
            .get("u123")
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

pub fn run(args: DemoArgs) -> CliResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(demo(args))
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

/// What the demo writes, as its policy names it.
struct Files {
    consents: PathBuf,
    log: PathBuf,
    key: SigningKeyFiles,
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
    Ok(Files { consents, log, key })
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

async fn demo(args: DemoArgs) -> CliResult {
    if !args.policy.exists() {
        if let Some(dir) = args.policy.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&args.policy, DEMO_POLICY)?;
    }
    let policy = super::load_policy(&args.policy)?;
    let files = prepare(&policy)?;
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
    match common_folder(&[&files.log, &files.consents, &files.key.key_path]) {
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

    let replayed = tokio::select! {
        r = replay(&running, &files.consents, &cn, &us) => Some(r),
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

/// The seven steps; true if each decided as expected and nothing reached the foreign server.
async fn replay(
    running: &Sidecar,
    consents_path: &Path,
    cn: &Store,
    us: &Store,
) -> Result<bool, CliError> {
    let addr = running.addr;
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
    let mut outcomes = Vec::new();
    outcomes.push(
        step(
            1,
            "The platform reads a user's spending records at home.",
            &app,
            addr,
            "GET",
            obj,
            &[("X-Purpose", "billing")],
            "",
        )
        .await?,
    );
    outcomes.push(
        step(
            2,
            "The foreign credit bureau asks for the same records. No consent exists.",
            &bureau,
            addr,
            "GET",
            obj,
            &purpose,
            "",
        )
        .await?,
    );

    let pre = consent(
        "c-pre-ticked-1",
        "pre_ticked",
        "signup form v3: box 'share with partners' ticked by default",
    );
    write_consents(consents_path, std::slice::from_ref(&pre))?;
    if !wait_for_consents(running, &["c-pre-ticked-1"]).await {
        return Err(fail(
            "the proxy did not pick up the consent file within 10 s",
        ));
    }
    outcomes.push(
        step(
            3,
            "The platform points at a pre-ticked checkbox from its sign-up form.",
            &bureau,
            addr,
            "GET",
            obj,
            &purpose,
            "",
        )
        .await?,
    );

    let explicit = consent(
        "c-explicit-1",
        "explicit",
        "consent receipt 7f3a: user u123 ticked 'share with credit-bureau-us for credit scoring'",
    );
    write_consents(consents_path, &[pre.clone(), explicit.clone()])?;
    if !wait_for_consents(running, &["c-pre-ticked-1", "c-explicit-1"]).await {
        return Err(fail(
            "the proxy did not pick up the consent file within 10 s",
        ));
    }
    outcomes.push(
        step(
            4,
            "The user gives explicit consent for credit scoring by this bureau.",
            &bureau,
            addr,
            "GET",
            obj,
            &purpose,
            "",
        )
        .await?,
    );
    outcomes.push(
        step(
            5,
            "The bureau asks for another purpose the user never agreed to.",
            &bureau,
            addr,
            "GET",
            obj,
            &[("X-Purpose", "marketing")],
            "",
        )
        .await?,
    );

    let before = us.requests.load(Ordering::Relaxed);
    outcomes.push(
        step(
            6,
            "The platform tries to back the records up to a server abroad.",
            &app,
            addr,
            "PUT",
            "/backup/payments/u123/2026-01.json",
            &[],
            "{\"records\":[]}",
        )
        .await?,
    );
    let after = us.requests.load(Ordering::Relaxed);
    say!(
        "       requests that reached the foreign server: {}",
        after - before
    );

    let mut revoked = explicit.clone();
    revoked.revoked_at = Some(jiff::Timestamp::now());
    write_consents(consents_path, &[pre, revoked])?;
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
    outcomes.push(
        step(
            7,
            "The user withdraws the consent; the next request is refused.",
            &bureau,
            addr,
            "GET",
            obj,
            &purpose,
            "",
        )
        .await?,
    );

    let expected = [
        (200, ""),
        (451, "consent_missing"),
        (451, "consent_method_invalid"),
        (200, ""),
        (451, "consent_scope_mismatch"),
        (451, "upstream_outside_jurisdiction"),
        (451, "consent_revoked"),
    ];
    let as_expected = outcomes
        .iter()
        .zip(expected.iter())
        .all(|((s, r), (es, er))| s == es && r == er)
        && after == before;
    say!(
        "\nsummary: {} of {} steps as expected; cn-store served {} requests, us-store {} (nothing personal reached it)",
        outcomes
            .iter()
            .zip(expected.iter())
            .filter(|((s, r), (es, er))| s == es && r == er)
            .count(),
        expected.len(),
        cn.requests.load(Ordering::Relaxed),
        us.requests.load(Ordering::Relaxed)
    );
    Ok(as_expected)
}
