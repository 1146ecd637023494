//! The consent cache over a database store (SPEC section 4.1): a miss is filled by one query
//! and then served from memory; a revocation reaches a sidecar under load within a second; a
//! lost notification cannot keep a revoked consent in force; a store that does not answer
//! refuses uncached subjects within the lookup timeout while cached ones keep being decided.

use crate::support::prom::parse;
use crate::support::proxy::TestProxy;
use crate::support::registry::{
    TOKEN, admin, bureau_reads, fresh_database, grant_via_api, grant_with_cli, home_store,
    pg_connect, postgres_url, registry_policy, until_bureau_reads,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

async fn metric(proxy: &TestProxy, name: &str) -> f64 {
    let r = admin(proxy, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    parse(&r.text()).sum(name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_filled_by_one_query_and_the_next_requests_are_served_from_the_cache() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    let home = home_store().await;
    grant_with_cli(&store, "c-1", "u1").await;
    let mut proxy = registry_policy(&store, &home).start().await;

    assert_eq!(
        metric(&proxy, "residency_consent_cache_misses_total").await,
        0.0
    );
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");
    assert_eq!(
        metric(&proxy, "residency_consent_cache_misses_total").await,
        1.0
    );
    assert_eq!(
        metric(&proxy, "residency_consent_lookup_duration_seconds_count").await,
        1.0
    );
    for _ in 0..5 {
        assert_eq!(bureau_reads(&proxy, "u1").await, "200");
    }
    // A subject without consent is remembered as such: no query for it either.
    for _ in 0..3 {
        assert_eq!(bureau_reads(&proxy, "nobody").await, "451 consent_missing");
    }
    assert_eq!(
        metric(&proxy, "residency_consent_cache_misses_total").await,
        2.0
    );
    // Five hits for u1 and two for nobody: a request decided again after its miss was
    // filled is not counted a second time.
    assert_eq!(
        metric(&proxy, "residency_consent_cache_hits_total").await,
        7.0
    );
    assert!(metric(&proxy, "residency_consent_cache_bytes").await > 0.0);
    // Ready at once, with nothing loaded: the index holds only what was looked up.
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
}

/// Requests of many subjects (most without consent, so misses and negative entries) sent to
/// `proxy` until `stop`; counts them.
fn load(
    proxy: &TestProxy,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let addr = proxy.addr;
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let subject = format!("load-{}", i % 500);
            let r = crate::support::client::get(
                crate::support::proxy::BUREAU,
                addr,
                &format!("/payments/{subject}/2026-01.json"),
                &[crate::support::registry::PURPOSE],
            )
            .await;
            assert!(r.status == 451, "{}", r.text());
            sent.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_sidecar_is_refused_by_another_under_load_within_a_second() {
    let Some(server) = postgres_url("a_revocation_through_one_sidecar_under_load") else {
        return;
    };
    let url = fresh_database(&server).await;
    let home = home_store().await;
    let mut first = registry_policy(&url, &home).start().await;
    let mut second = registry_policy(&url, &home).start().await;
    grant_via_api(&first, "c-1", "u1").await;
    assert_eq!(bureau_reads(&second, "u1").await, "200");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let loads: Vec<_> = (0..3)
        .flat_map(|_| {
            [
                load(&first, stop.clone(), sent.clone()),
                load(&second, stop.clone(), sent.clone()),
            ]
        })
        .collect();
    crate::support::wait_until("the load to run", || sent.load(Ordering::Relaxed) >= 50).await;
    assert_eq!(
        bureau_reads(&second, "u1").await,
        "200",
        "cached under load"
    );

    let r = admin(&first, "POST", "/v1/consents/c-1/revoke", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let took = until_bureau_reads(
        &second,
        "u1",
        "451 consent_revoked",
        Duration::from_secs(10),
    )
    .await;
    assert!(took < Duration::from_secs(1), "revoked after {took:?}");
    // And it stays revoked.
    for _ in 0..10 {
        assert_eq!(bureau_reads(&second, "u1").await, "451 consent_revoked");
    }
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 100, "the load ran");
    assert!(metric(&second, "residency_consent_cache_invalidations_total").await >= 1.0);
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_cannot_keep_a_revoked_consent_in_force() {
    let Some(server) = postgres_url("a_lost_notification_cannot_keep_a_revoked_consent") else {
        return;
    };
    let url = fresh_database(&server).await;
    let home = home_store().await;
    let mut proxy = registry_policy(&url, &home)
        .consent("max_staleness = '2s'")
        .start()
        .await;
    grant_via_api(&proxy, "c-1", "u1").await;
    grant_via_api(&proxy, "c-2", "u2").await;
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");
    assert_eq!(bureau_reads(&proxy, "u2").await, "200");

    // The feed's connection is ended, and the revocation committed before it can LISTEN
    // again: its notification goes to nobody.
    let db = pg_connect(&url).await;
    let ended = db
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'residency-proxy-feed' AND datname = current_database()) t",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(ended, 1, "the feed's connection");
    db.batch_execute(
        "INSERT INTO consent_revocations (consent_id, revoked_at) VALUES ('c-1', now())",
    )
    .await
    .unwrap();
    let took =
        until_bureau_reads(&proxy, "u1", "451 consent_revoked", Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(2),
        "revoked after {took:?}, over max_staleness"
    );
    // What did not change is still granted.
    assert_eq!(bureau_reads(&proxy, "u2").await, "200");

    // A change whose notification never arrives on a live connection: written with the
    // triggers off, then numbered by hand, so no NOTIFY is sent. The heartbeat's read of the
    // change table finds it.
    db.batch_execute(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         INSERT INTO consent_revocations (consent_id, revoked_at) VALUES ('c-2', now()); COMMIT;",
    )
    .await
    .unwrap();
    db.batch_execute("INSERT INTO consent_changes (subject, consent_id) VALUES ('u2', 'c-2')")
        .await
        .unwrap();
    let took =
        until_bureau_reads(&proxy, "u2", "451 consent_revoked", Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(2),
        "revoked after {took:?}, over max_staleness"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_answer_refuses_uncached_subjects_within_the_lookup_timeout() {
    let Some(server) = postgres_url("a_store_that_does_not_answer") else {
        return;
    };
    let url = fresh_database(&server).await;
    let home = home_store().await;
    grant_with_cli(&url, "c-1", "u1").await;
    grant_with_cli(&url, "c-5", "u5").await;
    let mut proxy = registry_policy(&url, &home).start().await;
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");

    // Reads of the consent table wait behind this lock; the change table stays readable,
    // so the feed is current and only lookups fail.
    let mut db = pg_connect(&url).await;
    let tx = db.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE consents IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        bureau_reads(&proxy, "u5").await,
        "451 consent_store_unavailable"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1500),
        "answered after {took:?} (lookup_timeout is 200 ms)"
    );
    // A cached subject is decided from memory meanwhile.
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");
    // A client that gives up while its lookup runs still leaves its decision (as it stood)
    // and an outcome saying what happened.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), bureau_reads(&proxy, "u6")).await;
    assert!(gave_up.is_err(), "answered within 50 ms: {gave_up:?}");
    let mut abandoned = None;
    crate::support::wait_until("the abandoned request's decision record", || {
        abandoned = proxy
            .log
            .of_kind("decision")
            .into_iter()
            .filter(|d| d["reason"] == "consent_store_unavailable")
            .nth(1);
        abandoned.is_some()
    })
    .await;
    let id = abandoned.unwrap()["id"].as_str().unwrap().to_string();
    let outcome = proxy.log.outcome(&id).await;
    assert_eq!(outcome["error"], "consent_store_unavailable", "{outcome}");
    assert!(
        outcome["detail"]
            .as_str()
            .unwrap_or("")
            .contains("went away"),
        "{outcome}"
    );
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("lookups failing"), "{}", r.text());
    let r = admin(&proxy, "GET", "/metrics", None, None).await;
    let refused = parse(&r.text()).sum(
        "residency_decisions_total",
        &[("reason", "consent_store_unavailable")],
    );
    assert_eq!(refused, 1.0, "counted");

    tx.rollback().await.unwrap();
    until_bureau_reads(&proxy, "u5", "200", Duration::from_secs(10)).await;
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_read_the_replica_unless_it_has_not_replayed_the_subjects_latest_change() {
    let Some(server) = postgres_url("misses_read_the_replica") else {
        return;
    };
    // Two databases stand for a primary and its replica: what each holds tells which one
    // answered a miss.
    let primary = fresh_database(&server).await;
    let replica = fresh_database(&server).await;
    let home = home_store().await;
    crate::support::registry::cli_ok(&["consent", "list", "--store", &replica]).await;
    let r = pg_connect(&replica).await;
    // Only the replica holds u1's consent, and an unrevoked c-2 (one change behind).
    r.batch_execute(
        "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at) VALUES \
         ('c-1', 'u1', 'credit-bureau-us', '{credit_scoring}', '{user.financial}', '{US}', 'explicit', now() - interval '1 hour', now() + interval '1 year'), \
         ('c-2', 'u2', 'credit-bureau-us', '{credit_scoring}', '{user.financial}', '{US}', 'explicit', now() - interval '1 hour', now() + interval '1 year')",
    )
    .await
    .unwrap();
    let mut proxy = registry_policy(&primary, &home)
        .consent(&format!("read_url = '{replica}'"))
        .start()
        .await;
    assert_eq!(
        bureau_reads(&proxy, "u1").await,
        "200",
        "read from the replica"
    );

    // On the primary, c-2 is granted and revoked after the sidecar started, after other
    // changes the replica has not replayed either (its change numbers stop at 2): the feed
    // knows u2's latest change, numbered beyond what the replica answers with.
    grant_via_api(&proxy, "c-8", "u8").await;
    grant_via_api(&proxy, "c-9", "u9").await;
    grant_via_api(&proxy, "c-2", "u2").await;
    let p = pg_connect(&primary).await;
    p.batch_execute(
        "INSERT INTO consent_revocations (consent_id, revoked_at) VALUES ('c-2', now())",
    )
    .await
    .unwrap();
    until_bureau_reads(&proxy, "u2", "451 consent_revoked", Duration::from_secs(5)).await;
    for _ in 0..5 {
        assert_eq!(bureau_reads(&proxy, "u2").await, "451 consent_revoked");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_import_forgets_the_cache_at_once_and_its_revocations_apply() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    let home = home_store().await;
    let mut proxy = registry_policy(&store, &home).start().await;
    grant_via_api(&proxy, "c-1", "u1").await;
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");
    let before = metric(&proxy, "residency_consent_cache_invalidations_total").await;

    // 12,000 new consents and the revocation of c-1, in one import.
    let mut lines = String::new();
    for i in 0..12_000 {
        let c = crate::support::registry::consent_body(&format!("bulk-{i}"), &format!("b{i}"));
        lines.push_str(&format!("{c}\n"));
    }
    let mut revoked = crate::support::registry::consent_body("c-1", "u1");
    revoked["revoked_at"] = "2026-06-01T00:00:00Z".into();
    lines.push_str(&format!("{revoked}\n"));
    let file = db.path().join("bulk.jsonl");
    std::fs::write(&file, lines).unwrap();
    crate::support::registry::cli_ok(&[
        "consent",
        "import",
        "--store",
        &store,
        &file.display().to_string(),
    ])
    .await;
    until_bureau_reads(&proxy, "u1", "451 consent_revoked", Duration::from_secs(5)).await;
    assert_eq!(bureau_reads(&proxy, "b7").await, "200");
    // Forgotten in one go, not one subject at a time.
    let after = metric(&proxy, "residency_consent_cache_invalidations_total").await;
    assert!(after - before < 10.0, "{before} -> {after}");
    proxy.shutdown().await;
}
