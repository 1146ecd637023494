//! The consent registry at scale (issue 4), printed as a report:
//!
//! - decision latency with 1,000,000 consents in the index, median and tail of single
//!   decisions, through the proxy's own environment (staleness check included);
//! - memory per consent: resident set size before and after loading the index;
//! - start-up: the time to load 1,000,000 consents from SQLite, and from PostgreSQL when
//!   `RESIDENCY_TEST_POSTGRES` names a server (`.ci/postgres.sh` starts one).
//!
//! `cargo bench --bench registry`; `BENCH_CONSENTS=N` changes the number of consents.

mod common;

use common::{CONSENTS, DATASETS, consent, policy_text, request};
use http::{HeaderMap, HeaderValue, Method};
use residency_proxy::consent::change::Change;
use residency_proxy::consent::registry::Registry;
use residency_proxy::consent::{ConsentIndex, postgres, sqlite};
use residency_proxy::policy::compile::from_str;
use residency_proxy::policy::decide::decide;
use residency_proxy::policy::decision::Reason;
use residency_proxy::policy::model::ConsentStore;
use residency_proxy::proxy::snapshot::Snapshot;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Median, 99th and 99.9th percentile of `samples` (nanoseconds), sorted in place.
fn percentiles(samples: &mut [u32]) -> (u32, u32, u32) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99), at(0.999))
}

fn main() {
    let n: usize = std::env::var("BENCH_CONSENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CONSENTS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("consent registry benchmark: {n} consents, {DATASETS} datasets");

    // Memory: the index built one consent at a time, as a change feed would, so that no
    // batch of records is alive when the resident set is measured.
    let index = Arc::new(ConsentIndex::new());
    let before = rss();
    let started = Instant::now();
    for i in 0..n {
        index.upsert(&consent(i)).unwrap();
    }
    let built = started.elapsed();
    let after = rss();
    println!(
        "index: {n} consents in {:.2} s (upsert one by one); resident set {:.1} MiB -> {:.1} MiB: {:.0} bytes per consent",
        built.as_secs_f64(),
        mib(before),
        mib(after),
        (after - before) as f64 / n as f64
    );

    // Decision latency, through the proxy's environment with a tracked, fresh index.
    let policy = from_str("bench.toml", &policy_text()).expect("the bench policy compiles");
    index.freshness().track();
    index.freshness().confirm();
    let snap = rt
        .block_on(Snapshot::build(
            policy,
            None,
            index.clone(),
            &residency_proxy::metrics::Metrics::new(),
        ))
        .expect("the snapshot builds");
    let now = jiff::Timestamp::from_second(1_795_000_000)
        .unwrap()
        .as_microsecond();
    let env = snap.env(now, false, &[]);
    let mut headers = HeaderMap::new();
    headers.insert("x-purpose", HeaderValue::from_static("credit_scoring"));
    let get = Method::GET;
    let bureau = "127.0.0.20".parse().unwrap();
    // Even subjects hold a consent for the bureau, odd ones for another recipient.
    let paths: Vec<String> = (0..65_536usize)
        .map(|i| {
            format!(
                "/ds{}/u{}/2026-01.json",
                (i * 7919) % DATASETS,
                (i * 104_729 * 2) % n
            )
        })
        .collect();
    let refused: Vec<String> = paths.iter().map(|p| p.replacen("/u", "/x", 1)).collect();
    let p = &snap.policy;
    assert_eq!(
        decide(
            p,
            &env,
            &request(&get, &headers, &paths[1], bureau),
            &mut ()
        )
        .reason,
        Reason::Consented
    );
    assert_eq!(
        decide(
            p,
            &env,
            &request(&get, &headers, &refused[1], bureau),
            &mut ()
        )
        .reason,
        Reason::ConsentMissing
    );
    let rounds = 1_000_000usize;
    let mut clock = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        clock.push(t.elapsed().as_nanos() as u32);
    }
    let (clock_median, _, _) = percentiles(&mut clock);
    for (name, set) in [
        ("consented cross-border", &paths),
        ("refused, no consent", &refused),
    ] {
        // Warm up, then time each decision on its own.
        for path in set.iter().take(100_000) {
            black_box(decide(p, &env, &request(&get, &headers, path, bureau), &mut ()).reason);
        }
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let req = request(&get, &headers, &set[i & 65_535], bureau);
            let t = Instant::now();
            black_box(decide(p, &env, &req, &mut ()).reason);
            samples.push(t.elapsed().as_nanos() as u32);
        }
        let (p50, p99, p999) = percentiles(&mut samples);
        println!(
            "decide ({name}): median {p50} ns, p99 {p99} ns, p99.9 {p999} ns over {rounds} decisions (clock read included: median {clock_median} ns)"
        );
    }
    drop(snap);
    drop(index);

    // Start-up from SQLite: a database of n consents written through the import path, then
    // the feed's first load, which the proxy awaits before it listens.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consent.db");
    let store = ConsentStore::Sqlite(path.clone());
    let (imported, loaded) = rt.block_on(async {
        let registry = Registry::open(&store, true).await.unwrap();
        let started = Instant::now();
        import(&registry, n).await;
        let imported = started.elapsed();
        let index = Arc::new(ConsentIndex::new());
        let started = Instant::now();
        let feed = sqlite::start_feed(path.clone(), index.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        let loaded = started.elapsed();
        assert_eq!(index.len(), n);
        feed.abort();
        (imported, loaded)
    });
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "sqlite: import of {n} consents {:.1} s ({:.0} MiB file); start-up load {:.2} s",
        imported.as_secs_f64(),
        mib(size),
        loaded.as_secs_f64()
    );

    match std::env::var("RESIDENCY_TEST_POSTGRES") {
        Ok(server) if !server.is_empty() => rt.block_on(postgres_load(&server, n)),
        _ => println!("postgres: skipped (RESIDENCY_TEST_POSTGRES is not set)"),
    }
}

/// Writes consents `0..n` in import batches.
async fn import(registry: &Registry, n: usize) {
    let batch = residency_proxy::consent::registry::IMPORT_BATCH;
    for start in (0..n).step_by(batch) {
        let records = (start..(start + batch).min(n))
            .map(|i| (i + 1, Change::Record(consent(i))))
            .collect();
        let report = registry.import(records, "bench").await.unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
    }
}

async fn postgres_load(server: &str, n: usize) {
    let name = format!("rp_bench_{:08x}", fastrand::u32(..));
    let (admin, conn) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
    let registry = Registry::open(&ConsentStore::Postgres(url.clone()), true)
        .await
        .unwrap();
    let started = Instant::now();
    import(&registry, n).await;
    let imported = started.elapsed();
    let index = Arc::new(ConsentIndex::new());
    let started = Instant::now();
    let feed = postgres::start_feed(&url, index.clone(), Duration::from_secs(30), None)
        .await
        .unwrap();
    let loaded = started.elapsed();
    assert_eq!(index.len(), n);
    feed.abort();
    drop(registry);
    println!(
        "postgres: import of {n} consents {:.1} s; start-up load {:.2} s",
        imported.as_secs_f64(),
        loaded.as_secs_f64()
    );
    let _ = admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await;
}
