//! Heap held per idle keep-alive client connection through the real proxy: a tracking global
//! allocator counts the bytes the proxy's threads hold while `CONNS` client connections (each
//! having made one request, as `benches/memory/run.sh` holds them) sit idle, against the same
//! proxy before they were opened. Resident size adds the allocator's own overhead and the
//! kernel's socket buffers are not in it: this says where the heap part goes.
//!
//! `cargo bench --bench idle_memory` prints live heap bytes per connection, once with the
//! requests sent one connection after another (one upstream connection serves them all) and
//! once with all requests in flight at once (as `benches/memory/run.sh` sends them, so the
//! upstream pool fills too). `CONNS=N` changes the count; `ALLOC_TRACE=1` prints the call
//! sites of the bytes still held, largest first.

mod common;

use bytes::Bytes;
use residency_proxy::proxy::snapshot::Overrides;
use residency_proxy::proxy::{self, ServeConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

struct Tracking;

/// Bytes the proxy's threads hold (allocated by a counted thread, not yet freed).
static LIVE: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Cleared on the client's and the upstream's threads.
    static COUNTED: Cell<bool> = const { Cell::new(true) };
    /// Set while this thread records a call site (which allocates too).
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

/// With `ALLOC_TRACE=1`: each live counted allocation made while connections open, by
/// address, with its size and call site.
static TRACE: AtomicBool = AtomicBool::new(false);
static SITES: Mutex<Option<HashMap<usize, (usize, std::backtrace::Backtrace)>>> = Mutex::new(None);

/// The size of an allocation is charged to the thread that made it: counted is decided
/// there, and a free by another thread subtracts only what a counted thread added (the
/// low bit of the size class is not available, so a side table tells).
static OWNED: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

fn on_alloc(ptr: *mut u8, size: usize) {
    if ptr.is_null() || !COUNTED.with(Cell::get) || TRACING.with(Cell::get) {
        return;
    }
    TRACING.with(|t| t.set(true));
    LIVE.fetch_add(size as i64, Ordering::Relaxed);
    OWNED
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(ptr as usize, size);
    if TRACE.load(Ordering::Relaxed) {
        // Captured unresolved: resolving every one would take minutes.
        let site = std::backtrace::Backtrace::force_capture();
        SITES
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(ptr as usize, (size, site));
    }
    TRACING.with(|t| t.set(false));
}

fn on_free(ptr: *mut u8) {
    if TRACING.with(Cell::get) {
        return;
    }
    TRACING.with(|t| t.set(true));
    if let Some(size) = OWNED
        .lock()
        .unwrap()
        .as_mut()
        .and_then(|m| m.remove(&(ptr as usize)))
    {
        LIVE.fetch_sub(size as i64, Ordering::Relaxed);
    }
    if let Some(m) = SITES.lock().unwrap().as_mut() {
        m.remove(&(ptr as usize));
    }
    TRACING.with(|t| t.set(false));
}

/// The innermost source locations of `trace` outside the standard library, the allocator
/// glue and this file.
fn site(trace: &std::backtrace::Backtrace) -> String {
    let trace = trace.to_string();
    let frames: Vec<&str> = trace
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("at "))
        .filter(|f| !f.starts_with("/rustc/") && !f.contains("benches/idle_memory.rs"))
        .map(|f| f.rsplit_once("/src/").map_or(f, |(_, tail)| tail))
        .take(4)
        .collect();
    frames.join("\n      <- ")
}

// SAFETY: every call is passed on to the system allocator unchanged. The bookkeeping reads
// thread-local flags (const-initialised, no destructor) and updates side tables under
// mutexes; it allocates through this same allocator, kept from recursing by `TRACING`.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        on_alloc(p, layout.size());
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        on_alloc(p, layout.size());
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            on_free(ptr);
            on_alloc(p, new_size);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(ptr);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

