//! Consent registry helpers: the admin consent API, the real `consent` command, a fresh
//! PostgreSQL database per test, and a loopback relay that can cut a database off.

#![allow(dead_code)]

use super::client::{self, Reply, full, request};
use super::proxy::{APP, BUREAU, HOME_IP, PolicySpec, TestProxy, payments_dataset};
use super::upstream::{Reply as Serve, Upstream};
use std::net::SocketAddr;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The admin token every registry test uses.
pub const TOKEN: &str = "test-admin-token-5f2b";
/// The purpose the consents of these tests grant.
pub const PURPOSE: (&str, &str) = ("X-Purpose", "credit_scoring");

/// A policy with the usual parties, a home store, the `payments` dataset (consent needed
/// abroad and for third parties), the admin token, and `store` as the consent store.
pub fn registry_policy(store: &str, home: &Upstream) -> PolicySpec {
    PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .consent(&format!("store = '{store}'"))
        .admin_token(TOKEN)
}

/// A home store that answers 200.
pub async fn home_store() -> Upstream {
    Upstream::start(HOME_IP, Serve::Ok).await
}

/// A call of the admin API, with `token` as the bearer token when given.
pub async fn admin(
    proxy: &TestProxy,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Reply {
    let mut req = request(method, path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            full(serde_json::to_vec(&v).unwrap())
        }
        None => client::empty(),
    };
    client::send(
        "127.0.0.1",
        proxy.running().admin_addr,
        req.body(body).unwrap(),
    )
    .await
}

/// The credit bureau reads `subject`'s payments for credit scoring; returns `"200"` when
/// forwarded, else the status and reason code (`"451 consent_revoked"`).
pub async fn bureau_reads(proxy: &TestProxy, subject: &str) -> String {
    let r = client::get(
        BUREAU,
        proxy.addr,
        &format!("/payments/{subject}/2026-01.json"),
        &[PURPOSE],
    )
    .await;
    if r.status == 200 {
        "200".to_string()
    } else {
        format!("{} {}", r.status, r.json()["error"].as_str().unwrap_or("?"))
    }
}

/// Repeats [`bureau_reads`] every 50 ms until it answers `want`; returns how long that took,
/// or panics after `limit`.
pub async fn until_bureau_reads(
    proxy: &TestProxy,
    subject: &str,
    want: &str,
    limit: Duration,
) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let got = bureau_reads(proxy, subject).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "still {got} after {limit:?}, waiting for {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the store is lost: waits until the bureau is refused `consent_store_unavailable`,
/// which must take at least `at_least` (the consents loaded stay in force within the
/// bound); checks that a request needing no consent is still forwarded and that `/readyz`
/// fails naming the consent store. Returns readiness's reasons.
pub async fn expect_store_unavailable(proxy: &TestProxy, at_least: Duration) -> String {
    let took = until_bureau_reads(
        proxy,
        "u1",
        "451 consent_store_unavailable",
        Duration::from_secs(20),
    )
    .await;
    assert!(took >= at_least, "refused after {took:?}");
    let r = client::get(APP, proxy.addr, "/payments/u1/2026-01.json", &[]).await;
    assert_eq!(
        r.status,
        200,
        "a request needing no consent is unaffected: {}",
        r.text()
    );
    let r = admin(proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 503);
    let why = r.json()["failing"].to_string();
    assert!(why.contains("consent store"), "{why}");
    why
}

/// Grants [`consent_body`]`(id, subject)` through the admin API.
pub async fn grant_via_api(proxy: &TestProxy, id: &str, subject: &str) {
    let r = admin(
        proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        Some(consent_body(id, subject)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Grants [`consent_body`]`(id, subject)` with the `consent` command, straight into `store`.
/// Tests that need a consent cached and then left alone grant it before the proxy starts: the
/// change feed's word of a grant made while it runs may reach the cache after the first read
/// and forget the subject again.
pub async fn grant_with_cli(store: &str, id: &str, subject: &str) {
    cli_ok(&[
        "consent",
        "grant",
        "--store",
        store,
        "--id",
        id,
        "--subject",
        subject,
        "--recipient",
        "credit-bureau-us",
        "--purpose",
        "credit_scoring",
        "--category",
        "user.financial",
        "--destination",
        "US",
        "--method",
        "explicit",
        "--granted-at",
        "2026-01-01T00:00:00Z",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    ])
    .await;
}

/// A consent body for the API: `subject` lets `credit-bureau-us` score credit from the US.
pub fn consent_body(id: &str, subject: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "subject": subject,
        "recipient": "credit-bureau-us",
        "purposes": ["credit_scoring"],
        "categories": ["user.financial"],
        "destinations": ["US"],
        "method": "explicit",
        "granted_at": "2026-01-01T00:00:00Z",
        "expires_at": "2099-01-01T00:00:00Z",
        "evidence": "consent receipt in the test",
    })
}

/// Runs the real binary with `args`; returns its output.
pub async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
            .args(&args)
            .env_remove("RESIDENCY_CONSENT_STORE")
            .output()
            .expect("the binary runs")
    })
    .await
    .unwrap()
}

/// `cli`, asserting success; returns standard output.
pub async fn cli_ok(args: &[&str]) -> String {
    let out = cli(args).await;
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The PostgreSQL server the tests may use (`RESIDENCY_TEST_POSTGRES`, set by
/// `.ci/postgres.sh`), or `None` after saying the test is skipped.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("RESIDENCY_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipped {test}: RESIDENCY_TEST_POSTGRES is not set (`source .ci/postgres.sh && postgres_start` starts a server)"
            );
            None
        }
    }
}

