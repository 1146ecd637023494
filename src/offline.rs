//! The decision environment for offline tools (`explain`, `test`, benchmarks): the same
//! locator and consent index as the proxy, upstreams resolved once, a clock that can be set,
//! and hypothetical requests built from what a user typed.

use crate::bulk::{
    Batch, BulkError, Compression, Counts, Emitted, Format, Limits, ParquetFilter, StreamFilter,
    UnsupportedEncoding, Verdict, run_parquet, run_stream,
};
use crate::consent::ConsentIndex;
use crate::consent::cache::{Loader, POOL_SIZE, Reader};
use crate::consent::index::Lookup;
use crate::consent::postgres::PgReader;
use crate::consent::record::Consent;
use crate::consent::sqlite::SqliteReader;
use crate::geo::Locator;
use crate::policy::Policy;
use crate::policy::decide::Copied;
use crate::policy::decide::{ConsentLookup, Env, Request};
use crate::policy::decide::{RecordTerms, RecordVerdict};
use crate::policy::decision::Location;
use crate::policy::decision::{Decision, Reason};
use crate::policy::model::Upstream;
use crate::policy::model::{ConsentSettings, ConsentStore};
use bytes::Bytes;
use compact_str::CompactString;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A fixed environment for deciding requests outside the proxy.
pub struct OfflineEnv {
    pub locator: Locator,
    pub upstreams: Vec<Result<Arc<[SocketAddr]>, String>>,
    pub consents: Arc<ConsentIndex>,
    /// Unix microseconds.
    pub now: i64,
}

impl OfflineEnv {
    /// Resolves every upstream of `policy` now, with the system resolver.
    pub fn new(
        policy: &Policy,
        locator: Locator,
        consents: Arc<ConsentIndex>,
        now: i64,
    ) -> OfflineEnv {
        let upstreams = policy.upstreams.iter().map(resolve).collect();
        OfflineEnv {
            locator,
            upstreams,
            consents,
            now,
        }
    }
}

/// The addresses `up`'s host resolves to now, with the system resolver (an IP literal
/// resolves to itself without a query).
pub fn resolve(up: &Upstream) -> Result<Arc<[SocketAddr]>, String> {
    (up.host.as_str(), up.port)
        .to_socket_addrs()
        .map(|a| {
            a.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect::<Vec<_>>()
                .into()
        })
        .map_err(|e| format!("does not resolve: {e}"))
}

/// A request described on the command line or in a test case that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum HypotheticalError {
    #[error("\"{0}\" is not an HTTP method")]
    Method(String),
    #[error("header \"{0}\" is not `Name: value`")]
    HeaderLine(String),
    #[error("\"{0}\" is not a header name")]
    HeaderName(String),
    #[error("\"{0}\" is not a header value")]
    HeaderValue(String),
}

/// A request that `explain` and `test` decide: what the proxy would have received.
#[derive(Clone, Debug)]
pub struct Hypothetical {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The socket peer.
    pub client_ip: IpAddr,
    /// A verified mTLS identity (certificate SAN).
    pub identity: Option<String>,
    /// What a copy request copies, from its headers.
    pub copy_source: Copied<String>,
}

