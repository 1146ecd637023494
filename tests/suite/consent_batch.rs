//! Batched consent lookups (`Loader::fill_many`) against real stores: the misses of a batch of
//! records filled by a query for many subjects (a large batch split across the pooled
//! connections, one query each, at once), over SQLite and PostgreSQL
//! (`RESIDENCY_TEST_POSTGRES`; without it those tests say they are skipped). Queries are
//! counted by the histograms the loader observes once per query.

use crate::support::registry::{
    Relay, address_of, consent_body, fresh_database, pg_connect, postgres_url, with_address,
};
use compact_str::CompactString;
use residency_proxy::consent::ConsentIndex;
use residency_proxy::consent::ConsentRecord;
use residency_proxy::consent::cache::{Loader, LookupError, POOL_SIZE, Reader};
use residency_proxy::consent::change::{Change, Revocation};
use residency_proxy::consent::index::Lookup;
use residency_proxy::consent::postgres::{self, PgReader};
use residency_proxy::consent::registry::Registry;
use residency_proxy::consent::sqlite::SqliteReader;
use residency_proxy::policy::model::ConsentStore;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Subjects in a batch, as a bulk object's records name them.
const SUBJECTS: usize = 5000;
const CACHE_BYTES: usize = 64 << 20;
/// Queries for a batch of `SUBJECTS` misses: one per pooled connection (a part holds at least
/// 512 subjects, so 5,000 fill every connection).
const QUERIES: usize = POOL_SIZE;

fn record(id: &str, subject: &str) -> ConsentRecord {
    serde_json::from_value(consent_body(id, subject)).unwrap()
}

/// The `i`th subject of the batch: a few carry characters that quoting must survive.
fn subject(i: usize) -> String {
    match i {
        7 => "s-7 'quoted' \"twice\"".into(),
        11 => "s-11 ünïcödé, {braces}".into(),
        _ => format!("s-{i}"),
    }
}

/// What the registry holds for subject `i`: (consent id, revoked), by `i % 4`: one consent;
/// one revoked; none; two, the second revoked.
fn expected(i: usize) -> Vec<(String, bool)> {
    match i % 4 {
        0 => vec![(format!("c-{i}"), false)],
        1 => vec![(format!("c-{i}"), true)],
        2 => vec![],
        _ => vec![(format!("c-{i}-a"), false), (format!("c-{i}-b"), true)],
    }
}

/// Writes the batch's consents (see [`expected`]) and one of a subject outside the batch.
async fn populate(registry: &Registry) {
    let revoke = |id: String| {
        Change::Revoke(Revocation {
            consent_id: id,
            revoked_at: "2026-06-01T00:00:00Z".parse().unwrap(),
            evidence: None,
        })
    };
    let mut grants = vec![Change::Record(record("c-outside", "outside"))];
    let mut revocations = Vec::new();
    for i in 0..SUBJECTS {
        for (id, revoked) in expected(i) {
            grants.push(Change::Record(record(&id, &subject(i))));
            if revoked {
                revocations.push(revoke(id));
            }
        }
    }
    for chunk in grants.chunks(1000).chain(revocations.chunks(1000)) {
        for r in registry.write(chunk.to_vec(), "test").await.unwrap() {
            r.unwrap();
        }
    }
}

fn batch() -> Vec<CompactString> {
    (0..SUBJECTS).map(|i| subject(i).into()).collect()
}

/// What the cache holds of `subject`: its consents (id, revoked), or `None` for a miss.
fn cached(index: &ConsentIndex, subject: &str) -> Option<Vec<(String, bool)>> {
    index.lookup(subject, false, |l| match l {
        Lookup::Found(cs) => {
            let mut v: Vec<(String, bool)> = cs
                .iter()
                .map(|c| (c.id.to_string(), c.revoked_at.is_some()))
                .collect();
            v.sort();
            Some(v)
        }
        Lookup::NotFound => Some(vec![]),
        Lookup::Miss => None,
    })
}

fn loader(reader: Reader, timeout: Duration) -> Loader {
    Loader::new(Arc::new(ConsentIndex::cache(CACHE_BYTES)), reader, timeout)
}

