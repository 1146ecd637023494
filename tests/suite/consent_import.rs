//! A large `consent import` and the admin API at once, against a real SQLite file and a real
//! PostgreSQL server (`RESIDENCY_TEST_POSTGRES`; without it that test says it is skipped): a
//! grant made while the import runs is answered within the API's time, takes effect, and
//! the import still ends with every line counted. And the one-time rebuild of a PostgreSQL
//! registry's id indexes, done by an import only to a registry small enough not to stall.

use crate::support::registry::{
    TOKEN, admin, bureau_reads, cli, cli_ok, consent_body, fresh_database, home_store, pg_connect,
    postgres_url, registry_policy,
};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Lines imported: in a debug build, several of the chunks PostgreSQL commits one by one
/// and of the transactions of about a second SQLite commits, in a few seconds.
const LINES: usize = 100_000;

/// The longest a grant may wait: SQLite's connections wait 5 s for the write lock
/// (PostgreSQL's statements 10 s) before the API answers 503.
const GRANT_WITHIN: Duration = Duration::from_secs(5);

/// Imports [`LINES`] new consents into `store` while a proxy on it grants one more through
/// its admin API once the import has written its first consents.
async fn a_grant_is_served_while_an_import_runs(store: &str, dir: &std::path::Path) {
    let lines: Vec<String> = (0..LINES)
        .map(|i| consent_body(&format!("c-imp-{i}"), &format!("u-imp-{i}")).to_string())
        .collect();
    let file = dir.join("consents.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    drop(lines);
    let home = home_store().await;
    let mut proxy = registry_policy(store, &home).start().await;
    assert_eq!(bureau_reads(&proxy, "u-api").await, "451 consent_missing");

    let mut import = std::process::Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["consent", "import", "--store", store])
        .arg(&file)
        .env_remove("RESIDENCY_CONSENT_STORE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let last = format!("/v1/consents/c-imp-{}", LINES - 1);
    // Under way: its first consents are written (and readable by others).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = admin(&proxy, "GET", "/v1/consents/c-imp-0", Some(TOKEN), None).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 404, "{}", r.text());
        assert!(
            import.try_wait().unwrap().is_none(),
            "the import ended before any of its consents could be read"
        );
        assert!(Instant::now() < deadline, "nothing imported after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let asked = Instant::now();
    let r = admin(
        &proxy,
        "POST",
        "/v1/consents",
        Some(TOKEN),
        Some(consent_body("c-api-1", "u-api")),
    )
    .await;
    let took = asked.elapsed();
    eprintln!("the grant was answered after {took:?}");
    assert_eq!(r.status, 201, "after {took:?}: {}", r.text());
    assert!(took < GRANT_WITHIN, "the grant was answered after {took:?}");
    // The import had not ended when the grant was answered: its last line is not written
    // yet, and the process still runs.
    let r = admin(&proxy, "GET", &last, Some(TOKEN), None).await;
    assert_eq!(
        r.status, 404,
        "the import's last consent was written before the grant was answered ({took:?})"
    );
    assert!(import.try_wait().unwrap().is_none());
    assert_eq!(bureau_reads(&proxy, "u-api").await, "200");

    let out = tokio::task::spawn_blocking(move || import.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{LINES} granted, 0 revoked, 0 unchanged, 0 superseded, 0 refused"
        )),
        "{stdout}"
    );
    let r = admin(&proxy, "GET", &last, Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(&proxy, "GET", "/v1/consents/c-api-1", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(bureau_reads(&proxy, "u-api").await, "200");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_during_a_large_sqlite_import_is_served_and_the_import_completes() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("consent.db").display());
    a_grant_is_served_while_an_import_runs(&store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_during_a_large_postgres_import_is_served_and_the_import_completes() {
    let Some(server) = postgres_url("a_grant_during_a_large_postgres_import_is_served") else {
        return;
    };
    let url = fresh_database(&server).await;
    let dir = tempfile::tempdir().unwrap();
    a_grant_is_served_while_an_import_runs(&url, dir.path()).await;
}

/// The collation of `consents.id` in the database at `url`.
async fn id_collation(url: &str) -> String {
    pg_connect(url)
        .await
        .query_one(
            "SELECT c.collname::text FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation \
             WHERE a.attrelid = 'consents'::regclass AND a.attname = 'id'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A registry as an earlier version left it: ids compared by the database's collation,
/// holding `held` consents written by straight SQL.
async fn registry_of_an_earlier_version(server: &str, held: i64) -> String {
    let url = fresh_database(server).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("one.jsonl");
    std::fs::write(&file, consent_body("c-first", "u-first").to_string()).unwrap();
    cli_ok(&["consent", "import", "--store", &url, file.to_str().unwrap()]).await;
    assert_eq!(
        id_collation(&url).await,
        "C",
        "a new registry compares bytes"
    );
    let db = pg_connect(&url).await;
    db.batch_execute(
        r#"ALTER TABLE consents ALTER COLUMN id TYPE text COLLATE "default", ALTER COLUMN subject TYPE text COLLATE "default";
           ALTER TABLE consent_revocations ALTER COLUMN consent_id TYPE text COLLATE "default";
           ALTER TABLE consent_changes ALTER COLUMN subject TYPE text COLLATE "default", ALTER COLUMN consent_id TYPE text COLLATE "default";"#,
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at) \
         SELECT 'c-old-' || g, 'u-old-' || g, 'credit-bureau-us', '{credit_scoring}', '{user.financial}', '{US}', \
                'explicit', '2026-01-01T00:00:00Z', '2099-01-01T00:00:00Z' \
         FROM generate_series(2, $1::bigint) AS g",
        &[&held],
    )
    .await
    .unwrap();
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_rebuilds_the_id_indexes_of_a_small_registry_only() {
    let Some(server) = postgres_url("an_import_rebuilds_the_id_indexes_of_a_small_registry_only")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("more.jsonl");
    std::fs::write(&file, consent_body("c-more", "u-more").to_string()).unwrap();
    let import = |url: String| {
        let file = file.display().to_string();
        async move { cli(&["consent", "import", "--store", &url, &file]).await }
    };

    // Small: its indexes are rebuilt at once (a pause too short for the fleet to notice).
    let small = registry_of_an_earlier_version(&server, 1_000).await;
    assert_eq!(id_collation(&small).await, "default");
    let out = import(small.clone()).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(id_collation(&small).await, "C");

    // Large: left as it is (no sidecar stops reading), with a warning naming the step.
    let large = registry_of_an_earlier_version(&server, 100_001).await;
    let out = import(large.clone()).await;
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("docs/consent.md"), "{stderr}");
    assert_eq!(id_collation(&large).await, "default");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 granted"), "{stdout}");
}
