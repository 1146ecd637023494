//! Prometheus metrics of the running proxy. Handles are registered once: the process-wide
//! ones at start-up, the per-dataset and per-upstream ones when a policy is loaded (resolved
//! to indexes held by the snapshot). The hot path only does relaxed atomic adds on them; no
//! map is looked up by a string per request. A scrape reads them into families that the
//! Prometheus project's Rust client (`prometheus-client`) encodes as OpenMetrics text, as a
//! collector: names, label escaping, histogram lines and `# EOF` are the library's.
//!
//! Label values are bounded: dataset and upstream names come from loaded policies, reasons
//! and error kinds from closed enums. Paths, subjects and client addresses never appear.

use crate::policy::decision::{Reason, Verdict};
use crate::policy::model::Policy;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The `Content-Type` of the exposition: OpenMetrics 1.0, which Prometheus scrapes natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram with fixed bucket bounds (nanoseconds). An observation costs a
/// short scan of the bounds and two relaxed adds: the bucket and the sum. Buckets are kept
/// non-cumulative and summed when rendered, so the count needs no add of its own.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, then the `+Inf` bucket.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bound at or above the value: Prometheus buckets are `le` (<=).
        let i = self.bounds.partition_point(|b| *b < nanos);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, f: &mut Families, name: &str, help: &str) {
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut count = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count += n;
            let le = self.bounds.get(i).map_or(f64::MAX, |b| *b as f64 / 1e9);
            buckets.push((le, n));
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        f.family(name, help, Kind::Histogram);
        f.sample(Vec::new(), Val::H(sum, count, buckets));
    }
}

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// From the request head reaching the pipeline to the decision: policy evaluation is
/// expected well under a microsecond, so the buckets start below it.
const DECISION_BOUNDS: &[u64] = &[
    250,
    500,
    US,
    2 * US + US / 2,
    5 * US,
    10 * US,
    25 * US,
    50 * US,
    100 * US,
    250 * US,
    MS,
    10 * MS,
];

/// How long a request waits for its decision record to be written (and synced, in `fsync`
/// mode) before anything is forwarded.
const LOG_BOUNDS: &[u64] = &[
    10 * US,
    25 * US,
    50 * US,
    100 * US,
    250 * US,
    500 * US,
    MS,
    2 * MS + MS / 2,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    S,
];

/// A whole exchange, from the request head to the last byte of the response.
const REQUEST_BOUNDS: &[u64] = &[
    100 * US,
    250 * US,
    500 * US,
    MS,
    2 * MS + MS / 2,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
    5 * S / 2,
    5 * S,
    10 * S,
    30 * S,
    60 * S,
];

/// The decision classes a decision counter distinguishes: verdict and enforcement.
const OUTCOMES: [(&str, &str); 4] = [
    ("allow", "true"),
    ("deny", "true"),
    // A would-deny in audit mode: logged, not enforced, forwarded.
    ("deny", "false"),
    ("error", "true"),
];

fn outcome(verdict: Verdict, enforced: bool) -> usize {
    match (verdict, enforced) {
        (Verdict::Allow, _) => 0,
        (Verdict::Deny, true) => 1,
        (Verdict::Deny, false) => 2,
        (Verdict::Error, _) => 3,
    }
}

/// Decision counts of one dataset (or of the requests that matched none), by reason and
/// outcome. The slots are allocated on the first decision, so that a policy with thousands
/// of datasets costs memory only for those that see traffic.
#[derive(Debug, Default)]
pub struct DatasetCounters {
    slots: OnceLock<Box<[AtomicU64]>>,
    bulk: OnceLock<Box<BulkCounters>>,
}

/// What the record filter of a dataset of bulk objects let through: records kept, dropped
/// and (audit mode) kept although they would have been dropped, by the filter's reason
/// code; and the bytes that went in (as received) and out.
#[derive(Debug)]
pub struct BulkCounters {
    kept: AtomicU64,
    dropped: [AtomicU64; 256],
    would_drop: [AtomicU64; 256],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Exchanges filtered to their end, and those cut short.
    complete: AtomicU64,
    cut: AtomicU64,
}

