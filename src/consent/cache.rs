//! Filling the consent cache on a miss (SPEC section 4.1): one indexed point query for the
//! subject, over a small pool of connections to the store (or its read replica), shared by
//! every request that misses the same subject meanwhile, and bounded by
//! `[consent] lookup_timeout`: a request whose answer does not come in time is refused
//! `consent_store_unavailable`, while the query goes on and fills the cache for later ones.
//!
//! The misses of a batch of records (a bulk object's, SPEC section 3.1) are filled together
//! ([`Loader::fill_many`]): one query for every subject the batch is first to miss, joined
//! with the fills already under way for the others, within one `lookup_timeout`.

use super::index::{ConsentIndex, Fill, Pending};
use super::postgres::PgReader;
use super::record::ConsentRecord;
use super::sqlite::SqliteReader;
use crate::metrics::Histogram;
use compact_str::CompactString;
use foldhash::fast::RandomState;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Connections a sidecar keeps for cache misses (each runs queries pipelined).
pub const POOL_SIZE: usize = 4;

/// The fewest subjects a batch is split into parts of: below this, one query answers faster
/// than several.
const MIN_PART: usize = 512;

/// The longest a miss's query may run before its fill is abandoned as failed: the requests
/// waiting on it gave up at `lookup_timeout` already, later ones join it until then.
const QUERY_LIMIT: Duration = Duration::from_secs(5);

/// Bounds of the miss latency histogram (nanoseconds): 100 µs to 5 s.
pub const MISS_BOUNDS: &[u64] = &[
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// Where misses are read from.
pub enum Reader {
    Sqlite(SqliteReader),
    Postgres(Box<PgReader>),
}

impl Reader {
    async fn subject(&self, subject: &str) -> Result<Vec<ConsentRecord>, String> {
        match self {
            Reader::Sqlite(r) => r.subject(subject).await.map_err(|e| e.to_string()),
            Reader::Postgres(r) => r.subject(subject).await.map_err(|e| e.to_string()),
        }
    }

    /// Each of `subjects` (distinct) with its consents, in one query.
    async fn subjects(
        &self,
        subjects: &[&str],
    ) -> Result<Vec<(String, Vec<ConsentRecord>)>, String> {
        match self {
            Reader::Sqlite(r) => r.subjects(subjects).await.map_err(|e| e.to_string()),
            Reader::Postgres(r) => r.subjects(subjects).await.map_err(|e| e.to_string()),
        }
    }
}

/// Why a miss could not be filled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("the consent store did not answer within consent.lookup_timeout ({} ms)", .0.as_millis())]
    Timeout(Duration),
    #[error("the consent store could not answer: {0}")]
    Store(String),
}

/// Fills the cache (see the module doc).
pub struct Loader {
    index: Arc<ConsentIndex>,
    reader: Arc<Reader>,
    timeout: Duration,
    /// Time from a miss to its query's answer.
    pub miss_time: Arc<Histogram>,
    /// Time a batch's query took to answer, once per query ([`Loader::fill_many`]).
    pub batch_time: Arc<Histogram>,
    /// The last failure and when, until a query answers again: readiness reports it.
    failure: Arc<Mutex<Option<(Instant, String)>>>,
    /// Where queries run: the runtime that made the loader (the proxy's control runtime),
    /// not the worker whose request missed. A query another worker joins must not end
    /// with the runtime of the worker that started it, nor must the connections it opens.
    runtime: Option<tokio::runtime::Handle>,
}

