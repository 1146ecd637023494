//! The `postgres://` registry against a real PostgreSQL server (`RESIDENCY_TEST_POSTGRES`,
//! started by `.ci/postgres.sh`; without it these tests say they are skipped): proxies
//! sharing one database, the `consent` command and straight SQL writing while they run, and
//! the database lost mid-run. Each test uses a database of its own.

use crate::support::registry::{
    Relay, TOKEN, address_of, admin, bulk_import_matches_the_file_store, bureau_reads, cli_ok,
    expect_store_unavailable, fresh_database, grant_via_api, home_store, pg_connect, postgres_url,
    registry_policy, until_bureau_reads, with_address,
};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_proxy_is_refused_by_another_within_a_second() {
    let Some(server) = postgres_url("a_revocation_through_one_proxy_is_refused_by_another") else {
        return;
    };
    let url = fresh_database(&server).await;
    let home = home_store().await;
    let mut first = registry_policy(&url, &home).start().await;
    let mut second = registry_policy(&url, &home).start().await;
    // A third holds the whole registry instead of a cache: the same feed keeps it current.
    let mut third = registry_policy(&url, &home)
        .consent("preload = true")
        .start()
        .await;
    assert_eq!(bureau_reads(&second, "u1").await, "451 consent_missing");
    assert_eq!(bureau_reads(&third, "u1").await, "451 consent_missing");

    grant_via_api(&first, "c-1", "u1").await;
    let took = until_bureau_reads(&second, "u1", "200", Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(1), "granted after {took:?}");
    assert_eq!(bureau_reads(&second, "u1").await, "200");
    let took = until_bureau_reads(&third, "u1", "200", Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(1),
        "granted (preloaded) after {took:?}"
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
    assert_eq!(bureau_reads(&second, "u1").await, "451 consent_revoked");
    assert_eq!(bureau_reads(&first, "u1").await, "451 consent_revoked");
    let took =
        until_bureau_reads(&third, "u1", "451 consent_revoked", Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(1),
        "revoked (preloaded) after {took:?}"
    );

    // The second proxy's API sees the history written through the first.
    let r = admin(
        &second,
        "GET",
        "/v1/consents?subject=u1&history=true",
        Some(TOKEN),
        None,
    )
    .await;
    let kinds: Vec<String> = r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["grant", "revoke"]);
    first.shutdown().await;
    second.shutdown().await;
    third.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_by_the_consent_command_and_by_straight_sql_take_effect_while_running() {
    let Some(server) = postgres_url("grants_by_the_consent_command_and_by_straight_sql") else {
        return;
    };
    let url = fresh_database(&server).await;
    let home = home_store().await;
    let mut proxy = registry_policy(&url, &home).start().await;

    cli_ok(&[
        "consent",
        "grant",
        "--store",
        &url,
        "--id",
        "c-cli",
        "--subject",
        "u2",
        "--recipient",
        "credit-bureau-us",
        "--purpose",
        "credit_scoring",
        "--category",
        "user",
        "--destination",
        "US",
        "--method",
        "explicit",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    ])
    .await;
    let took = until_bureau_reads(&proxy, "u2", "200", Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(1), "granted after {took:?}");
    assert_eq!(bureau_reads(&proxy, "u2").await, "200");

    // An operator's INSERT, bypassing every tool: the trigger notifies the proxies.
    let db = pg_connect(&url).await;
    db.batch_execute(
        "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at) \
         VALUES ('c-sql', 'u3', 'credit-bureau-us', '{credit_scoring}', '{user.financial}', '{US}', 'explicit', now() - interval '1 hour', now() + interval '1 year')",
    )
    .await
    .unwrap();
    until_bureau_reads(&proxy, "u3", "200", Duration::from_secs(10)).await;
    assert_eq!(bureau_reads(&proxy, "u3").await, "200");
    db.batch_execute(
        "INSERT INTO consent_revocations (consent_id, revoked_at) VALUES ('c-sql', now())",
    )
    .await
    .unwrap();
    until_bureau_reads(&proxy, "u3", "451 consent_revoked", Duration::from_secs(10)).await;
    assert_eq!(bureau_reads(&proxy, "u3").await, "451 consent_revoked");

    // Facts stay facts, even for straight SQL.
    let e = db
        .batch_execute("DELETE FROM consents WHERE id = 'c-sql'")
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("facts"), "{e:?}");
    let history = cli_ok(&[
        "consent",
        "list",
        "--store",
        &url,
        "--subject",
        "u3",
        "--history",
    ])
    .await;
    assert_eq!(history.lines().count(), 2, "{history}");
    assert!(
        history.contains("\"recorded_by\":\"postgres\""),
        "{history}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_lost_mid_run_refuses_consent_after_the_bound_and_recovers() {
    let Some(server) = postgres_url("the_database_lost_mid_run") else {
        return;
    };
    let direct = fresh_database(&server).await;
    let relay = Relay::start(address_of(&direct)).await;
    let via_relay = with_address(&direct, relay.addr);
    let home = home_store().await;
    // Granted before the proxy starts: the notification of a grant made while it runs could
    // reach its cache after the first read and forget u1 again, which would make the read
    // after the cut a miss, refused at once instead of after the bound.
    cli_ok(&["consent", "list", "--store", &direct]).await;
    pg_connect(&direct)
        .await
        .batch_execute(
            "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at) \
             VALUES ('c-1', 'u1', 'credit-bureau-us', '{credit_scoring}', '{user.financial}', '{US}', 'explicit', now() - interval '1 hour', now() + interval '1 year')",
        )
        .await
        .unwrap();
    let mut proxy = registry_policy(&via_relay, &home)
        .consent("max_staleness = '2s'")
        .start()
        .await;
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    relay.cut();
    // The bound counts from the last contact, at most a heartbeat (0.5 s) before the cut.
    expect_store_unavailable(&proxy, Duration::from_millis(1400)).await;
    // The admin API says the store is unavailable rather than hanging.
    let r = admin(&proxy, "GET", "/v1/consents/c-1", Some(TOKEN), None).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (503, "store_unavailable".into())
    );

    // Meanwhile the consent is revoked elsewhere; the proxy learns it when it reconnects.
    let db = pg_connect(&direct).await;
    db.batch_execute(
        "INSERT INTO consent_revocations (consent_id, revoked_at) VALUES ('c-1', now())",
    )
    .await
    .unwrap();
    relay.restore();
    until_bureau_reads(&proxy, "u1", "451 consent_revoked", Duration::from_secs(20)).await;
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_proxy_cannot_read_grants_nothing_and_the_others_still_load() {
    let Some(server) = postgres_url("a_row_the_proxy_cannot_read_grants_nothing") else {
        return;
    };
    let url = fresh_database(&server).await;
    let home = home_store().await;
    // Any use of the registry creates the schema.
    cli_ok(&["consent", "list", "--store", &url]).await;
    let db = pg_connect(&url).await;
    let insert = |id: &str, subject: &str, purposes: &str, granted: &str, expires: &str| {
        format!(
            "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at) \
             VALUES ('{id}', '{subject}', 'credit-bureau-us', '{purposes}', '{{user.financial}}', '{{US}}', 'explicit', {granted}, {expires});"
        )
    };
    let good = |id: &str, subject: &str| {
        insert(
            id,
            subject,
            "{credit_scoring}",
            "now() - interval '1 hour'",
            "now() + interval '1 year'",
        )
    };
    // Rows the schema accepts and a consent cannot hold, written the way an operator
    // writes "no expiry" or a list by hand, between readable ones.
    db.batch_execute(
        &[
            good("c-a", "u1"),
            insert("c-b", "u2", "{credit_scoring}", "now()", "'infinity'"),
            insert(
                "c-c",
                "u3",
                "{credit_scoring}",
                "'-infinity'",
                "'2099-01-01'",
            ),
            insert(
                "c-d",
                "u4",
                "{credit_scoring,NULL}",
                "now()",
                "'2099-01-01'",
            ),
            insert("c-e", "u5", "{credit_scoring}", "now()", "'200000-01-01'"),
            good("c-f", "u6"),
            "INSERT INTO consent_revocations (consent_id, revoked_at) VALUES ('c-f', '-infinity');"
                .into(),
            good("c-g", "u7"),
        ]
        .concat(),
    )
    .await
    .unwrap();

    let mut proxy = registry_policy(&url, &home).start().await;
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");
    assert_eq!(bureau_reads(&proxy, "u7").await, "200");
    for subject in ["u2", "u3", "u4", "u5"] {
        assert_eq!(
            bureau_reads(&proxy, subject).await,
            "451 consent_missing",
            "{subject}"
        );
    }
    // A revocation with an unreadable time still revokes.
    assert_eq!(bureau_reads(&proxy, "u6").await, "451 consent_revoked");
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The same while running: the change feed skips the row and stays current.
    db.batch_execute(
        &[
            insert("c-h", "u8", "{credit_scoring}", "now()", "'infinity'"),
            good("c-i", "u9"),
        ]
        .concat(),
    )
    .await
    .unwrap();
    until_bureau_reads(&proxy, "u9", "200", Duration::from_secs(10)).await;
    assert_eq!(bureau_reads(&proxy, "u9").await, "200");
    assert_eq!(bureau_reads(&proxy, "u8").await, "451 consent_missing");
    db.batch_execute(
        "INSERT INTO consent_revocations (consent_id, revoked_at) VALUES ('c-g', 'infinity')",
    )
    .await
    .unwrap();
    until_bureau_reads(&proxy, "u7", "451 consent_revoked", Duration::from_secs(10)).await;
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The admin API lists what it can read, and the history keeps every revocation.
    let r = admin(&proxy, "GET", "/v1/consents?subject=u2", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["consents"], serde_json::json!([]));
    let r = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=u6&history=true",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["events"].as_array().unwrap().len(),
        2,
        "{}",
        r.text()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_import_holds_what_the_file_store_would_and_repeats_as_unchanged() {
    let Some(server) = postgres_url("a_bulk_import_holds_what_the_file_store_would") else {
        return;
    };
    let url = fresh_database(&server).await;
    let dir = tempfile::tempdir().unwrap();
    bulk_import_matches_the_file_store(&url, dir.path()).await;
}
