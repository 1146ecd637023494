//! Consents at scale (SPEC sections 4.1 and 9), in process, against PostgreSQL:
//!
//! - a fresh database holding N consents (`CONSENTS`, default 10,000,000), written with
//!   set-based SQL in chunks of a million rows (the change triggers fire once per statement);
//! - start-up: time from `start_feed` to a connected, listening feed (cache mode loads
//!   nothing);
//! - a miss: `Loader::fill` of random uncached subjects, one at a time and 16 at once;
//! - a cached subject: `decide()` through the proxy's own environment, timed in batches of
//!   1,000 decisions, for subjects drawn uniformly and by Zipf(1.1) over all N;
//! - the hit rate of the default 64 MiB cache under each distribution, the cache's bytes
//!   and the process's resident set;
//! - a revocation through `Registry::revoke` seen by two caches, each with its own feed.
//!
//! `RESIDENCY_TEST_POSTGRES` names the server (`.ci/postgres.sh` starts one); the bench says
//! so and stops when it is unset. `CONSENT_SCALE_DB=name` uses (and fills if empty) that
//! database instead of a fresh one, and keeps it; otherwise the fresh database is dropped
//! at the end. `benches/consent_scale/run.sh` runs this, then two real sidecars.

mod common;

use common::request;
use http::{HeaderMap, HeaderValue, Method};
use residency_proxy::consent::ConsentIndex;
use residency_proxy::consent::cache::{Loader, POOL_SIZE, Reader};
use residency_proxy::consent::change::{Filter, Revocation};
use residency_proxy::consent::index::{Fill, Lookup};
use residency_proxy::consent::postgres::{self, PgReader};
use residency_proxy::consent::record::ConsentRecord;
use residency_proxy::consent::registry::Registry;
use residency_proxy::policy::compile::from_str;
use residency_proxy::policy::decide::decide;
use residency_proxy::policy::decision::Reason;
use residency_proxy::policy::model::ConsentStore;
use residency_proxy::proxy::snapshot::Snapshot;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The default `[consent] cache_max_bytes`.
const BUDGET: usize = 64 << 20;
/// Rows per generating statement.
const CHUNK: i64 = 1_000_000;
/// The Zipf exponent of the skewed load.
const ZIPF_S: f64 = 1.1;
/// Misses timed per mode.
const MISSES: usize = 20_000;
/// Revocations timed.
const REVOCATIONS: usize = 20;

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// The value at quantile `q` of sorted `v`.
fn at<T: Copy>(v: &[T], q: f64) -> T {
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// Subjects drawn from `0..n`: uniformly, or by Zipf with exponent `ZIPF_S` (rank r has
/// weight r^-s), sampled by inverting the continuous approximation of its distribution
/// function; ranks are scattered over the subjects by a multiplication modulo n, so that
/// the popular subjects are not neighbours.
#[derive(Clone, Copy)]
enum Dist {
    Uniform,
    Zipf,
}

impl Dist {
    fn name(self) -> &'static str {
        match self {
            Dist::Uniform => "uniform",
            Dist::Zipf => "zipf(1.1)",
        }
    }

    fn sampler(self, n: u64, seed: u64) -> impl FnMut() -> u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let one_minus_s = 1.0 - ZIPF_S;
        let h_max = ((n as f64 + 1.0).powf(one_minus_s) - 1.0) / one_minus_s;
        // An odd multiplier not divisible by 5, coprime to n for n = 10^k (and most others).
        let spread: u64 = (2_654_435_761 % n.max(2)) | 1;
        move || match self {
            Dist::Uniform => rng.u64(..n),
            Dist::Zipf => {
                let u = rng.f64() * h_max;
                let x = (1.0 + u * one_minus_s).powf(1.0 / one_minus_s);
                let rank = (x as u64).clamp(1, n) - 1;
                ((rank as u128 * spread as u128) % n as u128) as u64
            }
        }
    }
}

/// The record the database holds for subject `u{i}` (as generated below).
fn record(i: u64) -> ConsentRecord {
    ConsentRecord {
        id: format!("c{i}"),
        subject: format!("u{i}"),
        recipient: "bureau".into(),
        purposes: vec!["credit_scoring".into()],
        categories: vec!["user.financial".into()],
        destinations: vec!["US".into()],
        method: "explicit".into(),
        granted_at: "2026-01-01T00:00:00Z".parse().unwrap(),
        expires_at: "2036-01-01T00:00:00Z".parse().unwrap(),
        revoked_at: None,
        evidence: None,
    }
}

