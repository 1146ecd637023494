//! Workers (`serve --workers N`): each worker takes connections on the shared address and
//! writes a decision-log chain of its own (`decisions.jsonl` for worker 0, `decisions.w1.jsonl`
//! for worker 1), as the real binary runs them: connections land on both, every request has
//! one decision and one outcome record in the chain of the worker that served its
//! connection, each chain verifies and ends with a final checkpoint on SIGTERM; a reload
//! reaches every worker; readiness fails while one chain cannot be written; shipping sends
//! each chain to its own instance folder, and a fleet of two sidecars of two workers verifies
//! as four named chains; a consent lookup started by one worker and joined by another is not
//! lost when the first one's runtime ends.

use crate::support::binary::Served;
use crate::support::client::{Conn, empty, request};
use crate::support::proxy::{APP, BUREAU, HOME_IP, payments_spec};
use crate::support::registry::grant_with_cli;
use crate::support::s3::{self, S3Server};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::audit::keys::SigningKey;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_residency-proxy");

/// Client connections opened per round: with `SO_REUSEPORT` the kernel picks a worker by a
/// hash of each connection's addresses and ports, so many connections land on both.
const CONNECTIONS: usize = 24;

/// `residency-proxy ARGS`: exit code, stdout, stderr.
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

/// The complete records of a chain file.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The two chains of a two-worker sidecar whose log is `dir/decisions.jsonl`.
fn chains(dir: &Path) -> [PathBuf; 2] {
    [dir.join("decisions.jsonl"), dir.join("decisions.w1.jsonl")]
}

