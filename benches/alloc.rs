//! Heap allocations per request through the real proxy (SPEC section 9, issue 11): a counting
//! global allocator counts what the proxy's runtime threads allocate while a client sends
//! requests through it to a small upstream.
//!
//! The case is the load benchmark's: a foreign third party reads a resident object (1 KiB)
//! under a valid explicit consent, so that the policy, the consent check, the pseudonymised
//! and signed decision log (`durability = "write"`) all run. A refused request (no consent)
//! is measured too. The client and the upstream run on threads of their own, which are not
//! counted; the proxy, its log writer and its blocking pool are.
//!
//! `cargo bench --bench alloc` prints allocations and bytes per request. `CASE=forwarded`
//! (or `refused`) runs one case, `REQUESTS=N` changes the count (benches/instructions.sh
//! runs this under valgrind with fewer), and `ALLOC_TRACE=1` prints where a few requests'
//! allocations are made.

mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use residency_proxy::proxy::snapshot::Overrides;
use residency_proxy::proxy::{self, ServeConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Cleared on the client's and the upstream's threads: every other thread is the
    /// proxy's (its control runtime, its workers, which it starts itself, their log writers
    /// and blocking pools).
    static COUNTED: Cell<bool> = const { Cell::new(true) };
    /// Set while this thread records where an allocation came from (which allocates too).
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

/// With `ALLOC_TRACE=1`, the call sites of the allocations of a few requests.
static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SITES: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

fn note(size: usize) {
    if COUNTED.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
        if TRACE.load(Ordering::Relaxed) && !TRACING.with(Cell::get) {
            TRACING.with(|t| t.set(true));
            record_site();
            TRACING.with(|t| t.set(false));
        }
    }
}

/// Counts the allocation under its innermost source locations outside the standard library
/// and this file.
fn record_site() {
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<&str> = trace
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("at "))
        .filter(|f| !f.starts_with("/rustc/") && !f.contains("benches/alloc.rs"))
        .map(|f| f.rsplit_once("/src/").map_or(f, |(_, tail)| tail))
        .take(3)
        .collect();
    let mut sites = SITES.lock().unwrap();
    *sites
        .get_or_insert_with(HashMap::new)
        .entry(frames.join("\n    <- "))
        .or_default() += 1;
}

// SAFETY: every call is passed on to the system allocator unchanged. Counting reads a
// thread-local flag (const-initialised, no destructor) and bumps two atomics; with
// ALLOC_TRACE it also records a backtrace, which allocates through this same allocator and is
// kept from recursing by a second thread-local flag.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Requests measured per case, after as many unmeasured ones (pools, caches, buffers warm);
/// `REQUESTS` in the environment changes it (fewer under valgrind).
fn requests() -> u64 {
    std::env::var("REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}
/// Connections the client keeps open, each sending its requests one after another.
const CONNECTIONS: u64 = 16;

fn main() {
    // This thread runs the client.
    COUNTED.with(|c| c.set(false));
    let dir = tempfile::tempdir().expect("temp dir");
    // A store answering 1 KiB, and the load benchmark's policy (`benches/lib.sh`).
    let upstream = common::start_upstream(Bytes::from(vec![7u8; 1024]), || {
        COUNTED.with(|c| c.set(false))
    });
    let policy = common::write_load_setup(dir.path(), "alloc-bench", upstream, "");

    let proxy_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(|| COUNTED.with(|c| c.set(true)))
        .build()
        .expect("runtime");
    // The proxy runs on a thread of its own, counted from its first instruction.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy_thread = std::thread::spawn(move || {
        COUNTED.with(|c| c.set(true));
        proxy_rt.block_on(async move {
            let running = proxy::start(ServeConfig {
                policy_path: policy,
                overrides: Overrides::default(),
            })
            .await
            .expect("the proxy starts");
            addr_tx.send(running.addr).expect("main waits");
            let _ = stop_rx.await;
            running.shutdown().await;
        });
    });
    let addr = addr_rx.recv().expect("proxy address");

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(|| COUNTED.with(|c| c.set(false)))
        .build()
        .expect("runtime");
    let requests = requests();
    println!(
        "heap allocations per request through the proxy ({requests} requests, {CONNECTIONS} connections):"
    );
    for (name, path, status) in [
        (
            "1 KiB GET under consent (forwarded)",
            "/payments/u1/1k.bin",
            200,
        ),
        ("GET without consent (refused)", "/payments/u2/1k.bin", 451),
    ] {
        // `CASE=forwarded` or `CASE=refused` runs one case only.
        if std::env::var("CASE").is_ok_and(|c| !name.contains(c.as_str())) {
            continue;
        }
        client.block_on(send(addr, path, status, requests));
        let (a0, b0) = counts();
        client.block_on(send(addr, path, status, requests));
        let (a1, b1) = counts();
        let n = requests as f64;
        println!(
            "  {name:<40} {:>6.1} allocations, {:>7.0} bytes",
            (a1 - a0) as f64 / n,
            (b1 - b0) as f64 / n
        );
        if std::env::var_os("ALLOC_TRACE").is_some() {
            const TRACED: u64 = 160;
            TRACE.store(true, Ordering::Relaxed);
            client.block_on(send(addr, path, status, TRACED));
            TRACE.store(false, Ordering::Relaxed);
            let mut sites: Vec<_> = SITES
                .lock()
                .unwrap()
                .take()
                .unwrap_or_default()
                .into_iter()
                .collect();
            sites.sort_by_key(|s| std::cmp::Reverse(s.1));
            for (site, n) in sites {
                println!("{:>8.2}  {site}", n as f64 / TRACED as f64);
            }
        }
    }
    let _ = stop_tx.send(());
    proxy_thread.join().expect("proxy thread");
}

fn counts() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

/// Sends `total` GETs over `CONNECTIONS` keep-alive connections; each must answer `status`.
async fn send(addr: SocketAddr, path: &'static str, status: u16, total: u64) {
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let local = tokio::net::TcpSocket::new_v4().expect("socket");
            // The client sits at 127.0.0.1, placed abroad (US) by the policy.
            local.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
            let stream = local.connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            for _ in 0..total / CONNECTIONS {
                let req = Request::get(path)
                    .header("host", "storage.internal")
                    .header("x-purpose", "credit_scoring")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.expect("response");
                assert_eq!(resp.status().as_u16(), status, "{path}");
                resp.into_body().collect().await.expect("body");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}