/// A connection to `url`, driven on its own task.
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A new, empty database on the test server; returns its URL (tests never share one).
pub async fn fresh_database(server_url: &str) -> String {
    let name = format!("rp_test_{:016x}", fastrand::u64(..));
    let admin = pg_connect(server_url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    with_database(server_url, &name)
}

/// `url` naming database `name` instead.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{name}")
}

/// `url` pointing at `addr` instead of its host and port.
pub fn with_address(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}{path}", user.unwrap_or_default())
}

/// The address of a `postgres://` URL.
pub fn address_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = &rest[..rest.find('/').unwrap()];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hostport.parse().expect("host:port")
}

/// A TCP relay on loopback in front of `target`: `cut` drops every connection and refuses
/// new ones (a database that went away, as its clients see it); `restore` lets them through
/// again. Other tests sharing the server are not disturbed.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = {
            let (open, links) = (open.clone(), links.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if !open.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().unwrap().push(link);
                }
            })
        };
        Relay {
            addr,
            open,
            links,
            task,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Imports 20,000 lines into `store` (repeated ids whose last line changes the terms or
/// revokes, malformed last lines, lines without an id) and checks that the registry then
/// holds what the `file:` store would serve from the same file, with the counts that says;
/// then imports the file again and checks that nothing changed. `dir` holds the files.
pub async fn bulk_import_matches_the_file_store(store: &str, dir: &std::path::Path) {
    use residency_proxy::consent::file::{Latest, latest};
    // Consents the registry holds before: the file's malformed last line withdraws c-held-3.
    let held: Vec<String> = (0..10)
        .map(|i| consent_body(&format!("c-held-{i}"), "uh").to_string())
        .collect();
    let first = dir.join("held.jsonl");
    std::fs::write(&first, held.join("\n")).unwrap();
    cli_ok(&[
        "consent",
        "import",
        "--store",
        store,
        &first.display().to_string(),
    ])
    .await;

    let mut lines = Vec::new();
    for i in 0..20_000usize {
        let id = format!("c-{}", i % 15_000);
        let mut v = consent_body(&id, &format!("u{}", i % 997));
        if i >= 15_000 {
            // The second line of an id corrects its terms, or revokes it.
            v["expires_at"] = "2030-01-01T00:00:00Z".into();
        }
        if i % 50 == 0 {
            v["revoked_at"] = "2026-02-01T00:00:00Z".into();
        }
        let line = match i {
            _ if i % 1_333 == 0 => v.to_string().replace("explicit", "telepathy"),
            _ if i % 4_001 == 0 => r#"{"subject": "no id""#.to_string(),
            _ => v.to_string(),
        };
        lines.push(line);
        if i == 10_000 {
            lines.push(
                consent_body("c-held-3", "uh")
                    .to_string()
                    .replace("US", "U S"),
            );
        }
    }
    let text = lines.join("\n");
    let file = dir.join("bulk.jsonl");
    std::fs::write(&file, &text).unwrap();
    let file = file.display().to_string();

    let (words, report) = latest(text.as_bytes()).unwrap();
    let mut expected = std::collections::BTreeMap::new();
    let mut withdrawn = Vec::new();
    for (_, word) in words {
        match word {
            Latest::Record(r) => {
                expected.insert(r.id.clone(), serde_json::to_value(&r).unwrap());
            }
            Latest::Withdrawn(id) => withdrawn.push(id),
        }
    }
    assert!(withdrawn.contains(&"c-held-3".to_string()));
    let granted = expected.len();
    let revoked = expected
        .values()
        .filter(|v| !v["revoked_at"].is_null())
        .count()
        + 1;
    let (superseded, refused) = (report.superseded.len(), report.skipped.len());
    assert!(superseded > 4_000 && refused > 10, "{superseded} {refused}");

    let out = cli(&["consent", "import", "--store", store, &file]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "{granted} granted, {revoked} revoked, 0 unchanged, {superseded} superseded, {refused} refused"
        )),
        "{stdout}"
    );
    let numbers: Vec<usize> = stderr
        .lines()
        .map(|l| l.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    let skipped: Vec<usize> = report.skipped.iter().map(|e| e.line).collect();
    assert_eq!(numbers, skipped, "refused lines, in order");

    let listed = cli_ok(&["consent", "list", "--store", store]).await;
    let mut states: std::collections::BTreeMap<String, serde_json::Value> = listed
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    let held_now: Vec<serde_json::Value> = (0..10)
        .map(|i| states.remove(&format!("c-held-{i}")).unwrap())
        .collect();
    assert!(
        !held_now[3]["revoked_at"].is_null(),
        "c-held-3 is withdrawn"
    );
    assert!(held_now[4]["revoked_at"].is_null());
    assert!(states == expected, "the registry holds what the file says");

    let out = cli(&["consent", "import", "--store", store, &file]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "0 granted, 0 revoked, {} unchanged, {superseded} superseded, {refused} refused",
            granted + 1
        )),
        "{stdout}"
    );
    let history = cli_ok(&["consent", "list", "--store", store, "--history"]).await;
    let events: Vec<serde_json::Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 10 + granted + revoked, "one fact each");
    assert!(
        events
            .iter()
            .filter(|e| e["consent"] == "c-held-3")
            .any(|e| e["event"] == "revoke"
                && e["recorded_by"].as_str().unwrap().starts_with("cli:"))
    );
}
