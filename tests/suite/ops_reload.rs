//! Hot reload: the policy file and the geolocation database are watched; an edit changes
//! decisions without failing a request, a broken one is rejected with every error while the
//! running policy keeps deciding, and a database is only used once it has been read whole.

use crate::support::client::{self, Conn, empty, request};
use crate::support::proxy::{APP, BUREAU, HOME_IP, PolicySpec, TestProxy, payments_dataset};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::metrics::ReloadResult;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Polls `probe` every 20 ms until it returns `Some`, for at most 15 s (a reload takes one
/// poll to notice and one to confirm, a second each).
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin_get(proxy: &TestProxy, path: &str) -> client::Reply {
    client::send(
        "127.0.0.1",
        proxy.running().admin_addr,
        request("GET", path).body(empty()).unwrap(),
    )
    .await
}

async fn policy_status(proxy: &TestProxy) -> Value {
    admin_get(proxy, "/v1/policy").await.json()
}

async fn bureau_get(proxy: &TestProxy) -> client::Reply {
    client::get(
        BUREAU,
        proxy.addr,
        "/payments/u1/2026-01.json",
        &[("x-purpose", "credit_scoring")],
    )
    .await
}

/// Requests from the domestic application, on one keep-alive connection and on fresh ones,
/// until told to stop; counts those that did not get their 200.
struct Flow {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Flow {
    fn start(proxy: &TestProxy) -> Flow {
        let (stop, sent, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let addr = proxy.addr;
        let (s, n, f) = (stop.clone(), sent.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut keep_alive = Conn::open(APP, addr).await;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let req = request("GET", &format!("/payments/u{i}/a.json"))
                    .body(empty())
                    .unwrap();
                let r = if i % 2 == 0 {
                    keep_alive.try_send(req).await
                } else {
                    Conn::open(APP, addr).await.try_send(req).await
                };
                n.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status == 200 => {}
                    other => {
                        f.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request {i} failed during the reload: {other:?}");
                    }
                }
            }
        });
        Flow {
            stop,
            sent,
            failed,
            task,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn start(home: &Upstream) -> TestProxy {
    PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edited_on_disk_changes_decisions_without_a_failed_request() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&home).await;
    let r = bureau_get(&proxy).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (451, Some("consent_missing"))
    );
    let before = policy_status(&proxy).await;
    assert!(before["last_reload"].is_null(), "{before}");

    let flow = Flow::start(&proxy);
    // Edited in place, as an editor that truncates and rewrites does.
    let text = std::fs::read_to_string(&proxy.policy_path).unwrap();
    let edited = text.replace(
        "cross_border = 'consent'\nthird_party = 'consent'",
        "cross_border = 'allow'\nthird_party = 'allow'",
    );
    assert_ne!(text, edited);
    std::fs::write(&proxy.policy_path, edited).unwrap();

    let allowed = eventually("the edited policy to decide", || async {
        let r = bureau_get(&proxy).await;
        (r.status == 200).then_some(r)
    })
    .await;
    let (sent, failed) = flow.finish().await;
    assert!(sent > 0, "no request flowed during the reload");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the reload"
    );

    let rec = proxy.log.decision(&allowed.decision_id());
    assert_eq!(rec["reason"], "cross_border_allowed", "{rec}");
    let after = policy_status(&proxy).await;
    assert_ne!(after["hash"], before["hash"]);
    assert_eq!(rec["policy"], after["hash"]);
    assert_eq!(after["last_reload"]["result"], "ok", "{after}");
    assert_eq!(after["last_reload"]["trigger"], "file_change", "{after}");
    let metrics = &proxy.running().shared.metrics;
    assert_eq!(metrics.reloads(ReloadResult::Ok), 1);
    assert_eq!(metrics.reloads(ReloadResult::Rejected), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_is_rejected_with_every_error_and_decisions_do_not_change() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&home).await;
    let before = policy_status(&proxy).await;
    let text = std::fs::read_to_string(&proxy.policy_path).unwrap();

    // Two mistakes in an edit that would otherwise let the bureau in.
    let broken = text
        .replace(
            "cross_border = 'consent'\nthird_party = 'consent'",
            "cross_border = 'allow'\nthird_party = 'allow'",
        )
        .replace("upstream = 'cn-store'", "upstream = 'cn-stor'")
        .replace("[policy]\n", "[policy]\ncolour = 'red'\n");
    std::fs::write(&proxy.policy_path, &broken).unwrap();
    let metrics = &proxy.running().shared.metrics;
    eventually("the rejection", || async {
        (metrics.reloads(ReloadResult::Rejected) == 1).then_some(())
    })
    .await;

    let r = bureau_get(&proxy).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (451, Some("consent_missing"))
    );
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["policy"], before["hash"]);
    let status = policy_status(&proxy).await;
    assert_eq!(status["hash"], before["hash"]);
    let last = &status["last_reload"];
    assert_eq!(last["result"], "rejected", "{status}");
    let errors: Vec<&str> = last["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("policy.colour") && e.contains("unknown key")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("datasets.payments.upstream") && e.contains("cn-stor")),
        "{errors:?}"
    );
    let exposition = crate::support::prom::parse(&admin_get(&proxy, "/metrics").await.text());
    assert_eq!(
        exposition.value("residency_policy_reloads_total", &[("result", "rejected")]),
        Some(1.0)
    );
    assert_eq!(
        exposition.value("residency_policy_reloads_total", &[("result", "ok")]),
        Some(0.0)
    );

    // SIGHUP's path rejects the same file, and is counted too.
    assert!(proxy.running().reload().await.is_err());
    assert_eq!(metrics.reloads(ReloadResult::Rejected), 2);

    // Fixing the file is picked up.
    std::fs::write(
        &proxy.policy_path,
        broken
            .replace("cn-stor'", "cn-store'")
            .replace("colour = 'red'\n", ""),
    )
    .unwrap();
    eventually("the fixed policy", || async {
        (bureau_get(&proxy).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(metrics.reloads(ReloadResult::Ok), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_geolocation_database_is_used_only_once_read_whole() {
    let store_ip = "127.0.0.5";
    let store = Upstream::start(store_ip, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("geo.mmdb");
    let at_home = crate::support::mmdb::maxmind_country_db(&[("127.0.0.5/32", "CN")]);
    let moved = crate::support::mmdb::maxmind_country_db(&[("127.0.0.5/32", "US")]);
    std::fs::write(&db_path, &at_home).unwrap();
    // Only the database places the store; the caller is placed by an override.
    let proxy = PolicySpec::new()
        .network("127.0.0.10/32", "CN")
        .upstream("store", &store.url())
        .toml(&format!("[geo]\ndatabase = '{}'\n", db_path.display()))
        .toml(&payments_dataset("store", "consent", "allow"))
        .start_in(dir)
        .await;
    let get = || client::get(APP, proxy.addr, "/payments/u1/a.json", &[]);
    assert_eq!(get().await.status, 200);
    let metrics = &proxy.running().shared.metrics;

    // A copy caught half-written is refused; the database in use keeps locating.
    std::fs::write(&db_path, &moved[..moved.len() / 2]).unwrap();
    eventually("the truncated database to be refused", || async {
        (metrics.reloads(ReloadResult::Rejected) == 1).then_some(())
    })
    .await;
    let status = policy_status(&proxy).await;
    assert!(
        status["last_reload"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("geo.mmdb"),
        "{status}"
    );
    let r = get().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(store.requests(), 2);

    // The whole new file, moved into place, is used: the store is now abroad.
    let tmp = proxy.dir.path().join("geo.mmdb.tmp");
    std::fs::write(&tmp, &moved).unwrap();
    std::fs::rename(&tmp, &db_path).unwrap();
    let refused = eventually("the new database", || async {
        let r = get().await;
        (r.status == 451).then_some(r)
    })
    .await;
    assert_eq!(refused.json()["error"], "upstream_outside_jurisdiction");
    assert_eq!(metrics.reloads(ReloadResult::Ok), 1);
    let reached = store.requests();
    assert_eq!(get().await.status, 451);
    assert_eq!(
        store.requests(),
        reached,
        "a request reached the store abroad"
    );
}