impl Hypothetical {
    /// `target` is a path, optionally with `?query`; `purpose` goes in the policy's purpose
    /// header and `host` in `Host`, after `headers`.
    #[allow(clippy::too_many_arguments)]
    pub fn new<'h>(
        policy: &Policy,
        method: &str,
        target: &str,
        client_ip: IpAddr,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        purpose: Option<&str>,
        host: Option<&str>,
        identity: Option<&str>,
    ) -> Result<Hypothetical, HypotheticalError> {
        // As received: `serve` refuses a standard method spelled in lower case, and so must a
        // rehearsal of it.
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| HypotheticalError::Method(method.into()))?;
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target.to_string(), None),
        };
        let value = |v: &str| {
            HeaderValue::from_str(v.trim()).map_err(|_| HypotheticalError::HeaderValue(v.into()))
        };
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|_| HypotheticalError::HeaderName(k.into()))?;
            map.append(name, value(v)?);
        }
        if let Some(p) = purpose {
            map.insert(policy.consent.purpose_header.clone(), value(p)?);
        }
        if let Some(h) = host {
            map.insert(http::header::HOST, value(h)?);
        }
        let copy_source = match crate::policy::decide::copy_source(&map) {
            Copied::Nothing => Copied::Nothing,
            Copied::From(p) => Copied::From(p.into_owned()),
            Copied::Unreadable => Copied::Unreadable,
        };
        Ok(Hypothetical {
            method,
            path,
            query,
            headers: map,
            client_ip,
            identity: identity.map(str::to_string),
            copy_source,
        })
    }

    /// Splits `Name: value` command-line header arguments.
    pub fn header_line(line: &str) -> Result<(&str, &str), HypotheticalError> {
        line.split_once(':')
            .ok_or_else(|| HypotheticalError::HeaderLine(line.into()))
    }

    /// The `Host` header, if any.
    pub fn host(&self) -> Option<&str> {
        self.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    }

    /// The request as `decide` takes it.
    pub fn request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            host: self.host(),
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
            peer: self.client_ip,
            identity: self.identity.as_deref(),
            pick: 0,
            copy_source: self.copy_source.as_deref(),
        }
    }
}

impl Env for OfflineEnv {
    type Addrs = Arc<[SocketAddr]>;

    fn locate(&self, ip: IpAddr) -> Location {
        self.locator.locate(ip)
    }

    fn upstream_addrs(&self, upstream: usize) -> Result<Arc<[SocketAddr]>, String> {
        self.upstreams[upstream].clone()
    }

    fn with_consents<R>(&self, subject: &str, f: impl FnOnce(ConsentLookup<&[Consent]>) -> R) -> R {
        self.consents.with(subject, |found| match found {
            Some(c) => f(ConsentLookup::Found(c)),
            None => f(ConsentLookup::NotFound),
        })
    }

    fn now(&self) -> i64 {
        self.now
    }
}

/// An environment that notes every subject a decision asks about, over another one: the
/// offline tools read those subjects' consents from a registry and decide again.
pub struct Asking<'e, E> {
    inner: &'e E,
    asked: std::cell::RefCell<Vec<String>>,
}

impl<'e, E: Env> Asking<'e, E> {
    pub fn new(inner: &'e E) -> Self {
        Asking {
            inner,
            asked: Default::default(),
        }
    }

    /// The subjects asked about, in order, each once.
    pub fn asked(self) -> Vec<String> {
        self.asked.into_inner()
    }
}

impl<E: Env> Env for Asking<'_, E> {
    type Addrs = E::Addrs;

    fn locate(&self, ip: IpAddr) -> Location {
        self.inner.locate(ip)
    }

    fn upstream_addrs(&self, upstream: usize) -> Result<E::Addrs, String> {
        self.inner.upstream_addrs(upstream)
    }

    fn with_consents<R>(&self, subject: &str, f: impl FnOnce(ConsentLookup<&[Consent]>) -> R) -> R {
        let mut asked = self.asked.borrow_mut();
        if !asked.iter().any(|s| s == subject) {
            asked.push(subject.to_string());
        }
        drop(asked);
        self.inner.with_consents(subject, f)
    }

    fn now(&self) -> i64 {
        self.inner.now()
    }
}

// ---------------------------------------------------------------------------------------
// Bulk objects, offline: a body run through the proxy's own filter, each distinct subject
// judged by `RecordTerms::judge` as the proxy judges it (`explain --body`, policy tests).

/// How long a batch of subjects may take to be read from a database store offline. Longer
/// than the proxy's `lookup_timeout`: a tool opens its connections cold, and a store that
/// cannot answer is an error here, not a fail-closed refusal.
const OFFLINE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many bytes of the body are read at a time.
const BODY_CHUNK: usize = 64 * 1024;

/// How the object of a request is compressed, as the proxy tells from the upstream's answer:
/// its `Content-Encoding` (here given among the request's headers) and the object's key (the
/// path). Several `Content-Encoding` values are one list, which the filter refuses.
pub fn body_compression(h: &Hypothetical) -> Result<Compression, UnsupportedEncoding> {
    let values: Vec<&str> = h
        .headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not text)"))
        .collect();
    let joined = values.join(", ");
    Compression::detect((!values.is_empty()).then_some(joined.as_str()), &h.path)
}

