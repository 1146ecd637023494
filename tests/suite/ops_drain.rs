//! SIGTERM on the real process: a slow download in flight finishes within `drain_timeout`,
//! the process then exits 0 with its decision log flushed; a download slower than the drain
//! time is cut at the deadline rather than holding the process.

use crate::support::binary::Served;
use crate::support::client::{Conn, empty, request};
use crate::support::log::DecisionLog;
use crate::support::proxy::{APP, HOME_IP, PolicySpec, payments_dataset};
use crate::support::upstream::{Reply as Serve, Upstream};
use http_body_util::BodyExt;
use residency_proxy::audit::read::verify::verify;
use std::time::{Duration, Instant};

const CHUNK: usize = 16 * 1024;

async fn serve_slow(chunks: usize, drain: &str) -> (Upstream, Served, tempfile::TempDir) {
    let home = Upstream::start(
        HOME_IP,
        Serve::Trickle {
            chunks,
            size: CHUNK,
            every: Duration::from_millis(100),
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (policy, _) = PolicySpec::new()
        .with_parties()
        .proxy(&format!("drain_timeout = '{drain}'"))
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .write_files(dir.path());
    let served = Served::start(&policy, dir.path());
    (home, served, dir)
}

/// A download through the proxy, started: its decision id, the body still arriving, and the
/// bytes of its first chunk.
struct Download {
    id: String,
    resp: http::Response<hyper::body::Incoming>,
    received: usize,
    _conn: Conn,
}

async fn begin_download(served: &Served) -> Download {
    let addr = served.addr("residency-proxy serving", "listen").await;
    let mut conn = Conn::open(APP, addr).await;
    let mut resp = conn
        .response(
            request("GET", "/payments/u1/big.bin")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-residency-decision"]
        .to_str()
        .unwrap()
        .to_string();
    let first = resp.body_mut().frame().await.unwrap().unwrap();
    let received = first.data_ref().map_or(0, |d| d.len());
    Download {
        id,
        resp,
        received,
        _conn: conn,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_download_finish_within_the_drain_time() {
    // 20 chunks, one every 100 ms: about two seconds of response after the signal.
    let chunks = 20;
    let (_home, mut served, dir) = serve_slow(chunks, "10s").await;
    let addr = served.addr("residency-proxy serving", "listen").await;
    let Download {
        id,
        mut resp,
        mut received,
        _conn,
    } = begin_download(&served).await;

    let signalled = Instant::now();
    served.signal("TERM");
    served
        .event("shutting down: draining connections and flushing the decision log")
        .await;
    // New clients are turned away while the download goes on.
    crate::support::wait_until("the listener to close", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    while let Some(frame) = resp.body_mut().frame().await {
        let frame = frame.expect("the download is not cut");
        received += frame.data_ref().map_or(0, |d| d.len());
    }
    let finished = signalled.elapsed();
    assert_eq!(received, chunks * CHUNK);
    assert!(finished >= Duration::from_millis(1500), "{finished:?}");

    let status = served
        .exit(Duration::from_secs(10))
        .await
        .expect("the process exits once drained");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let log = DecisionLog::new(dir.path().join("decisions.jsonl"));
    let outcome = log.outcome(&id).await;
    assert_eq!(outcome["complete"], true, "{outcome}");
    assert_eq!(outcome["bytes_out"], (chunks * CHUNK) as u64, "{outcome}");
    verify(&log.path).unwrap_or_else(|e| panic!("the log does not verify: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_slower_than_the_drain_time_is_cut_at_the_deadline() {
    // Ten seconds of response, one second of drain.
    let chunks = 100;
    let (_home, mut served, _dir) = serve_slow(chunks, "1s").await;
    let mut download = begin_download(&served).await;

    let signalled = Instant::now();
    served.signal("TERM");
    let status = served
        .exit(Duration::from_secs(8))
        .await
        .expect("the process exits at the drain deadline");
    assert!(status.success(), "{status:?}");
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    let mut received = download.received;
    while let Some(Ok(frame)) = download.resp.body_mut().frame().await {
        received += frame.data_ref().map_or(0, |d| d.len());
    }
    assert!(received < (chunks - 1) * CHUNK, "{received} bytes arrived");
}
