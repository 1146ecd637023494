//! `explain` decides as `serve` does: the same requests, server-side copies among them, sent
//! to a real proxy over a registry it caches (SQLite and PostgreSQL) and rehearsed with the
//! real `explain` command against the same registry, give the same decision, reason, rule and
//! consent. The proxy starts with an empty cache, so every subject is a miss the first time:
//! a copy's source must be filled as any request's subject is.

use crate::support::client::{self, request};
use crate::support::proxy::{BUREAU, TestProxy};
use crate::support::registry::{
    PURPOSE, cli_ok, fresh_database, grant_with_cli, home_store, postgres_url, registry_policy,
};

/// A request of the comparison: method, path, the copy source (if a copy).
struct Case {
    method: &'static str,
    path: &'static str,
    copy_from: Option<&'static str>,
    /// The reason both must give (guards against both being wrong the same way).
    reason: &'static str,
}

const CASES: [Case; 8] = [
    // A copy from a subject nobody has asked about yet: its consent must be read from the
    // store, not taken for an outage.
    Case {
        method: "PUT",
        path: "/payments/u123/y",
        copy_from: Some("/payments/u600/a"),
        reason: "not_egress",
    },
    Case {
        method: "PUT",
        path: "/payments/u124/y",
        copy_from: Some("/payments/u603/a"),
        reason: "consent_missing",
    },
    Case {
        method: "PUT",
        path: "/payments/u125/y",
        copy_from: Some("/payments/u601/a"),
        reason: "consent_revoked",
    },
    Case {
        method: "PUT",
        path: "/payments/u126/y",
        copy_from: Some("payments/u602/a?versionId=3"),
        reason: "consent_method_invalid",
    },
    Case {
        method: "GET",
        path: "/payments/u600/a",
        copy_from: None,
        reason: "consented",
    },
    Case {
        method: "GET",
        path: "/payments/u601/a",
        copy_from: None,
        reason: "consent_revoked",
    },
    Case {
        method: "GET",
        path: "/payments/u604/a",
        copy_from: None,
        reason: "consent_missing",
    },
    // The same copy again, now from the cache.
    Case {
        method: "PUT",
        path: "/payments/u123/z",
        copy_from: Some("/payments/u600/a"),
        reason: "not_egress",
    },
];

/// The registry every store kind holds: u600 consented, u601 revoked, u602 pre-ticked, u603
/// and u604 nothing.
async fn fill_registry(store: &str) {
    grant_with_cli(store, "c-600", "u600").await;
    grant_with_cli(store, "c-601", "u601").await;
    cli_ok(&["consent", "revoke", "--store", store, "c-601"]).await;
    cli_ok(&[
        "consent",
        "grant",
        "--store",
        store,
        "--id",
        "c-602",
        "--subject",
        "u602",
        "--recipient",
        "credit-bureau-us",
        "--purpose",
        "credit_scoring",
        "--category",
        "user.financial",
        "--destination",
        "US",
        "--method",
        "pre_ticked",
        "--granted-at",
        "2026-01-01T00:00:00Z",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    ])
    .await;
}

/// What a decision record says, for comparison.
fn summary(r: &serde_json::Value) -> String {
    format!(
        "{} {} {} consent={}",
        r["decision"], r["reason"], r["rule"], r["consent"]["id"]
    )
}

async fn serve_and_explain_agree(store: &str) {
    fill_registry(store).await;
    let home = home_store().await;
    let mut proxy: TestProxy = registry_policy(store, &home).start().await;
    let policy = proxy.policy_path.display().to_string();
    for case in &CASES {
        let mut req = request(case.method, case.path).header(PURPOSE.0, PURPOSE.1);
        if let Some(from) = case.copy_from {
            req = req.header("x-amz-copy-source", from);
        }
        let r = client::send(BUREAU, proxy.addr, req.body(client::empty()).unwrap()).await;
        let id = r
            .header("x-residency-decision")
            .expect("every answer names its decision")
            .to_string();
        let served = proxy.log.decision(&id);

        let mut args = vec![
            "explain".to_string(),
            "--json".into(),
            "--policy".into(),
            policy.clone(),
            "--method".into(),
            case.method.into(),
            "--path".into(),
            case.path.into(),
            "--client-ip".into(),
            BUREAU.into(),
            "--purpose".into(),
            PURPOSE.1.into(),
        ];
        if let Some(from) = case.copy_from {
            args.push("--header".into());
            args.push(format!("x-amz-copy-source: {from}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let explained: serde_json::Value = serde_json::from_str(&cli_ok(&args).await).unwrap();
        let what = format!(
            "{} {} (copy of {:?})",
            case.method, case.path, case.copy_from
        );
        assert_eq!(
            summary(&served),
            summary(&explained["record"]),
            "serve and explain disagree on {what}"
        );
        assert_eq!(served["reason"], case.reason, "{what}: {served}");
    }
    // No lookup failed: the store answered every miss.
    let metrics = crate::support::registry::admin(&proxy, "GET", "/metrics", None, None).await;
    let failures = crate::support::prom::parse(&metrics.text()).sum(
        "residency_decisions_total",
        &[("reason", "consent_store_unavailable")],
    );
    assert_eq!(failures, 0.0, "a store outage that never happened");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_through_a_cache_miss_is_decided_as_explain_decides_it_with_sqlite() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    serve_and_explain_agree(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_through_a_cache_miss_is_decided_as_explain_decides_it_with_postgres() {
    let Some(server) = postgres_url("serve_explain postgres") else {
        return;
    };
    let url = fresh_database(&server).await;
    serve_and_explain_agree(&url).await;
}