/// Fills the batch through `reader` and checks, entry by entry, that the cache holds exactly
/// the registry's answer after one query; then that single fills (a second reader of the
/// same store) hold the same entries.
async fn one_query_fills_the_batch(reader: Reader, single: Reader) {
    let l = loader(reader, Duration::from_secs(10));
    l.fill_many(&batch()).await.unwrap();
    assert_eq!(
        l.batch_time.count(),
        QUERIES as u64,
        "one query per pooled connection for {SUBJECTS} subjects"
    );
    assert_eq!(l.miss_time.count(), 0, "no query of one subject");
    for i in 0..SUBJECTS {
        let s = subject(i);
        assert_eq!(cached(l.index(), &s), Some(expected(i)), "subject {s:?}");
    }
    assert_eq!(cached(l.index(), "outside"), None, "only what was asked");
    assert_eq!(l.index().subjects(), SUBJECTS);

    // Filled again: all cached, no query.
    l.fill_many(&batch()).await.unwrap();
    assert_eq!(l.batch_time.count(), QUERIES as u64);

    // The same entries, consent for consent, as one subject's query fills.
    let one = loader(single, Duration::from_secs(10));
    for i in (0..SUBJECTS).step_by(37).chain([7, 11]) {
        let s = subject(i);
        one.fill(&s).await.unwrap();
        let (a, b) = (l.index().get(&s), one.index().get(&s));
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "subject {s:?}");
    }
}

/// Polls `f` once: a batch's first poll leads its subjects' fills and sends the query.
async fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    let mut f = Some(f);
    std::future::poll_fn(move |cx| Poll::Ready(f.take().unwrap().poll(cx))).await
}

/// A batch under way is joined, not asked again, by a request's fill of one of its subjects
/// and by another batch overlapping it.
async fn concurrent_fills_share_the_query(reader: Reader) {
    let l = loader(reader, Duration::from_secs(10));
    let all = batch();
    let mut many = std::pin::pin!(l.fill_many(&all));
    let first = poll_once(many.as_mut()).await;
    assert!(first.is_pending(), "the batch's query is under way");
    let four = subject(4);
    let (many, one, overlap) = tokio::join!(many, l.fill(&four), l.fill_many(&all[..100]));
    many.unwrap();
    one.unwrap();
    overlap.unwrap();
    assert_eq!(
        l.batch_time.count(),
        QUERIES as u64,
        "the batch's queries only"
    );
    assert_eq!(l.miss_time.count(), 0, "the single fill joined the batch");
    assert_eq!(cached(l.index(), &subject(4)), Some(expected(4)));
}

async fn sqlite_store() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consent.db");
    let registry = Registry::open(&ConsentStore::Sqlite(path.clone()), true)
        .await
        .unwrap();
    populate(&registry).await;
    (dir, path)
}

async fn postgres_store(test: &str) -> Option<String> {
    let server = postgres_url(test)?;
    let url = fresh_database(&server).await;
    let registry = Registry::open(&ConsentStore::Postgres(url.clone()), true)
        .await
        .unwrap();
    populate(&registry).await;
    Some(url)
}

fn sqlite_reader(path: &std::path::Path) -> Reader {
    Reader::Sqlite(SqliteReader::new(path.into(), POOL_SIZE))
}