/// The compression a body file's first bytes show, for a hint when the request says none.
pub fn sniff_compression(first: &[u8]) -> Option<Compression> {
    if first.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if first.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else {
        None
    }
}

/// Why a body could not be filtered offline.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(
        "the object is not filtered record by record: the request is decided {verdict} {reason} (rule {rule}), so {fate}; only a request decided consent_filtered is filtered"
    )]
    NotFiltered {
        verdict: &'static str,
        reason: Reason,
        rule: String,
        fate: &'static str,
    },
    #[error("{}: {source}", path.display())]
    Encoding {
        path: PathBuf,
        source: UnsupportedEncoding,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} cannot be filtered to its end: {source}", path.display())]
    Bulk { path: PathBuf, source: BulkError },
    #[error("the consent store cannot answer for the body's subjects: {0}")]
    Store(String),
}

impl BodyError {
    /// The refusal of a body for a decision that does not filter its object.
    pub fn not_filtered(d: &Decision<'_>) -> BodyError {
        BodyError::NotFiltered {
            verdict: d.verdict.as_str(),
            reason: d.reason,
            rule: d.rule.to_string(),
            fate: if d.forwards() {
                "the object would leave whole"
            } else {
                "nothing would leave"
            },
        }
    }
}

/// The consent cache of a `sqlite:` or `postgres://` store, filled as the proxy fills it: a
/// batch's subjects that it does not hold are read in one query, and only those.
pub struct CacheReader {
    loader: Loader,
    runtime: tokio::runtime::Runtime,
}

impl CacheReader {
    /// A reader of the store `settings` names; `None` for a store that is not a database.
    /// Nothing is read (nor created) until a batch asks.
    pub fn open(settings: &ConsentSettings) -> Result<Option<CacheReader>, BodyError> {
        let store = |e: &dyn std::fmt::Display| BodyError::Store(e.to_string());
        let reader = match &settings.store {
            ConsentStore::Sqlite(path) => {
                Reader::Sqlite(SqliteReader::new(path.clone(), POOL_SIZE))
            }
            ConsentStore::Postgres(url) => Reader::Postgres(Box::new(
                PgReader::new(url, settings.read_url.as_deref(), POOL_SIZE)
                    .map_err(|e| store(&e))?,
            )),
            ConsentStore::None | ConsentStore::File(_) => return Ok(None),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| store(&e))?;
        let index = Arc::new(ConsentIndex::cache(settings.cache_max_bytes));
        Ok(Some(CacheReader {
            loader: Loader::new(index, reader, OFFLINE_LOOKUP_TIMEOUT),
            runtime,
        }))
    }

    fn fill(&self, subjects: &[CompactString]) -> Result<(), BodyError> {
        self.runtime
            .block_on(self.loader.fill_many(subjects))
            .map_err(|e| BodyError::Store(e.to_string()))
    }
}

/// Where the consents of a body's subjects come from.
pub enum BodyConsents<'a> {
    /// A complete index (a consents file, a test case's consents): a subject it does not
    /// hold has no consent.
    Index(&'a ConsentIndex),
    /// A database store, read a batch at a time through its cache.
    Cache(&'a CacheReader),
}

impl BodyConsents<'_> {
    fn index(&self) -> &ConsentIndex {
        match self {
            BodyConsents::Index(i) => i,
            BodyConsents::Cache(c) => c.loader.index(),
        }
    }
}

/// What the proxy would make of a body: the filter's counts, and the distinct subjects
/// whose records would leave.
#[derive(Debug)]
pub struct FilteredBody {
    pub format: Format,
    pub compression: Compression,
    /// Audit mode: nothing is dropped, and would-drops are counted instead.
    pub audit: bool,
    pub counts: Counts,
    /// Distinct subjects with a record that leaves under a consent.
    pub subjects_kept: u64,
    /// Audit mode: distinct subjects with a record that leaves without a consent.
    pub subjects_would_drop: u64,
}

