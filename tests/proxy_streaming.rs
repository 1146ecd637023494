//! Large bodies stream through the real proxy in both directions without the process's
//! memory growing with their size. The client, the proxy and the store all run in this
//! process, so its resident set bounds all three. This file holds one test so that no other
//! test shares the process while it measures.

mod support;

use http_body_util::BodyExt;
use std::time::Instant;
use support::body::Generated;
use support::client::{Conn, empty, request};
use support::proxy::PolicySpec;
use support::upstream::{Reply as Serve, Upstream};

/// Bytes moved each way. Much larger than the allowed growth, and small enough to stay
/// within a few seconds in a debug build on two cores.
const SIZE: u64 = 256 * 1024 * 1024;
/// How much the resident set may grow while `SIZE` bytes go up and down.
const ALLOWED_GROWTH: u64 = 64 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// `VmRSS` and `VmHWM` (peak) of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_streams_both_ways_with_flat_memory() {
    let sink = Upstream::start("127.0.0.2", Serve::Ok).await;
    let source = Upstream::start(
        "127.0.0.3",
        Serve::Stream {
            len: SIZE,
            chunk: CHUNK,
        },
    )
    .await;
    let proxy = PolicySpec::new()
        .network("127.0.0.0/8", "CN")
        .upstream("uploads", &sink.url())
        .upstream("downloads", &source.url())
        .toml(
            r#"
[[datasets]]
name = 'uploads'
match = { path_prefix = '/up/' }
upstream = 'uploads'
category = 'system.operations'
cross_border = 'allow'
third_party = 'allow'

[[datasets]]
name = 'downloads'
match = { path_prefix = '/down/' }
upstream = 'downloads'
category = 'system.operations'
cross_border = 'allow'
third_party = 'allow'
"#,
        )
        .start()
        .await;
    // Warm up every path once (buffers, pools, the log writer) before measuring.
    let mut conn = Conn::open("127.0.0.10", proxy.addr).await;
    let warm = request("PUT", "/up/warm")
        .body(Generated::new(1024 * 1024, CHUNK).boxed())
        .unwrap();
    assert_eq!(conn.send(warm).await.status, 200);
    let (before, _) = memory();
    let started = Instant::now();

    let up = request("PUT", "/up/object.bin")
        .body(Generated::new(SIZE, CHUNK).boxed())
        .unwrap();
    let r = conn.send(up).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sink.last().body_len, SIZE);
    assert_eq!(sink.last().body_sha256, Generated::sha256(SIZE, CHUNK));
    let out = proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(out["bytes_in"], SIZE, "{out}");
    assert_eq!(out["complete"], true, "{out}");

    let down = request("GET", "/down/object.bin").body(empty()).unwrap();
    let r = conn.send_counted(down).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.len, SIZE);
    assert_eq!(r.sha256, Generated::sha256(SIZE, CHUNK));
    let id = r.headers["x-residency-decision"].to_str().unwrap();
    let out = proxy.log.outcome(id).await;
    assert_eq!(out["bytes_out"], SIZE, "{out}");
    assert_eq!(out["complete"], true, "{out}");

    let elapsed = started.elapsed();
    let (_, peak) = memory();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "2 x {} MiB through the proxy in {elapsed:?}; resident {} MiB before, peak {} MiB",
        SIZE >> 20,
        before >> 20,
        peak >> 20
    );
    assert!(
        growth < ALLOWED_GROWTH,
        "memory grew by {} MiB while streaming 2 x {} MiB",
        growth >> 20,
        SIZE >> 20
    );
}
