//! The proxy's own logs as a log collector sees them: `serve` with its output piped (as under
//! systemd, `kubectl logs` or `serve > proxy.out`) writes plain lines with no colour escapes,
//! `--log-format json` writes one JSON object per line, and colour appears only on a terminal
//! (a real pseudo-terminal, through `script`), and not there either with `NO_COLOR` set; a
//! log that cannot be written (a full disk) loses its lines but not the proxy.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_residency-proxy");

/// The smallest policy `serve` starts with, on ports of its own.
const POLICY: &str = r#"
[policy]
name = "own-logs"
home = "CN"
[proxy]
listen = "127.0.0.1:0"
[log]
path = "decisions.jsonl"
pseudonymize = false
"#;

/// The message `serve` logs once it accepts requests.
const SERVING: &str = "residency-proxy serving";

/// A command that runs `serve` in a fresh folder with the policy above: its own log at
/// `info`, whatever the environment of the test says about levels and colour.
fn serve_command(dir: &Path, program: &str) -> Command {
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    let mut c = Command::new(program);
    c.current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Reads `out` line by line on a thread of its own.
fn lines_of(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line holding `SERVING` on `rx`, calls `stop`, waits for the process to exit 0
/// and returns every line `rx` carried.
fn until_stopped(
    mut child: Child,
    rx: &mpsc::Receiver<String>,
    stop: impl FnOnce(&mut Child),
) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lines.iter().any(|l: &String| l.contains(SERVING)) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve did not come up ({e}):\n{}", lines.join("\n"));
            }
        }
    }
    stop(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve did not stop:\n{}", lines.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The reader ends at end of file, which the exit brings.
    lines.extend(rx.iter());
    assert!(status.success(), "{status}:\n{}", lines.join("\n"));
    lines
}

fn terminate(child: &mut Child) {
    let killed = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn serve_piped_writes_its_own_log_without_colour_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_command(dir.path(), BIN)
        .args(["serve", "--policy", "policy.toml", "--admin", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    let logged = until_stopped(child, &stderr, terminate);
    let printed: Vec<String> = stdout.iter().collect();
    let text = logged.join("\n");
    assert!(!text.contains("\x1b["), "colour escapes in a pipe:\n{text}");
    assert!(printed.iter().all(|l| !l.contains('\x1b')), "{printed:?}");
    // Plain text still: the level and the message as a person reads them.
    let serving = logged.iter().find(|l| l.contains(SERVING)).unwrap();
    assert!(serving.contains(" INFO "), "{serving}");
    assert!(text.contains("shutting down"), "{text}");
}

#[test]
fn serve_log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_command(dir.path(), BIN)
        .args(["--log-format", "json", "serve", "--policy", "policy.toml"])
        .args(["--admin", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    let stderr = lines_of(child.stderr.take().unwrap());
    let logged = until_stopped(child, &stderr, terminate);
    let events: Vec<Value> = logged
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}")))
        .collect();
    for e in &events {
        assert!(e["level"].is_string(), "no level in {e}");
        assert!(e["fields"]["message"].is_string(), "no message in {e}");
        assert!(e["timestamp"].is_string(), "no timestamp in {e}");
    }
    let serving = events
        .iter()
        .find(|e| e["fields"]["message"] == SERVING)
        .unwrap_or_else(|| panic!("{logged:?}"));
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["fields"]["listen"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{serving}"
    );
    assert!(
        events.iter().any(|e| e["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutting down"))),
        "{logged:?}"
    );
}

/// `serve` on a pseudo-terminal made by `script` (util-linux), stopped by typing Ctrl-C as a
/// person would; returns what the terminal showed.
#[cfg(target_os = "linux")]
fn on_a_terminal(no_color: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    // `exec`: the shell script starts must not stay between it and serve, or Ctrl-C reaches
    // that shell too, and a shell that dies of it makes the session's status a failure.
    let serve = format!(
        "exec {} serve --policy policy.toml --admin 127.0.0.1:0",
        quote(BIN)
    );
    let mut cmd = serve_command(dir.path(), "script");
    cmd.args(["-q", "-f", "-e", "-c", &serve, "/dev/null"])
        .env("SHELL", "/bin/sh");
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut child = cmd
        .spawn()
        .expect("run `script` (util-linux) to give serve a terminal");
    let shown = lines_of(child.stdout.take().unwrap());
    // Standard input stays open until the exit: script ends its session when its input ends.
    let lines = until_stopped(child, &shown, |child| {
        let keys = child.stdin.as_mut().unwrap();
        keys.write_all(b"\x03").unwrap();
        keys.flush().unwrap();
    });
    lines.join("\n")
}

#[cfg(target_os = "linux")]
#[test]
fn serve_on_a_terminal_colours_its_log_unless_no_color_is_set() {
    let coloured = on_a_terminal(None);
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal:\n{coloured}"
    );
    // Set to anything but the empty string, NO_COLOR turns colour off (no-color.org).
    let plain = on_a_terminal(Some("1"));
    assert!(plain.contains(SERVING), "{plain}");
    assert!(
        !plain.contains("\x1b["),
        "colour despite NO_COLOR:\n{plain}"
    );
    let empty = on_a_terminal(Some(""));
    assert!(
        empty.contains("\x1b["),
        "an empty NO_COLOR turned colour off:\n{empty}"
    );
}

/// The proxy's own log cannot be written (standard error on a full disk: `/dev/full`): its
/// lines are lost, but the proxy keeps serving and stops cleanly. It used to panic at its
/// first line, as the logging library reported the failed write with `eprintln!`.
#[test]
fn serve_keeps_running_when_its_own_log_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full (Linux)");
    let mut child = serve_command(dir.path(), BIN)
        .args(["serve", "--policy", "policy.toml", "--admin", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(full)
        .spawn()
        .unwrap();
    // Serving once its decision log is open (lines were logged, and lost, before that).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("decisions.jsonl").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve ended with its own log unwritable: {status}");
        }
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "serve ended with its own log unwritable"
    );
    terminate(&mut child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