/// Opens `CONNECTIONS` connections at once, alternately from the app and the bureau, and
/// sends `per_conn` reads of u1 on each; returns each connection's answers (status, decision
/// id), in order.
async fn load(addr: SocketAddr, per_conn: usize) -> Vec<Vec<(u16, String)>> {
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            tokio::spawn(async move {
                let from = if c % 2 == 0 { APP } else { BUREAU };
                let mut conn = Conn::open(from, addr).await;
                let mut answers = Vec::new();
                for i in 0..per_conn {
                    let req = request("GET", &format!("/payments/u1/{c}-{i}.json"))
                        .header("x-purpose", "credit_scoring")
                        .body(empty())
                        .unwrap();
                    let r = conn.send(req).await;
                    answers.push((r.status, r.decision_id()));
                }
                answers
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    all
}

/// Which chain (index into `chains`) holds the decision record of each id, checking that it
/// is held once across all of them.
fn chain_of(chains: &[Vec<Value>]) -> HashMap<String, usize> {
    let mut found: HashMap<String, usize> = HashMap::new();
    for (k, records) in chains.iter().enumerate() {
        for r in records.iter().filter(|r| r["kind"] == "decision") {
            let id = r["id"].as_str().unwrap().to_string();
            assert!(
                found.insert(id.clone(), k).is_none(),
                "decision {id} is recorded twice"
            );
        }
    }
    found
}

/// Two workers, as a user starts them: several client connections land on each; each
/// connection's requests are decided and logged by the worker that accepted it (decision and
/// outcome in its chain, once); SIGTERM ends every chain with a final checkpoint and each
/// verifies with the signing key, under its own instance name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_take_connections_and_sigterm_closes_every_chain() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (policy, _) = payments_spec(&home.url())
        .log("instance = 'edge-1'")
        .write_files(dir.path());
    let mut served = Served::start_workers(&policy, dir.path(), 2);
    let serving = served.event("residency-proxy serving").await;
    assert_eq!(serving["fields"]["workers"], 2, "{serving}");
    let addr = served.addr("residency-proxy serving", "listen").await;

    let answers = load(addr, 5).await;
    let files = chains(dir.path());
    served.signal("TERM");
    let status = served
        .exit(Duration::from_secs(15))
        .await
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}: {:?}", served.events());

    let all: Vec<Vec<Value>> = files.iter().map(|f| records(f)).collect();
    let decided = chain_of(&all);
    let mut outcomes: HashMap<String, Vec<usize>> = HashMap::new();
    for (k, records) in all.iter().enumerate() {
        for r in records.iter().filter(|r| r["kind"] == "outcome") {
            outcomes
                .entry(r["id"].as_str().unwrap().to_string())
                .or_default()
                .push(k);
        }
    }
    let mut per_chain = [0usize; 2];
    for (c, conn) in answers.iter().enumerate() {
        let chain = decided[&conn[0].1];
        per_chain[chain] += 1;
        for (status, id) in conn {
            assert_eq!(*status, 200, "{id}");
            assert_eq!(
                decided.get(id),
                Some(&chain),
                "connection {c}: decision {id} is not in the chain of the worker that took the connection"
            );
            assert_eq!(
                outcomes.get(id),
                Some(&vec![chain]),
                "connection {c}: decision {id} has not exactly one outcome, in its own chain"
            );
        }
    }
    assert!(
        per_chain.iter().all(|&n| n > 0),
        "{CONNECTIONS} connections all landed on one worker: {per_chain:?}"
    );
    let requests = CONNECTIONS * 5;
    assert_eq!(decided.len(), requests);
    assert_eq!(outcomes.len(), requests);

    let key = public_key(dir.path());
    for (file, (records, instance)) in files.iter().zip(all.iter().zip(["edge-1", "edge-1-w1"])) {
        let last = records.last().unwrap();
        assert_eq!(last["kind"], "checkpoint", "{}: {last}", file.display());
        assert_eq!(last["final"], true, "{}: {last}", file.display());
        assert!(
            records.iter().all(|r| r["instance"] == instance),
            "{} holds records of another instance than {instance}",
            file.display()
        );
        let (code, out, err) = cli(&["audit", "verify", "--key", &key, file.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {out}{err}", file.display());
    }
}

/// SIGHUP reloads the policy on every worker: after it, requests on fresh connections (on
/// both workers) are decided under the new policy, and both chains say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_every_worker() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = payments_spec(&home.url());
    let (policy, text) = spec.write_files(dir.path());
    let mut served = Served::start_workers(&policy, dir.path(), 2);
    let addr = served.addr("residency-proxy serving", "listen").await;
    let old = served.event("residency-proxy serving").await["fields"]["policy.hash"].clone();
    let before = load(addr, 2).await;
    assert!(before.iter().flatten().all(|(s, _)| *s == 200));

    // Third parties are refused outright from now on.
    let stricter = text.replace("third_party = 'consent'", "third_party = 'deny'");
    assert_ne!(stricter, text);
    std::fs::write(&policy, stricter).unwrap();
    served.signal("HUP");
    let reloaded = served.event("policy reloaded").await;
    let new = reloaded["fields"]["policy.hash"].clone();
    assert_ne!(new, old);

    let after = load(addr, 3).await;
    served.signal("TERM");
    assert!(
        served
            .exit(Duration::from_secs(15))
            .await
            .unwrap()
            .success()
    );

    let all: Vec<Vec<Value>> = chains(dir.path()).iter().map(|f| records(f)).collect();
    let decided = chain_of(&all);
    let by_id: HashMap<&str, &Value> = all
        .iter()
        .flatten()
        .filter(|r| r["kind"] == "decision")
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    let mut per_chain = [0usize; 2];
    for (c, conn) in after.iter().enumerate() {
        for (status, id) in conn {
            let record = by_id[id.as_str()];
            assert_eq!(record["policy"], new, "{record}");
            per_chain[decided[id]] += 1;
            // The app is the first party: still served. The bureau is a third party.
            let expect_refused = c % 2 == 1;
            assert_eq!(*status != 200, expect_refused, "connection {c}: {record}");
        }
    }
    assert!(
        per_chain.iter().all(|&n| n > 0),
        "no request after the reload reached one of the workers: {per_chain:?}"
    );
    for id in before.iter().flatten().map(|(_, id)| id) {
        assert_eq!(by_id[id.as_str()]["policy"], old);
    }
}

/// `/readyz` reports the log writable only while every worker's chain is: worker 1's file on
/// a full disk fails readiness, naming the worker, and the requests it takes are refused 503
/// while worker 0's are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_the_worker_whose_chain_cannot_be_written() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    // /dev/full fails every write with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", dir.path().join("decisions.w1.jsonl")).unwrap();
    let mut proxy = payments_spec(&home.url())
        .proxy("workers = 2")
        .start_in(dir)
        .await;
    let answers = load(proxy.addr, 2).await;
    let refused: Vec<_> = answers
        .iter()
        .flatten()
        .filter(|(s, _)| *s == 503)
        .collect();
    let served: Vec<_> = answers
        .iter()
        .flatten()
        .filter(|(s, _)| *s == 200)
        .collect();
    assert!(
        !refused.is_empty() && !served.is_empty(),
        "{CONNECTIONS} connections did not reach both workers: {answers:?}"
    );
    let ready =
        crate::support::client::get("127.0.0.1", proxy.running().admin_addr, "/readyz", &[]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(
        ready.json()["failing"],
        serde_json::json!(["decision log (worker 1): the last write failed"])
    );
    // Worker 0's chain has exactly the requests it served.
    let decided: Vec<String> = proxy
        .log
        .of_kind("decision")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(decided.len(), served.len());
    assert!(served.iter().all(|(_, id)| decided.contains(id)));
    proxy.shutdown().await;
}

/// Workers share their port through `SO_REUSEPORT`, which another process of the same user
/// could join: a second proxy started on the address of a running one must fail to start, as
/// it does with one worker, rather than take half of its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_a_running_ones_address_fails_to_start() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut first = payments_spec(&home.url())
        .proxy("workers = 2")
        .start()
        .await;
    let err = residency_proxy::admin::start(residency_proxy::proxy::ServeConfig {
        policy_path: first.policy_path.clone(),
        overrides: residency_proxy::proxy::snapshot::Overrides {
            listen: Some(first.addr),
            log: Some(residency_proxy::policy::model::LogTarget::File(
                first.dir.path().join("second/decisions.jsonl"),
            )),
            ..Default::default()
        },
    })
    .await
    .err()
    .expect("a second proxy on the same address refuses to start")
    .to_string();
    assert!(
        err.starts_with(&format!("cannot listen on {}: ", first.addr)),
        "{err}"
    );
    // The first one still takes every connection.
    let answers = load(first.addr, 1).await;
    assert!(answers.iter().flatten().all(|(s, _)| *s == 200));
    first.shutdown().await;
}