/// The cache's own fill, with the answer the store would give (`record`) instead of a
/// query: for hit rates over millions of requests, which depend on the cache, not on
/// where a fill's answer comes from.
fn fill_locally(index: &ConsentIndex, i: u64) {
    let subject = format!("u{i}");
    if let Fill::Lead(p) = index.begin_fill(&subject) {
        index.finish_fill(&subject, &p, Ok(vec![record(i)]));
    }
}

struct Db {
    admin: tokio_postgres::Client,
    server: String,
    name: String,
    url: String,
    keep: bool,
}

async fn open_db(server: &str) -> Db {
    let (admin, conn) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .expect("RESIDENCY_TEST_POSTGRES reachable");
    tokio::spawn(conn);
    let (name, keep) = match std::env::var("CONSENT_SCALE_DB") {
        Ok(n) if !n.is_empty() => (n, true),
        _ => (format!("rp_consent_scale_{:08x}", fastrand::u32(..)), false),
    };
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
    let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
    Db {
        admin,
        server: server.into(),
        name,
        url,
        keep,
    }
}

/// Creates the schema and writes consents `u0..u{n-1}` unless the database holds them.
async fn generate(db: &Db, n: u64) {
    let registry = Registry::open(&ConsentStore::Postgres(db.url.clone()), true)
        .await
        .unwrap();
    registry.list(Filter::Id("none")).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let held: i64 = client
        .query_one("SELECT count(*) FROM consents", &[])
        .await
        .unwrap()
        .get(0);
    if held as u64 == n {
        println!("database {}: {n} consents already there", db.name);
        return tidy(&client).await;
    }
    assert_eq!(
        held, 0,
        "database {} holds {held} consents, not {n}",
        db.name
    );
    let started = Instant::now();
    let mut from = 0i64;
    while (from as u64) < n {
        let to = (from + CHUNK).min(n as i64) - 1;
        let t = Instant::now();
        client
            .execute(
                "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, \
                                       method, granted_at, expires_at) \
                 SELECT 'c' || i, 'u' || i, 'bureau', ARRAY['credit_scoring'], \
                        ARRAY['user.financial'], ARRAY['US'], 'explicit', \
                        '2026-01-01T00:00:00Z', '2036-01-01T00:00:00Z' \
                 FROM generate_series($1::int8, $2::int8) AS i",
                &[&from, &to],
            )
            .await
            .unwrap();
        println!(
            "  generated u{from}..u{to} in {:.1} s ({:.0} s so far)",
            t.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        from = to + 1;
    }
    tidy(&client).await;
    println!(
        "database {}: {n} consents generated in {:.1} s ({:.0} per second)",
        db.name,
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
}

/// The change table keeps the latest changes only; the registry's writes trim it, and the
/// first revocation would otherwise pay for trimming the whole generation. Then statistics
/// for the planner, as autovacuum would gather them in time.
async fn tidy(client: &tokio_postgres::Client) {
    client
        .execute(
            "DELETE FROM consent_changes WHERE seq <= (SELECT max(seq) FROM consent_changes) - $1",
            &[&postgres::CHANGES_KEPT],
        )
        .await
        .unwrap();
    for table in ["consents", "consent_changes"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .unwrap();
    }
}

/// Rows of the report: (what, measured, target, met).
type Rows = Vec<(String, String, String, Option<bool>)>;

fn row(rows: &mut Rows, what: impl Into<String>, value: String, target: &str, met: Option<bool>) {
    let what = what.into();
    println!("  {what}: {value}");
    rows.push((what, value, target.into(), met));
}

fn main() {
    let n: u64 = std::env::var("CONSENTS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(10_000_000);
    let Some(server) = std::env::var("RESIDENCY_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        println!(
            "consent_scale: skipped (RESIDENCY_TEST_POSTGRES is not set; `source .ci/postgres.sh && postgres_start`)"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "consent_scale: {n} consents in PostgreSQL, cache budget {} MiB",
        BUDGET >> 20
    );
    let db = rt.block_on(open_db(&server));
    rt.block_on(generate(&db, n));
    let mut rows = Rows::new();
    rt.block_on(measure_store(&db, n, &mut rows));
    measure_cached(n, &mut rows);
    rt.block_on(measure_revocation(&db, n, &mut rows));
    let (rss, hwm) = (rss_kib("VmRSS:"), rss_kib("VmHWM:"));
    row(
        &mut rows,
        "bench process resident set at the end (peak)",
        format!(
            "{:.1} MiB ({:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        ),
        "-",
        None,
    );

    println!();
    println!("| measure | value | target | met |");
    println!("|---|---|---|---|");
    for (what, value, target, met) in &rows {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("| {what} | {value} | {target} | {met} |");
    }
    println!();
    if db.keep {
        println!("database kept: {} ({})", db.name, db.url);
    } else {
        rt.block_on(async {
            let _ = db
                .admin
                .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", db.name))
                .await;
        });
        println!(
            "database {} dropped (server {})",
            db.name,
            redacted(&db.server)
        );
    }
}

fn redacted(url: &str) -> String {
    residency_proxy::consent::postgres::redact(url)
}

/// Start-up and misses, against the database.
async fn measure_store(db: &Db, n: u64, rows: &mut Rows) {
    // Start-up: what the proxy awaits before it listens.
    let mut ready = Vec::new();
    for _ in 0..5 {
        let index = Arc::new(ConsentIndex::cache(BUDGET));
        let t = Instant::now();
        let feed = postgres::start_feed(&db.url, index.clone(), Duration::from_secs(30), None)
            .await
            .unwrap();
        ready.push(t.elapsed());
        assert!(!index.freshness().is_stale(Duration::from_secs(30)));
        feed.abort();
    }
    ready.sort();
    row(
        rows,
        "start_feed to ready (connected, LISTEN; 5 starts: median / max)",
        format!(
            "{:.1} ms / {:.1} ms",
            at(&ready, 0.5).as_secs_f64() * 1e3,
            ready.last().unwrap().as_secs_f64() * 1e3
        ),
        "< 1 s",
        Some(*ready.last().unwrap() < Duration::from_secs(1)),
    );

    // Misses: each a subject not cached yet, filled by one point query.
    let index = Arc::new(ConsentIndex::cache(BUDGET));
    let feed = postgres::start_feed(&db.url, index.clone(), Duration::from_secs(30), None)
        .await
        .unwrap();
    let reader = PgReader::new(&db.url, None, POOL_SIZE).unwrap();
    let loader = Arc::new(Loader::new(
        index.clone(),
        Reader::Postgres(Box::new(reader)),
        Duration::from_millis(200),
    ));
    // Open the pool's connections (and prepare their statements) first.
    for i in 0..8 {
        loader.fill(&format!("u{i}")).await.unwrap();
    }
    let mut next = Dist::Uniform.sampler(n, 1);
    let mut seq = Vec::with_capacity(MISSES);
    let mut failed = 0;
    while seq.len() < MISSES {
        let s = format!("u{}", next());
        if index.is_cached(&s) {
            continue;
        }
        let t = Instant::now();
        match loader.fill(&s).await {
            Ok(()) => seq.push(t.elapsed()),
            Err(_) => failed += 1,
        }
    }
    let found = index.lookup(
        "u3",
        true,
        |l| matches!(l, Lookup::Found(c) if c.len() == 1),
    );
    assert!(found, "a filled subject holds its consent");
    miss_rows(rows, "miss, 1 at a time", &mut seq, failed);

    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let (loader, index) = (loader.clone(), index.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = Dist::Uniform.sampler(n, 100 + t);
            let (mut times, mut failed) = (Vec::with_capacity(MISSES / 16), 0);
            while times.len() < MISSES / 16 {
                let s = format!("u{}", next());
                if index.is_cached(&s) {
                    continue;
                }
                let t = Instant::now();
                match loader.fill(&s).await {
                    Ok(()) => times.push(t.elapsed()),
                    Err(_) => failed += 1,
                }
            }
            (times, failed)
        }));
    }
    let started = Instant::now();
    let (mut conc, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (times, f) = t.await.unwrap();
        conc.extend(times);
        failed += f;
    }
    let rate = conc.len() as f64 / started.elapsed().as_secs_f64();
    miss_rows(
        rows,
        &format!("miss, 16 at once ({rate:.0} fills/s)"),
        &mut conc,
        failed,
    );
    let stats = index.stats();
    let bytes = stats.bytes.load(Ordering::Relaxed);
    row(
        rows,
        "cache after the misses: subjects, bytes per subject",
        format!(
            "{} subjects, {:.0} bytes each",
            index.subjects(),
            bytes as f64 / index.subjects() as f64
        ),
        "-",
        None,
    );
    feed.abort();
}

fn miss_rows(rows: &mut Rows, what: &str, times: &mut [Duration], failed: usize) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p99 = at(times, 0.99);
    row(
        rows,
        format!(
            "{what}: p50 / p99 / max ({} fills, {failed} failed)",
            times.len()
        ),
        format!(
            "{:.3} / {:.3} / {:.3} ms",
            ms(at(times, 0.5)),
            ms(p99),
            ms(*times.last().unwrap())
        ),
        "p99 < 2 ms",
        Some(p99 < Duration::from_millis(2) && failed == 0),
    );
}