impl BulkCounters {
    /// Adds a filtered exchange's counts.
    pub fn observe(&self, c: &crate::bulk::Counts, complete: bool) {
        let add = |a: &AtomicU64, n: u64| {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&self.kept, c.kept);
        for (r, n) in c.dropped_by_reason() {
            add(&self.dropped[usize::from(r.0)], n);
        }
        for (r, n) in c.would_drop_by_reason() {
            add(&self.would_drop[usize::from(r.0)], n);
        }
        add(&self.bytes_in, c.bytes_in_raw);
        add(&self.bytes_out, c.bytes_out);
        add(if complete { &self.complete } else { &self.cut }, 1);
    }
}

impl DatasetCounters {
    /// The record filter's counters (allocated on first use).
    pub fn bulk(&self) -> &BulkCounters {
        self.bulk.get_or_init(|| {
            Box::new(BulkCounters {
                kept: AtomicU64::new(0),
                dropped: std::array::from_fn(|_| AtomicU64::new(0)),
                would_drop: std::array::from_fn(|_| AtomicU64::new(0)),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
                complete: AtomicU64::new(0),
                cut: AtomicU64::new(0),
            })
        })
    }

    #[inline]
    pub fn record(&self, reason: Reason, verdict: Verdict, enforced: bool) {
        let slots = self.slots.get_or_init(|| {
            (0..Reason::ALL.len() * OUTCOMES.len())
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        // `Reason` is a field-less enum declared in the order of `Reason::ALL`.
        let r = reason as usize;
        debug_assert_eq!(Reason::ALL[r], reason);
        slots[r * OUTCOMES.len() + outcome(verdict, enforced)].fetch_add(1, Ordering::Relaxed);
    }

    /// Non-zero counts as `(reason, outcome index, count)`.
    fn each(&self, mut f: impl FnMut(Reason, usize, u64)) {
        let Some(slots) = self.slots.get() else {
            return;
        };
        for (i, s) in slots.iter().enumerate() {
            let n = s.load(Ordering::Relaxed);
            if n > 0 {
                f(Reason::ALL[i / OUTCOMES.len()], i % OUTCOMES.len(), n);
            }
        }
    }

    /// All decisions counted here.
    pub fn total(&self) -> u64 {
        let mut n = 0;
        self.each(|_, _, c| n += c);
        n
    }
}

/// What went wrong between the proxy and an upstream.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UpstreamError {
    /// The host resolved to no address (the request was decided `upstream_unreachable`).
    Resolve,
    /// TCP connect or HTTP handshake failed or timed out.
    Connect,
    /// The connected socket's peer was not inside the dataset's home: refused before a byte.
    OutsideHome,
    /// No response head within `upstream_timeout`.
    Timeout,
    /// The request failed after the connection was made.
    Request,
}

impl UpstreamError {
    const ALL: [UpstreamError; 5] = [
        UpstreamError::Resolve,
        UpstreamError::Connect,
        UpstreamError::OutsideHome,
        UpstreamError::Timeout,
        UpstreamError::Request,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Resolve => "resolve",
            UpstreamError::Connect => "connect",
            UpstreamError::OutsideHome => "outside_home",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Request => "request",
        }
    }
}

/// Error counts of one upstream.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    errors: [AtomicU64; 5],
}

impl UpstreamCounters {
    pub fn error(&self, kind: UpstreamError) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self, kind: UpstreamError) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }
}

/// The counters one snapshot's requests update, indexed like the snapshot's policy.
#[derive(Debug)]
pub struct SnapshotMetrics {
    datasets: Box<[Arc<DatasetCounters>]>,
    unmatched: Arc<DatasetCounters>,
    upstreams: Box<[Arc<UpstreamCounters>]>,
}

impl SnapshotMetrics {
    /// The decision counters of dataset `i`, or of requests that matched no dataset.
    #[inline]
    pub fn dataset(&self, i: Option<usize>) -> &DatasetCounters {
        match i.and_then(|i| self.datasets.get(i)) {
            Some(d) => d,
            None => &self.unmatched,
        }
    }

