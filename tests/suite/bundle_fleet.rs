//! A fleet of real sidecars (`serve` processes) taking their rules from one signed bundle in
//! one bucket (moto): a new revision is live on all three within `poll_interval` + 2 s while
//! clients keep sending requests, none refused or lost at the swap, and the decision records
//! switch revision; a bundle signed by another key, an older revision, an unsigned one, a
//! damaged one and one that does not compile are each refused by all three, with the reason
//! in `/v1/policy`, `/readyz`, the metrics and each proxy's own log, while the live revision
//! keeps deciding; a restart with the store down comes up on the bundle kept on the volume,
//! and a sidecar that kept none stays unready, saying why, until stopped; a store that the
//! bundle's own policy places abroad is never taken from, and refuses start-up when a bundle
//! was kept.

use crate::support::binary::Served;
use crate::support::client::{self, Conn, empty, request};
use crate::support::prom;
use crate::support::proxy::{APP, HOME_IP};
use crate::support::s3::S3Server;
use crate::support::upstream::{Reply as Serve, Upstream};
use object_store::ObjectStoreExt;
use residency_proxy::audit::keys::SigningKey;
use residency_proxy::bundle::build::{BuildOptions, build};
use residency_proxy::bundle::format::{self, FileEntry, Manifest};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Where the store listens: located at home (CN) by the bundle's policy.
const STORE_IP: &str = "127.0.0.46";
/// A store the bundle's policy locates abroad (US).
const ABROAD_STORE_IP: &str = "127.0.0.47";
const URL: &str = "s3://policies/fleet.bundle";
const POLL: Duration = Duration::from_secs(1);
const SIDECARS: usize = 3;

/// The rules every sidecar shares, revision by revision (the name says which).
fn rules(name: &str, home_url: &str) -> String {
    format!(
        r#"[policy]
name = '{name}'
home = 'CN'
unmatched = 'deny'
unknown_location = 'deny'

[[networks]]
cidr = '{APP}/32'
country = 'CN'

[[networks]]
cidr = '{STORE_IP}/32'
country = 'CN'

[[networks]]
cidr = '{ABROAD_STORE_IP}/32'
country = 'US'

[[networks]]
cidr = '{HOME_IP}/32'
country = 'CN'

[[upstreams]]
name = 'cn-store'
url = '{home_url}'

[[recipients]]
id = 'payments-app'
relation = 'first_party'
country = 'CN'
networks = ['{APP}/32']

[[datasets]]
name = 'payments'
match = {{ path_prefix = '/payments/' }}
upstream = 'cn-store'
category = 'user.financial'
subject = {{ path_segment = 2 }}
cross_border = 'deny'
third_party = 'deny'
"#
    )
}

/// The publisher's side: the policy-signing key, and the bundle's policy on disk.
struct Publisher {
    dir: tempfile::TempDir,
    key: SigningKey,
    home_url: String,
}

impl Publisher {
    fn new(home_url: String) -> Publisher {
        let dir = tempfile::tempdir().unwrap();
        let key =
            SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("k")).unwrap();
        std::fs::write(dir.path().join("policy-signing.pub"), key.public_pem()).unwrap();
        Publisher { dir, key, home_url }
    }

    fn public_key(&self) -> PathBuf {
        self.dir.path().join("policy-signing.pub")
    }

    /// `bundle build` of revision `revision`, signed by `key`.
    fn bundle_by(&self, key: &SigningKey, revision: u64) -> Vec<u8> {
        let policy = self.dir.path().join("rules/fleet.toml");
        std::fs::create_dir_all(policy.parent().unwrap()).unwrap();
        let text = rules(&format!("fleet-r{revision}"), &self.home_url);
        std::fs::write(&policy, text).unwrap();
        build(&BuildOptions {
            policy: &policy,
            geo: None,
            signing_key: key,
            revision,
            built_at: jiff::Timestamp::now(),
            builder: "ci@fleet".into(),
            allow_rollback: false,
        })
        .unwrap()
        .bytes
    }

    fn bundle(&self, revision: u64) -> Vec<u8> {
        self.bundle_by(&self.key, revision)
    }

    /// A bundle signed by the right key whose policy does not compile (made by hand: `bundle
    /// build` refuses it).
    fn broken(&self, revision: u64) -> Vec<u8> {
        let text = rules("broken", &self.home_url).replace("home = 'CN'", "home = 'Mars'");
        let manifest = Manifest {
            format: format::FORMAT,
            revision,
            built_at: jiff::Timestamp::now(),
            builder: "hand@made".into(),
            allow_rollback: false,
            signer: self.key.fingerprint(),
            policy: "fleet.toml".into(),
            geo: None,
            files: vec![FileEntry {
                path: "fleet.toml".into(),
                size: text.len() as u64,
                sha256: format::sha256_hex(text.as_bytes()),
            }],
        };
        let bytes = manifest.to_bytes();
        format::encode(&bytes, Some(&self.key.sign(&bytes)), &[text.as_bytes()])
    }
}