impl FilteredBody {
    /// Records dropped, by the reason's name (the filter's own reasons first).
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.counts
            .dropped_by_reason()
            .map(|(r, n)| (Reason::of_bulk_code(r), n))
            .collect()
    }

    /// Audit mode: records kept that would have been dropped, by the reason's name.
    pub fn would_drop(&self) -> Vec<(&'static str, u64)> {
        self.counts
            .would_drop_by_reason()
            .map(|(r, n)| (Reason::of_bulk_code(r), n))
            .collect()
    }
}

/// Runs the object in the file `body` through the filter the proxy runs on the upstream's
/// answer to a request decided `d` (which must be `consent_filtered`), judging each distinct
/// subject of each batch at `now` with the proxy's own terms. The filtered object is
/// written to `out` when one is given.
pub fn filter_body(
    policy: &Policy,
    d: &Decision<'_>,
    now: i64,
    body: &Path,
    compression: Compression,
    consents: &BodyConsents<'_>,
    out: Option<(&Path, &mut dyn std::io::Write)>,
) -> Result<FilteredBody, BodyError> {
    let (Some(terms), Some(ds)) = (
        RecordTerms::of(policy, d, now),
        d.dataset.map(|i| &policy.datasets[i]),
    ) else {
        return Err(BodyError::not_filtered(d));
    };
    let Some(records) = &ds.records else {
        return Err(BodyError::not_filtered(d));
    };
    let spec = &records.spec;
    let audit = !d.enforced;
    let read = |source| BodyError::Read {
        path: body.into(),
        source,
    };
    let bulk = |source| BodyError::Bulk {
        path: body.into(),
        source,
    };
    let file = std::fs::File::open(body).map_err(read)?;
    let mut judge = Judge {
        policy,
        terms,
        consents,
        audit,
        kept: HashSet::new(),
        would_drop: HashSet::new(),
        failed: None,
    };
    let mut totals = Counts::default();
    let mut write_failed = None;
    let mut out = out;
    let sink = |e: Emitted| {
        totals.add(&e.counts);
        if let (Some((_, w)), None) = (out.as_mut(), &write_failed) {
            write_failed = w.write_all(&e.bytes).err();
        }
    };
    match spec.format {
        Format::Parquet => {
            let mut filter = ParquetFilter::new(file, spec).map_err(bulk)?;
            run_parquet(&mut filter, |b, v| judge.batch(b, v), sink).map_err(bulk)?;
        }
        Format::Jsonl | Format::Csv => {
            let mut filter = StreamFilter::new(spec, compression, Limits::default())
                .map_err(bulk)?
                .forward_blank_lines(audit);
            let mut chunks = Chunks { file, failed: None };
            let ran = run_stream(&mut filter, &mut chunks, |b, v| judge.batch(b, v), sink);
            if let Some(e) = chunks.failed {
                return Err(read(e));
            }
            ran.map_err(bulk)?;
        }
    }
    if let Some(e) = judge.failed {
        return Err(e);
    }
    if let Some((path, w)) = out
        && let Some(source) = write_failed.or_else(|| w.flush().err())
    {
        return Err(BodyError::Write {
            path: path.into(),
            source,
        });
    }
    Ok(FilteredBody {
        format: spec.format,
        compression,
        audit,
        counts: totals,
        subjects_kept: judge.kept.len() as u64,
        subjects_would_drop: judge.would_drop.len() as u64,
    })
}

/// The body file as chunks; a read error ends them and is kept for the caller.
struct Chunks {
    file: std::fs::File,
    failed: Option<std::io::Error>,
}

impl Iterator for Chunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let mut buf = vec![0; BODY_CHUNK];
        loop {
            match std::io::Read::read(&mut self.file, &mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    buf.truncate(n);
                    return Some(Bytes::from(buf));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.failed = Some(e);
                    return None;
                }
            }
        }
    }
}

/// Judges the batches of one body, and notes which subjects' records leave.
struct Judge<'a> {
    policy: &'a Policy,
    terms: RecordTerms<'a>,
    consents: &'a BodyConsents<'a>,
    audit: bool,
    kept: HashSet<CompactString>,
    would_drop: HashSet<CompactString>,
    /// The store could not answer: the records after are dropped unjudged, and the run fails.
    failed: Option<BodyError>,
}

