//! The decision log under concurrent load and across shutdown: one decision and one outcome
//! record per request, a chain that verifies, and in-flight exchanges that finish and are
//! logged after `shutdown()` begins.

use crate::support::client::{self, Conn, empty, full, request};
use crate::support::proxy::{
    APP, BUREAU, HOME_IP, PolicySpec, TestProxy, consent, payments_dataset,
};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::audit::read::verify::verify;
use std::collections::HashMap;
use std::time::Duration;

async fn start(home: &Upstream, tweak: impl FnOnce(PolicySpec) -> PolicySpec) -> TestProxy {
    let spec = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .consents(vec![consent("c-1", "u1", "credit-bureau-us")]);
    tweak(spec).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_one_decision_and_one_outcome_and_the_log_verifies() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    // Checkpoints, when due, land among the records and must verify too.
    let mut proxy = start(&home, |s| s.log("checkpoint_every = 50")).await;
    let addr = proxy.addr;
    let mut tasks = Vec::new();
    for i in 0..200usize {
        tasks.push(tokio::spawn(async move {
            let (from, method, target, purpose) = match i % 5 {
                0 => (APP, "GET", format!("/payments/u{i}/a.json"), ""),
                1 => (
                    BUREAU,
                    "GET",
                    "/payments/u1/a.json".into(),
                    "credit_scoring",
                ),
                2 => (
                    BUREAU,
                    "GET",
                    format!("/payments/u{i}/a.json"),
                    "credit_scoring",
                ),
                3 => (BUREAU, "PUT", format!("/payments/u{i}/a.json"), ""),
                _ => (APP, "GET", format!("/nowhere/{i}"), ""),
            };
            let mut req = request(method, &target);
            if !purpose.is_empty() {
                req = req.header("x-purpose", purpose);
            }
            let r = client::send(from, addr, req.body(full("x")).unwrap()).await;
            let want = [200, 200, 451, 200, 404][i % 5];
            assert_eq!(r.status, want, "request {i}: {}", r.text());
            r.decision_id()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    assert_eq!(home.requests(), 120);
    proxy.shutdown().await;

    let mut decisions: HashMap<String, usize> = HashMap::new();
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let records = proxy.log.records();
    for r in &records {
        let id = r["id"].as_str().map(str::to_string);
        match r["kind"].as_str() {
            Some("decision") => *decisions.entry(id.unwrap()).or_default() += 1,
            Some("outcome") => *outcomes.entry(id.unwrap()).or_default() += 1,
            _ => {}
        }
    }
    assert_eq!(decisions.len(), 200, "decision records");
    assert_eq!(outcomes.len(), 200, "outcome records");
    for id in &ids {
        assert_eq!(decisions.get(id), Some(&1), "decision records of {id}");
        assert_eq!(outcomes.get(id), Some(&1), "outcome records of {id}");
    }
    let report = verify(&proxy.log.path).unwrap_or_else(|e| panic!("the log does not verify: {e}"));
    assert_eq!(report.records, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_response_completes_after_shutdown_begins() {
    let home = Upstream::start(HOME_IP, Serve::Delay(Duration::from_millis(700))).await;
    let mut proxy = start(&home, |s| s).await;
    let addr = proxy.addr;
    let slow = tokio::spawn(async move {
        let req = request("GET", "/payments/u1/a.json").body(empty()).unwrap();
        client::send(APP, addr, req).await
    });
    // Shut down only once the request is at the store, waiting for its answer.
    home.wait_requests(1).await;
    proxy.shutdown().await;

    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("ok from {}", home.addr));
    let id = r.decision_id();
    let records = proxy.log.records();
    let outcome = records
        .iter()
        .find(|r| r["kind"] == "outcome" && r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("no outcome record for {id} after shutdown"));
    assert_eq!(outcome["status"], 200);
    assert_eq!(outcome["complete"], true);
    verify(&proxy.log.path).unwrap_or_else(|e| panic!("the log does not verify: {e}"));

    // The listener is closed: a new client is refused.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{APP}:0").parse().unwrap()).unwrap();
    assert!(
        socket.connect(addr).await.is_err(),
        "the proxy still accepts after shutdown"
    );
}

/// An idle keep-alive client does not hold shutdown up for the whole drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_does_not_delay_shutdown() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = start(&home, |s| s.proxy("drain_timeout = '20s'")).await;
    let mut conn = Conn::open(APP, proxy.addr).await;
    let r = conn
        .send(request("GET", "/payments/u1/a.json").body(empty()).unwrap())
        .await;
    assert_eq!(r.status, 200);
    let started = std::time::Instant::now();
    proxy.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for an idle connection",
        started.elapsed()
    );
    proxy.log.outcome(&r.decision_id()).await;
}

/// A client that goes away in the middle of a download still leaves an outcome record,
/// which says the response did not reach its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_download_leaves_an_incomplete_outcome() {
    let size = 64 * 1024 * 1024;
    let home = Upstream::start(
        HOME_IP,
        Serve::Stream {
            len: size,
            chunk: 64 * 1024,
        },
    )
    .await;
    let proxy = start(&home, |s| s).await;
    let id = {
        let mut conn = Conn::open(APP, proxy.addr).await;
        let mut resp = conn
            .response(
                request("GET", "/payments/u1/big.bin")
                    .body(empty())
                    .unwrap(),
            )
            .await;
        let id = resp.headers()["x-residency-decision"]
            .to_str()
            .unwrap()
            .to_string();
        use http_body_util::BodyExt;
        resp.body_mut().frame().await.unwrap().unwrap();
        id
        // The connection drops here, after the first chunk.
    };
    let out = proxy.log.outcome(&id).await;
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["complete"], false, "{out}");
    assert!(out["bytes_out"].as_u64().unwrap() < size, "{out}");
}

/// A client that connects and sends nothing does not hold a connection slot for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_plain_client_is_cut_off_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&home, |s| s.proxy("handshake_timeout = '300ms'")).await;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the proxy closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent to a client that said nothing");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    // A client that speaks is served as usual.
    let r = client::get(APP, proxy.addr, "/payments/u1/a.json", &[]).await;
    assert_eq!(r.status, 200);
}

