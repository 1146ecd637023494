//! Filling the consent cache on a miss (SPEC section 4.1): one indexed point query for the
//! subject, over a small pool of connections to the store (or its read replica), shared by
//! every request that misses the same subject meanwhile, and bounded by
//! `[consent] lookup_timeout`: a request whose answer does not come in time is refused
//! `consent_store_unavailable`, while the query goes on and fills the cache for later ones.

use super::index::{ConsentIndex, Fill};
use super::postgres::PgReader;
use super::record::ConsentRecord;
use super::sqlite::SqliteReader;
use crate::metrics::Histogram;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Connections a sidecar keeps for cache misses (each runs queries pipelined).
pub const POOL_SIZE: usize = 4;

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
    /// The last failure and when, until a query answers again: readiness reports it.
    failure: Arc<Mutex<Option<(Instant, String)>>>,
}

impl Loader {
    pub fn new(index: Arc<ConsentIndex>, reader: Reader, timeout: Duration) -> Loader {
        Loader {
            index,
            reader: Arc::new(reader),
            timeout,
            miss_time: Arc::new(Histogram::new(MISS_BOUNDS)),
            failure: Arc::default(),
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
        tokio::spawn(async move {
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