fn pg_reader(url: &str) -> Reader {
    Reader::Postgres(Box::new(PgReader::new(url, None, POOL_SIZE).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_subjects_is_filled_by_one_sqlite_query() {
    let (_dir, path) = sqlite_store().await;
    one_query_fills_the_batch(sqlite_reader(&path), sqlite_reader(&path)).await;
    concurrent_fills_share_the_query(sqlite_reader(&path)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_subjects_is_filled_by_one_postgres_query() {
    let Some(url) = postgres_store("a_batch_of_subjects_is_filled_by_one_postgres_query").await
    else {
        return;
    };
    one_query_fills_the_batch(pg_reader(&url), pg_reader(&url)).await;
    concurrent_fills_share_the_query(pg_reader(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_sqlite_store_cannot_answer_fails_whole() {
    let (dir, path) = sqlite_store().await;
    let l = loader(sqlite_reader(&path), Duration::from_millis(500));
    l.fill_many(&batch()[..10]).await.unwrap();
    std::fs::rename(&path, dir.path().join("moved.db")).unwrap();
    let e = l.fill_many(&batch()).await.unwrap_err();
    assert!(matches!(e, LookupError::Store(_)), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    // Nothing of the failed batch is cached: each reads as a miss, refused by the caller.
    assert_eq!(cached(l.index(), &subject(20)), None);
    assert!(l.failing(Duration::from_secs(60)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_through_a_cut_connection_fails_within_the_lookup_timeout() {
    let Some(url) = postgres_store("a_batch_through_a_cut_connection_fails").await else {
        return;
    };
    let relay = Relay::start(address_of(&url)).await;
    let timeout = Duration::from_millis(500);
    let l = loader(pg_reader(&with_address(&url, relay.addr)), timeout);
    l.fill_many(&batch()[..10]).await.unwrap();
    relay.cut();
    let started = Instant::now();
    let e = l.fill_many(&batch()).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        took < timeout + Duration::from_secs(1),
        "failed after {took:?}: {e}"
    );
    assert_eq!(cached(l.index(), &subject(20)), None);
    assert!(l.failing(Duration::from_secs(60)).is_some());
    // Reachable again, the next batch is answered.
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.fill_many(&batch()).await.is_err() {
        assert!(Instant::now() < deadline, "never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cached(l.index(), &subject(20)), Some(expected(20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_store_holds_back_times_out_and_fills_the_cache_later() {
    let Some(url) = postgres_store("a_batch_the_store_holds_back_times_out").await else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let l = loader(pg_reader(&url), timeout);
    l.fill_many(&batch()[..10]).await.unwrap();
    // Another session holds the table: the batch's query waits for it.
    let mut holder = pg_connect(&url).await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE consents IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = Instant::now();
    let e = l.fill_many(&batch()).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, LookupError::Timeout(_)), "{e}");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(1),
        "timed out after {took:?}"
    );
    assert_eq!(cached(l.index(), &subject(20)), None);
    // The query goes on: once the table is free it fills the cache for later batches.
    tx.commit().await.unwrap();
    crate::support::wait_until("the held-back query to fill the cache", || {
        cached(l.index(), &subject(SUBJECTS - 1)).is_some()
    })
    .await;
    l.fill_many(&batch()).await.unwrap();
    assert_eq!(
        l.batch_time.count(),
        1 + QUERIES as u64,
        "the held-back queries were the last ones"
    );
    assert_eq!(cached(l.index(), &subject(20)), Some(expected(20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reads_the_replica_except_for_subjects_it_has_not_caught_up_on() {
    let Some(server) = postgres_url("a_batch_reads_the_replica_except_for_subjects") else {
        return;
    };
    // Two databases stand for a primary and its replica: what each holds tells which one
    // answered for a subject.
    let primary = fresh_database(&server).await;
    let replica = fresh_database(&server).await;
    for url in [&primary, &replica] {
        Registry::open(&ConsentStore::Postgres(url.clone()), true)
            .await
            .unwrap()
            .list(residency_proxy::consent::change::Filter::All)
            .await
            .unwrap();
    }
    let on_replica = Registry::open(&ConsentStore::Postgres(replica.clone()), true)
        .await
        .unwrap();
    // Only the replica holds u1's consent, and u2's unrevoked (behind the primary).
    on_replica
        .write(
            vec![
                Change::Record(record("c-1", "u1")),
                Change::Record(record("c-2", "u2")),
            ],
            "test",
        )
        .await
        .unwrap();
    let reader = PgReader::new(&primary, Some(&replica), POOL_SIZE).unwrap();
    let index = Arc::new(ConsentIndex::cache(CACHE_BYTES));
    let feed = postgres::start_feed(
        &primary,
        index.clone(),
        Duration::from_secs(5),
        reader.recent(),
    )
    .await
    .unwrap();
    let l = Loader::new(
        index.clone(),
        Reader::Postgres(Box::new(reader)),
        Duration::from_secs(5),
    );
    // On the primary, u2's consent is granted and revoked after the feed started, after
    // changes the replica has not replayed either.
    let on_primary = Registry::open(&ConsentStore::Postgres(primary.clone()), true)
        .await
        .unwrap();
    on_primary
        .write(
            vec![
                Change::Record(record("c-8", "u8")),
                Change::Record(record("c-9", "u9")),
                Change::Record(record("c-2", "u2")),
            ],
            "test",
        )
        .await
        .unwrap();
    on_primary
        .revoke(
            Revocation {
                consent_id: "c-2".into(),
                revoked_at: "2026-06-01T00:00:00Z".parse().unwrap(),
                evidence: None,
            },
            "test",
        )
        .await
        .unwrap()
        .unwrap();
    let subjects: Vec<CompactString> = ["u1", "u2", "u3"].map(Into::into).to_vec();
    // Until the feed has read u2's change, the replica may answer for it; from then on, u2
    // is read from the primary while u1 and u3 still come from the replica.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for s in &subjects {
            index.invalidate(s);
        }
        l.fill_many(&subjects).await.unwrap();
        if cached(&index, "u2") == Some(vec![("c-2".into(), true)]) {
            break;
        }
        assert!(Instant::now() < deadline, "u2 never read from the primary");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        cached(&index, "u1"),
        Some(vec![("c-1".into(), false)]),
        "from the replica"
    );
    assert_eq!(cached(&index, "u3"), Some(vec![]));
    feed.abort();
}

/// Measures `fill_many` of 4,096 uncached subjects from PostgreSQL holding 1,000,000
/// consents (one per subject), against the same subjects filled one query each. A
/// measurement, not a check: `cargo test --release --test suite fill_many_of_4096 --
/// --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: loads a million consents"]
async fn fill_many_of_4096_uncached_subjects_among_a_million_consents() {
    let Some(server) = postgres_url("fill_many_of_4096_uncached_subjects") else {
        return;
    };
    let url = fresh_database(&server).await;
    Registry::open(&ConsentStore::Postgres(url.clone()), true)
        .await
        .unwrap()
        .list(residency_proxy::consent::change::Filter::Id("none"))
        .await
        .unwrap();
    let db = pg_connect(&url).await;
    let started = Instant::now();
    db.batch_execute(
        "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at) \
         SELECT 'c-' || i, 'u-' || i, 'credit-bureau-us', '{credit_scoring}', '{user.financial}', '{US}', 'explicit', \
                '2026-01-01T00:00:00Z', '2099-01-01T00:00:00Z' FROM generate_series(0, 999999) AS i",
    )
    .await
    .unwrap();
    // As a registry in service is: vacuumed, its pages' hint bits set.
    db.batch_execute("VACUUM ANALYZE consents").await.unwrap();
    println!("loaded 1,000,000 consents in {:?}", started.elapsed());
    let l = loader(pg_reader(&url), Duration::from_secs(10));
    // Connections opened and statements prepared before anything is timed.
    l.fill_many(&["warm-up".into()]).await.unwrap();
    l.fill("warm-up-2").await.unwrap();
    // Distinct subjects, none asked before: every one a miss.
    let mut rng = fastrand::Rng::with_seed(7);
    let mut asked = std::collections::HashSet::new();
    let mut picks = |n: usize| -> Vec<CompactString> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let i = rng.u32(0..1_000_000);
            if asked.insert(i) {
                out.push(format!("u-{i}").into());
            }
        }
        out
    };
    let mut batched = Vec::new();
    for _ in 0..5 {
        let subjects = picks(4096);
        let t = Instant::now();
        l.fill_many(&subjects).await.unwrap();
        batched.push(t.elapsed());
    }
    // The query alone (sent, answered, its rows decoded), without filling the cache.
    let reader = PgReader::new(&url, None, POOL_SIZE).unwrap();
    reader.subjects(&["warm-up"]).await.unwrap();
    let mut query = Vec::new();
    for _ in 0..5 {
        let subjects = picks(4096);
        let subjects: Vec<&str> = subjects.iter().map(CompactString::as_str).collect();
        let t = Instant::now();
        let found = reader.subjects(&subjects).await.unwrap();
        query.push(t.elapsed());
        assert_eq!(found.len(), subjects.len());
    }
    let mut single = Vec::new();
    for _ in 0..3 {
        let subjects = picks(4096);
        let t = Instant::now();
        let fills = subjects.iter().map(|s| l.fill(s));
        for r in futures_util::future::join_all(fills).await {
            r.unwrap();
        }
        single.push(t.elapsed());
    }
    for runs in [&mut batched, &mut query, &mut single] {
        runs.sort();
    }
    let median = |runs: &[Duration]| runs[runs.len() / 2];
    println!(
        "fill_many of 4096 uncached subjects: median {:?} (runs {batched:?}); \
         its query alone: median {:?} (runs {query:?}); \
         the same by 4096 single fills at once: median {:?} (runs {single:?})",
        median(&batched),
        median(&query),
        median(&single),
    );
    // 400 MiB the other tests have no use for.
    drop((l, reader, db));
    let name = url.rsplit_once('/').unwrap().1;
    pg_connect(&server)
        .await
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}