    #[inline]
    pub fn upstream(&self, i: usize) -> Option<&UpstreamCounters> {
        self.upstreams.get(i).map(|u| &**u)
    }
}

/// Per-name counters of every dataset and upstream any loaded policy has named. A reload
/// that keeps a name keeps its counters (Prometheus sees no reset); a name a reload drops
/// keeps its last values.
#[derive(Default)]
struct Named {
    datasets: BTreeMap<Arc<str>, Arc<DatasetCounters>>,
    upstreams: BTreeMap<Arc<str>, Arc<UpstreamCounters>>,
}

/// The result of a policy reload, for `residency_policy_reloads_total`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Rejected,
}

/// Values read from elsewhere when the metrics are rendered.
pub struct Scrape<'a> {
    pub policy: &'a Policy,
    pub policy_loaded_at: jiff::Timestamp,
    pub geo_db: Option<&'a str>,
    pub log_written: u64,
    pub log_failures: u64,
    pub log_dropped: u64,
    pub log_healthy: bool,
    pub consents: usize,
    pub consent_subjects: usize,
    /// The consent cache, when the store is a database read through one.
    pub consent_cache: Option<CacheScrape<'a>>,
    /// Log shipping, when the log ships.
    pub ship: Option<crate::audit::write::ship::ShipStats>,
    /// The policy bundle source, when the rules come from one.
    pub source: Option<SourceScrape>,
}

/// The policy bundle source's figures, read when the metrics are rendered.
pub struct SourceScrape {
    /// When the source last answered a poll (with a bundle or with "not modified").
    pub last_poll: Option<jiff::Timestamp>,
    /// Bundles refused and polls failed since start, by reason: every reason, zeros
    /// included, so that an alert on a rate sees the series from the start.
    pub failures: Vec<(&'static str, u64)>,
}

/// The consent cache's figures (SPEC section 4.1), read when the metrics are rendered.
pub struct CacheScrape<'a> {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub invalidations: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub feed_lag: Duration,
    pub miss_time: &'a Histogram,
    pub batch_time: &'a Histogram,
}