impl Judge<'_> {
    fn batch(&mut self, batch: Batch<'_>, out: &mut Vec<Verdict>) {
        let subjects = batch.distinct_subjects();
        if let (BodyConsents::Cache(cache), None) = (self.consents, &self.failed) {
            self.failed = cache.fill(&subjects).err();
        }
        let unavailable = Verdict::Drop(Reason::ConsentStoreUnavailable.bulk_code());
        let mut per_subject: Vec<Verdict> = subjects.iter().map(|s| self.subject(s)).collect();
        if let (BodyConsents::Cache(cache), None) = (self.consents, &self.failed) {
            // A subject filled for this batch but evicted before it was judged (a batch of
            // more subjects than the cache holds) is read again alone.
            for (s, v) in subjects.iter().zip(per_subject.iter_mut()) {
                if *v == unavailable {
                    if let Err(e) = cache.fill(std::slice::from_ref(s)) {
                        self.failed = Some(e);
                        break;
                    }
                    *v = self.subject(s);
                }
            }
        }
        batch.verdicts_by_subject(&per_subject, self.audit, out);
        for (r, v) in batch.records().zip(out.iter()) {
            let Some(i) = r.subject_id() else { continue };
            match v {
                Verdict::Keep => {
                    self.kept.insert(subjects[i].clone());
                }
                Verdict::KeepAudit(_) => {
                    self.would_drop.insert(subjects[i].clone());
                }
                Verdict::Drop(_) => {}
            }
        }
    }

    /// One subject's records, judged with the proxy's own terms.
    fn subject(&self, subject: &str) -> Verdict {
        self.consents.index().lookup(subject, false, |found| {
            let lookup = match found {
                Lookup::Found(c) => ConsentLookup::Found(c),
                Lookup::NotFound => ConsentLookup::NotFound,
                Lookup::Miss => ConsentLookup::Unavailable,
            };
            match self.terms.judge(self.policy, lookup) {
                RecordVerdict::Keep(..) => Verdict::Keep,
                RecordVerdict::Drop(r) => Verdict::Drop(r.bulk_code()),
            }
        })
    }
}