/// Hit rates and decisions on cached subjects, per distribution, each on a fresh cache of
/// the default budget (fills answered locally, see [`fill_locally`]).
fn measure_cached(n: u64, rows: &mut Rows) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-purpose", HeaderValue::from_static("credit_scoring"));
    let get = Method::GET;
    let bureau: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let now = jiff::Timestamp::from_second(1_795_000_000)
        .unwrap()
        .as_microsecond();
    let requests: u64 = (4 * n).clamp(2_000_000, 20_000_000);
    for dist in [Dist::Uniform, Dist::Zipf] {
        let index = Arc::new(ConsentIndex::cache(BUDGET));
        index.freshness().track();
        index.freshness().confirm();
        // Warm up with as many requests as are measured, then count.
        let mut next = dist.sampler(n, 7);
        for _ in 0..requests {
            let i = next();
            if !index.is_cached(&format!("u{i}")) {
                fill_locally(&index, i);
            }
        }
        let stats = index.stats();
        let (h0, m0) = (
            stats.hits.load(Ordering::Relaxed),
            stats.misses.load(Ordering::Relaxed),
        );
        for _ in 0..requests {
            let i = next();
            let subject = format!("u{i}");
            if index.lookup(&subject, true, |l| matches!(l, Lookup::Miss)) {
                fill_locally(&index, i);
            }
        }
        let (hits, misses) = (
            stats.hits.load(Ordering::Relaxed) - h0,
            stats.misses.load(Ordering::Relaxed) - m0,
        );
        let rate = hits as f64 / (hits + misses) as f64;
        let bytes = stats.bytes.load(Ordering::Relaxed);
        row(
            rows,
            format!("{}: cache hit rate over {requests} requests", dist.name()),
            format!(
                "{:.1} % ({} subjects cached, {:.1} MiB by the budget's count, {} evictions)",
                rate * 100.0,
                index.subjects(),
                mib(bytes as f64),
                stats.evictions.load(Ordering::Relaxed)
            ),
            "-",
            None,
        );

        // Decisions on cached subjects: drawn from the distribution, kept if cached.
        let paths: Vec<String> = {
            let mut v = Vec::with_capacity(65_536);
            while v.len() < 65_536 {
                let i = next();
                if index.is_cached(&format!("u{i}")) {
                    v.push(format!("/payments/u{i}/2026-01.json"));
                }
            }
            v
        };
        let snap = rt
            .block_on(Snapshot::build(
                from_str(
                    "consent-scale.toml",
                    &common::load_policy(
                        "consent-scale",
                        "127.0.0.2:9000",
                        "[log]\npseudonymize = false\n",
                    ),
                )
                .expect("the bench policy compiles"),
                None,
                index.clone(),
                &residency_proxy::metrics::Metrics::new(),
            ))
            .expect("the snapshot builds");
        let p = &snap.policy;
        index.freshness().confirm();
        for path in &paths {
            let env = snap.env(now, true, &[]);
            let d = decide(p, &env, &request(&get, &headers, path, bureau), &mut ());
            assert!(env.take_missed().is_empty(), "{path} is cached");
            assert_eq!(d.reason, Reason::Consented, "{path}");
        }
        let mut per_decision = Vec::with_capacity(4000);
        let mut k = 0usize;
        for _ in 0..4000 {
            index.freshness().confirm();
            let t = Instant::now();
            for _ in 0..1000 {
                let env = snap.env(now, true, &[]);
                let req = request(&get, &headers, &paths[k & 65_535], bureau);
                black_box(decide(p, &env, &req, &mut ()).reason);
                k += 1;
            }
            per_decision.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
        per_decision.sort_by(f64::total_cmp);
        let median = at(&per_decision, 0.5);
        row(
            rows,
            format!(
                "{}: decide() on a cached subject, median of 4,000 batches of 1,000 (p99 batch)",
                dist.name()
            ),
            format!("{median:.0} ns ({:.0} ns)", at(&per_decision, 0.99)),
            "< 1 µs median",
            Some(median < 1000.0),
        );
        drop(snap);
        if matches!(dist, Dist::Zipf) {
            row(
                rows,
                "zipf(1.1): resident set with the full cache held",
                format!("{:.1} MiB", rss_kib("VmRSS:") as f64 / 1024.0),
                "-",
                None,
            );
        }
    }
}

