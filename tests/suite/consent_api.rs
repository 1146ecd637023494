//! The consent API on the admin listener, against a real SQLite registry: the bearer token,
//! every validation error, and grant / look-up / revoke with the history kept.

use crate::support::client;
use crate::support::proxy::{APP, PolicySpec};
use crate::support::registry::{
    TOKEN, admin, bureau_reads, consent_body, home_store, registry_policy,
};
use serde_json::{Value, json};

fn sqlite_store(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("consent.db").display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consent_api_needs_the_bearer_token_for_reads_and_writes() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = registry_policy(&sqlite_store(&db), &home).start().await;

    let routes: [(&str, &str, Option<Value>); 4] = [
        ("POST", "/v1/consents", Some(consent_body("c-1", "u1"))),
        ("GET", "/v1/consents?subject=u1", None),
        ("GET", "/v1/consents/c-1", None),
        ("POST", "/v1/consents/c-1/revoke", None),
    ];
    for token in [None, Some("wrong"), Some("test-admin-token-5f2"), Some("")] {
        for (method, path, body) in &routes {
            let r = admin(&proxy, method, path, token, body.clone()).await;
            assert_eq!(
                r.status,
                401,
                "{method} {path} with {token:?}: {}",
                r.text()
            );
            assert_eq!(r.json()["error"], "unauthorized");
            assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        }
    }
    let r = admin(&proxy, "GET", "/v1/consents?subject=u1", None, None).await;
    assert_eq!(r.status, 401);
    assert!(
        proxy.running().shared.consents.get("u1").is_none(),
        "nothing was granted without the token"
    );

    let r = admin(
        &proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        routes[0].2.clone(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin(&proxy, "GET", "/v1/consents?subject=u1", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(&proxy, "GET", "/v1/consents/c-1", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(&proxy, "POST", "/v1/consents/c-1/revoke", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The scheme's name is case-insensitive (RFC 9110).
    let r = client::send(
        "127.0.0.1",
        proxy.running().admin_addr,
        client::request("GET", "/v1/consents/c-1")
            .header("authorization", format!("bearer {TOKEN}"))
            .body(client::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The data listener never serves the admin API, token or not.
    let r = client::send(
        APP,
        proxy.addr,
        client::request("GET", "/v1/consents?subject=u1")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(client::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("no_route"))
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_the_consent_api_is_closed() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .consent(&format!("store = '{}'", sqlite_store(&db)))
        .start()
        .await;
    let r = admin(&proxy, "GET", "/v1/consents?subject=u1", Some(TOKEN), None).await;
    assert_eq!(r.status, 401);
    assert!(r.json()["message"].as_str().unwrap().contains("token_file"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_record_is_refused_with_422_naming_the_field() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = registry_policy(&sqlite_store(&db), &home).start().await;

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "method",
            json!("telepathy"),
            "not a known collection method",
        ),
        ("purposes", json!([]), "at least one purpose"),
        ("recipient", json!("*"), "never a wildcard"),
        ("recipient", json!("credit-*"), "never a wildcard"),
        (
            "recipient",
            json!("credit-bureau-usa"),
            "not a recipient of the policy",
        ),
        ("destinations", json!(["USA"]), "neither a country code"),
        (
            "expires_at",
            json!("2025-12-31T00:00:00Z"),
            "after granted_at",
        ),
        ("categories", json!(["User Financial"]), "is not a category"),
        (
            "categories",
            json!(["user..financial"]),
            "is not a category",
        ),
        ("destinations", json!([]), "at least one destination"),
        ("subject", json!(""), "must not be empty"),
        ("purposes", json!("credit_scoring"), "a list of strings"),
        ("granted_at", json!("yesterday"), "RFC 3339"),
        ("scope", json!("everything"), "not a field"),
        ("revoked_at", json!("2026-06-01"), "RFC 3339"),
    ];
    for (field, value, says) in cases {
        let mut body = consent_body("c-bad", "u-bad");
        body[field] = value.clone();
        let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(body)).await;
        assert_eq!(r.status, 422, "{field} = {value}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"], "invalid_consent");
        assert_eq!(v["field"], field, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(says),
            "{field}: {v}"
        );
    }
    // A missing field is named too.
    let mut body = consent_body("c-bad", "u-bad");
    body.as_object_mut().unwrap().remove("expires_at");
    let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(body)).await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (422, json!("expires_at"))
    );
    // Not JSON at all is a bad request, not a record at fault.
    let r = client::send(
        "127.0.0.1",
        proxy.running().admin_addr,
        client::request("POST", "/v1/consents")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(client::full("{\"id\": "))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_json"))
    );

    let r = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=u-bad",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        r.json()["consents"],
        json!([]),
        "nothing invalid was recorded"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_takes_effect_and_a_revocation_keeps_the_record_and_its_history() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = registry_policy(&sqlite_store(&db), &home).start().await;
    assert_eq!(bureau_reads(&proxy, "u1").await, "451 consent_missing");

    let r = admin(
        &proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        Some(consent_body("c-1", "u1")),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("location"), Some("/v1/consents/c-1"));
    assert_eq!(r.json()["id"], "c-1");
    // At once on this proxy: the API applies its write to the index.
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");

    // The same grant again changes nothing; the id with other content is refused.
    let r = admin(
        &proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        Some(consent_body("c-1", "u1")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut other = consent_body("c-1", "u1");
    other["purposes"] = json!(["marketing"]);
    let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(other)).await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (409, json!("purposes"))
    );

    // An id is generated when none is given, and granted_at defaults to now.
    let mut anonymous = consent_body("", "u2");
    anonymous.as_object_mut().unwrap().remove("id");
    anonymous.as_object_mut().unwrap().remove("granted_at");
    let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(anonymous)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let generated = r.json()["id"].as_str().unwrap().to_string();
    assert!(generated.starts_with("c-"), "{generated}");

    let r = admin(&proxy, "GET", "/v1/consents/c-1", Some(TOKEN), None).await;
    assert_eq!((r.status, r.json()["subject"].clone()), (200, json!("u1")));
    let r = admin(&proxy, "GET", "/v1/consents?subject=u1", Some(TOKEN), None).await;
    let listed = r.json()["consents"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], "c-1");

    let r = admin(
        &proxy,
        "POST",
        "/v1/consents/c-1/revoke",
        Some(TOKEN),
        Some(json!({"evidence": "user withdrew in the app"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["revoked_at"].is_string());
    assert_eq!(bureau_reads(&proxy, "u1").await, "451 consent_revoked");

    // The record is kept, revoked; the history has both facts, with who and why.
    let r = admin(&proxy, "GET", "/v1/consents/c-1", Some(TOKEN), None).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["revoked_at"].is_string());
    assert_eq!(r.json()["evidence"], "consent receipt in the test");
    let r = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=u1&history=true",
        Some(TOKEN),
        None,
    )
    .await;
    let events = r.json()["events"].as_array().unwrap().clone();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["grant", "revoke"], "{events:?}");
    assert!(events.iter().all(|e| e["recorded_by"] == "admin-api"));
    assert_eq!(events[1]["evidence"], "user withdrew in the app");
    assert_eq!(events[0]["record"]["purposes"], json!(["credit_scoring"]));

    // Revoking again changes nothing; unknown ids are 404.
    let r = admin(&proxy, "POST", "/v1/consents/c-1/revoke", Some(TOKEN), None).await;
    assert_eq!(r.status, 200);
    for (method, path) in [
        ("GET", "/v1/consents/nope"),
        ("POST", "/v1/consents/nope/revoke"),
    ] {
        let r = admin(&proxy, method, path, Some(TOKEN), None).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
    }
    let r = admin(&proxy, "DELETE", "/v1/consents/c-1", Some(TOKEN), None).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    let r = admin(&proxy, "GET", "/v1/consents", Some(TOKEN), None).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("subject_required"))
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_retried_without_its_time_answers_200_and_changes_nothing() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = registry_policy(&sqlite_store(&db), &home).start().await;
    // The docs' example: an id, and no granted_at (now).
    let mut body = consent_body("c-retry", "u1");
    body.as_object_mut().unwrap().remove("granted_at");
    let first = admin(
        &proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        Some(body.clone()),
    )
    .await;
    assert_eq!(first.status, 201, "{}", first.text());
    // A client that timed out sends it again.
    let retry = admin(
        &proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        Some(body.clone()),
    )
    .await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.json(), first.json(), "the grant as first recorded");
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");

    // Other terms are still refused, and so is another time given explicitly.
    let mut other = body.clone();
    other["purposes"] = json!(["marketing"]);
    let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(other)).await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (409, json!("purposes"))
    );
    let mut dated = body;
    dated["granted_at"] = "2026-01-01T00:00:00Z".into();
    let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(dated)).await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (409, json!("granted_at"))
    );
    let r = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=u1&history=true",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        r.json()["events"].as_array().unwrap().len(),
        1,
        "{}",
        r.text()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_admin_token_replaces_the_old_one_on_reload() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = registry_policy(&sqlite_store(&db), &home).start().await;
    let token_file = proxy.dir.path().join("admin.token");
    let status = |token: &'static str| {
        let proxy = &proxy;
        async move {
            admin(proxy, "GET", "/v1/consents?subject=u1", Some(token), None)
                .await
                .status
        }
    };
    assert_eq!(status(TOKEN).await, 200);

    // After a leak: the Secret is rotated and the proxy told to reload.
    std::fs::write(&token_file, "rotated-token-1\n").unwrap();
    proxy.running().reload().await.unwrap();
    assert_eq!(status(TOKEN).await, 401, "the old token stops working");
    assert_eq!(status("rotated-token-1").await, 200);

    // A token file that cannot be used rejects the reload; the token in force stays.
    std::fs::write(&token_file, "\n").unwrap();
    let e = proxy.running().reload().await.unwrap_err();
    assert!(e.to_string().contains("admin.token"), "{e}");
    assert_eq!(status("rotated-token-1").await, 200);

    // Without a signal too: the token file is watched like the policy.
    std::fs::write(&token_file, "rotated-token-2\n").unwrap();
    time_until_status(&proxy, "rotated-token-2", 200).await;
    assert_eq!(status("rotated-token-1").await, 401);
    proxy.shutdown().await;
}

