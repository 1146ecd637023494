//! Shipping the decision log to object storage and verifying a fleet there (SPEC 5.1),
//! against a real S3-compatible server (moto): three sidecars, one of them killed with
//! SIGKILL and restarted, ship to one bucket and `audit verify s3://…` passes for each; a
//! deleted object is a named missing range and an overwritten one an edit; a store that is
//! down fills the spool, then the log refuses (503), and what the spool holds at a stop
//! ships at the next start, with no record lost; a store abroad is refused at start-up; and DuckDB counts an export
//! as `audit report` does.

use crate::support::binary::Served;
use crate::support::client::{self, Conn, empty, request};
use crate::support::proxy::{APP, BUREAU, HOME_IP, PolicySpec, payments_spec};
use crate::support::s3::{self, S3Server};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::audit::keys::SigningKey;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_residency-proxy");
/// Where the store listens: located at home (CN) by the policy.
const STORE_IP: &str = "127.0.0.40";
const URL: &str = "s3://fleet/decision-logs/";

/// `payments_spec` shipping to `store` as `instance`, sealing every second; `more` adds
/// fields to `[log.ship]`.
fn shipping_spec(
    home: &str,
    store: &S3Server,
    dir: &Path,
    instance: &str,
    more: &str,
) -> PolicySpec {
    let creds = S3Server::credentials_file(dir);
    payments_spec(home)
        .network(&format!("{STORE_IP}/32"), "CN")
        .log(&format!("instance = '{instance}'"))
        .log("rotate_interval = '1s'")
        .log(&format!(
            "ship = {{ url = '{URL}', endpoint = '{}', region = 'cn-north-1', credentials = '{}'{more} }}",
            store.endpoint(),
            creds.display()
        ))
}

/// `residency-proxy ARGS` with the store's credentials in the environment.
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", s3::KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", s3::SECRET)
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn public_key(dir: &Path) -> String {
    let key = SigningKey::load(&dir.join("log-signing.key")).unwrap();
    let path = dir.join("log-signing.pub");
    std::fs::write(&path, key.public_pem()).unwrap();
    path.display().to_string()
}