/// A revocation made through the registry, seen by two caches with their own feeds.
async fn measure_revocation(db: &Db, n: u64, rows: &mut Rows) {
    let registry = Registry::open(&ConsentStore::Postgres(db.url.clone()), false)
        .await
        .unwrap();
    let mut sidecars = Vec::new();
    for _ in 0..2 {
        let index = Arc::new(ConsentIndex::cache(BUDGET));
        let feed = postgres::start_feed(&db.url, index.clone(), Duration::from_secs(30), None)
            .await
            .unwrap();
        let loader = Loader::new(
            index.clone(),
            Reader::Postgres(Box::new(PgReader::new(&db.url, None, POOL_SIZE).unwrap())),
            Duration::from_millis(200),
        );
        sidecars.push((index, loader, feed));
    }
    let refused = |index: &ConsentIndex, s: &str| {
        index.lookup(s, true, |l| match l {
            Lookup::Found(c) => c.iter().all(|c| c.revoked_at.is_some()),
            Lookup::NotFound | Lookup::Miss => true,
        })
    };
    let (mut since_call, mut since_commit) = (Vec::new(), Vec::new());
    let mut next = Dist::Uniform.sampler(n, 99);
    let mut done = std::collections::HashSet::new();
    while since_call.len() < REVOCATIONS {
        let i = next();
        if !done.insert(i) {
            continue;
        }
        let s = format!("u{i}");
        for (index, loader, _) in &sidecars {
            loader.fill(&s).await.unwrap();
            assert!(!refused(index, &s), "{s} is granted before its revocation");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        registry
            .revoke(
                Revocation {
                    consent_id: format!("c{i}"),
                    revoked_at: jiff::Timestamp::now(),
                    evidence: None,
                },
                "consent_scale bench",
            )
            .await
            .unwrap()
            .unwrap();
        let committed = t.elapsed();
        loop {
            if sidecars.iter().all(|(index, _, _)| refused(index, &s)) {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                panic!("{s}: not refused 10 s after its revocation");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let seen = t.elapsed();
        since_call.push(seen);
        since_commit.push(seen.saturating_sub(committed));
    }
    since_call.sort();
    since_commit.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let max = *since_call.last().unwrap();
    row(
        rows,
        format!(
            "revocation refused by both caches, from the revoke call: median / max ({REVOCATIONS} revocations)"
        ),
        format!("{:.1} / {:.1} ms", ms(at(&since_call, 0.5)), ms(max)),
        "< 1 s",
        Some(max < Duration::from_secs(1)),
    );
    row(
        rows,
        "  the same, from the revoke's commit (call returned): median / max",
        format!(
            "{:.1} / {:.1} ms",
            ms(at(&since_commit, 0.5)),
            ms(*since_commit.last().unwrap())
        ),
        "-",
        None,
    );
    for (_, _, feed) in sidecars {
        feed.abort();
    }
}