/// Every metric of one proxy.
pub struct Metrics {
    named: Mutex<Named>,
    unmatched: Arc<DatasetCounters>,
    pub decision_time: Histogram,
    pub log_append_time: Histogram,
    pub request_time: Histogram,
    /// Responses by status class: 1xx…5xx, then "none" (the exchange ended without one).
    responses: [AtomicU64; 6],
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    reloads_ok: Counter,
    reloads_rejected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            named: Mutex::new(Named::default()),
            unmatched: Arc::new(DatasetCounters::default()),
            decision_time: Histogram::new(DECISION_BOUNDS),
            log_append_time: Histogram::new(LOG_BOUNDS),
            request_time: Histogram::new(REQUEST_BOUNDS),
            responses: Default::default(),
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            reloads_ok: Counter::default(),
            reloads_rejected: Counter::default(),
        }
    }

    fn named(&self) -> std::sync::MutexGuard<'_, Named> {
        // Only start-up, reloads and scrapes take this lock; a panic under it leaves maps
        // that are still consistent.
        self.named.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or finds) the counters of every dataset and upstream of `policy`, for a
    /// snapshot of it. Called off the request path, when a snapshot is built.
    pub fn for_policy(&self, policy: &Policy) -> SnapshotMetrics {
        let mut named = self.named();
        let datasets = policy
            .datasets
            .iter()
            .map(|d| named.datasets.entry(d.name.clone()).or_default().clone())
            .collect();
        let upstreams = policy
            .upstreams
            .iter()
            .map(|u| named.upstreams.entry(u.name.clone()).or_default().clone())
            .collect();
        SnapshotMetrics {
            datasets,
            unmatched: self.unmatched.clone(),
            upstreams,
        }
    }

    /// Counts the response status (0: none was sent) and the duration of an exchange.
    #[inline]
    pub fn exchange_ended(&self, status: u16, elapsed: Duration) {
        let class = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.request_time.observe(elapsed);
    }

    pub fn reloaded(&self, result: ReloadResult) {
        match result {
            ReloadResult::Ok => self.reloads_ok.inc(),
            ReloadResult::Rejected => self.reloads_rejected.inc(),
        }
    }

    /// Reloads so far with `result`.
    pub fn reloads(&self, result: ReloadResult) -> u64 {
        match result {
            ReloadResult::Ok => self.reloads_ok.get(),
            ReloadResult::Rejected => self.reloads_rejected.get(),
        }
    }

    /// The exposition text (OpenMetrics, written by the Prometheus project's own encoder).
    pub fn render(&self, s: &Scrape<'_>) -> String {
        let mut f = Families::default();
        f.family("residency_build_info", "The running build.", Kind::Gauge);
        f.sample(
            vec![("version", env!("CARGO_PKG_VERSION").into())],
            Val::I(1),
        );
        f.family(
            "residency_policy_info",
            "The policy in force: name, hash and geolocation database build.",
            Kind::Gauge,
        );
        f.sample(
            vec![
                ("name", s.policy.name.clone()),
                ("hash", s.policy.hash.to_string()),
                ("geo_db", s.geo_db.unwrap_or("").to_string()),
            ],
            Val::I(1),
        );
        f.family(
            "residency_policy_loaded_timestamp_seconds",
            "When the policy in force was loaded (Unix time).",
            Kind::Gauge,
        );
        f.sample(vec![], Val::I(s.policy_loaded_at.as_second()));
        f.family(
            "residency_policy_reloads_total",
            "Policy reloads (SIGHUP or a changed file), by result; a rejected one leaves the running policy in force.",
            Kind::Counter,
        );
        f.sample(vec![("result", "ok".into())], Val::U(self.reloads_ok.get()));
        f.sample(
            vec![("result", "rejected".into())],
            Val::U(self.reloads_rejected.get()),
        );
        if let Some(revision) = s.policy.revision {
            f.one(
                "residency_policy_revision",
                "The revision of the signed policy bundle in force.",
                Kind::Gauge,
                Val::U(revision),
            );
        }
        if let Some(source) = &s.source {
            render_source(&mut f, source);
        }

        f.family(
            "residency_decisions_total",
            "Decisions, one per request, by dataset (empty: none matched), decision, enforcement and reason.",
            Kind::Counter,
        );
        let named = self.named();
        let rows = named
            .datasets
            .iter()
            .map(|(n, c)| (&**n, &**c))
            .chain(std::iter::once(("", &*self.unmatched)));
        for (name, counters) in rows {
            counters.each(|reason, o, n| {
                let (decision, enforced) = OUTCOMES[o];
                f.sample(
                    vec![
                        ("dataset", name.to_string()),
                        ("decision", decision.into()),
                        ("enforced", enforced.into()),
                        ("reason", reason.as_str().into()),
                    ],
                    Val::U(n),
                );
            });
        }
        f.family(
            "residency_bulk_records_total",
            "Records of bulk objects filtered record by record, by dataset, outcome (kept, dropped, or would_drop: kept in audit mode although they would have been dropped) and the reason a record was or would have been dropped.",
            Kind::Counter,
        );
        let bulk_rows: Vec<(&str, &BulkCounters)> = named
            .datasets
            .iter()
            .filter_map(|(n, c)| Some((&**n, &**c.bulk.get()?)))
            .collect();
        for (name, b) in &bulk_rows {
            let mut row = |outcome: &str, reason: &str, n: u64| {
                f.sample(
                    vec![
                        ("dataset", name.to_string()),
                        ("outcome", outcome.into()),
                        ("reason", reason.into()),
                    ],
                    Val::U(n),
                );
            };
            row("kept", "", b.kept.load(Ordering::Relaxed));
            for (outcome, by) in [("dropped", &b.dropped), ("would_drop", &b.would_drop)] {
                for (i, a) in by.iter().enumerate() {
                    let n = a.load(Ordering::Relaxed);
                    if n > 0 {
                        row(
                            outcome,
                            Reason::of_bulk_code(crate::bulk::Reason(i as u8)),
                            n,
                        );
                    }
                }
            }
        }
        f.family(
            "residency_bulk_bytes_total",
            "Bytes of bulk objects through the record filter, by dataset and direction (in: as received from the upstream; out: as sent to the client).",
            Kind::Counter,
        );
        for (name, b) in &bulk_rows {
            for (dir, a) in [("in", &b.bytes_in), ("out", &b.bytes_out)] {
                f.sample(
                    vec![("dataset", name.to_string()), ("direction", dir.into())],
                    Val::U(a.load(Ordering::Relaxed)),
                );
            }
        }
        f.family(
            "residency_bulk_exchanges_total",
            "Filtered exchanges, by dataset and whether the object was filtered to its end (complete) or the response was cut short (cut: the client went away, or the upstream, the consent store or the log failed).",
            Kind::Counter,
        );
        for (name, b) in &bulk_rows {
            for (end, a) in [("complete", &b.complete), ("cut", &b.cut)] {
                f.sample(
                    vec![("dataset", name.to_string()), ("end", end.into())],
                    Val::U(a.load(Ordering::Relaxed)),
                );
            }
        }
        f.family(
            "residency_upstream_errors_total",
            "Failures between the proxy and an upstream, by upstream and kind.",
            Kind::Counter,
        );
        for (name, c) in &named.upstreams {
            for kind in UpstreamError::ALL {
                f.sample(
                    vec![
                        ("upstream", name.to_string()),
                        ("error", kind.as_str().into()),
                    ],
                    Val::U(c.errors(kind)),
                );
            }
        }
        drop(named);

        f.family(
            "residency_responses_total",
            "Exchanges ended, by response status class (none: no response was sent).",
            Kind::Counter,
        );
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx", "none"]
            .iter()
            .enumerate()
        {
            f.sample(
                vec![("code", (*class).into())],
                Val::U(self.responses[i].load(Ordering::Relaxed)),
            );
        }
        self.decision_time.render(
            &mut f,
            "residency_decision_duration_seconds",
            "Time from a request head reaching the pipeline to its decision.",
        );
        self.log_append_time.render(
            &mut f,
            "residency_log_append_duration_seconds",
            "Time a request waits for its decision record to be written before anything is forwarded.",
        );
        self.request_time.render(
            &mut f,
            "residency_request_duration_seconds",
            "Whole exchanges, from the request head to the end of the response.",
        );

        let counters: [(&str, &str, u64); 3] = [
            (
                "residency_log_records_written_total",
                "Decision-log records written.",
                s.log_written,
            ),
            (
                "residency_log_write_failures_total",
                "Decision-log records whose write failed.",
                s.log_failures,
            ),
            (
                "residency_log_records_dropped_total",
                "Outcome records that never reached the decision-log writer.",
                s.log_dropped,
            ),
        ];
        for (name, help, v) in counters {
            f.one(name, help, Kind::Counter, Val::U(v));
        }
        let gauges: [(&str, &str, i64); 5] = [
            (
                "residency_log_writable",
                "1 while the last decision-log write succeeded.",
                i64::from(s.log_healthy),
            ),
            (
                "residency_consents",
                "Consent records held in the in-memory index.",
                s.consents as i64,
            ),
            (
                "residency_consent_subjects",
                "Data subjects with at least one consent in the index.",
                s.consent_subjects as i64,
            ),
            (
                "residency_connections_open",
                "Client connections open on the data listener.",
                self.connections_open.get(),
            ),
            (
                "residency_datasets",
                "Datasets in the policy in force.",
                s.policy.datasets.len() as i64,
            ),
        ];
        for (name, help, v) in gauges {
            f.one(name, help, Kind::Gauge, Val::I(v));
        }
        if let Some(c) = &s.consent_cache {
            render_cache(&mut f, c);
        }
        if let Some(ship) = &s.ship {
            render_ship(&mut f, ship);
        }
        f.one(
            "residency_connections_accepted_total",
            "Client connections accepted on the data listener.",
            Kind::Counter,
            Val::U(self.connections_accepted.get()),
        );
        f.encode()
    }
}

