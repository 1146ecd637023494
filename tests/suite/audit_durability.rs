//! The decision log when things go wrong: the real binary killed with SIGKILL under load
//! (every answered request keeps its decision record; the restart continues the chain with
//! a recovery record and the log verifies), and a full disk (503 `log_unavailable`, nothing
//! forwarded, recovery once space is back).

use crate::support::client::{ReqBody, empty, request};
use crate::support::proxy::{APP, BUREAU, HOME_IP, consent, payments_spec, write_consents};
use crate::support::upstream::{Reply as Serve, Upstream};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use residency_proxy::audit::keys::SigningKey;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpSocket;

const BIN: &str = env!("CARGO_BIN_EXE_residency-proxy");

/// A keep-alive client connection that reports failures instead of panicking: the proxy
/// may die under it.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<ReqBody>,
}

impl Client {
    async fn open(from: &str, to: SocketAddr) -> Option<Client> {
        let socket = TcpSocket::new_v4().ok()?;
        socket.bind(SocketAddr::new(from.parse().ok()?, 0)).ok()?;
        let stream = socket.connect(to).await.ok()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(Client { sender })
    }

    /// The status and decision id of an answer, once its headers have arrived.
    async fn get(&mut self, target: &str, purpose: Option<&str>) -> Option<(u16, String)> {
        let mut req = request("GET", target);
        if let Some(p) = purpose {
            req = req.header("x-purpose", p);
        }
        self.sender.ready().await.ok()?;
        let resp = self
            .sender
            .send_request(req.body(empty()).unwrap())
            .await
            .ok()?;
        let id = resp
            .headers()
            .get("x-residency-decision")?
            .to_str()
            .ok()?
            .to_string();
        let status = resp.status().as_u16();
        // An answer counts from its headers: the record was written before them.
        let _ = resp.into_body().collect().await.map(|b| b.to_bytes());
        Some((status, id))
    }
}

/// The real binary serving `policy`, with its stderr (JSON logs) read on a thread.
struct Served {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(policy: &Path) -> Served {
        let mut child = Command::new(BIN)
            .args([
                "--log-format",
                "json",
                "serve",
                "--workers",
                "2",
                "--policy",
            ])
            .arg(policy)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap());
        let seen = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if let Some(listen) = v["fields"]["listen"].as_str() {
                    let _ = tx.send(listen.to_string());
                }
                seen.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the proxy did not start: {:?}", stderr.lock().unwrap()))
            .parse()
            .unwrap();
        Served {
            child,
            addr,
            stderr,
        }
    }

    fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        self.child.wait().unwrap()
    }
}

/// The complete records of the log (a torn last line is left out).
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_public_key(dir: &Path) -> PathBuf {
    let key = SigningKey::load(&dir.join("log-signing.key")).unwrap();
    let path = dir.join("log-signing.pub");
    std::fs::write(&path, key.public_pem()).unwrap();
    path
}