impl Loader {
    pub fn new(index: Arc<ConsentIndex>, reader: Reader, timeout: Duration) -> Loader {
        Loader {
            index,
            reader: Arc::new(reader),
            timeout,
            miss_time: Arc::new(Histogram::new(MISS_BOUNDS)),
            batch_time: Arc::new(Histogram::new(MISS_BOUNDS)),
            failure: Arc::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Runs a query's task on the loader's runtime (else the caller's).
    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, query: F) {
        match &self.runtime {
            Some(rt) => drop(rt.spawn(query)),
            None => drop(tokio::spawn(query)),
        }
    }

    pub fn index(&self) -> &Arc<ConsentIndex> {
        &self.index
    }

    /// Brings `subject` into the cache, or says why it could not within the lookup timeout.
    /// A fill a change made doubtful is started again, within the same deadline.
    pub async fn fill(&self, subject: &str) -> Result<(), LookupError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let pending = match self.index.begin_fill(subject) {
                Fill::Cached => return Ok(()),
                Fill::Join(p) => p,
                Fill::Lead(p) => {
                    self.spawn_query(subject, p.clone());
                    p
                }
            };
            match tokio::time::timeout_at(deadline, pending.wait()).await {
                Err(_) => {
                    let e = LookupError::Timeout(self.timeout);
                    self.note_failure(e.to_string());
                    return Err(e);
                }
                Ok(Err(e)) => return Err(LookupError::Store(e)),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Runs the query on its own task: it outlives a request that stops waiting.
    fn spawn_query(&self, subject: &str, pending: Arc<super::index::Pending>) {
        let (index, reader, hist, failure) = (
            self.index.clone(),
            self.reader.clone(),
            self.miss_time.clone(),
            self.failure.clone(),
        );
        let subject = subject.to_string();
        self.spawn(async move {
            let started = Instant::now();
            let answer = match tokio::time::timeout(QUERY_LIMIT, reader.subject(&subject)).await {
                Ok(a) => a,
                Err(_) => Err(format!("no answer within {} s", QUERY_LIMIT.as_secs())),
            };
            hist.observe(started.elapsed());
            match &answer {
                Ok(_) => *failure.lock().unwrap_or_else(PoisonError::into_inner) = None,
                Err(e) => note(&failure, e.clone()),
            }
            index.finish_fill(&subject, &pending, answer);
        });
    }

    /// Brings every one of `subjects` into the cache, or says why it could not within the
    /// lookup timeout (one deadline for them all: fail closed, the whole call fails). The
    /// subjects no other fill is bringing in are asked in one query; those already under way
    /// (another request's `fill` or `fill_many`) are joined, not asked again. A subject whose
    /// answer a change made doubtful is asked again, within the same deadline. As for `fill`,
    /// a query outlives a caller that stops waiting and fills the cache for later ones. A
    /// batch larger than the cache's budget holds can see its first subjects evicted by its
    /// last: those read as misses again (the caller decides them as an unavailable store).
    pub async fn fill_many(&self, subjects: &[CompactString]) -> Result<(), LookupError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut seen = HashSet::with_capacity_and_hasher(subjects.len(), RandomState::default());
        let mut todo: Vec<&CompactString> = subjects.iter().filter(|s| seen.insert(*s)).collect();
        while !todo.is_empty() {
            let mut joined: Vec<(&CompactString, Arc<Pending>)> = Vec::new();
            let mut led: Vec<(CompactString, Arc<Pending>)> = Vec::new();
            for s in &todo {
                match self.index.begin_fill(s) {
                    Fill::Cached => {}
                    Fill::Join(p) => joined.push((*s, p)),
                    Fill::Lead(p) => led.push(((*s).clone(), p)),
                }
            }
            // A large batch is asked as up to one query per pooled connection, at once: the
            // answer comes in the time of the largest part, not of the whole.
            let parts = led.len().div_ceil(MIN_PART).clamp(1, POOL_SIZE);
            let per_part = led.len().div_ceil(parts).max(1);
            let mut batches = Vec::with_capacity(parts);
            let mut led = led;
            while !led.is_empty() {
                let rest = led.split_off(per_part.min(led.len()));
                batches.push(self.spawn_batch(std::mem::replace(&mut led, rest)));
            }
            let waited = tokio::time::timeout_at(deadline, async {
                let mut again: Vec<&CompactString> = Vec::new();
                for (s, p) in &joined {
                    p.wait().await.map_err(LookupError::Store)?;
                    // Filled, unless a change made it doubtful: then ask again.
                    if !self.index.is_cached(s) {
                        again.push(*s);
                    }
                }
                let mut doubtful: HashSet<CompactString, RandomState> = HashSet::default();
                for batch in batches {
                    doubtful.extend(
                        batch
                            .await
                            .unwrap_or_else(|_| Err("the consent lookup was abandoned".into()))
                            .map_err(LookupError::Store)?,
                    );
                }
                again.extend(todo.iter().copied().filter(|s| doubtful.contains(*s)));
                Ok::<_, LookupError>(again)
            })
            .await;
            todo = match waited {
                Err(_) => {
                    let e = LookupError::Timeout(self.timeout);
                    self.note_failure(e.to_string());
                    return Err(e);
                }
                Ok(again) => again?,
            };
        }
        Ok(())
    }

    /// Runs a batch's query on its own task (it outlives a caller that stops waiting) and ends
    /// each subject's fill with its answer. The receiver hears the subjects whose answers a
    /// change made doubtful (not kept), or the store's failure.
    fn spawn_batch(
        &self,
        led: Vec<(CompactString, Arc<Pending>)>,
    ) -> tokio::sync::oneshot::Receiver<Result<Vec<CompactString>, String>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (index, reader, hist, failure) = (
            self.index.clone(),
            self.reader.clone(),
            self.batch_time.clone(),
            self.failure.clone(),
        );
        self.spawn(async move {
            let started = Instant::now();
            let subjects: Vec<&str> = led.iter().map(|(s, _)| s.as_str()).collect();
            let answer = match tokio::time::timeout(QUERY_LIMIT, reader.subjects(&subjects)).await {
                Ok(a) => a,
                Err(_) => Err(format!("no answer within {} s", QUERY_LIMIT.as_secs())),
            };
            hist.observe(started.elapsed());
            let result = match answer {
                Ok(found) => {
                    *failure.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    let mut found: HashMap<String, Vec<ConsentRecord>, RandomState> =
                        found.into_iter().collect();
                    let mut doubtful = Vec::new();
                    for (subject, pending) in &led {
                        let records = found.remove(subject.as_str()).unwrap_or_default();
                        if !index.finish_fill(subject, pending, Ok(records)) {
                            doubtful.push(subject.clone());
                        }
                    }
                    Ok(doubtful)
                }
                Err(e) => {
                    note(&failure, e.clone());
                    for (subject, pending) in &led {
                        index.finish_fill(subject, pending, Err(e.clone()));
                    }
                    Err(e)
                }
            };
            let _ = tx.send(result);
        });
        rx
    }

    fn note_failure(&self, why: String) {
        note(&self.failure, why);
    }

    /// The last lookup failure, if no lookup has answered since and it is recent (within
    /// `within`): readiness names it.
    pub fn failing(&self, within: Duration) -> Option<String> {
        let f = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        match &*f {
            Some((at, why)) if at.elapsed() <= within => Some(why.clone()),
            _ => None,
        }
    }
}

/// Records a lookup failure for readiness; the first of a run is logged.
fn note(failure: &Mutex<Option<(Instant, String)>>, why: String) {
    let mut f = failure.lock().unwrap_or_else(PoisonError::into_inner);
    if f.is_none() {
        tracing::error!(error = %why, "consent lookup failed: consent-needing requests of uncached subjects are refused consent_store_unavailable");
    }
    *f = Some((Instant::now(), why));
}
