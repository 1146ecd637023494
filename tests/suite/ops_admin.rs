//! What an orchestrator and a Prometheus server see on the admin listener: metrics that parse
//! and count what was sent, and readiness that follows the policy load and the decision log.

use crate::support::binary::Served;
use crate::support::client::{self, empty, full, request};
use crate::support::prom::{Exposition, parse};
use crate::support::proxy::{
    APP, BUREAU, HOME_IP, PolicySpec, TestProxy, consent, payments_dataset,
};
use crate::support::upstream::{Reply as Serve, Upstream};
use std::time::Duration;

async fn admin(addr: std::net::SocketAddr, path: &str) -> client::Reply {
    client::send(
        "127.0.0.1",
        addr,
        request("GET", path).body(empty()).unwrap(),
    )
    .await
}

async fn scrape(proxy: &TestProxy) -> (client::Reply, Exposition) {
    let r = admin(proxy.running().admin_addr, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let e = parse(&r.text());
    (r, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_the_requests_sent() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    // A port nothing listens on, for an upstream that refuses connections.
    let dead = std::net::TcpListener::bind((HOME_IP, 0)).unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let proxy = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .upstream("dead-store", &dead_url)
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .toml(
            "[[datasets]]\nname = 'archive'\nmatch = { path_prefix = '/archive/' }\n\
             upstream = 'dead-store'\ncategory = 'user'\ncross_border = 'allow'\nthird_party = 'allow'\n",
        )
        .consents(vec![consent("c-1", "u1", "credit-bureau-us")])
        .start()
        .await;
    let addr = proxy.addr;
    let purpose = [("x-purpose", "credit_scoring")];
    let sent = [
        (
            client::get(APP, addr, "/payments/u1/a.json", &[]).await,
            200,
        ),
        (
            client::get(APP, addr, "/payments/u2/a.json", &[]).await,
            200,
        ),
        (
            client::get(APP, addr, "/payments/u3/a.json", &[]).await,
            200,
        ),
        (
            client::get(BUREAU, addr, "/payments/u2/a.json", &purpose).await,
            451,
        ),
        (
            client::get(BUREAU, addr, "/payments/u3/a.json", &purpose).await,
            451,
        ),
        (
            client::get(BUREAU, addr, "/payments/u1/a.json", &purpose).await,
            200,
        ),
        (client::get(APP, addr, "/nowhere", &[]).await, 404),
        (
            client::send(
                APP,
                addr,
                request("PUT", "/payments/u1/a.json")
                    .body(full("x"))
                    .unwrap(),
            )
            .await,
            200,
        ),
        (
            client::get(APP, addr, "/archive/u1/old.json", &[]).await,
            502,
        ),
    ];
    for (i, (r, want)) in sent.iter().enumerate() {
        assert_eq!(r.status, *want, "request {i}: {}", r.text());
    }

    // Exchanges are counted when they end, which can be just after the client has its answer.
    let shared = &proxy.running().shared;
    crate::support::wait_until("every exchange to end", || {
        shared.metrics.request_time.count() == 9 && shared.metrics.connections_open.get() == 0
    })
    .await;
    let (r, m) = scrape(&proxy).await;
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{:?}",
        r.headers
    );
    let decisions = |dataset: &str, decision: &str, reason: &str| {
        m.value(
            "residency_decisions_total",
            &[
                ("dataset", dataset),
                ("decision", decision),
                ("enforced", "true"),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(decisions("payments", "allow", "domestic"), Some(3.0));
    assert_eq!(decisions("payments", "deny", "consent_missing"), Some(2.0));
    assert_eq!(decisions("payments", "allow", "consented"), Some(1.0));
    assert_eq!(decisions("payments", "allow", "not_egress"), Some(1.0));
    assert_eq!(decisions("", "deny", "no_route"), Some(1.0));
    assert_eq!(decisions("archive", "allow", "domestic"), Some(1.0));
    assert_eq!(m.sum("residency_decisions_total", &[]), 9.0);

    let responses = |code: &str| m.value("residency_responses_total", &[("code", code)]);
    assert_eq!(responses("2xx"), Some(5.0));
    assert_eq!(responses("4xx"), Some(3.0));
    assert_eq!(responses("5xx"), Some(1.0));
    for h in [
        "residency_request_duration_seconds_count",
        "residency_decision_duration_seconds_count",
        "residency_log_append_duration_seconds_count",
    ] {
        assert_eq!(m.value(h, &[]), Some(9.0), "{h}");
    }
    assert_eq!(m.types["residency_request_duration_seconds"], "histogram");

    let upstream = |name: &str, error: &str| {
        m.value(
            "residency_upstream_errors_total",
            &[("upstream", name), ("error", error)],
        )
    };
    assert_eq!(upstream("dead-store", "connect"), Some(1.0));
    assert_eq!(m.sum("residency_upstream_errors_total", &[]), 1.0);
    assert_eq!(upstream("cn-store", "connect"), Some(0.0));

    assert_eq!(
        m.value("residency_connections_accepted_total", &[]),
        Some(9.0)
    );
    assert_eq!(m.value("residency_connections_open", &[]), Some(0.0));
    assert_eq!(m.value("residency_consents", &[]), Some(1.0));
    assert_eq!(m.value("residency_consent_subjects", &[]), Some(1.0));
    assert_eq!(m.value("residency_log_writable", &[]), Some(1.0));
    assert_eq!(
        m.value("residency_log_write_failures_total", &[]),
        Some(0.0)
    );
    assert!(m.value("residency_log_records_written_total", &[]).unwrap() >= 9.0);
    let hash = shared.snapshot.load().policy.hash.clone();
    assert_eq!(
        m.value(
            "residency_policy_info",
            &[("name", "itest"), ("hash", &hash), ("geo_db", "")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("residency_policy_reloads_total", &[("result", "ok")]),
        Some(0.0)
    );
    // Label values come from the policy and closed sets only: never paths or subjects.
    for s in &m.samples {
        for v in s.labels.values() {
            assert!(!v.contains('/') && !v.contains("u1"), "{s:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_unready_while_the_decision_log_cannot_be_written() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.jsonl");
    // /dev/full fails every write with ENOSPC, for root too.
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let proxy = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .start_in(dir)
        .await;
    let admin_addr = proxy.running().admin_addr;
    assert_eq!(admin(admin_addr, "/readyz").await.status, 200);

    let r = client::get(APP, proxy.addr, "/payments/u1/a.json", &[]).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("log_unavailable"))
    );
    let ready = admin(admin_addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let v = ready.json();
    assert_eq!(v["ready"], false);
    let failing = v["failing"].as_array().unwrap();
    assert_eq!(failing.len(), 1, "{v}");
    assert!(
        failing[0].as_str().unwrap().starts_with("decision log"),
        "{v}"
    );
    let (_, m) = scrape(&proxy).await;
    assert_eq!(m.value("residency_log_writable", &[]), Some(0.0));
    assert!(m.value("residency_log_write_failures_total", &[]).unwrap() >= 1.0);
    assert_eq!(home.requests(), 0);
    // Counted as answered (refused), not as decided (allowed).
    let decisions = |decision: &str, reason: &str| {
        m.value(
            "residency_decisions_total",
            &[
                ("dataset", "payments"),
                ("decision", decision),
                ("enforced", "true"),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(decisions("error", "log_unavailable"), Some(1.0));
    assert_eq!(decisions("allow", "domestic"), None);

    // Space is back: the path leads to a regular file, and the next write succeeds.
    std::fs::remove_file(&log).unwrap();
    let r = client::get(APP, proxy.addr, "/payments/u1/a.json", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(admin(admin_addr, "/readyz").await.status, 200);
}

/// `mkfifo PATH`: a database "file" whose reader waits until the test writes it, which holds
/// the proxy's start-up at the point where it loads what the policy names.
fn fifo(path: &std::path::Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_only_once_the_policy_is_loaded() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("geo.mmdb");
    fifo(&db);
    let spec = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .toml(&format!("[geo]\ndatabase = '{}'\n", db.display()))
        .toml(&payments_dataset("cn-store", "consent", "consent"));
    let (policy, _) = spec.write_files(dir.path());
    let mut served = Served::start(&policy, dir.path());
    let admin_addr = served
        .addr("admin listener serving (starting)", "admin.listen")
        .await;

    // Alive, not ready, and saying why, while the database is being read.
    assert_eq!(admin(admin_addr, "/healthz").await.status, 200);
    let r = admin(admin_addr, "/readyz").await;
    assert_eq!(r.status, 503, "{}", r.text());
    let v = r.json();
    assert_eq!(v["ready"], false);
    assert!(
        v["failing"][0].as_str().unwrap().starts_with("policy"),
        "{v}"
    );
    assert_eq!(admin(admin_addr, "/metrics").await.status, 503);

    let bytes = crate::support::mmdb::maxmind_country_db(&[("198.51.100.0/24", "US")]);
    let writer = tokio::task::spawn_blocking(move || std::fs::write(db, bytes));
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the proxy reads the database")
        .unwrap()
        .unwrap();
    let data_addr = served.addr("residency-proxy serving", "listen").await;
    served.event("admin listener serving").await;
    let r = admin(admin_addr, "/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ready"], true);
    let r = client::get(APP, data_addr, "/payments/u1/a.json", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    served.signal("TERM");
    let status = served.exit(Duration::from_secs(10)).await.expect("exit");
    assert!(status.success(), "{status:?}");
}