/// Waits (up to 10 s) until the consent API answers `token` with `want`.
async fn time_until_status(proxy: &crate::support::proxy::TestProxy, token: &str, want: u16) {
    let start = tokio::time::Instant::now();
    loop {
        let got = admin(proxy, "GET", "/v1/consents?subject=u1", Some(token), None)
            .await
            .status;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "still {got} with {token}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_store_has_no_consent_api() {
    let home = home_store().await;
    let mut proxy = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .admin_token(TOKEN)
        .start()
        .await;
    let r = admin(&proxy, "GET", "/v1/consents?subject=u1", Some(TOKEN), None).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (501, json!("no_registry"))
    );
    proxy.shutdown().await;
}

/// Regression: `"revoked_at": null` (or any optional field sent as `null`) was refused 422,
/// and so was a revoked record as the API itself lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_the_api_returns_is_accepted_back_unchanged() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = registry_policy(&sqlite_store(&db), &home).start().await;

    // `null` is absent: a grant, dated now, without evidence.
    let mut body = consent_body("c-null", "u-null");
    for field in ["revoked_at", "evidence", "granted_at"] {
        body[field] = Value::Null;
    }
    let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(body)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.json().get("revoked_at").is_none(), "{}", r.text());
    assert!(r.json().get("evidence").is_none(), "{}", r.text());
    assert!(r.json()["granted_at"].is_string(), "{}", r.text());

    for (id, subject) in [("c-kept", "u-rt"), ("c-gone", "u-rt")] {
        let r = admin(
            &proxy,
            "POST",
            "/v1/consents",
            Some(TOKEN),
            Some(consent_body(id, subject)),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let r = admin(
        &proxy,
        "POST",
        "/v1/consents/c-gone/revoke",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // What a listing and a look-up return, sent back: 200, the record unchanged.
    let listed = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=u-rt",
        Some(TOKEN),
        None,
    )
    .await;
    let mut returned: Vec<Value> = listed.json()["consents"].as_array().unwrap().clone();
    assert_eq!(returned.len(), 2, "{}", listed.text());
    assert!(returned.iter().any(|r| r["revoked_at"].is_string()));
    for id in ["c-null", "c-gone"] {
        let r = admin(
            &proxy,
            "GET",
            &format!("/v1/consents/{id}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        returned.push(r.json());
    }
    let history = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=u-rt&history=true",
        Some(TOKEN),
        None,
    )
    .await;
    for e in history.json()["events"].as_array().unwrap() {
        if e["event"] == "grant" {
            returned.push(e["record"].clone());
        }
    }
    for record in returned {
        let r = admin(
            &proxy,
            "POST",
            "/v1/consents",
            Some(TOKEN),
            Some(record.clone()),
        )
        .await;
        assert_eq!(r.status, 200, "{record}: {}", r.text());
        // The answer is the consent's current state: the record itself, except for the
        // grant of a revoked consent as its history lists it.
        let id = record["id"].as_str().unwrap();
        let now = admin(
            &proxy,
            "GET",
            &format!("/v1/consents/{id}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(r.json(), now.json(), "{record}");
        if id != "c-gone" || record.get("revoked_at").is_some() {
            assert_eq!(r.json(), record, "unchanged");
        }
    }
    // Nothing was recorded twice.
    let after = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=u-rt&history=true",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(after.json(), history.json());
    proxy.shutdown().await;
}

/// A recorded grant sent back with `revoked_at` set is revoked, and answered 200 as
/// `/revoke` is: nothing was created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_grant_sent_back_revoked_is_revoked_and_answered_200() {
    let db = tempfile::tempdir().unwrap();
    let home = home_store().await;
    let mut proxy = registry_policy(&sqlite_store(&db), &home).start().await;
    let r = admin(
        &proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        Some(consent_body("c-1", "u1")),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mut revoked = consent_body("c-1", "u1");
    revoked["revoked_at"] = "2026-06-01T00:00:00Z".into();
    let r = admin(&proxy, "POST", "/v1/consents", Some(TOKEN), Some(revoked)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.get("location").is_none());
    assert_eq!(r.json()["revoked_at"], "2026-06-01T00:00:00Z");
    assert_eq!(bureau_reads(&proxy, "u1").await, "451 consent_revoked");
    proxy.shutdown().await;
}
