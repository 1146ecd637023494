//! The `sqlite:` registry with the proxy running: the real `consent` command writing from
//! another process, imports that are idempotent, and a database that goes away.

use crate::support::registry::{
    TOKEN, admin, bulk_import_matches_the_file_store, bureau_reads, cli, cli_ok,
    expect_store_unavailable, home_store, registry_policy, until_bureau_reads,
};
use std::time::Duration;

const GRANT: [&str; 14] = [
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
    "--expires-at",
    "2099-01-01T00:00:00Z",
    "--evidence",
    "receipt from the CLI test",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_by_the_consent_command_takes_effect_while_the_proxy_runs() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("data/consent.db").display());
    let home = home_store().await;
    let mut proxy = registry_policy(&store, &home).start().await;
    assert!(
        db.path().join("data/consent.db").exists(),
        "created on first use"
    );
    assert_eq!(bureau_reads(&proxy, "u7").await, "451 consent_missing");

    let mut args = vec![
        "consent",
        "grant",
        "--store",
        &store,
        "--subject",
        "u7",
        "--id",
        "c-cli-1",
    ];
    args.extend(GRANT);
    let out = cli_ok(&args).await;
    let printed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(printed["id"], "c-cli-1");
    let took = until_bureau_reads(&proxy, "u7", "200", Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(1), "noticed after {took:?}");
    assert_eq!(bureau_reads(&proxy, "u7").await, "200");

    // The same command again (without --granted-at) finds the first run's grant.
    let out = cli(&args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("already recorded"), "{stderr}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        printed
    );

    let out = cli(&[
        "consent",
        "revoke",
        "--store",
        &store,
        "c-cli-1",
        "--by",
        "dpo@example",
        "--evidence",
        "ticket 42",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took =
        until_bureau_reads(&proxy, "u7", "451 consent_revoked", Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(1), "noticed after {took:?}");
    assert_eq!(bureau_reads(&proxy, "u7").await, "451 consent_revoked");

    // History, not overwrites: both facts, with who recorded them and why.
    let out = cli_ok(&[
        "consent",
        "list",
        "--store",
        &store,
        "--subject",
        "u7",
        "--history",
    ])
    .await;
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[0]["event"], "grant");
    assert!(
        events[0]["recorded_by"]
            .as_str()
            .unwrap()
            .starts_with("cli:")
    );
    assert_eq!(events[0]["evidence"], "receipt from the CLI test");
    assert_eq!(events[1]["event"], "revoke");
    assert_eq!(events[1]["recorded_by"], "dpo@example");
    assert_eq!(events[1]["evidence"], "ticket 42");
    let out = cli_ok(&["consent", "list", "--store", &store, "--subject", "u7"]).await;
    let now: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(now["revoked_at"].is_string(), "{now}");
    assert_eq!(
        now["evidence"], "receipt from the CLI test",
        "the grant is kept"
    );

    // A revocation typed into the sqlite3 shell the way SQLite writes times
    // (`datetime('now')`: UTC without an offset) revokes too; so does one whose time cannot
    // be read at all: the row says the person withdrew.
    for (n, revoked_at) in [(1, "datetime('now')"), (2, "'last tuesday'")] {
        let (subject, id) = (format!("u9{n}"), format!("c-sql-{n}"));
        let mut args = vec![
            "consent",
            "grant",
            "--store",
            &store,
            "--subject",
            &subject,
            "--id",
            &id,
        ];
        args.extend(GRANT);
        cli_ok(&args).await;
        until_bureau_reads(&proxy, &subject, "200", Duration::from_secs(10)).await;
        let sql = rusqlite::Connection::open(db.path().join("data/consent.db")).unwrap();
        sql.execute(
            &format!(
                "INSERT INTO consent_revocations (consent_id, revoked_at) VALUES (?1, {revoked_at})"
            ),
            [&id],
        )
        .unwrap();
        drop(sql);
        until_bureau_reads(
            &proxy,
            &subject,
            "451 consent_revoked",
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            bureau_reads(&proxy, &subject).await,
            "451 consent_revoked",
            "{revoked_at}"
        );
    }

    // An invalid grant names the flag at fault and records nothing.
    let mut args = vec!["consent", "grant", "--store", &store, "--subject", "u8"];
    args.extend(GRANT);
    let at = args.iter().position(|a| *a == "explicit").unwrap();
    args[at] = "telepathy";
    let out = cli(&args).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--method"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_is_idempotent_and_records_revocations_as_facts() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    let home = home_store().await;
    let mut proxy = registry_policy(&store, &home).start().await;

    let line = |id: &str, subject: &str, revoked: bool| {
        let mut v = crate::support::registry::consent_body(id, subject);
        if revoked {
            v["revoked_at"] = "2026-02-01T00:00:00Z".into();
        }
        v.to_string()
    };
    let file = db.path().join("consents.jsonl");
    let text = [
        "# exported from the file store".to_string(),
        line("c-a", "ua", false),
        line("c-b", "ub", false),
        line("c-b", "ub", true),
        r#"{"id": "c-broken""#.to_string(),
        line("c-c", "uc", false).replace("credit-bureau-us", "*"),
    ]
    .join("\n");
    std::fs::write(&file, text).unwrap();
    let file = file.display().to_string();

    let out = cli(&["consent", "import", "--store", &store, &file]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused line fails the import: {stderr}"
    );
    assert!(
        stdout.contains("2 granted, 1 revoked, 0 unchanged, 1 superseded, 2 refused"),
        "{stdout}"
    );
    assert!(stderr.contains(":5: refused"), "{stderr}");
    assert!(
        stderr.contains(":6: refused") && stderr.contains("recipient"),
        "{stderr}"
    );

    let out = cli(&["consent", "import", "--store", &store, &file]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("0 granted, 0 revoked, 2 unchanged, 1 superseded, 2 refused"),
        "{stdout}"
    );

    until_bureau_reads(&proxy, "ua", "200", Duration::from_secs(10)).await;
    until_bureau_reads(&proxy, "ub", "451 consent_revoked", Duration::from_secs(10)).await;
    assert_eq!(bureau_reads(&proxy, "ua").await, "200");
    assert_eq!(bureau_reads(&proxy, "ub").await, "451 consent_revoked");
    let r = admin(
        &proxy,
        "GET",
        "/v1/consents?subject=ub&history=1",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        r.json()["events"].as_array().unwrap().len(),
        2,
        "{}",
        r.text()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_grants_what_the_file_store_would_from_each_consents_last_line() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    let line = |id: &str, subject: &str| crate::support::registry::consent_body(id, subject);
    let import = |lines: Vec<String>| {
        let file = db
            .path()
            .join(format!("import-{}.jsonl", fastrand::u32(..)));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let store = store.clone();
        async move {
            cli(&[
                "consent",
                "import",
                "--store",
                &store,
                &file.display().to_string(),
            ])
            .await
        }
    };
    import(vec![line("c-held", "u3").to_string()]).await;

    let mut broad = line("c-scope", "u1");
    broad["purposes"] = serde_json::json!(["credit_scoring", "marketing"]);
    let mut narrowed = line("c-scope", "u1");
    narrowed["expires_at"] = "2030-01-01T00:00:00Z".into();
    let mut typo = line("c-typo", "u2");
    typo["revoked_at"] = "2026-11-20".into();
    let mut unreadable = line("c-held", "u3");
    unreadable["method"] = "telepathy".into();
    let out = import(vec![
        broad.to_string(),
        narrowed.to_string(),
        line("c-typo", "u2").to_string(),
        typo.to_string(),
        unreadable.to_string(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("1 granted, 1 revoked, 0 unchanged, 2 superseded, 2 refused"),
        "{stdout}"
    );
    assert!(
        stderr.contains(":4: refused") && stderr.contains(":5: refused"),
        "{stderr}"
    );

    let listed = cli_ok(&["consent", "list", "--store", &store]).await;
    let states: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = states.iter().map(|s| s["id"].as_str().unwrap()).collect();
    // The earlier grant of c-typo, whose last line is unreadable, is not imported.
    assert_eq!(ids, ["c-held", "c-scope"], "{listed}");
    assert!(
        !states[0]["revoked_at"].is_null(),
        "c-held is withdrawn: {listed}"
    );
    assert_eq!(states[1]["purposes"], serde_json::json!(["credit_scoring"]));
    assert_eq!(states[1]["expires_at"], "2030-01-01T00:00:00Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_import_holds_what_the_file_store_would_and_repeats_as_unchanged() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    bulk_import_matches_the_file_store(&store, db.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_gone_away_refuses_consent_after_the_staleness_bound_and_recovers() {
    let db = tempfile::tempdir().unwrap();
    let path = db.path().join("consent.db");
    let store = format!("sqlite:{}", path.display());
    let home = home_store().await;
    // Granted before the proxy starts: the feed noticing a grant made while it runs could
    // forget u1 after its first read, and the read after the file goes would be a miss,
    // refused at once instead of after the bound.
    let mut args = vec![
        "consent",
        "grant",
        "--store",
        &store,
        "--subject",
        "u1",
        "--id",
        "c-1",
    ];
    args.extend(GRANT);
    cli_ok(&args).await;
    let mut proxy = registry_policy(&store, &home)
        .consent("max_staleness = '2s'")
        .start()
        .await;
    assert_eq!(bureau_reads(&proxy, "u1").await, "200");

    let moved = db.path().join("consent.db.moved");
    std::fs::rename(&path, &moved).unwrap();
    let gone = tokio::time::Instant::now();
    // Within the bound the consents loaded stay in force.
    let early = bureau_reads(&proxy, "u1").await;
    if gone.elapsed() < Duration::from_secs(1) {
        assert_eq!(early, "200");
    }
    let why = expect_store_unavailable(&proxy, Duration::from_millis(1500)).await;
    assert!(why.contains("consent.db"), "{why}");

    std::fs::rename(&moved, &path).unwrap();
    until_bureau_reads(&proxy, "u1", "200", Duration::from_secs(10)).await;
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reads_the_subject_the_request_names_from_the_registry() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    let mut args = vec![
        "consent",
        "grant",
        "--store",
        &store,
        "--subject",
        "u7",
        "--id",
        "c-7",
    ];
    args.extend(GRANT);
    cli_ok(&args).await;
    let home = home_store().await;
    let (policy, _) = registry_policy(&store, &home).write_files(db.path());
    let policy = policy.display().to_string();
    let explain = |subject: &str| {
        let path = format!("/payments/{subject}/2026-01.json");
        let policy = policy.clone();
        async move {
            cli_ok(&[
                "explain",
                "--policy",
                &policy,
                "--method",
                "GET",
                "--path",
                &path,
                "--client-ip",
                crate::support::proxy::BUREAU,
                "--purpose",
                "credit_scoring",
            ])
            .await
        }
    };
    let out = explain("u7").await;
    assert!(out.contains("consented") && out.contains("c-7"), "{out}");
    let out = explain("u8").await;
    assert!(out.contains("consent_missing"), "{out}");
}

/// Regression: what `consent list` prints, a revoked consent and `null` fields included, is
/// imported back as it is: nothing granted, revoked or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_consent_list_prints_is_imported_back_unchanged() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    for id in ["c-kept", "c-gone"] {
        let mut args = vec![
            "consent",
            "grant",
            "--store",
            &store,
            "--subject",
            "u-rt",
            "--id",
            id,
        ];
        args.extend(GRANT);
        cli_ok(&args).await;
    }
    cli_ok(&["consent", "revoke", "--store", &store, "c-gone"]).await;

    let list = ["consent", "list", "--store", &store, "--format", "json"];
    let listed = cli_ok(&list).await;
    assert!(listed.contains("\"revoked_at\""), "{listed}");
    let history = cli_ok(&[&list[..], &["--history"]].concat()).await;

    // The current states; the grants of the history; a state with its absent fields as null.
    let grants: Vec<String> = history
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "grant")
        .map(|e| e["record"].to_string())
        .collect();
    assert_eq!(grants.len(), 2, "{history}");
    let kept = listed.lines().find(|l| l.contains("c-kept")).unwrap();
    let mut nulls: serde_json::Value = serde_json::from_str(kept).unwrap();
    nulls["revoked_at"] = serde_json::Value::Null;
    let files = [
        ("listed.jsonl", listed.clone()),
        ("grants.jsonl", grants.join("\n")),
        ("nulls.jsonl", nulls.to_string()),
    ];
    for (name, text) in files {
        let file = db.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = cli_ok(&[
            "consent",
            "import",
            "--store",
            &store,
            &file.display().to_string(),
        ])
        .await;
        let unchanged = if name == "nulls.jsonl" { 1 } else { 2 };
        assert!(
            out.contains(&format!(
                "0 granted, 0 revoked, {unchanged} unchanged, 0 superseded, 0 refused"
            )),
            "{name}: {out}"
        );
    }
    assert_eq!(cli_ok(&list).await, listed);
    assert_eq!(cli_ok(&[&list[..], &["--history"]].concat()).await, history);
}

/// Regression: an import read from a pipe named by path (`<(zcat …)`, `/dev/stdin`) was read
/// once for the ids and found empty on the next passes, importing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_from_a_pipe_imports_every_line() {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", db.path().join("consent.db").display());
    let lines: String = (0..3)
        .map(|i| {
            format!(
                "{}\n",
                crate::support::registry::consent_body(&format!("p-{i}"), &format!("u{i}"))
            )
        })
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
            .args(["consent", "import", "--store", &store, "/dev/stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 granted"), "{stdout}");
}

#[tokio::test]
async fn reading_a_database_that_does_not_exist_says_so_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/consent.db");
    let store = format!("sqlite:{}", path.display());
    for args in [
        vec!["consent", "list", "--store", &store],
        vec!["consent", "revoke", "--store", &store, "c-1"],
    ] {
        let out = cli(&args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "consent database {} does not exist",
                path.display()
            )),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("unreachable"), "{args:?}: {stderr}");
        assert!(
            !dir.path().join("data").exists(),
            "{args:?} created a folder"
        );
    }
}