/// Decisions that need the consent index and the locator as the offline tools build them:
/// where a consent's destinations are checked (SPEC section 4).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::{ConsentIndex, ConsentRecord};
    use crate::policy::country::Country;
    use crate::policy::decide::{Copied, RecordVerdict, Request};
    use crate::policy::{Decision, Policy, Reason, decide};
    use http::{HeaderMap, Method};
    use std::borrow::Cow;

    /// A policy at home in CN: `payments` needs consent abroad and for third parties; the
    /// recipients are a US bureau with an office address at home (127.0.0.21, CN) and one
    /// abroad (127.0.0.20, US), and a CN partner (127.0.0.30). 127.0.0.40 is located nowhere.
    fn world(consent: ConsentRecord) -> (Policy, OfflineEnv) {
        let text = "[policy]\nname = \"unit\"\nhome = \"CN\"\nunknown_location = \"foreign\"\n\
            [log]\npseudonymize = false\n\
            [consent]\npurpose_header = \"x-purpose\"\n\
            [[networks]]\ncidr = \"127.0.0.2/32\"\ncountry = \"CN\"\n\
            [[networks]]\ncidr = \"127.0.0.21/32\"\ncountry = \"CN\"\n\
            [[networks]]\ncidr = \"127.0.0.20/32\"\ncountry = \"US\"\n\
            [[networks]]\ncidr = \"127.0.0.30/32\"\ncountry = \"CN\"\n\
            [[upstreams]]\nname = \"store\"\nurl = \"http://127.0.0.2:9000\"\n\
            [[recipients]]\nid = \"bureau\"\nrelation = \"third_party\"\ncountry = \"US\"\n\
            networks = [\"127.0.0.20/32\", \"127.0.0.21/32\"]\n\
            [[recipients]]\nid = \"partner\"\nrelation = \"third_party\"\ncountry = \"CN\"\n\
            networks = [\"127.0.0.30/32\", \"127.0.0.40/32\"]\n\
            [[datasets]]\nname = \"payments\"\nmatch = { path_prefix = \"/payments/\" }\n\
            upstream = \"store\"\ncategory = \"user.financial\"\nsubject = { path_segment = 2 }\n\
            cross_border = \"consent\"\nthird_party = \"consent\"\n";
        let policy = crate::policy::compile::from_str("unit.toml", text).expect("compiles");
        let index = std::sync::Arc::new(ConsentIndex::new());
        index.upsert(&consent).expect("a valid consent");
        let locator = Locator::new(&policy, None);
        let now = "2026-06-01T00:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_microsecond();
        let env = OfflineEnv::new(&policy, locator, index, now);
        (policy, env)
    }

    fn granted(recipient: &str, destinations: &[&str]) -> ConsentRecord {
        ConsentRecord {
            recipient: recipient.into(),
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
            ..crate::consent::record::sample("c1", "u1")
        }
    }

    fn decide_from(policy: &Policy, env: &OfflineEnv, peer: &str) -> Decision<'static> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-purpose",
            http::HeaderValue::from_static("credit_scoring"),
        );
        let req = Request {
            method: &Method::GET,
            host: Some("storage.internal"),
            path: "/payments/u1/2026-01.json",
            query: None,
            headers: &headers,
            peer: peer.parse().unwrap(),
            identity: None,
            pick: 0,
            copy_source: Copied::Nothing,
        };
        let d = decide(policy, env, &req, &mut ());
        // Only what the assertions read outlives the request.
        let mut out = Decision::new(d.reason, "-");
        out.verdict = d.verdict;
        out.detail = d.detail.map(|s| Cow::Owned(s.into_owned()));
        out.destinations = d.destinations;
        out.outside_home = d.outside_home;
        out.consent = d.consent;
        out
    }

    #[test]
    fn a_foreign_recipient_at_a_home_address_needs_only_its_foreign_destinations() {
        let (policy, env) = world(granted("bureau", &["US"]));
        let d = decide_from(&policy, &env, "127.0.0.21");
        assert_eq!(d.reason, Reason::Consented, "{:?}", d.detail);
        let us = Country::parse("US").unwrap();
        let cn = Country::parse("CN").unwrap();
        // The decision still records both; only the foreign one had to be granted.
        assert_eq!(d.destinations, [Some(us), Some(cn)]);
        assert!(d.outside_home);

        let (policy, env) = world(granted("bureau", &["DE"]));
        let d = decide_from(&policy, &env, "127.0.0.21");
        assert_eq!(d.reason, Reason::ConsentScopeMismatch);
        assert_eq!(d.detail.as_deref(), Some("destination US not granted"));
        assert_eq!(
            d.consent.unwrap().failure,
            Some(Reason::ConsentScopeMismatch)
        );

        // Abroad, the consent naming the US is enough as before.
        let (policy, env) = world(granted("bureau", &["US"]));
        assert_eq!(
            decide_from(&policy, &env, "127.0.0.20").reason,
            Reason::Consented
        );
    }

    #[test]
    fn a_home_seated_third_party_at_home_passes_the_destination_check() {
        // The third-party rule needs consent; every destination is at home, so the consent's
        // destinations are not consulted (it names only DE).
        let (policy, env) = world(granted("partner", &["DE"]));
        let d = decide_from(&policy, &env, "127.0.0.30");
        assert!(!d.outside_home);
        assert_eq!(d.reason, Reason::Consented, "{:?}", d.detail);
    }

    #[test]
    fn an_unlocated_destination_outside_home_is_unknown_to_a_consent() {
        // 127.0.0.40 is located nowhere and treated as foreign: the home seat of the
        // recipient does not make the destination known.
        let (policy, env) = world(granted("partner", &["US", "CN"]));
        let d = decide_from(&policy, &env, "127.0.0.40");
        assert!(d.outside_home);
        assert_eq!(d.reason, Reason::ConsentScopeMismatch);
        assert_eq!(
            d.detail.as_deref(),
            Some("the destination country is unknown")
        );
    }

    /// `world`'s parties, with an `exports` dataset of JSON-lines records (subject at
    /// `/user_id`) in `mode`, and these consents.
    fn bulk_world(mode: &str, consents: &[ConsentRecord]) -> (Policy, OfflineEnv) {
        let text = format!(
            "[policy]\nname = \"unit\"\nhome = \"CN\"\n\
            [log]\npseudonymize = false\n\
            [consent]\npurpose_header = \"x-purpose\"\n\
            [[networks]]\ncidr = \"127.0.0.2/32\"\ncountry = \"CN\"\n\
            [[networks]]\ncidr = \"127.0.0.20/32\"\ncountry = \"US\"\n\
            [[upstreams]]\nname = \"store\"\nurl = \"http://127.0.0.2:9000\"\n\
            [[recipients]]\nid = \"bureau\"\nrelation = \"third_party\"\ncountry = \"US\"\n\
            networks = [\"127.0.0.20/32\"]\n\
            [[datasets]]\nname = \"exports\"\nmatch = {{ path_prefix = \"/exports/\" }}\n\
            upstream = \"store\"\ncategory = \"user.financial\"\n\
            records = {{ format = \"jsonl\", subject = \"/user_id\" }}\nmode = \"{mode}\"\n\
            [[datasets]]\nname = \"payments\"\nmatch = {{ path_prefix = \"/payments/\" }}\n\
            upstream = \"store\"\ncategory = \"user.financial\"\nsubject = {{ path_segment = 2 }}\n\
            cross_border = \"consent\"\nthird_party = \"consent\"\n"
        );
        let policy = crate::policy::compile::from_str("unit.toml", &text).expect("compiles");
        let index = std::sync::Arc::new(ConsentIndex::new());
        for c in consents {
            index.upsert(c).expect("a valid consent");
        }
        let now = "2026-06-01T00:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_microsecond();
        let env = OfflineEnv::new(&policy, Locator::new(&policy, None), index, now);
        (policy, env)
    }

    fn bureau_asks<'p>(
        policy: &'p Policy,
        env: &OfflineEnv,
        method: &'p Method,
        path: &'p str,
        headers: &'p HeaderMap,
    ) -> Decision<'p> {
        let req = Request {
            method,
            host: Some("storage.internal"),
            path,
            query: None,
            headers,
            peer: "127.0.0.20".parse().unwrap(),
            identity: None,
            pick: 0,
            copy_source: match crate::policy::decide::copy_source(headers) {
                Copied::From(Cow::Borrowed(p)) => Copied::From(p),
                Copied::Nothing => Copied::Nothing,
                other => panic!("the tests copy from absolute paths: {other:?}"),
            },
        };
        decide(policy, env, &req, &mut ())
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_records_dataset_is_forwarded_filtered_where_consent_applies() {
        let (policy, env) = bulk_world("enforce", &[]);
        let h = headers(&[("x-purpose", "credit_scoring")]);
        let d = bureau_asks(&policy, &env, &Method::GET, "/exports/2026-11.jsonl", &h);
        assert_eq!(d.reason, Reason::ConsentFiltered);
        assert_eq!(d.verdict, crate::policy::decision::Verdict::Allow);
        assert!(d.enforced && d.forwards() && d.subject.is_none());
        assert_eq!(d.rule, "datasets.exports.cross_border");

        // Steps before 8 still decide the whole request: a purpose is required...
        let none = HeaderMap::new();
        let d = bureau_asks(&policy, &env, &Method::GET, "/exports/2026-11.jsonl", &none);
        assert_eq!(d.reason, Reason::PurposeMissing);
        // ...a byte range of a filtered object cannot be served...
        let h = headers(&[("x-purpose", "credit_scoring"), ("range", "bytes=0-99")]);
        let d = bureau_asks(&policy, &env, &Method::GET, "/exports/2026-11.jsonl", &h);
        assert_eq!(d.reason, Reason::RangeOnFilteredDataset);
        assert_eq!(d.status(), Some(416));
        // ...and a server-side copy cannot be filtered at all.
        let h = headers(&[
            ("x-purpose", "credit_scoring"),
            ("x-amz-copy-source", "/exports/2026-11.jsonl"),
        ]);
        let d = bureau_asks(&policy, &env, &Method::PUT, "/payments/u1/copy.jsonl", &h);
        assert_eq!(d.reason, Reason::SubjectUnidentified);
        assert_eq!(d.status(), Some(451));

        // In audit mode nothing is dropped: the decision says so.
        let (policy, env) = bulk_world("audit", &[]);
        let h = headers(&[("x-purpose", "credit_scoring")]);
        let d = bureau_asks(&policy, &env, &Method::GET, "/exports/2026-11.jsonl", &h);
        assert_eq!(d.reason, Reason::ConsentFiltered);
        assert!(!d.enforced && d.forwards());
    }

    #[test]
    fn each_record_is_judged_as_step_8_judges_a_request_naming_its_subject() {
        let record = |id: &str, subject: &str| ConsentRecord {
            recipient: "bureau".into(),
            ..crate::consent::record::sample(id, subject)
        };
        let revoked = ConsentRecord {
            revoked_at: Some("2026-03-01T00:00:00Z".parse().unwrap()),
            ..record("c-rev", "u-rev")
        };
        let ticked = ConsentRecord {
            method: "pre_ticked".into(),
            ..record("c-tick", "u-tick")
        };
        let expired = ConsentRecord {
            expires_at: "2026-05-01T00:00:00Z".parse().unwrap(),
            ..record("c-exp", "u-exp")
        };
        let elsewhere = ConsentRecord {
            destinations: vec!["DE".into()],
            ..record("c-de", "u-de")
        };
        let other_purpose = ConsentRecord {
            purposes: vec!["marketing".into()],
            ..record("c-mkt", "u-mkt")
        };
        let consents = [
            record("c-ok", "u-ok"),
            revoked,
            ticked,
            expired,
            elsewhere,
            other_purpose,
        ];
        let (policy, env) = bulk_world("enforce", &consents);
        let h = headers(&[("x-purpose", "credit_scoring")]);
        let d = bureau_asks(&policy, &env, &Method::GET, "/exports/x.jsonl", &h);
        let terms = crate::policy::decide::RecordTerms::of(&policy, &d, env.now).unwrap();
        let judge = |subject: &str| {
            env.with_consents(subject, |l| match terms.judge(&policy, l) {
                RecordVerdict::Keep(id, _) => format!("keep {id}"),
                RecordVerdict::Drop(r) => format!("drop {r}"),
            })
        };
        assert_eq!(judge("u-ok"), "keep c-ok");
        assert_eq!(judge("u-rev"), "drop consent_revoked");
        assert_eq!(judge("u-tick"), "drop consent_method_invalid");
        assert_eq!(judge("u-exp"), "drop consent_expired");
        assert_eq!(judge("u-de"), "drop consent_scope_mismatch");
        assert_eq!(judge("u-mkt"), "drop consent_scope_mismatch");
        assert_eq!(judge("nobody"), "drop consent_missing");

        // The same terms a year later: the good consent has expired too.
        let later = terms.at(env.now + 365 * 86_400 * 1_000_000);
        let kept = env.with_consents("u-ok", |l| {
            later.judge(&policy, l) == RecordVerdict::Drop(Reason::ConsentExpired)
        });
        assert!(kept);
        // Any other decision has no record terms.
        let d = bureau_asks(&policy, &env, &Method::GET, "/payments/u-ok/x.json", &h);
        assert!(crate::policy::decide::RecordTerms::of(&policy, &d, env.now).is_none());
    }

    #[test]
    fn every_drop_reason_has_a_code_whose_name_is_the_reason() {
        for r in Reason::ALL {
            assert_eq!(Reason::of_bulk_code(r.bulk_code()), r.as_str());
            assert!(
                r.bulk_code().builtin_name().is_none(),
                "{r} takes a filter's code"
            );
        }
        assert_eq!(
            Reason::of_bulk_code(crate::bulk::Reason::NO_SUBJECT),
            "no_subject"
        );
        assert_eq!(
            Reason::of_bulk_code(crate::bulk::Reason::UNPARSABLE),
            "unparsable"
        );
        assert_eq!(Reason::of_bulk_code(crate::bulk::Reason(255)), "unknown");
    }
}