fn render_source(f: &mut Families, s: &SourceScrape) {
    f.family(
        "residency_policy_source_failures_total",
        "Policy bundles refused and polls of the policy source failed, by reason; the live revision keeps serving.",
        Kind::Counter,
    );
    for (reason, n) in &s.failures {
        f.sample(vec![("reason", (*reason).into())], Val::U(*n));
    }
    if let Some(at) = s.last_poll {
        f.one(
            "residency_policy_source_last_poll_timestamp_seconds",
            "When the policy source last answered a poll (Unix time).",
            Kind::Gauge,
            Val::I(at.as_second()),
        );
    }
}

fn render_ship(f: &mut Families, s: &crate::audit::write::ship::ShipStats) {
    let series: [(&str, &str, Kind, u64); 7] = [
        (
            "residency_log_ship_files_total",
            "Sealed decision-log files whose upload to object storage was confirmed.",
            Kind::Counter,
            s.shipped_files,
        ),
        (
            "residency_log_ship_bytes_total",
            "Compressed bytes of decision log uploaded to object storage.",
            Kind::Counter,
            s.shipped_bytes,
        ),
        (
            "residency_log_ship_failures_total",
            "Failed shipping attempts (each retried with back-off).",
            Kind::Counter,
            s.failures,
        ),
        (
            "residency_log_spool_files",
            "Sealed decision-log files waiting to ship.",
            Kind::Gauge,
            s.spool_files,
        ),
        (
            "residency_log_spool_bytes",
            "Bytes of sealed decision-log files waiting to ship.",
            Kind::Gauge,
            s.spool_bytes,
        ),
        (
            "residency_log_spool_max_bytes",
            "log.ship.spool_max_bytes: once the spool holds this much, the log refuses records.",
            Kind::Gauge,
            s.spool_max_bytes,
        ),
        (
            "residency_log_ship_oldest_unshipped_seconds",
            "Age of the oldest sealed file still waiting to ship; 0 when none waits.",
            Kind::Gauge,
            s.oldest_age_secs,
        ),
    ];
    for (name, help, kind, v) in series {
        f.one(name, help, kind, Val::U(v));
    }
    f.one(
        "residency_log_ship_cpu_seconds_total",
        "CPU time spent reading and compressing sealed decision-log files for shipping.",
        Kind::Counter,
        Val::F(s.cpu.as_secs_f64()),
    );
}

