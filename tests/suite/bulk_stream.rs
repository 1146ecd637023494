//! Long bulk objects through the real proxy, as a bureau pulling a month's export sees them:
//! the log names a subject before any of its records reaches the client, even one that hangs
//! up mid-stream; a consent revoked during the download stops that subject's records within a
//! second; records already received leave while the store pauses; the SQLite and PostgreSQL
//! registries are asked once per batch of records, and one that stops answering cuts the
//! response instead of thinning it silently; HTTP/2, Parquet, and boto3 and the AWS CLI read
//! exactly what is left.

use crate::bulk_proxy::{EXPORT, KEPT, PURPOSE, bulk_policy, consents, dropped, named};
use crate::support::client::{self, Conn, request};
use crate::support::objects::{Object, Objects};
use crate::support::prom::parse;
use crate::support::proxy::{BUREAU, HOME_IP, PolicySpec, TestProxy, consent};
use crate::support::registry::{
    Relay, TOKEN, address_of, admin, cli_ok, fresh_database, postgres_url, with_address,
};
use bytes::Bytes;
use http_body_util::BodyExt;
use residency_proxy::consent::ConsentRecord;
use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Where the month's export lives (bucket `exports`, key `spending/2026-11.jsonl`).
const PATH: &str = "/exports/spending/2026-11.jsonl";

/// The longest any one step of these tests may take before it counts as hung.
const STEP: Duration = Duration::from_secs(30);

/// One record of an [`Export`].
struct Line {
    subject: String,
    seq: usize,
    /// Its bytes in the object, newline included.
    range: Range<usize>,
}

/// A JSON-lines export, one purchase per line, and where each line is.
struct Export {
    text: String,
    lines: Vec<Line>,
}

impl Export {
    /// `n` records; record `seq` belongs to `subject(seq)`.
    fn new(n: usize, subject: impl Fn(usize) -> String) -> Export {
        let mut text = String::new();
        let mut lines = Vec::with_capacity(n);
        for seq in 0..n {
            let subject = subject(seq);
            let start = text.len();
            text.push_str(&format!(
                "{{\"user_id\":\"{subject}\",\"seq\":{seq},\"amount_cents\":{}}}\n",
                seq * 7 % 10_000
            ));
            lines.push(Line {
                subject,
                seq,
                range: start..text.len(),
            });
        }
        Export { text, lines }
    }

    /// The lines `keep` keeps, in order, byte for byte.
    fn kept(&self, keep: impl Fn(&Line) -> bool) -> String {
        self.lines
            .iter()
            .filter(|l| keep(l))
            .map(|l| &self.text[l.range.clone()])
            .collect()
    }

    fn line(&self, seq: usize) -> &Line {
        &self.lines[seq]
    }
}

/// `(subject, seq)` of every complete line in `bytes` (a line still arriving is skipped).
fn records_in(bytes: &[u8]) -> Vec<(String, usize)> {
    bytes
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).unwrap_or_else(|e| {
                panic!(
                    "a received line is not JSON ({e}): {}",
                    String::from_utf8_lossy(l)
                )
            });
            (
                v["user_id"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

/// Where a text that should equal another first differs from it (a 3 MB body is no message).
fn first_difference(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let around = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.saturating_sub(60)..(at + 60).min(b.len())]).into_owned()
    };
    format!(
        "{} bytes received, {} expected; first difference at byte {at}: received …{}… expected …{}…",
        got.len(),
        want.len(),
        around(got),
        around(want)
    )
}

fn one(path: &str, object: Object) -> BTreeMap<String, Object> {
    BTreeMap::from([(path.to_string(), object)])
}

/// The bureau's GET of `path`, with its purpose.
fn bureau_get(path: &str) -> http::Request<client::ReqBody> {
    request("GET", path)
        .header(PURPOSE.0, PURPOSE.1)
        .body(client::empty())
        .unwrap()
}

/// The next frame of `body` within [`STEP`]: `None` at a clean end, `Some(Err)` when the
/// transfer broke.
async fn next_frame(body: &mut hyper::body::Incoming) -> Option<Result<Bytes, hyper::Error>> {
    let frame = tokio::time::timeout(STEP, body.frame())
        .await
        .expect("the response body stalled");
    frame.map(|f| f.map(|f| f.into_data().unwrap_or_default()))
}

/// The bureau's GET of `path`, read whole on a new connection; a transfer cut short fails
/// the test with the outcome records that say why.
async fn bureau_reads(proxy: &TestProxy, path: &str) -> client::Reply {
    let mut conn = Conn::open(BUREAU, proxy.addr).await;
    match conn.try_send(bureau_get(path)).await {
        Ok(r) => r,
        Err(e) => {
            // The outcome is written once the exchange ends, shortly after the cut.
            let mut cut = Vec::new();
            crate::support::wait_until("the outcome of the cut transfer", || {
                cut = proxy
                    .log
                    .of_kind("outcome")
                    .into_iter()
                    .filter(|o| o["complete"] == false)
                    .collect();
                !cut.is_empty()
            })
            .await;
            panic!("GET {path} was cut short ({e}): {cut:?}")
        }
    }
}