/// `--workers` takes 1 to 1024, and says so.
#[test]
fn serve_refuses_zero_workers() {
    let (code, _, err) = cli(&["serve", "--workers", "0", "--policy", "unused.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value '0' for '--workers <N>'"),
        "{err}"
    );
    assert!(err.contains("1..=1024"), "{err}");
}

/// Shipping with two workers: each chain ships to its own instance folder (`a`, `a-w1`) in
/// one location; two such sidecars make four chains, which `audit verify s3://…` checks and
/// names one by one.
/// A sidecar that ran with two workers and restarts with one still ships what worker 1's
/// chain sealed: nobody writes that chain now, but its files must not be stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_fewer_workers_still_ships_the_chains_they_sealed() {
    const STORE_IP: &str = "127.0.0.42";
    const URL: &str = "s3://fleet/fewer/";
    let store = S3Server::start(STORE_IP);
    store.create_bucket("fleet");
    let loc = store.location(URL);
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = payments_spec(&home.url())
        .network(&format!("{STORE_IP}/32"), "CN")
        .log("instance = 'side'");
    let (policy, _) = spec.write_files(dir.path());
    let key = std::fs::read(dir.path().join("log-signing.key")).unwrap();

    // Two workers, no shipping: both chains written, then sealed by a rotation.
    let mut two = Served::start_workers(&policy, dir.path(), 2);
    let addr = two.addr("residency-proxy serving", "listen").await;
    load(addr, 2).await;
    let [_, w1] = chains(dir.path());
    assert!(!records(&w1).is_empty(), "worker 1 took no connection");
    two.signal("USR1");
    let sealed = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("decisions.w1-"))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sealed(dir.path()).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker 1's chain was not rotated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    two.signal("TERM");
    assert!(
        two.exit(Duration::from_secs(15))
            .await
            .expect("exits")
            .success()
    );

    // One worker, shipping on: worker 1's sealed files ship under its own name.
    let creds = S3Server::credentials_file(dir.path());
    let spec = spec.log(&format!(
        "ship = {{ url = '{URL}', endpoint = '{}', region = 'cn-north-1', credentials = '{}' }}",
        store.endpoint(),
        creds.display()
    ));
    let (policy, _) = spec.write_files(dir.path());
    std::fs::write(dir.path().join("log-signing.key"), key).unwrap();
    let mut one = Served::start_workers(&policy, dir.path(), 1);
    one.addr("residency-proxy serving", "listen").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let keys = s3::keys(&loc).await;
        if keys.iter().any(|k| k.starts_with("side-w1/")) && sealed(dir.path()).is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker 1's sealed files did not ship: {keys:?}, left {:?}",
            sealed(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    one.signal("TERM");
    assert!(
        one.exit(Duration::from_secs(15))
            .await
            .expect("exits")
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_of_two_workers_ship_four_chains_that_verify_by_name() {
    const STORE_IP: &str = "127.0.0.41";
    const URL: &str = "s3://fleet/workers/";
    let store = S3Server::start(STORE_IP);
    store.create_bucket("fleet");
    let loc = store.location(URL);
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let names = ["side-a", "side-b"];
    let dirs: Vec<tempfile::TempDir> = names.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let mut served = Vec::new();
    for (name, dir) in names.iter().zip(&dirs) {
        let creds = S3Server::credentials_file(dir.path());
        let spec = payments_spec(&home.url())
            .network(&format!("{STORE_IP}/32"), "CN")
            .log(&format!("instance = '{name}'"))
            .log("rotate_interval = '1s'")
            .log(&format!(
                "ship = {{ url = '{URL}', endpoint = '{}', region = 'cn-north-1', credentials = '{}' }}",
                store.endpoint(),
                creds.display()
            ));
        let (policy, _) = spec.write_files(dir.path());
        // One fleet, one signing key.
        if dir.path() != dirs[0].path() {
            std::fs::copy(
                dirs[0].path().join("log-signing.key"),
                dir.path().join("log-signing.key"),
            )
            .unwrap();
        }
        served.push(Served::start_workers(&policy, dir.path(), 2));
    }
    let mut answered = Vec::new();
    for s in &served {
        let addr = s.addr("residency-proxy serving", "listen").await;
        answered.extend(load(addr, 3).await.into_iter().flatten());
    }
    let chains = ["side-a", "side-a-w1", "side-b", "side-b-w1"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let keys = s3::keys(&loc).await;
        if chains
            .iter()
            .all(|c| keys.iter().any(|k| k.starts_with(&format!("{c}/"))))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every chain shipped: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in &mut served {
        s.signal("TERM");
        let status = s.exit(Duration::from_secs(15)).await.expect("exits");
        assert!(status.success(), "{status:?}");
    }
    // Every chain's last file (its final checkpoint) shipped on the way out.
    for dir in &dirs {
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("-0000"))
            .collect();
        assert!(left.is_empty(), "sealed files left unshipped: {left:?}");
    }

    let key = public_key(dirs[0].path());
    let endpoint = store.endpoint();
    let (code, out, err) = cli(&[
        "audit",
        "verify",
        URL,
        "--endpoint",
        &endpoint,
        "--key",
        &key,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(": ok, ")).collect();
    assert_eq!(lines.len(), 4, "{out}");
    for (line, chain) in lines.iter().zip(chains) {
        assert!(line.starts_with(&format!("{chain}: ok, ")), "{out}");
    }
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
    for (status, id) in &answered {
        assert!(
            out.contains(id.as_str()),
            "answer {status} {id} is not in the bucket"
        );
    }
}

/// A cache miss's query runs on the control runtime, not on the worker whose request
/// missed: a worker that joined a query another worker started gets its answer even though
/// the starting worker's runtime has ended (with the query on that runtime, it never came:
/// the joiner waited out `lookup_timeout` and the request was refused).
#[test]
fn a_cache_miss_query_outlives_the_worker_that_started_it() {
    use residency_proxy::consent::ConsentIndex;
    use residency_proxy::consent::cache::{Loader, Reader};
    use residency_proxy::consent::sqlite::SqliteReader;
    use std::sync::Arc;
    use std::sync::mpsc::channel;

    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consents.db");
    let store = format!("sqlite:{}", db.display());
    control.block_on(grant_with_cli(&store, "c-1", "u1"));

    // Another connection holds the database locked: the query waits for it, so that the
    // second worker surely joins the query the first one started.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.pragma_update(None, "journal_mode", "DELETE").unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let index = Arc::new(ConsentIndex::cache(1 << 20));
    let loader = {
        let _control = control.enter();
        Arc::new(Loader::new(
            index.clone(),
            Reader::Sqlite(SqliteReader::new(db.clone(), 2)),
            Duration::from_secs(3),
        ))
    };
    let worker = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    // Polls `fill` once (it starts or joins the query), then says so.
    async fn begin(fill: &mut std::pin::Pin<&mut impl Future<Output = ()>>) {
        tokio::select! {
            biased;
            () = fill.as_mut() => panic!("the lookup answered while the database was locked"),
            () = tokio::task::yield_now() => {}
        }
    }

    // Worker A misses u1 and starts the query, then its runtime ends (its request gave up).
    let (started_tx, started) = channel();
    let a = {
        let loader = loader.clone();
        std::thread::spawn(move || {
            let rt = worker();
            rt.block_on(async {
                let fill = async {
                    let _ = loader.fill("u1").await;
                };
                let mut fill = std::pin::pin!(fill);
                begin(&mut fill).await;
            });
            rt.shutdown_background();
            started_tx.send(()).unwrap();
        })
    };
    started.recv().unwrap();
    assert!(!index.is_cached("u1"));

    // Worker B misses u1 too, joins the query under way, and waits for it.
    let (joined_tx, joined) = channel();
    let b = {
        let loader = loader.clone();
        std::thread::spawn(move || {
            worker().block_on(async {
                let (answer_tx, answer) = tokio::sync::oneshot::channel();
                let fill = async {
                    let _ = answer_tx.send(loader.fill("u1").await);
                };
                let mut fill = std::pin::pin!(fill);
                begin(&mut fill).await;
                joined_tx.send(()).unwrap();
                fill.await;
                answer.await.unwrap()
            })
        })
    };
    joined.recv().unwrap();
    lock.execute_batch("COMMIT").unwrap();
    let answer = b.join().unwrap();
    a.join().unwrap();
    assert!(answer.is_ok(), "{answer:?}");
    assert!(index.is_cached("u1"));
}
