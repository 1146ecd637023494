//! The real `residency-proxy serve` process, for what only a process shows: signals, exit
//! codes, start-up order. Its own logs are read as JSON lines from standard error, which is
//! also how a test learns the addresses it bound (`127.0.0.1:0` in the policy).

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `serve` process; killed when dropped.
pub struct Served {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Served {
    /// Starts `residency-proxy --log-format json serve --policy POLICY` in `cwd`.
    pub fn start(policy: &Path, cwd: &Path) -> Served {
        Served::spawn(policy, cwd, Stdio::null(), 1)
    }

    /// As [`Served::start`], with `workers` workers (a decision-log chain each).
    pub fn start_workers(policy: &Path, cwd: &Path, workers: usize) -> Served {
        Served::spawn(policy, cwd, Stdio::null(), workers)
    }

    /// As [`Served::start`], with standard output (where `log.path = "-"` writes) a pipe the
    /// caller reads, or does not.
    pub fn start_with_stdout(policy: &Path, cwd: &Path) -> (Served, ChildStdout) {
        let mut served = Served::spawn(policy, cwd, Stdio::piped(), 1);
        let out = served.child.stdout.take().unwrap();
        (served, out)
    }

    fn spawn(policy: &Path, cwd: &Path, stdout: Stdio, workers: usize) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
            // One worker unless asked (one chain: `decisions.jsonl`), as the benchmarks
            // measure; the default, one per core, would depend on the machine.
            .args(["--log-format", "json", "serve", "--workers"])
            .arg(workers.to_string())
            .arg("--policy")
            .arg(policy)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start residency-proxy serve");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        Served { child, events }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line logged so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) for an event with this message and returns it.
    pub async fn event(&self, message: &str) -> Value {
        let mut found = None;
        super::wait_until(&format!("the event \"{message}\""), || {
            found = self
                .events()
                .into_iter()
                .find(|e| e["fields"]["message"] == message);
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    /// An address field of the event with this message.
    pub async fn addr(&self, message: &str, field: &str) -> SocketAddr {
        let e = self.event(message).await;
        e["fields"][field]
            .as_str()
            .unwrap_or_else(|| panic!("no field {field} in {e}"))
            .parse()
            .unwrap()
    }

    /// Sends `signal` (`"TERM"`, `"HUP"`) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s {signal} failed");
    }

    /// Waits at most `limit` for the process to exit.
    pub async fn exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