/// A consent like [`consent`]'s for `credit-bureau-us`, id `c-SUBJECT`.
fn bureau_consent(subject: &str) -> ConsentRecord {
    consent(&format!("c-{subject}"), subject, "credit-bureau-us")
}

/// Imports `records` into the registry at `store` with the `consent` command (before the
/// proxy starts, so that its cache begins cold).
async fn import(store: &str, records: &[ConsentRecord], dir: &std::path::Path) {
    let file = dir.join(format!("import-{:08x}.jsonl", fastrand::u32(..)));
    let text: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&file, text).unwrap();
    cli_ok(&[
        "consent",
        "import",
        "--store",
        store,
        &file.display().to_string(),
    ])
    .await;
}

/// A sample of the proxy's metrics (summed over the other labels).
async fn metric(proxy: &TestProxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let r = admin(proxy, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    parse(&r.text()).sum(name, labels)
}

/// The subjects named by the disclosures of `id` so far.
fn named_subjects(proxy: &TestProxy, id: &str) -> HashSet<String> {
    named(proxy, id).into_iter().map(|(s, _)| s).collect()
}

async fn verify_log(proxy: &TestProxy) {
    let out = cli_ok(&["audit", "verify", &proxy.log.path.display().to_string()]).await;
    assert!(out.starts_with("ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_mid_stream_got_only_records_whose_subjects_the_log_named_first() {
    // 24,000 records over 400 subjects; each run of 240 records alternates a subject with
    // consent (even number) and one without (odd), so every batch brings new subjects.
    let n = 24_000;
    let ex = Export::new(n, |i| format!("s-{:03}", 2 * (i / 240) + i % 2));
    let consented = |s: &str| s[2..].parse::<usize>().unwrap() % 2 == 0;
    let leaves = ex.kept(|l| consented(&l.subject));
    let grants: Vec<ConsentRecord> = (0..400)
        .step_by(2)
        .map(|k| bureau_consent(&format!("s-{k:03}")))
        .collect();
    // The first half is trickled, then the store holds the rest until the client is gone:
    // the proxy is mid-object when the client hangs up, however loaded the machine.
    let gate = Arc::new(Notify::new());
    let half = ex.line(n / 2).range.start;
    let store = Objects::start(
        HOME_IP,
        one(
            PATH,
            Object::new(ex.text.clone())
                .trickle(8 << 10, Duration::from_millis(2))
                .hold_at(half, gate.clone()),
        ),
    )
    .await;
    let mut proxy = bulk_policy(&store, "enforce")
        .log("pseudonymize = false")
        .consents(grants)
        .start()
        .await;

    let mut conn = Conn::open(BUREAU, proxy.addr).await;
    let resp = conn.response(bureau_get(PATH)).await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-residency-decision"]
        .to_str()
        .unwrap()
        .to_string();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut frames = 0;
    // A quarter of what would leave, then the client hangs up. At each arrival the log (the
    // OS has it: `durability = "write"`) must already name every subject received so far.
    while got.len() < leaves.len() / 4 {
        let data = next_frame(&mut body)
            .await
            .expect("the body ended early")
            .expect("the transfer broke");
        got.extend_from_slice(&data);
        frames += 1;
        let names = named_subjects(&proxy, &id);
        for (subject, seq) in records_in(&got) {
            assert!(
                names.contains(&subject),
                "record {seq} of {subject} reached the client before a disclosure named {subject} (frame {frames})"
            );
        }
    }
    assert!(
        leaves.as_bytes().starts_with(&got),
        "{}",
        first_difference(&got, leaves.as_bytes())
    );
    drop(body);
    drop(conn);
    gate.notify_one();

    let outcome = proxy.log.outcome(&id).await;
    assert_eq!(outcome["complete"], false, "{outcome}");
    // The proxy may have sent more than the client read (socket buffers): the disclosures
    // must cover every record it counts as sent, not only those read.
    let sent = outcome["records"]["kept"].as_u64().unwrap() as usize;
    let received = records_in(&got).len();
    assert!(
        received <= sent && sent < n / 2,
        "{received} read, {sent} sent: {outcome}"
    );
    let names: BTreeMap<String, serde_json::Value> = named(&proxy, &id).into_iter().collect();
    for l in ex.lines.iter().filter(|l| consented(&l.subject)).take(sent) {
        assert_eq!(
            names.get(&l.subject),
            Some(&serde_json::json!(format!("c-{}", l.subject))),
            "record {} of {} was sent",
            l.seq,
            l.subject
        );
    }
    assert!(
        names.keys().all(|s| consented(s)),
        "only subjects with consent are named: {names:?}"
    );
    assert_eq!(
        metric(
            &proxy,
            "residency_bulk_exchanges_total",
            &[("dataset", "exports"), ("end", "cut")]
        )
        .await,
        1.0
    );
    proxy.shutdown().await;
    verify_log(&proxy).await;
}

/// The bureau downloads a five-second export in which every tenth record is `u-hot`'s;
/// `u-hot`'s consent is revoked through the admin API a quarter of the way in. `store` is the
/// registry (`sqlite:…` or `postgres://…`), `dir` a scratch directory.
async fn a_revocation_mid_stream_stops_the_subjects_records_within_a_second(
    store: &str,
    dir: &std::path::Path,
) {
    let n = 60_000;
    let filler = |i: usize| format!("f-{:02}", (i / 10) % 40);
    let ex = Export::new(n, |i| {
        if i % 10 == 0 {
            "u-hot".to_string()
        } else {
            filler(i)
        }
    });
    let filler_consented = |s: &str| s.starts_with("f-") && s[2..].parse::<u32>().unwrap() % 2 == 0;
    let mut grants = vec![bureau_consent("u-hot")];
    grants.extend(
        (0..40)
            .step_by(2)
            .map(|k| bureau_consent(&format!("f-{k:02}"))),
    );
    import(store, &grants, dir).await;
    // About 600 kB/s: ~3 MB over five seconds or more.
    let objects = Objects::start(
        HOME_IP,
        one(
            PATH,
            Object::new(ex.text.clone()).trickle(6_000, Duration::from_millis(10)),
        ),
    )
    .await;
    let mut proxy = bulk_policy(&objects, "enforce")
        .consent(&format!("store = '{store}'"))
        .admin_token(TOKEN)
        .start()
        .await;

    let mut conn = Conn::open(BUREAU, proxy.addr).await;
    let resp = conn.response(bureau_get(PATH)).await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-residency-decision"]
        .to_str()
        .unwrap()
        .to_string();
    // The client reads without pause, noting when each frame arrived.
    let frames: Arc<Mutex<Vec<(Instant, Bytes)>>> = Arc::default();
    let reader = {
        let frames = frames.clone();
        let mut body = resp.into_body();
        tokio::spawn(async move {
            while let Some(frame) = next_frame(&mut body).await {
                let data = frame.map_err(|e| e.to_string())?;
                frames.lock().unwrap().push((Instant::now(), data));
            }
            Ok::<_, String>(())
        })
    };
    // A quarter in: a quarter of what would leave were u-hot never revoked.
    let quarter = ex
        .kept(|l| filler_consented(&l.subject) || l.subject == "u-hot")
        .len()
        / 4;
    let received = || -> usize { frames.lock().unwrap().iter().map(|(_, d)| d.len()).sum() };
    let deadline = Instant::now() + STEP;
    while received() < quarter {
        assert!(
            Instant::now() < deadline,
            "the stream did not get a quarter in"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = admin(
        &proxy,
        "POST",
        "/v1/consents/c-u-hot/revoke",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The revocation is recorded once the API answers: the bound runs from here.
    let revoked = Instant::now();
    tokio::time::timeout(STEP, reader)
        .await
        .expect("the download did not end")
        .unwrap()
        .expect("the download ended cleanly");

    let frames = std::mem::take(&mut *frames.lock().unwrap());
    let mut got = Vec::new();
    // Each record with the instant its last byte reached the client.
    let mut arrivals: Vec<(String, usize, Instant)> = Vec::new();
    for (at, data) in &frames {
        got.extend_from_slice(data);
        let complete = records_in(&got);
        for (subject, seq) in complete.into_iter().skip(arrivals.len()) {
            arrivals.push((subject, seq, *at));
        }
    }
    let hot_all: Vec<usize> = ex
        .lines
        .iter()
        .filter(|l| l.subject == "u-hot")
        .map(|l| l.seq)
        .collect();
    let hot_got: Vec<(usize, Instant)> = arrivals
        .iter()
        .filter(|(s, ..)| s == "u-hot")
        .map(|(_, seq, at)| (*seq, *at))
        .collect();
    let k = hot_got.len();
    assert!(
        k > 0 && k < hot_all.len(),
        "{k} of {} u-hot records received",
        hot_all.len()
    );
    // Exactly the records with consent: every filler with one, and u-hot's up to a cut-off.
    let cut = hot_all[k];
    let want = ex.kept(|l| filler_consented(&l.subject) || (l.subject == "u-hot" && l.seq < cut));
    assert!(
        got == want.as_bytes(),
        "{}",
        first_difference(&got, want.as_bytes())
    );

    // The bound. The revocation reaches the cache within 1 s of being recorded (the
    // registry's promise), and every batch judged after that drops u-hot's records. A
    // batch is judged whole, once its last record has arrived and the client can take it
    // (the permit is held first), and then sent at once: so a record that left is one the
    // proxy had received before the revocation took effect, and therefore one the store
    // handed over before `revoked + 1 s`, whatever the batch size and the trickle rate (they
    // only make the proxy drop records that arrived shortly before the revocation, in the
    // batch still filling). That is exact, from the store's own clock of what it sent:
    let (last_seq, last_at) = *hot_got.last().unwrap();
    let line = ex.line(last_seq);
    let handed = objects
        .sent_at(PATH, line.range.end - 1)
        .expect("the store sent it");
    assert!(
        handed < revoked + Duration::from_secs(1),
        "record {last_seq} of u-hot left although the store sent it {:?} after the revocation",
        handed - revoked
    );
    // What the bureau sees: the last u-hot record arrives within that second plus the
    // delivery of the one batch judged just before the revocation took effect (a log
    // append and at most 1 MiB over loopback to a client reading without pause: a few ms;
    // 250 ms allows for a loaded machine).
    let after = last_at.saturating_duration_since(revoked);
    assert!(
        after < Duration::from_millis(1_250),
        "u-hot's record {last_seq} arrived {after:?} after the revocation"
    );
    // And the test meant something: the store went on sending u-hot's records well past
    // the bound, none of which reached the client.
    let last_hot = ex.line(*hot_all.last().unwrap());
    let last_sent = objects.sent_at(PATH, last_hot.range.start).unwrap();
    assert!(
        last_sent > revoked + Duration::from_millis(1_500),
        "the export ended {:?} after the revocation: too soon to tell",
        last_sent.saturating_duration_since(revoked)
    );

    let outcome = proxy.log.outcome(&id).await;
    assert_eq!(outcome["complete"], true, "{outcome}");
    assert_eq!(outcome["records"]["kept"], arrivals.len(), "{outcome}");
    let missing = ex
        .lines
        .iter()
        .filter(|l| l.subject.starts_with("f-") && !filler_consented(&l.subject))
        .count();
    assert_eq!(
        outcome["records"]["dropped"],
        serde_json::json!({"consent_missing": missing, "consent_revoked": hot_all.len() - k}),
        "{outcome}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_mid_stream_stops_the_subjects_records_within_a_second_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("consent.db").display());
    a_revocation_mid_stream_stops_the_subjects_records_within_a_second(&store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_mid_stream_stops_the_subjects_records_within_a_second_postgres() {
    let Some(server) =
        postgres_url("a_revocation_mid_stream_stops_the_subjects_records_within_a_second_postgres")
    else {
        return;
    };
    let store = fresh_database(&server).await;
    let dir = tempfile::tempdir().unwrap();
    a_revocation_mid_stream_stops_the_subjects_records_within_a_second(&store, dir.path()).await;
}

/// The export and a larger one through a proxy whose registry is `store`, its cache cold:
/// exactly the records with consent leave, and the store is asked once per batch of
/// records, never once per subject.
async fn a_cold_cache_asks_the_store_once_per_batch(store: &str, dir: &std::path::Path) {
    // 10,000 records over 2,000 subjects, every other one with consent.
    let big = Export::new(10_000, |i| format!("b-{:04}", (i * 7) % 2_000));
    let consented = |s: &str| s[2..].parse::<u32>().unwrap() % 2 == 0;
    let mut grants = consents();
    grants.extend(
        (0..2_000)
            .step_by(2)
            .map(|k| bureau_consent(&format!("b-{k:04}"))),
    );
    import(store, &grants, dir).await;
    let objects = Objects::start(
        HOME_IP,
        BTreeMap::from([
            (PATH.to_string(), Object::new(EXPORT)),
            (
                "/exports/big.jsonl".to_string(),
                Object::new(big.text.clone()),
            ),
        ]),
    )
    .await;
    // A cold query for a thousand or more subjects takes ~10 ms here, but over 200 ms (the
    // default lookup_timeout, which then cuts the response) on a loaded two-core machine:
    // this test counts queries, so it gives them time.
    let mut proxy = bulk_policy(&objects, "enforce")
        .consent(&format!("store = '{store}'"))
        .consent("lookup_timeout = '10s'")
        .start()
        .await;
    let batches = "residency_consent_batch_lookup_duration_seconds_count";
    let singles = "residency_consent_lookup_duration_seconds_count";
    let misses = "residency_consent_cache_misses_total";
    assert_eq!(metric(&proxy, batches, &[]).await, 0.0);

    let r = bureau_reads(&proxy, PATH).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), KEPT);
    let outcome = proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(outcome["complete"], true);
    assert_eq!(outcome["records"]["kept"], 3);
    assert_eq!(outcome["records"]["dropped"], dropped());
    // Eight subjects, one query.
    assert_eq!(metric(&proxy, batches, &[]).await, 1.0);
    assert_eq!(metric(&proxy, singles, &[]).await, 0.0);
    assert_eq!(metric(&proxy, misses, &[]).await, 8.0);

    let r = bureau_reads(&proxy, "/exports/big.jsonl").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let want = big.kept(|l| consented(&l.subject));
    assert!(
        r.body == want.as_bytes(),
        "{}",
        first_difference(&r.body, want.as_bytes())
    );
    let outcome = proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(outcome["records"]["kept"], 5_000);
    assert_eq!(
        outcome["records"]["dropped"],
        serde_json::json!({"consent_missing": 5_000})
    );
    // 2,000 subjects each missed once, asked in a handful of queries (one per batch of
    // records), none alone.
    let queries = metric(&proxy, batches, &[]).await - 1.0;
    assert!((1.0..=5.0).contains(&queries), "{queries} queries");
    assert_eq!(metric(&proxy, singles, &[]).await, 0.0);
    assert_eq!(metric(&proxy, misses, &[]).await, 8.0 + 2_000.0);

    // Warm: the same object again asks nothing.
    let r = bureau_reads(&proxy, "/exports/big.jsonl").await;
    assert!(r.body == want.as_bytes());
    assert_eq!(metric(&proxy, batches, &[]).await, 1.0 + queries);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_cache_asks_the_store_once_per_batch_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("consent.db").display());
    a_cold_cache_asks_the_store_once_per_batch(&store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_cache_asks_the_store_once_per_batch_postgres() {
    let Some(server) = postgres_url("a_cold_cache_asks_the_store_once_per_batch_postgres") else {
        return;
    };
    let store = fresh_database(&server).await;
    let dir = tempfile::tempdir().unwrap();
    a_cold_cache_asks_the_store_once_per_batch(&store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_lost_mid_stream_cuts_the_response_with_an_error_not_a_thinner_object() {
    let Some(server) = postgres_url("a_store_lost_mid_stream_cuts_the_response") else {
        return;
    };
    let direct = fresh_database(&server).await;
    let relay = Relay::start(address_of(&direct)).await;
    let via_relay = with_address(&direct, relay.addr);
    let dir = tempfile::tempdir().unwrap();
    // The first 6,000 records are of subjects `a-…`, the rest of subjects `z-…` that no
    // request has asked about yet; every other subject of each has consent.
    let n = 12_000;
    let ex = Export::new(n, |i| {
        let side = if i < n / 2 { "a" } else { "z" };
        format!("{side}-{:03}", i % 100)
    });
    let consented = |s: &str| s[2..].parse::<u32>().unwrap() % 2 == 0;
    let grants: Vec<ConsentRecord> = ["a", "z"]
        .iter()
        .flat_map(|side| {
            (0..100)
                .step_by(2)
                .map(move |k| bureau_consent(&format!("{side}-{k:03}")))
        })
        .collect();
    import(&direct, &grants, dir.path()).await;
    let gate = Arc::new(Notify::new());
    let objects = Objects::start(
        HOME_IP,
        one(
            PATH,
            Object::new(ex.text.clone())
                .trickle(16 << 10, Duration::from_millis(2))
                .hold_at(ex.line(n / 2).range.start, gate.clone()),
        ),
    )
    .await;
    let mut proxy = bulk_policy(&objects, "enforce")
        .log("pseudonymize = false")
        .consent(&format!("store = '{via_relay}'"))
        .start()
        .await;

    let mut conn = Conn::open(BUREAU, proxy.addr).await;
    let resp = conn.response(bureau_get(PATH)).await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-residency-decision"]
        .to_str()
        .unwrap()
        .to_string();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    got.extend_from_slice(
        &next_frame(&mut body)
            .await
            .expect("a first batch")
            .expect("the transfer broke"),
    );
    // Records have left; now the store goes away, then the rest of the object comes.
    relay.cut();
    gate.notify_one();
    let ended = loop {
        match next_frame(&mut body).await {
            Some(Ok(data)) => got.extend_from_slice(&data),
            Some(Err(e)) => break Ok(e),
            None => break Err("the body ended cleanly"),
        }
    };
    // Cut short (hyper says "unexpected EOF during chunk size line"): never a clean end.
    let cut = ended.expect("a transfer cut with an error");
    let leaves = ex.kept(|l| consented(&l.subject));
    assert!(
        leaves.as_bytes().starts_with(&got),
        "{}",
        first_difference(&got, leaves.as_bytes())
    );
    let received = records_in(&got);
    assert!(!received.is_empty());
    assert!(
        received.iter().all(|(s, _)| s.starts_with("a-")),
        "a subject the store could not be asked about left (cut by: {cut})"
    );

    let outcome = proxy.log.outcome(&id).await;
    assert_eq!(outcome["complete"], false, "{outcome}");
    assert_eq!(outcome["error"], "consent_store_unavailable", "{outcome}");
    let names = named_subjects(&proxy, &id);
    assert!(received.iter().all(|(s, _)| names.contains(s)));
    // As for a single request the store fails: not ready, naming the store.
    let r = admin(&proxy, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("consent store"), "{}", r.text());
    assert_eq!(
        metric(
            &proxy,
            "residency_bulk_exchanges_total",
            &[("dataset", "exports"), ("end", "cut")]
        )
        .await,
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_already_received_are_not_held_back_while_the_store_pauses() {
    // A feed written as it goes: 1,000 records, then nothing for a while, then the rest.
    let n = 2_000;
    let ex = Export::new(n, |i| format!("s-{:02}", i % 50));
    let consented = |s: &str| s[2..].parse::<u32>().unwrap() % 2 == 0;
    let grants: Vec<ConsentRecord> = (0..50)
        .step_by(2)
        .map(|k| bureau_consent(&format!("s-{k:02}")))
        .collect();
    let gate = Arc::new(Notify::new());
    let pause = ex.line(n / 2).range.start;
    let objects = Objects::start(
        HOME_IP,
        one(
            PATH,
            Object::new(ex.text.clone()).hold_at(pause, gate.clone()),
        ),
    )
    .await;
    let mut proxy = bulk_policy(&objects, "enforce")
        .consents(grants)
        .start()
        .await;
    let mut conn = Conn::open(BUREAU, proxy.addr).await;
    let resp = conn.response(bureau_get(PATH)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // What arrived before the pause leaves during it, not once the store goes on.
    let before = ex.kept(|l| l.seq < n / 2 && consented(&l.subject));
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < before.len() {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await;
        let Ok(Some(Ok(frame))) = frame else {
            gate.notify_one();
            panic!(
                "{} of the {} bytes kept from the records before the pause reached the client within 5 s of it: {frame:?}",
                got.len(),
                before.len()
            );
        };
        got.extend_from_slice(&frame.into_data().unwrap_or_default());
    }
    assert!(
        got == before.as_bytes(),
        "{}",
        first_difference(&got, before.as_bytes())
    );
    gate.notify_one();
    while let Some(frame) = next_frame(&mut body).await {
        got.extend_from_slice(&frame.expect("the transfer broke"));
    }
    let all = ex.kept(|l| consented(&l.subject));
    assert!(
        got == all.as_bytes(),
        "{}",
        first_difference(&got, all.as_bytes())
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_gets_the_same_records_as_http1() {
    let big = Export::new(9_000, |i| format!("s-{:03}", i % 300));
    let consented = |s: &str| s[2..].parse::<u32>().unwrap() % 3 == 0;
    let mut grants = consents();
    grants.extend(
        (0..300)
            .step_by(3)
            .map(|k| bureau_consent(&format!("s-{k:03}"))),
    );
    let objects = Objects::start(
        HOME_IP,
        BTreeMap::from([
            (PATH.to_string(), Object::new(EXPORT)),
            (
                "/exports/big.jsonl".to_string(),
                Object::new(big.text.clone()).trickle(32 << 10, Duration::from_millis(1)),
            ),
        ]),
    )
    .await;
    let mut proxy = bulk_policy(&objects, "enforce")
        .consents(grants)
        .start()
        .await;
    let mut h2 = Conn::open_h2c(BUREAU, proxy.addr).await;
    let r = h2.send(bureau_get(PATH)).await;
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_2));
    assert_eq!(r.text(), KEPT);
    assert!(r.header("content-length").is_none(), "{:?}", r.headers);
    let one = bureau_reads(&proxy, "/exports/big.jsonl").await;
    let two = h2.send(bureau_get("/exports/big.jsonl")).await;
    let want = big.kept(|l| consented(&l.subject));
    assert!(
        one.body == want.as_bytes(),
        "{}",
        first_difference(&one.body, want.as_bytes())
    );
    assert!(
        two.body == want.as_bytes(),
        "{}",
        first_difference(&two.body, want.as_bytes())
    );
    let outcome = proxy.log.outcome(&two.decision_id()).await;
    assert_eq!(outcome["complete"], true);
    assert_eq!(outcome["bytes_out"], want.len());
    proxy.shutdown().await;
}

/// A Parquet object of purchases, one row group per slice of `groups`: `user { id; age? }`,
/// `amount_cents`, `merchant?`; row `r` (counted across groups) spent `r * 100` cents.
fn purchases(groups: &[&[&str]]) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message purchase {
            required group user { required binary id (UTF8); optional int64 age; }
            required int64 amount_cents;
            optional binary merchant (UTF8);
        }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = SerializedFileWriter::new(Vec::new(), schema.into(), props.into()).unwrap();
    let mut row = 0i64;
    for subjects in groups {
        let rows: Vec<i64> = (row..row + subjects.len() as i64).collect();
        row += subjects.len() as i64;
        let mut g = w.next_row_group().unwrap();
        let mut c = g.next_column().unwrap().unwrap();
        let ids: Vec<ByteArray> = subjects.iter().map(|s| ByteArray::from(*s)).collect();
        c.typed::<ByteArrayType>()
            .write_batch(&ids, None, None)
            .unwrap();
        c.close().unwrap();
        // age: unknown on every third row.
        let mut c = g.next_column().unwrap().unwrap();
        let def: Vec<i16> = rows.iter().map(|r| i16::from(r % 3 != 0)).collect();
        let ages: Vec<i64> = rows
            .iter()
            .filter(|r| *r % 3 != 0)
            .map(|r| 20 + r)
            .collect();
        c.typed::<Int64Type>()
            .write_batch(&ages, Some(&def), None)
            .unwrap();
        c.close().unwrap();
        let mut c = g.next_column().unwrap().unwrap();
        let amounts: Vec<i64> = rows.iter().map(|r| r * 100).collect();
        c.typed::<Int64Type>()
            .write_batch(&amounts, None, None)
            .unwrap();
        c.close().unwrap();
        // merchant: unknown on odd rows.
        let mut c = g.next_column().unwrap().unwrap();
        let def: Vec<i16> = rows.iter().map(|r| i16::from(r % 2 == 0)).collect();
        let m: Vec<ByteArray> = rows
            .iter()
            .filter(|r| *r % 2 == 0)
            .map(|r| ByteArray::from(format!("shop-{r}").as_str()))
            .collect();
        c.typed::<ByteArrayType>()
            .write_batch(&m, Some(&def), None)
            .unwrap();
        c.close().unwrap();
        g.close().unwrap();
    }
    w.into_inner().unwrap()
}

/// Every row of a Parquet file, as `(user.id, user.age, amount_cents, merchant)`.
fn purchase_rows(file: Bytes) -> Vec<(String, Option<i64>, i64, Option<String>)> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::{Field, RowAccessor};
    let reader = SerializedFileReader::new(file).expect("the response is a Parquet file");
    reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| {
            let row = row.unwrap();
            let user = row.get_group(0).unwrap();
            let age = match user.get_column_iter().nth(1).unwrap().1 {
                Field::Long(a) => Some(*a),
                _ => None,
            };
            let merchant = match row.get_column_iter().nth(2).unwrap().1 {
                Field::Str(m) => Some(m.clone()),
                _ => None,
            };
            (
                user.get_string(0).unwrap().clone(),
                age,
                row.get_long(1).unwrap(),
                merchant,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_object_keeps_exactly_the_consented_rows_in_order() {
    let groups: [&[&str]; 3] = [
        &["u-ok", "u-none", "u-too", "u-revoked", "u-ok"],
        // No row of this group may leave: it is left out.
        &["u-expired", "u-ticked", "u-none"],
        &["u-marketing", "u-too", "u-elsewhere", "u-ok"],
    ];
    let file = purchases(&groups);
    let every = purchase_rows(Bytes::from(file.clone()));
    assert_eq!(every.len(), 12);
    let path = "/columns/spending/2026-11.parquet";
    let objects = Objects::start(HOME_IP, one(path, Object::new(file))).await;
    let mut proxy = bulk_policy(&objects, "enforce")
        .consents(consents())
        .start()
        .await;
    let r = bureau_reads(&proxy, path).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-length").is_none());
    let want: Vec<_> = every
        .iter()
        .filter(|(id, ..)| id == "u-ok" || id == "u-too")
        .cloned()
        .collect();
    assert_eq!(purchase_rows(r.body.clone()), want);
    let outcome = proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(outcome["complete"], true);
    assert_eq!(outcome["records"]["kept"], 5);
    assert_eq!(
        outcome["records"]["dropped"],
        serde_json::json!({
            "consent_expired": 1,
            "consent_method_invalid": 1,
            "consent_missing": 2,
            "consent_revoked": 1,
            "consent_scope_mismatch": 2,
        })
    );
    proxy.shutdown().await;
}

/// A policy in which the bureau calls from 127.0.0.1 (placed in the US): a Python process
/// cannot choose its source address, and loopback connections come from 127.0.0.1.
fn sdk_policy(objects: &Objects) -> PolicySpec {
    PolicySpec::new()
        .network("127.0.0.1/32", "US")
        .network("127.0.0.2/32", "CN")
        .upstream("cn-store", &objects.url())
        .toml(
            r#"
[[recipients]]
id = 'credit-bureau-us'
relation = 'third_party'
country = 'US'
networks = ['127.0.0.1/32']

[[datasets]]
name = 'exports'
match = { path_prefix = '/exports/' }
upstream = 'cn-store'
category = 'user.financial'
records = { format = 'jsonl', subject = 'user_id' }
"#,
        )
        .consents(consents())
}

/// boto3's `get_object` of `s3://exports/spending/2026-11.jsonl` through the proxy at
/// `endpoint`, purpose added by an event hook, response checksums validated.
const BOTO3: &str = r#"
import sys, boto3
from botocore.config import Config
endpoint = sys.argv[1]
s3 = boto3.client(
    "s3", endpoint_url=endpoint, region_name="cn-north-1",
    aws_access_key_id="AKIDRESIDENCYTEST", aws_secret_access_key="not-a-secret",
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                  response_checksum_validation="when_supported"),
)
def purpose(request, **kwargs):
    request.headers["X-Purpose"] = "credit_scoring"
s3.meta.events.register("before-sign.s3.GetObject", purpose)
r = s3.get_object(Bucket="exports", Key="spending/2026-11.jsonl", ChecksumMode="ENABLED")
sys.stdout.buffer.write(r["Body"].read())
"#;

/// An AWS CLI plugin (the CLI's documented extension point) adding the purpose header to
/// every S3 call, as boto3's hook does.
const CLI_PLUGIN: &str = r#"
def _purpose(request, **kwargs):
    request.headers["X-Purpose"] = "credit_scoring"

def awscli_initialize(cli):
    cli.register("before-sign.s3", _purpose)
"#;

/// Runs `program args` with dummy AWS credentials and `env`; returns status, stdout, stderr.
async fn run(program: &str, args: &[&str], env: &[(&str, String)]) -> (bool, Vec<u8>, String) {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env("AWS_ACCESS_KEY_ID", "AKIDRESIDENCYTEST")
        .env("AWS_SECRET_ACCESS_KEY", "not-a-secret")
        .env("AWS_DEFAULT_REGION", "cn-north-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_PROXY", "*")
        .env_remove("AWS_PROFILE")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let program = program.to_string();
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{program} does not run: {e}"));
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `python3` can import boto3; says the test is skipped when not.
async fn have_boto3(test: &str) -> bool {
    let (importable, ..) = run("python3", &["-c", "import boto3"], &[]).await;
    if !importable {
        eprintln!(
            "skipped {test}: python3 cannot import boto3 (pip install boto3 awscli; .ci/run does)"
        );
    }
    importable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_reads_a_filtered_object_with_checksum_validation_on() {
    if !have_boto3("boto3_reads_a_filtered_object_with_checksum_validation_on").await {
        return;
    }
    let objects = Objects::start(HOME_IP, one(PATH, Object::new(EXPORT))).await;
    let mut proxy = sdk_policy(&objects).start().await;
    let endpoint = format!("http://{}", proxy.addr);
    let (ok, out, err) = run("python3", &["-c", BOTO3, &endpoint], &[]).await;
    assert!(ok, "boto3 failed: {err}");
    assert_eq!(String::from_utf8_lossy(&out), KEPT, "{err}");
    // It was the bureau, filtered.
    let decisions = proxy.log.of_kind("decision");
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0]["reason"], "consent_filtered");
    assert_eq!(decisions[0]["recipient"]["id"], "credit-bureau-us");
    proxy.shutdown().await;
}

// `aws s3 cp` and the SDKs' managed downloads (`download_file`) are not tested: they ask
// HeadObject for the object's size first (the CLI fails with `KeyError: 'ContentLength'`
// without one) and fetch large objects in byte ranges. A filtered object's size is known only
// once it has been filtered, and a HEAD cannot be turned into a GET to learn it: the client's
// SigV4 signature covers the method, so the store would refuse it. A HEAD answers without a
// length (HTTP allows omitting what only generating the content determines), and the README
// says to use `aws s3api get-object` and `get_object` instead.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_cli_reads_a_filtered_object_with_get_object() {
    let test = "the_aws_cli_reads_a_filtered_object_with_get_object";
    if !have_boto3(test).await {
        return;
    }
    let (cli_present, ..) = run("aws", &["--version"], &[]).await;
    if !cli_present {
        eprintln!("skipped {test}: no `aws` command (pip install awscli; .ci/run does)");
        return;
    }
    let objects = Objects::start(HOME_IP, one(PATH, Object::new(EXPORT))).await;
    let mut proxy = sdk_policy(&objects).start().await;
    let endpoint = format!("http://{}", proxy.addr);
    let dir = proxy.dir.path().to_path_buf();
    std::fs::write(dir.join("residency_purpose.py"), CLI_PLUGIN).unwrap();
    let config = dir.join("aws-config");
    // The CLI (version 1, the one on PyPI) imports plugins by module name.
    std::fs::write(
        &config,
        "[default]\nregion = cn-north-1\ns3 =\n    addressing_style = path\n\n[plugins]\nresidency_purpose = residency_purpose\n",
    )
    .unwrap();
    let env = [
        ("AWS_CONFIG_FILE", config.display().to_string()),
        ("PYTHONPATH", dir.display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-credentials").display().to_string(),
        ),
    ];
    // One GetObject call.
    let out_file = dir.join("got.jsonl");
    let (ok, _, err) = run(
        "aws",
        &[
            "s3api",
            "get-object",
            "--bucket",
            "exports",
            "--key",
            "spending/2026-11.jsonl",
            "--checksum-mode",
            "ENABLED",
            "--endpoint-url",
            &endpoint,
            &out_file.display().to_string(),
        ],
        &env,
    )
    .await;
    assert!(ok, "aws s3api get-object failed: {err}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), KEPT);
    proxy.shutdown().await;
}

/// Regression: with a cache smaller than an export's subjects, each batch's fills evicted
/// subjects of the same batch before they were judged, and the response was cut as if the
/// store were unavailable once the cache was full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_with_more_subjects_than_the_cache_holds_is_filtered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("consent.db").display());
    let n = 40_000;
    let ex = Export::new(n, |i| format!("s-{:05}", (i * 7_919) % 20_000));
    let consented = |s: &str| s[2..].parse::<u32>().unwrap() % 2 == 0;
    let grants: Vec<ConsentRecord> = (0..20_000)
        .step_by(2)
        .map(|k| bureau_consent(&format!("s-{k:05}")))
        .collect();
    import(&store, &grants, dir.path()).await;
    let objects = Objects::start(HOME_IP, one(PATH, Object::new(ex.text.clone()))).await;
    let mut proxy = bulk_policy(&objects, "enforce")
        .consent(&format!("store = '{store}'"))
        .consent("lookup_timeout = '10s'")
        // About 5,000 subjects' worth: a quarter of the export's.
        .consent("cache_max_bytes = 1048576")
        .start()
        .await;
    let r = bureau_reads(&proxy, PATH).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let want = ex.kept(|l| consented(&l.subject));
    assert!(
        r.body == want.as_bytes(),
        "{}",
        first_difference(&r.body, want.as_bytes())
    );
    let outcome = proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(outcome["complete"], true, "{outcome}");
    assert_eq!(outcome["records"]["kept"], n / 2);
    proxy.shutdown().await;
}