/// A decision log that hangs instead of failing (standard output piped to a reader that
/// stopped reading) must not hang the requests: past the log deadline they are refused with
/// `503 log_unavailable` (`on_failure = "deny"`), and once the reader drains the pipe the
/// proxy serves again, by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_log_refuses_requests_instead_of_hanging_them() {
    use crate::support::binary::Served;
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (policy, _) = PolicySpec::new()
        .with_parties()
        .log_path(std::path::Path::new("-"))
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .write_files(dir.path());
    let (served, stdout) = Served::start_with_stdout(&policy, dir.path());
    let addr = served.addr("residency-proxy serving", "listen").await;
    // Nobody reads the pipe: once its buffer is full, the writer's next write blocks.
    let mut answers = Vec::new();
    for _ in 0..400 {
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            client::get(APP, addr, "/payments/u1/a.json", &[]),
        )
        .await
        .expect("the request hung on the stuck log");
        answers.push(r.status);
        if r.status != 200 {
            assert_eq!(r.status, 503, "{}", r.text());
            assert_eq!(r.json()["error"], "log_unavailable");
            break;
        }
    }
    assert_eq!(
        answers.last(),
        Some(&503),
        "the pipe never filled: {answers:?}"
    );
    assert_eq!(
        home.requests() as usize,
        answers.len() - 1,
        "the refused request was forwarded"
    );
    // The reader comes back: the records waiting are written, and requests flow again.
    let reader = std::thread::spawn(move || {
        let mut stdout = stdout;
        std::io::copy(&mut stdout, &mut std::io::sink()).unwrap()
    });
    let mut recovered = false;
    for _ in 0..50 {
        if client::get(APP, addr, "/payments/u1/a.json", &[])
            .await
            .status
            == 200
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        recovered,
        "the proxy did not serve again once the log drained"
    );
    drop(served);
    let _ = reader.join();
}