fn render_cache(f: &mut Families, c: &CacheScrape<'_>) {
    let counters: [(&str, &str, u64); 4] = [
        (
            "residency_consent_cache_hits_total",
            "Consent lookups answered from the cache (a subject's consents, or that it has none).",
            c.hits,
        ),
        (
            "residency_consent_cache_misses_total",
            "Consent lookups of a subject the cache did not hold.",
            c.misses,
        ),
        (
            "residency_consent_cache_evictions_total",
            "Subjects dropped from the consent cache to stay within consent.cache_max_bytes.",
            c.evictions,
        ),
        (
            "residency_consent_cache_invalidations_total",
            "Subjects the consent cache was told to forget (changes from the store's feed and this proxy's API; a large change forgets all at once and counts once).",
            c.invalidations,
        ),
    ];
    for (name, help, v) in counters {
        f.one(name, help, Kind::Counter, Val::U(v));
    }
    let gauges: [(&str, &str, u64); 2] = [
        (
            "residency_consent_cache_bytes",
            "Bytes the consent cache holds, as it counts them against its budget.",
            c.bytes,
        ),
        (
            "residency_consent_cache_max_bytes",
            "The consent cache's budget (consent.cache_max_bytes).",
            c.max_bytes,
        ),
    ];
    for (name, help, v) in gauges {
        f.one(name, help, Kind::Gauge, Val::U(v));
    }
    f.one(
        "residency_consent_feed_lag_seconds",
        "Age of the newest consent change when the feed read it (PostgreSQL).",
        Kind::Gauge,
        Val::F(c.feed_lag.as_secs_f64()),
    );
    c.miss_time.render(
        f,
        "residency_consent_lookup_duration_seconds",
        "Time a consent cache miss took to be answered by the store.",
    );
    c.batch_time.render(
        f,
        "residency_consent_batch_lookup_duration_seconds",
        "Time the store took to answer one query for a batch of cache misses (a bulk object's records).",
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug)]
enum Val {
    U(u64),
    I(i64),
    F(f64),
    /// Sum in seconds, count, and each bucket's own count by upper bound in seconds (the
    /// last is `+Inf`).
    H(f64, u64, Vec<(f64, u64)>),
}