/// Requests from the app and the bureau to one sidecar until `stop`; every answer's status
/// and decision id goes to `answered`. Ends quietly when the sidecar goes away.
fn load(addr: SocketAddr, stop: Arc<AtomicBool>, answered: Arc<Mutex<Vec<(u16, String)>>>) {
    for (task, from) in [APP, BUREAU].into_iter().enumerate() {
        let (stop, answered) = (stop.clone(), answered.clone());
        tokio::spawn(async move {
            let mut conn = Conn::open(from, addr).await;
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let req = request("GET", &format!("/payments/u{}/{task}-{i}.json", i % 3))
                    .header("x-purpose", "credit_scoring")
                    .body(empty())
                    .unwrap();
                match conn.try_send(req).await {
                    Ok(r) => answered.lock().unwrap().push((r.status, r.decision_id())),
                    Err(_) => return,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
}

/// Waits (at most `limit`) until `cond` holds.
async fn wait_for(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_ship_to_one_bucket_and_the_fleet_verifies_or_names_what_is_wrong() {
    let store = S3Server::start(STORE_IP);
    store.create_bucket("fleet");
    let loc = store.location(URL);
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let names = ["sidecar-a", "sidecar-b", "sidecar-c"];
    let dirs: Vec<tempfile::TempDir> = names.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let mut policies = Vec::new();
    for (name, dir) in names.iter().zip(&dirs) {
        let spec = shipping_spec(&home.url(), &store, dir.path(), name, "");
        policies.push(spec.write_files(dir.path()).0);
        // One fleet, one signing key (a secret every sidecar mounts).
        if dir.path() != dirs[0].path() {
            std::fs::copy(
                dirs[0].path().join("log-signing.key"),
                dir.path().join("log-signing.key"),
            )
            .unwrap();
        }
    }
    let mut served: Vec<Served> = policies
        .iter()
        .zip(&dirs)
        .map(|(p, d)| Served::start(p, d.path()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    for s in &served {
        let addr = s.addr("residency-proxy serving", "listen").await;
        load(addr, stop.clone(), answered.clone());
    }
    wait_for(
        "every sidecar shipped twice",
        Duration::from_secs(20),
        async || {
            let keys = s3::keys(&loc).await;
            names.iter().all(|n| {
                keys.iter()
                    .filter(|k| k.starts_with(&format!("{n}/")))
                    .count()
                    >= 2
            })
        },
    )
    .await;

    // sidecar-b dies mid-run without a word, and comes back on the same volume.
    served[1].signal("KILL");
    assert!(served[1].exit(Duration::from_secs(5)).await.is_some());
    served[1] = Served::start(&policies[1], dirs[1].path());
    let addr = served[1].addr("residency-proxy serving", "listen").await;
    load(addr, stop.clone(), answered.clone());
    let before = answered.lock().unwrap().len();
    wait_for(
        "load on the restarted sidecar",
        Duration::from_secs(10),
        async || answered.lock().unwrap().len() > before + 100,
    )
    .await;
    // The restarted sidecar seals and ships under load too, before everything stops.
    let shipped_b = async || {
        s3::keys(&loc)
            .await
            .iter()
            .filter(|k| k.starts_with("sidecar-b/"))
            .count()
    };
    let b_so_far = shipped_b().await;
    wait_for(
        "a file shipped by the restarted sidecar",
        Duration::from_secs(10),
        async || shipped_b().await > b_so_far,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in &mut served {
        s.signal("TERM");
        let status = s
            .exit(Duration::from_secs(15))
            .await
            .expect("exits on SIGTERM");
        assert!(status.success(), "{status:?}");
    }
    // What could ship did: nothing is left in the spools.
    for dir in &dirs {
        let left: Vec<_> = std::fs::read_dir(dir.path().join("logs"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.iter().all(|n| !n.to_string_lossy().contains("-0000")),
            "sealed files left unshipped: {left:?}"
        );
    }

    let key = public_key(dirs[0].path());
    let endpoint = store.endpoint();
    let verify = |key: &str| {
        cli(&[
            "audit",
            "verify",
            URL,
            "--endpoint",
            &endpoint,
            "--key",
            key,
        ])
    };
    let (code, out, err) = verify(&key);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, name) in lines.iter().zip(names) {
        assert!(
            line.starts_with(&format!("{name}: ok, ")) && line.contains(" checkpoints, last seq "),
            "{out}"
        );
    }
    assert!(out.contains("signed with the given key"), "{out}");

    // Every answer the fleet gave has its decision record in the bucket, once.
    let (code, out, err) = cli(&[
        "audit",
        "query",
        URL,
        "--endpoint",
        &endpoint,
        "--kind",
        "decision",
    ]);
    assert_eq!(code, 0, "{err}");
    let ids: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a decision id appears twice");
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 300, "{}", answered.len());
    for (status, id) in &answered {
        assert!(
            unique.contains(id),
            "answer {status} {id} has no record in the bucket"
        );
    }

    // One instance's folder is a location of its own; a head names one chain's record.
    let one = format!("{URL}sidecar-c/");
    let (code, out, _) = cli(&[
        "audit",
        "verify",
        &one,
        "--endpoint",
        &endpoint,
        "--key",
        &key,
    ]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("sidecar-c: ok, ") && out.lines().count() == 1,
        "{out}"
    );
    let (code, _, err) = cli(&[
        "audit",
        "verify",
        URL,
        "--endpoint",
        &endpoint,
        "--head",
        &format!("1:{}", "0".repeat(64)),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("holds 3 instances: give the instance's own folder"),
        "{err}"
    );

    // An object of sidecar-a in the middle, edited and put back under its name.
    let keys: Vec<String> = s3::keys(&loc)
        .await
        .into_iter()
        .filter(|k| k.starts_with("sidecar-a/"))
        .collect();
    assert!(keys.len() >= 3, "{keys:?}");
    let middle = &keys[keys.len() / 2];
    let original = s3::read(&loc, middle).await;
    let text = String::from_utf8(original.clone()).unwrap();
    let edited = text.replacen("\"status\":200", "\"status\":204", 1);
    assert_ne!(edited, text, "the object holds a forwarded request");
    s3::overwrite(&loc, middle, edited.as_bytes()).await;
    let (code, out, _) = verify(&key);
    assert_eq!(code, 1, "{out}");
    let line_a = out.lines().find(|l| l.starts_with("sidecar-a: ")).unwrap();
    assert!(
        line_a.contains(middle.as_str()) && line_a.contains("hash mismatch"),
        "{out}"
    );
    assert!(
        out.contains("sidecar-b: ok") && out.contains("sidecar-c: ok"),
        "{out}"
    );
    s3::overwrite(&loc, middle, &original).await;

    // The same object deleted: its range is missing.
    s3::delete(&loc, middle).await;
    let (code, out, err) = verify(&key);
    assert_eq!(code, 1, "{out}");
    let range = middle
        .trim_start_matches("sidecar-a/")
        .split('-')
        .take(2)
        .map(|n| n.parse::<u64>().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("-");
    assert!(
        out.contains(&format!("sidecar-a: records {range} missing")),
        "{out}"
    );
    assert!(err.contains("1 of 3 instances failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_fills_the_spool_the_log_refuses_and_the_spool_ships_at_the_next_start()
 {
    let mut store = S3Server::start(STORE_IP);
    // Down from the start: not a reason to refuse to start.
    store.kill();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = shipping_spec(
        &home.url(),
        &store,
        dir.path(),
        "spooler",
        ", spool_max_bytes = '4KiB'",
    )
    .log("rotate_bytes = 2048")
    // A stop gives shipping this long; the store is down then, so the whole of it.
    .proxy("drain_timeout = '2s'");
    let mut proxy = spec.start_in(dir).await;
    let admin = proxy.running().admin_addr;

    let mut answered = Vec::new();
    let mut refused = None;
    for i in 0..400 {
        let r = client::get(APP, proxy.addr, &format!("/payments/u1/{i}.json"), &[]).await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        answered.push(r.decision_id());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let refused = refused.expect("the full spool refuses requests");
    assert_eq!(
        refused.json()["error"],
        "log_unavailable",
        "{}",
        refused.text()
    );
    let ready = client::send(APP, admin, request("GET", "/readyz").body(empty()).unwrap()).await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("shipping spool is full"),
        "{}",
        ready.text()
    );
    let metric = async |name: &str| -> f64 {
        let text = client::send(
            APP,
            admin,
            request("GET", "/metrics").body(empty()).unwrap(),
        )
        .await
        .text();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
            .parse()
            .unwrap()
    };
    assert!(metric("residency_log_spool_bytes").await >= 4096.0);
    wait_for(
        "a failed upload to be counted",
        Duration::from_secs(20),
        async || metric("residency_log_ship_failures_total").await >= 1.0,
    )
    .await;
    assert_eq!(metric("residency_log_ship_files_total").await, 0.0);

    // Stopped while the store is down: the sealed files stay in the spool.
    let policy = proxy.policy_path.clone();
    let logs = proxy.log.path.parent().unwrap().to_path_buf();
    proxy.shutdown().await;
    let spooled = || {
        std::fs::read_dir(&logs)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("-0000"))
            .count()
    };
    assert!(spooled() >= 2, "the spool keeps what could not ship");

    // The store is back and the sidecar starts again: the spool ships first, in order, and
    // requests go through again.
    store.restart();
    store.create_bucket("fleet");
    let start = async || {
        residency_proxy::admin::start(residency_proxy::proxy::ServeConfig {
            policy_path: policy.clone(),
            overrides: Default::default(),
        })
        .await
        .unwrap()
    };
    let running = start().await;
    let spool = running.shared.spool.clone().unwrap();
    wait_for("the spool to drain", Duration::from_secs(30), async || {
        spool.stats().spool_files == 0
    })
    .await;
    assert_eq!(spooled(), 0);
    let again = client::get(APP, running.addr, "/payments/u1/again.json", &[]).await;
    assert_eq!(again.status, 200, "{}", again.text());
    answered.push(again.decision_id());
    running.shutdown().await;
    assert_eq!(spooled(), 0, "the stop shipped the last file");
    assert!(logs.join("decisions.shipped").exists());

    // A third start on a folder whose every file has shipped continues the chain from the
    // head the shipper saved, rather than starting a new one at seq 1.
    let running = start().await;
    let last = client::get(APP, running.addr, "/payments/u1/last.json", &[]).await;
    assert_eq!(last.status, 200, "{}", last.text());
    answered.push(last.decision_id());
    running.shutdown().await;

    let endpoint = store.endpoint();
    let (code, out, err) = cli(&["audit", "verify", URL, "--endpoint", &endpoint]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("spooler: ok, "), "{out}");
    let (_, out, _) = cli(&["audit", "query", URL, "--endpoint", &endpoint]);
    for id in &answered {
        assert!(
            out.contains(id.as_str()),
            "answered {id} is not in the bucket"
        );
    }
}

#[tokio::test]
async fn a_store_abroad_is_refused_at_start_up_and_by_check() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    // 127.0.0.3 is located in the US by the shared cast; nothing needs to listen there.
    let spec = payments_spec(&home.url()).log(
        "ship = { url = 's3://fleet/logs/', endpoint = 'http://127.0.0.3:9000', region = 'us-east-1' }",
    );
    let (policy, _) = spec.write_files(dir.path());
    let err = residency_proxy::admin::start(residency_proxy::proxy::ServeConfig {
        policy_path: policy.clone(),
        overrides: Default::default(),
    })
    .await
    .err()
    .expect("a store abroad refuses start-up")
    .to_string();
    assert!(
        err.contains("127.0.0.3 located in US, outside the home jurisdiction CN"),
        "{err}"
    );
    let (code, _, stderr) = cli(&["check", policy.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("log.ship: the store 127.0.0.3 resolves to 127.0.0.3 located in US"),
        "{stderr}"
    );
}

/// A host that does not resolve cannot be located, so nothing ships to it; but DNS that is
/// not there yet is no reason for a sidecar not to serve: the spool holds the sealed files.
#[tokio::test]
async fn a_store_whose_host_does_not_resolve_yet_keeps_the_files_in_the_spool() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = payments_spec(&home.url())
        .log("rotate_interval = '1s'")
        .log("ship = { url = 's3://fleet/logs/', endpoint = 'http://store.invalid:9000' }")
        .proxy("drain_timeout = '1s'")
        .start()
        .await;
    let r = client::get(APP, proxy.addr, "/payments/u1/a.json", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let spool = proxy.running().shared.spool.clone().unwrap();
    wait_for("a sealed file", Duration::from_secs(10), async || {
        spool.stats().spool_files >= 1
    })
    .await;
    proxy.shutdown().await;
    let stats = spool.stats();
    assert_eq!((stats.shipped_files, stats.failures), (0, 0), "{stats:?}");
    assert!(stats.spool_files >= 2, "{stats:?}");
}

#[tokio::test]
async fn duckdb_counts_an_exported_log_by_reason_as_audit_report_does() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = payments_spec(&home.url()).start().await;
    let asks: [(&str, &str, Option<&str>); 5] = [
        (APP, "/payments/u1/a.json", None),
        (APP, "/payments/u2/b.json", None),
        (BUREAU, "/payments/u1/c.json", Some("credit_scoring")),
        (BUREAU, "/payments/u2/d.json", Some("credit_scoring")),
        (BUREAU, "/payments/u1/e.json", None),
    ];
    for (from, path, purpose) in asks {
        let headers: Vec<(&str, &str)> = purpose.map(|p| ("x-purpose", p)).into_iter().collect();
        client::get(from, proxy.addr, path, &headers).await;
    }
    proxy.shutdown().await;
    let log = proxy.log.path.display().to_string();
    let out = proxy.dir.path().join("log.parquet");
    let (code, _, err) = cli(&["audit", "export", &log, out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, report, err) = cli(&["audit", "report", &log, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&report).unwrap();

    let script = format!(
        "import duckdb, json\n\
         rows = duckdb.sql(\"SELECT reason, count(*) FROM read_parquet('{}') WHERE kind = 'decision' GROUP BY reason\").fetchall()\n\
         print(json.dumps(dict(rows)))",
        out.display()
    );
    let py = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "duckdb (pip install duckdb; .ci/run does): {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let duck: Value = serde_json::from_slice(&py.stdout).unwrap();
    let by_reason = counts(&report["by_reason"]);
    assert!(by_reason.len() >= 3, "{report}");
    assert_eq!(counts(&duck), by_reason);
}

/// `{reason: count}` from a report table or DuckDB's answer.
fn counts(v: &Value) -> std::collections::BTreeMap<String, u64> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a table of counts: {v}"))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}