/// Uploads `bytes` as the bundle, replacing what is there.
async fn publish(store: &S3Server, bytes: Vec<u8>) {
    let loc = store.location(URL);
    loc.store.put(&loc.prefix, bytes.into()).await.unwrap();
}

/// A sidecar's folder with its own file: its listeners, its log, and the bundle source.
fn sidecar_dir(n: usize, store: &S3Server, key: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let creds = S3Server::credentials_file(dir.path());
    let text = format!(
        r#"[proxy]
listen = '127.0.0.1:0'

[admin]
listen = '127.0.0.1:0'

[log]
path = 'logs/decisions.jsonl'
instance = 'side-{n}'
pseudonymize = false

[policy.source]
url = '{URL}'
endpoint = '{}'
region = 'cn-north-1'
credentials = '{}'
key = '{}'
poll_interval = '1s'
"#,
        store.endpoint(),
        creds.display(),
        key.display()
    );
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A running sidecar and where it listens.
struct Sidecar {
    served: Served,
    data: SocketAddr,
    admin: SocketAddr,
    /// Its working folder (its log is `logs/decisions.jsonl` there).
    dir: PathBuf,
}

impl Sidecar {
    async fn start(policy: &Path, dir: &Path) -> Sidecar {
        let served = Served::start(policy, dir);
        let data = served.addr("residency-proxy serving", "listen").await;
        let admin = served.addr("admin listener serving", "admin.listen").await;
        Sidecar {
            served,
            data,
            admin,
            dir: dir.to_path_buf(),
        }
    }

    async fn admin_get(&self, path: &str) -> client::Reply {
        client::get("127.0.0.1", self.admin, path, &[]).await
    }

    async fn policy(&self) -> Value {
        let r = self.admin_get("/v1/policy").await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    async fn metrics(&self) -> prom::Exposition {
        prom::parse(&self.admin_get("/metrics").await.text())
    }

    /// Waits (at most 10 s) until `/v1/policy` satisfies `cond`.
    async fn policy_until(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = self.policy().await;
            if cond(&p) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {p}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One request from the app, on `conn`: its status and decision id.
async fn one(conn: &mut Conn, n: usize) -> Result<(u16, String), String> {
    let req = request("GET", &format!("/payments/u1/{n}.json"))
        .body(empty())
        .unwrap();
    let r = conn.try_send(req).await.map_err(|e| e.to_string())?;
    Ok((r.status, r.decision_id()))
}

/// Clients sending requests to `addr` on two keep-alive connections until `stop`: every answer
/// (status, decision id), or the error of a request that got none.
fn keep_sending(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<Result<(u16, String), String>>> {
    tokio::spawn(async move {
        let mut conns = [Conn::open(APP, addr).await, Conn::open(APP, addr).await];
        let mut answers = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            for c in &mut conns {
                answers.push(one(c, n).await);
                answered.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }
        answers
    })
}

/// Waits until every sidecar has answered `more` requests beyond `from` (its counts then).
async fn answered_more(counts: &[Arc<AtomicUsize>], more: usize, what: &str) {
    let from: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    crate::support::wait_until(what, || {
        counts
            .iter()
            .zip(&from)
            .all(|(c, f)| c.load(Ordering::Relaxed) >= f + more)
    })
    .await;
}

/// The complete decision records of a sidecar's log, in chain order.
fn decisions(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("logs/decisions.jsonl"))
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "decision")
        .collect()
}

/// Waits until every sidecar refuses the bundle the store holds for `reason`, and checks
/// that each says so everywhere an operator looks, with revision 2 still deciding.
async fn refused_everywhere(fleet: &[Sidecar], reason: &str, says: &str) {
    for (n, s) in fleet.iter().enumerate() {
        let p = s
            .policy_until(&format!("side-{n} refusing ({reason})"), |p| {
                p["source"]["refused"]["reason"] == reason
            })
            .await;
        let message = p["source"]["refused"]["message"].as_str().unwrap();
        assert!(message.contains(says), "side-{n}: {message}");
        assert_eq!(p["revision"], 2, "side-{n}: {p}");
        assert_eq!(p["source"]["live"]["revision"], 2, "side-{n}: {p}");
        assert!(
            p["source"]["failures"][reason].as_u64().unwrap() >= 1,
            "{p}"
        );

        let ready = s.admin_get("/readyz").await;
        assert_eq!(
            ready.status, 200,
            "a refused bundle does not make it unready"
        );
        let ready = ready.json();
        assert_eq!(ready["policy_source"]["revision"], 2, "{ready}");
        let shown = ready["policy_source"]["refused"].as_str().unwrap();
        assert!(shown.starts_with(&format!("{reason}: ")), "{shown}");

        let m = s.metrics().await;
        let failures = m.value(
            "residency_policy_source_failures_total",
            &[("reason", reason)],
        );
        assert_eq!(failures, Some(1.0), "side-{n}");
        assert_eq!(m.value("residency_policy_revision", &[]), Some(2.0));

        let logged = s.served.events().into_iter().any(|e| {
            e["fields"]["message"] == "policy bundle refused; the live revision keeps serving"
                && e["fields"]["bundle.reason"] == reason
        });
        assert!(logged, "side-{n} did not log the {reason} refusal");

        // Revision 2 keeps deciding.
        let mut conn = Conn::open(APP, s.data).await;
        let (status, id) = one(&mut conn, 0).await.unwrap();
        assert_eq!(status, 200);
        let record = decisions(&s.dir)
            .into_iter()
            .find(|r| r["id"] == id.as_str())
            .expect("the decision is logged");
        assert_eq!(record["policy_revision"], 2, "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_takes_a_new_revision_under_load_refuses_bad_ones_and_restarts_on_the_kept_one() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut store = S3Server::start(STORE_IP);
    store.create_bucket("policies");
    let publisher = Publisher::new(home.url());
    publish(&store, publisher.bundle(1)).await;

    let mut dirs = Vec::new();
    let mut fleet = Vec::new();
    for n in 0..SIDECARS {
        let (dir, policy) = sidecar_dir(n, &store, &publisher.public_key());
        fleet.push(Sidecar::start(&policy, dir.path()).await);
        dirs.push((dir, policy));
    }
    for (n, s) in fleet.iter().enumerate() {
        let p = s.policy().await;
        assert_eq!(p["revision"], 1, "side-{n}: {p}");
        assert_eq!(p["name"], "fleet-r1");
        assert_eq!(p["source"]["url"], URL);
        assert_eq!(p["source"]["live"]["builder"], "ci@fleet");
        let ready = s.admin_get("/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.text());
        assert_eq!(ready.json()["policy_source"]["revision"], 1);
    }

    // Revision 2 rolls out while every sidecar is busy.
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicUsize>> = fleet.iter().map(|_| Arc::default()).collect();
    let load: Vec<_> = fleet
        .iter()
        .zip(&counts)
        .map(|(s, c)| keep_sending(s.data, stop.clone(), c.clone()))
        .collect();
    answered_more(&counts, 10, "every sidecar answering under revision 1").await;
    let published = Instant::now();
    publish(&store, publisher.bundle(2)).await;
    let mut live_after = vec![None; SIDECARS];
    while live_after.iter().any(Option::is_none) {
        for (n, s) in fleet.iter().enumerate() {
            if live_after[n].is_none() && s.policy().await["revision"] == 2 {
                live_after[n] = Some(published.elapsed());
            }
        }
        assert!(
            published.elapsed() < POLL + Duration::from_secs(2),
            "revision 2 not live on every sidecar within poll_interval + 2 s: {live_after:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("revision 2 live after {live_after:?}");
    // Requests keep flowing under the new revision.
    answered_more(&counts, 10, "every sidecar answering under revision 2").await;
    stop.store(true, Ordering::Relaxed);
    for (n, (s, task)) in fleet.iter().zip(load).enumerate() {
        let answers = task.await.unwrap();
        assert!(answers.len() > 20, "side-{n}: {} answers", answers.len());
        let mut ids = Vec::new();
        for a in &answers {
            let (status, id) = a.as_ref().unwrap_or_else(|e| panic!("side-{n}: lost: {e}"));
            assert_eq!(*status, 200, "side-{n}: refused at the swap ({id})");
            ids.push(id.clone());
        }
        let records = decisions(&s.dir);
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for r in &records {
            *seen.entry(r["id"].as_str().unwrap()).or_default() += 1;
        }
        for id in &ids {
            assert_eq!(seen.get(id.as_str()), Some(&1), "side-{n}: decision {id}");
        }
        // In chain order, revision 1 then revision 2, switching once.
        let revisions: Vec<u64> = records
            .iter()
            .map(|r| r["policy_revision"].as_u64().expect("a revision"))
            .collect();
        assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "{revisions:?}");
        assert_eq!((revisions[0], *revisions.last().unwrap()), (1, 2));
        let m = s.metrics().await;
        assert_eq!(m.value("residency_policy_revision", &[]), Some(2.0));
        assert!(
            m.value("residency_policy_source_last_poll_timestamp_seconds", &[])
                .unwrap()
                > 0.0
        );

        // `audit report` says which revisions the sidecar ran, and when the new one began.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
            .args(["audit", "report", "--format", "json"])
            .arg(s.dir.join("logs"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let runs = &report["revisions"][format!("side-{n}")];
        assert_eq!(runs[0]["revision"], 1, "{report}");
        assert_eq!(runs[1]["revision"], 2, "{report}");
        let first_r2 = records.iter().find(|r| r["policy_revision"] == 2).unwrap();
        assert_eq!(runs[1]["began"], first_r2["ts"], "{report}");
    }

    // Each kind of bad bundle in turn, refused by all three.
    let other =
        SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("o")).unwrap();
    publish(&store, publisher.bundle_by(&other, 3)).await;
    refused_everywhere(&fleet, "other_key", "signed by another key").await;
    publish(&store, publisher.bundle(1)).await;
    refused_everywhere(
        &fleet,
        "older_revision",
        "revision 1 is not newer than the live revision 2",
    )
    .await;
    let good = publisher.bundle(4);
    let parsed = format::parse(&good).unwrap();
    let contents: Vec<&[u8]> = parsed.files().map(|(_, c)| c).collect();
    publish(
        &store,
        format::encode(parsed.manifest_bytes(), None, &contents),
    )
    .await;
    refused_everywhere(&fleet, "unsigned", "no signature").await;
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    publish(&store, flipped).await;
    refused_everywhere(&fleet, "corrupt", "does not match its SHA-256").await;
    publish(&store, publisher.broken(5)).await;
    refused_everywhere(&fleet, "does_not_compile", "revision 5").await;

    // SIGHUP reads the sidecar's own file again and merges it with the live bundle...
    fleet[1].served.signal("HUP");
    let mut reloaded = None;
    crate::support::wait_until("a reload on SIGHUP", || {
        reloaded = fleet[1].served.events().into_iter().find(|e| {
            e["fields"]["message"] == "policy reloaded" && e["fields"]["reload.trigger"] == "signal"
        });
        reloaded.is_some()
    })
    .await;
    assert_eq!(reloaded.unwrap()["fields"]["policy.revision"], 2);
    assert_eq!(fleet[1].policy().await["last_reload"]["result"], "ok");
    // ... and makes the source judge the bundle it holds again: the sidecar's file may have
    // been what it did not compile with.
    fleet[1]
        .policy_until("the refused bundle judged again", |p| {
            p["source"]["failures"]["does_not_compile"] == 2
        })
        .await;

    // The store goes down; side-0 restarts and comes up on the bundle it kept.
    store.kill();
    let mut first = fleet.remove(0);
    first.served.signal("TERM");
    let status = first.served.exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status:?}");
    let (dir0, policy0) = &dirs[0];
    let restarted = Sidecar::start(policy0, dir0.path()).await;
    let serving = restarted.served.event("residency-proxy serving").await;
    assert_eq!(serving["fields"]["policy.revision"], 2, "{serving}");
    let ready = restarted.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let p = restarted
        .policy_until("the store reported down", |p| {
            p["source"]["failures"]["unreachable"].as_u64().unwrap_or(0) > 0
        })
        .await;
    assert_eq!(p["revision"], 2, "{p}");
    assert_eq!(p["source"]["live"]["from_kept"], true, "{p}");
    let ready = restarted.admin_get("/readyz").await.json();
    let failure = ready["policy_source"]["last_failure"].as_str().unwrap();
    assert!(failure.starts_with("unreachable: "), "{failure}");
    let mut conn = Conn::open(APP, restarted.data).await;
    let (status, id) = one(&mut conn, 0).await.unwrap();
    assert_eq!(status, 200);
    let record = decisions(dir0.path())
        .into_iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap();
    assert_eq!(record["policy_revision"], 2);

    // A new sidecar with nothing kept stays unready, says why, and stops when asked.
    let (dir, policy) = sidecar_dir(9, &store, &publisher.public_key());
    let mut fresh = Served::start(&policy, dir.path());
    let admin = fresh
        .addr(
            "admin listener serving (waiting for a policy bundle)",
            "admin.listen",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let why = loop {
        let r = client::get("127.0.0.1", admin, "/readyz", &[]).await;
        assert_eq!(r.status, 503);
        let why = r.json()["failing"][0].as_str().unwrap().to_string();
        if why.contains("unreachable") {
            break why;
        }
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        why.starts_with(&format!(
            "policy: no verified bundle is live yet from {URL}"
        )),
        "{why}"
    );
    assert!(
        !fresh
            .events()
            .iter()
            .any(|e| e["fields"]["message"] == "residency-proxy serving")
    );
    fresh.signal("TERM");
    let status = fresh.exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// A store that the bundle's own policy places abroad: a sidecar with nothing kept never takes
/// a bundle from it (unready, saying why), and one that kept a bundle does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_abroad_is_refused_at_start_up() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let store = S3Server::start(ABROAD_STORE_IP);
    store.create_bucket("policies");
    let publisher = Publisher::new(home.url());
    let bundle = publisher.bundle(1);
    publish(&store, bundle.clone()).await;
    let (dir, policy) = sidecar_dir(0, &store, &publisher.public_key());

    let mut waiting = Served::start(&policy, dir.path());
    let admin = waiting
        .addr(
            "admin listener serving (waiting for a policy bundle)",
            "admin.listen",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let why = loop {
        let r = client::get("127.0.0.1", admin, "/readyz", &[]).await;
        assert_eq!(r.status, 503);
        let why = r.json()["failing"][0].as_str().unwrap().to_string();
        if why.contains("source_abroad") {
            break why;
        }
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        why.contains(&format!(
            "source_abroad: the policy source {ABROAD_STORE_IP} resolves to {ABROAD_STORE_IP} located in US, outside the home jurisdiction CN"
        )),
        "{why}"
    );
    waiting.signal("TERM");
    assert!(
        waiting
            .exit(Duration::from_secs(10))
            .await
            .unwrap()
            .success()
    );
    assert!(!dir.path().join("logs/policy.bundle").exists());

    // Kept from before the store moved abroad: start-up fails, saying where it is.
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    std::fs::write(dir.path().join("logs/policy.bundle"), &bundle).unwrap();
    let mut refused = Served::start(&policy, dir.path());
    let status = refused.exit(Duration::from_secs(10)).await.unwrap();
    assert!(!status.success(), "{status:?}");
    // The last lines may still be on their way from the pipe.
    crate::support::wait_until("the refusal on standard error", || {
        refused.events().iter().any(|e| {
            e.to_string()
                .contains("located in US, outside the home jurisdiction CN")
        })
    })
    .await;
}