fn conns() -> usize {
    std::env::var("CONNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

const REQUEST: &[u8] = b"GET /payments/u1/small.txt HTTP/1.1\r\nHost: store.internal\r\n\
X-Purpose: credit_scoring\r\n\r\n";

fn main() {
    COUNTED.with(|c| c.set(false));
    let dir = tempfile::tempdir().expect("temp dir");
    // A store answering `small\n`, as nginx serves `small.txt` in the memory benchmark, and
    // that benchmark's policy (`benches/memory/run.sh`).
    let upstream = common::start_upstream(Bytes::from_static(b"small\n"), || {
        COUNTED.with(|c| c.set(false))
    });
    let policy = common::write_load_setup(
        dir.path(),
        "idle-memory-bench",
        upstream,
        "header_read_timeout = \"300s\"\nmax_connections = 20000\n",
    );
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy_thread = std::thread::spawn(move || {
        COUNTED.with(|c| c.set(true));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_start(|| COUNTED.with(|c| c.set(true)))
            .build()
            .expect("runtime");
        rt.block_on(async move {
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
    // Warm: pools, caches, the log's buffers.
    drop(open(addr, 16, true));
    settle();

    let n = conns();
    println!("heap the proxy holds per idle keep-alive connection ({n} connections):");
    for (name, one_by_one) in [
        ("requests one connection after another", true),
        ("all requests in flight at once", false),
    ] {
        let before = LIVE.load(Ordering::Relaxed);
        TRACE.store(std::env::var_os("ALLOC_TRACE").is_some(), Ordering::Relaxed);
        let held = open(addr, n, one_by_one);
        settle();
        let after = LIVE.load(Ordering::Relaxed);
        TRACE.store(false, Ordering::Relaxed);
        println!(
            "  {name:<40} {:>8.1} KiB held in all, {:>6.0} bytes per connection",
            (after - before) as f64 / 1024.0,
            (after - before) as f64 / n as f64
        );
        let sites = SITES.lock().unwrap().take();
        if let Some(sites) = sites {
            report_sites(sites, n);
        }
        drop(held);
        settle();
    }
    let _ = stop_tx.send(());
    proxy_thread.join().expect("proxy thread");
}

/// Prints the bytes still held by allocation size, largest share first, with the call sites
/// of a few allocations of each size (resolved here, once the counting is over).
fn report_sites(sites: HashMap<usize, (usize, std::backtrace::Backtrace)>, n: usize) {
    TRACING.with(|t| t.set(true));
    let mut by_size: HashMap<usize, Vec<std::backtrace::Backtrace>> = HashMap::new();
    for (size, trace) in sites.into_values() {
        by_size.entry(size).or_default().push(trace);
    }
    let mut rows: Vec<_> = by_size.into_iter().collect();
    rows.sort_by_key(|(size, traces)| std::cmp::Reverse(size * traces.len()));
    for (size, traces) in rows.into_iter().take(20) {
        println!(
            "  {:>8.0} bytes/conn: {:>5.2} allocations/conn of {size} bytes",
            (size * traces.len()) as f64 / n as f64,
            traces.len() as f64 / n as f64
        );
        let mut seen = Vec::new();
        for t in traces.iter().take(3) {
            let s = site(t);
            if !seen.contains(&s) {
                println!("      {s}");
                seen.push(s);
            }
        }
    }
    TRACING.with(|t| t.set(false));
}

/// Lets the proxy's runtime finish what the last step started (responses written, closed
/// connections' tasks ended).
fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

/// Opens `n` connections from 127.0.0.1 (placed abroad, US), each sending one request whose
/// answer it reads whole; one at a time, or all sent before any answer is read.
fn open(addr: SocketAddr, n: usize, one_by_one: bool) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(REQUEST).expect("send");
        if one_by_one {
            read_answer(&mut s);
        }
        conns.push(s);
    }
    if !one_by_one {
        for s in &mut conns {
            read_answer(s);
        }
    }
    conns
}

/// Reads one response (its body is `small\n`) and checks it is a 200.
fn read_answer(s: &mut TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"small\n") {
        let k = s.read(&mut buf).expect("read");
        assert!(k > 0, "the proxy closed the connection");
        got.extend_from_slice(&buf[..k]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}