#[derive(Debug)]
struct Family {
    /// As documented; a counter's `_total` is left for the encoder to add.
    name: String,
    help: String,
    kind: Kind,
    series: Vec<(Vec<(&'static str, String)>, Val)>,
}

/// The values of one scrape, read from the atomics, handed to `prometheus-client` as a
/// collector: the hot path keeps its plain atomic adds, and the exposition (names, label
/// escaping, histogram lines, `# EOF`) is the Prometheus project's own.
#[derive(Debug, Default)]
struct Families(Vec<Family>);

impl Families {
    fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let name = match kind {
            Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        self.0.push(Family {
            name: name.to_string(),
            help: help.to_string(),
            kind,
            series: Vec::new(),
        });
    }

    fn sample(&mut self, mut labels: Vec<(&'static str, String)>, v: Val) {
        // prometheus-client 0.24 writes label values as given: the exposition's escapes are
        // ours to add (a policy or dataset name may hold a quote or a backslash).
        for (_, value) in &mut labels {
            if value.contains(['\\', '"', '\n']) {
                *value = escape(value);
            }
        }
        self.0
            .last_mut()
            .expect("a family before its samples")
            .series
            .push((labels, v));
    }

    /// A family of one unlabelled series.
    fn one(&mut self, name: &str, help: &str, kind: Kind, v: Val) {
        self.family(name, help, kind);
        self.sample(Vec::new(), v);
    }

    fn encode(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// A label value as the exposition format wants it: `\`, `"` and line feeds escaped.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn put(m: &mut MetricEncoder<'_>, v: &Val) -> std::fmt::Result {
    match v {
        Val::U(n) => m.encode_counter::<NoLabelSet, _, u64>(n, None),
        Val::I(n) => m.encode_gauge(n),
        Val::F(x) => m.encode_gauge(x),
        Val::H(sum, count, buckets) => {
            m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)
        }
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut m = encoder.encode_descriptor(&f.name, &f.help, None, kind)?;
            for (labels, v) in &f.series {
                // A counter's value goes through the counter encoder (`_total`), whatever
                // its number type.
                let v = match (f.kind, v) {
                    (Kind::Counter, Val::F(x)) => {
                        if labels.is_empty() {
                            m.encode_counter::<NoLabelSet, _, f64>(x, None)?;
                        } else {
                            m.encode_family(labels)?
                                .encode_counter::<NoLabelSet, _, f64>(x, None)?;
                        }
                        continue;
                    }
                    (Kind::Gauge, Val::U(n)) => Val::I(i64::try_from(*n).unwrap_or(i64::MAX)),
                    _ => v.clone(),
                };
                if labels.is_empty() {
                    put(&mut m, &v)?;
                } else {
                    put(&mut m.encode_family(labels)?, &v)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(datasets: &[&str]) -> Policy {
        let mut text = String::from(
            "[policy]\nname='m'\nhome='CN'\n[log]\npseudonymize=false\n\
             [[upstreams]]\nname='cn-store'\nurl='http://127.0.0.2:9000'\n",
        );
        for d in datasets {
            text.push_str(&format!(
                "[[datasets]]\nname='{d}'\nmatch={{path_prefix='/{d}/'}}\nupstream='cn-store'\ncategory='user'\ncross_border='allow'\nthird_party='allow'\n"
            ));
        }
        crate::policy::compile::from_str("m.toml", &text).unwrap()
    }

    fn scrape(p: &Policy) -> Scrape<'_> {
        Scrape {
            policy: p,
            policy_loaded_at: jiff::Timestamp::UNIX_EPOCH,
            geo_db: None,
            log_written: 0,
            log_failures: 0,
            log_dropped: 0,
            log_healthy: true,
            consents: 0,
            consent_subjects: 0,
            consent_cache: None,
            ship: None,
            source: None,
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_le() {
        let h = Histogram::new(&[1_000, 2_000]);
        h.observe(Duration::from_nanos(1_000));
        h.observe(Duration::from_nanos(1_500));
        h.observe(Duration::from_secs(3));
        let mut f = Families::default();
        h.render(&mut f, "x", "help");
        let out = f.encode();
        let value = |prefix: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {out}"))
                .trim()
                .parse()
                .unwrap()
        };
        let le = |bound: &str| -> f64 {
            out.lines()
                .filter_map(|l| l.strip_prefix("x_bucket{le=\""))
                .find_map(|l| {
                    let (b, rest) = l.split_once('"')?;
                    let hit = if bound == "+Inf" {
                        b == "+Inf"
                    } else {
                        b.parse::<f64>().ok()? == bound.parse::<f64>().unwrap()
                    };
                    hit.then(|| rest.trim_start_matches('}').trim().parse().unwrap())
                })
                .unwrap_or_else(|| panic!("no bucket {bound} in {out}"))
        };
        assert_eq!(le("0.000001"), 1.0, "{out}");
        assert_eq!(le("0.000002"), 2.0, "{out}");
        assert_eq!(le("+Inf"), 3.0, "{out}");
        assert_eq!(value("x_sum "), 3.0000025);
        assert_eq!(value("x_count "), 3.0);
        assert!(out.ends_with("# EOF\n"), "{out}");
    }

    #[test]
    fn a_reload_keeps_the_counters_of_a_dataset_that_moved() {
        let m = Metrics::new();
        let first = policy(&["a", "b"]);
        let s1 = m.for_policy(&first);
        s1.dataset(Some(1))
            .record(Reason::Domestic, Verdict::Allow, true);
        // The reload puts "b" first and adds "c": the snapshot's indexes follow the new policy.
        let second = policy(&["b", "c", "a"]);
        let s2 = m.for_policy(&second);
        s2.dataset(Some(0))
            .record(Reason::CrossBorderDenied, Verdict::Deny, false);
        s2.dataset(None)
            .record(Reason::NoRoute, Verdict::Deny, true);
        let text = m.render(&scrape(&second));
        assert!(text.contains("residency_decisions_total{dataset=\"b\",decision=\"allow\",enforced=\"true\",reason=\"domestic\"} 1\n"), "{text}");
        assert!(text.contains("residency_decisions_total{dataset=\"b\",decision=\"deny\",enforced=\"false\",reason=\"cross_border_denied\"} 1\n"), "{text}");
        assert!(text.contains("residency_decisions_total{dataset=\"\",decision=\"deny\",enforced=\"true\",reason=\"no_route\"} 1\n"), "{text}");
        assert!(!text.contains("dataset=\"a\""), "{text}");
        assert_eq!(s2.dataset(Some(0)).total(), 2);
    }

    #[test]
    fn label_values_are_escaped_and_counters_keep_their_documented_names() {
        let m = Metrics::new();
        let p = crate::policy::compile::from_str(
            "m.toml",
            "[policy]\nname='we\"ird\\name'\nhome='CN'\n[log]\npseudonymize=false\n[[upstreams]]\nname='u'\nurl='http://127.0.0.1:1'\n",
        )
        .unwrap();
        let text = m.render(&scrape(&p));
        assert!(
            text.contains("residency_policy_info{name=\"we\\\"ird\\\\name\","),
            "{text}"
        );
        assert!(
            text.contains("# TYPE residency_decisions counter\n"),
            "{text}"
        );
        assert!(
            text.contains("\nresidency_connections_accepted_total 0\n"),
            "{text}"
        );
    }
}