async fn kill_under_load_and_restart(durability: &str) {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let spec = payments_spec(&home.url()).log(&format!("durability = '{durability}'"));
    std::fs::write(&policy, spec.render(dir.path())).unwrap();
    std::fs::write(
        dir.path().join("log-signing.key"),
        SigningKey::generate_pem(),
    )
    .unwrap();
    write_consents(
        &dir.path().join("consents.jsonl"),
        &[consent("c-1", "u1", "credit-bureau-us")],
    );
    // Two workers: a chain each, both written when the process is killed.
    let chains = [
        dir.path().join("decisions.jsonl"),
        dir.path().join("decisions.w1.jsonl"),
    ];

    let served = Served::start(&policy);
    let answered: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let mut load = Vec::new();
    for task in 0..16usize {
        let (answered, addr) = (answered.clone(), served.addr);
        load.push(tokio::spawn(async move {
            let from = if task % 2 == 0 { APP } else { BUREAU };
            let Some(mut c) = Client::open(from, addr).await else {
                return;
            };
            for i in 0.. {
                let target = format!("/payments/u{}/{task}-{i}.json", i % 3);
                match c.get(&target, Some("credit_scoring")).await {
                    Some(answer) => answered.lock().unwrap().push(answer),
                    None => return,
                }
            }
        }));
    }
    crate::support::wait_until("300 answers under load", || {
        answered.lock().unwrap().len() >= 300
    })
    .await;
    let mut child = served.child;
    child.kill().unwrap(); // SIGKILL, in the middle of the load
    child.wait().unwrap();
    for t in load {
        t.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let before: Vec<Vec<Value>> = chains.iter().map(|c| records(c)).collect();

    // The restart finds each chain unclosed, says so in a recovery record, and serves.
    let served = Served::start(&policy);
    let mut c = Client::open(APP, served.addr).await.unwrap();
    let (status, after_id) = c.get("/payments/u1/after.json", None).await.unwrap();
    assert_eq!(status, 200);
    let logs = served.logs();
    let status = served.stop();
    assert!(status.success(), "exit {status}; logs:\n{logs}");
    assert!(logs.contains("not closed cleanly"), "{logs}");

    let all: Vec<Vec<Value>> = chains.iter().map(|c| records(c)).collect();
    let decisions: std::collections::HashMap<&str, usize> = all
        .iter()
        .flatten()
        .filter(|r| r["kind"] == "decision")
        .fold(Default::default(), |mut m, r| {
            *m.entry(r["id"].as_str().unwrap()).or_default() += 1;
            m
        });
    for (status, id) in &answered {
        assert_eq!(
            decisions.get(id.as_str()),
            Some(&1),
            "the request answered {status} with decision {id} has no single decision record"
        );
    }
    assert_eq!(decisions.get(after_id.as_str()), Some(&1));
    let pubkey = write_public_key(dir.path());
    for ((log, before), all) in chains.iter().zip(&before).zip(&all) {
        let name = log.file_name().unwrap().to_str().unwrap();
        // The recovery record comes right after what the killed run left, and names it.
        let last = before
            .last()
            .unwrap_or_else(|| panic!("{name}: no record before the kill"));
        let recovery = &all[before.len()];
        assert_eq!(recovery["kind"], "recovery", "{name}: {recovery}");
        assert_eq!(recovery["last_seq"], last["seq"]);
        assert_eq!(recovery["file"], name);
        assert_eq!(all[before.len() + 1]["kind"], "checkpoint");

        let out = Command::new(BIN)
            .args(["audit", "verify", "--key"])
            .arg(&pubkey)
            .arg(log)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!(
                "recovered: {}:{} after a crash: the log ended at seq {}",
                log.display(),
                before.len() + 1,
                last["seq"]
            )),
            "{stdout}"
        );
        println!(
            "{durability}, {name}: {} lines left after SIGKILL, recovery {recovery}",
            before.len()
        );
    }
    println!("{durability}: {} answers before SIGKILL", answered.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_answered_decision_and_the_log_verifies() {
    kill_under_load_and_restart("write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_in_fsync_mode_loses_no_answered_decision() {
    kill_under_load_and_restart("fsync").await;
}

/// A tmpfs of 64 KiB mounted for the test, unmounted when dropped.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// `None` (with the reason printed) where the machine cannot mount one.
    fn mount(dir: PathBuf) -> Option<SmallDisk> {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                println!(
                    "skipped: cannot mount a tmpfs here ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("skipped: cannot run mount ({e})");
                None
            }
        }
    }

    /// Fills the file system; returns the file holding the space.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in [4096, 512, 64, 1] {
            while f.write_all(&vec![0u8; chunk]).is_ok() {}
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_503_forwards_nothing_and_recovers() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let scratch = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(scratch.path().join("small")) else {
        return;
    };
    let log = disk.dir.join("decisions.jsonl");
    let mut proxy = payments_spec(&home.url())
        .log("on_failure = 'deny'")
        .log_path(&log)
        .start()
        .await;
    let get = |target: &'static str| crate::support::client::get(APP, proxy.addr, target, &[]);
    assert_eq!(get("/payments/u1/a.json").await.status, 200);
    assert_eq!(home.requests(), 1);

    let filler = disk.fill();
    // The log file's last page may still take a record or two; then every request is refused.
    let mut refused = Vec::new();
    for _ in 0..20 {
        let forwarded = home.requests();
        let r = get("/payments/u1/a.json").await;
        if r.status == 503 {
            assert_eq!(r.json()["error"], "log_unavailable", "{}", r.text());
            assert_eq!(
                home.requests(),
                forwarded,
                "a refused request reached the store"
            );
            refused.push(r.json()["decision_id"].as_str().unwrap().to_string());
        } else {
            assert!(refused.is_empty(), "answered {} after a refusal", r.status);
        }
        if refused.len() == 3 {
            break;
        }
    }
    assert_eq!(refused.len(), 3, "the full disk never refused a request");
    let stats = proxy.running().shared.log.stats();
    assert!(stats.failures >= 3 && stats.write_errors >= 3, "{stats:?}");

    // Space is back: the next request is logged and forwarded, with no restart.
    std::fs::remove_file(filler).unwrap();
    let forwarded = home.requests();
    let r = get("/payments/u1/b.json").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(home.requests(), forwarded + 1);
    proxy.shutdown().await;

    let key = SigningKey::load(&proxy.dir.path().join("log-signing.key")).unwrap();
    let opts = residency_proxy::audit::read::verify::VerifyOptions {
        keys: vec![key.public_key().to_vec()],
        ..Default::default()
    };
    residency_proxy::audit::read::verify::verify_with(&log, &opts)
        .unwrap_or_else(|e| panic!("the log does not verify: {e}"));
    // A refused request left no decision record: its write failed whole.
    let all = records(&log);
    for id in &refused {
        assert!(
            !all.iter()
                .any(|r| r["kind"] == "decision" && r["id"] == id.as_str()),
            "refused {id} is in the log"
        );
    }
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_with_on_failure_allow_forwards_and_counts() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let scratch = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(scratch.path().join("small")) else {
        return;
    };
    let mut proxy = payments_spec(&home.url())
        .log("on_failure = 'allow'")
        .log_path(&disk.dir.join("decisions.jsonl"))
        .start()
        .await;
    let filler = disk.fill();
    let before = proxy.running().shared.log.stats().failures;
    for _ in 0..20 {
        let r = crate::support::client::get(APP, proxy.addr, "/payments/u1/a.json", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(home.requests(), 20);
    let stats = proxy.running().shared.log.stats();
    assert!(stats.failures > before, "{stats:?}");
    std::fs::remove_file(filler).unwrap();
    proxy.shutdown().await;
    drop(disk);
}
