//! A large `consent import` and the admin API at once, against a real SQLite file and a real
//! PostgreSQL server (`RESIDENCY_TEST_POSTGRES`; without it that test says it is skipped): a
//! grant made while the import runs is answered within the API's time, takes effect, and
//! the import still ends with every line counted.

use crate::support::registry::{
    TOKEN, admin, bureau_reads, consent_body, fresh_database, home_store, postgres_url,
    registry_policy,
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
