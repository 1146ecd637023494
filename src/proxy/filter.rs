//! Responses of datasets whose objects are records (exports, feeds): the upstream body runs
//! through the bulk filter on a task of its own, and for each batch of records the
//! subjects are judged through the consent cache (its misses filled by one query for the
//! whole batch), a `disclosure` record naming the subjects that leave is written to the
//! decision log, and only then do the batch's kept records go to the client.
//!
//! A batch is judged only once the client can take it (a permit of the body channel is
//! held first), so a revocation that reaches the cache applies to every batch judged after
//! it, however slowly the client reads. A batch the consent store cannot answer ends the
//! response with an error (the client sees a cut transfer, never a silently thinner one);
//! in audit mode its records leave, counted as would-drops.

use super::Shared;
use super::body::{Piece, ResponseBody};
use super::exchange::Exchange;
use super::snapshot::Snapshot;
use crate::audit::id::DecisionId;
use crate::audit::record::{DisclosureRecord, Link, Record, RecordCounts, Stamp, VERSION};
use crate::bulk::{
    self, BulkError, Compression, Format, Limits, ParquetFilter, StreamFilter, Verdict,
};
use crate::consent::index::Lookup;
use crate::policy::decide::{ConsentLookup, FilterTerms, RecordVerdict};
use crate::policy::decision::Reason;
use crate::policy::model::OnFailure;
use compact_str::CompactString;
use http::HeaderMap;
use http::header::{self, HeaderName};
use http_body_util::BodyExt;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Batches sent ahead of what the client has read: one in flight, one being judged.
const CHANNEL: usize = 1;

/// The most (subject, consent) pairs an exchange remembers as disclosed; past it, subjects
/// are named again in later batches (over-reporting, never under-reporting).
const DISCLOSED_MAX: usize = 1 << 20;

/// An upstream that sends nothing for this long has paused: the records it sent so far are
/// filtered and sent without waiting for a full batch. Long enough that a steady stream is
/// cut into full batches (few store queries and disclosure records), short against the
/// registry's one-second revocation bound.
const LINGER: Duration = Duration::from_millis(50);

/// A Parquet object is spooled to a file this large at most before it is refused.
const PARQUET_SPOOL_MAX: u64 = 16 << 30;

/// The response headers that describe the unfiltered object, which the filtered one is not.
pub fn strip_object_headers(headers: &mut HeaderMap) {
    for h in [
        header::CONTENT_LENGTH,
        header::ETAG,
        header::CONTENT_RANGE,
        header::ACCEPT_RANGES,
        HeaderName::from_static("content-md5"),
    ] {
        headers.remove(h);
    }
    let checksums: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-amz-checksum-"))
        .cloned()
        .collect();
    for k in checksums {
        headers.remove(k);
    }
}

/// Everything a filter task needs, owned: it outlives the request's borrows.
pub struct FilterJob {
    pub snap: Arc<Snapshot>,
    pub shared: Arc<Shared>,
    pub terms: FilterTerms,
    pub id: DecisionId,
    pub exchange: Arc<Exchange>,
    pub compression: Compression,
    /// Audit mode: nothing is dropped; would-drops are counted.
    pub audit: bool,
}

/// Why a filtered response ended early.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("{0}")]
    Bulk(#[from] BulkError),
    #[error("the upstream body failed: {0}")]
    Upstream(String),
    #[error("the consent store could not answer for a batch of records: {0}")]
    Store(String),
    #[error("the disclosure record could not be written: {0}")]
    Log(String),
    #[error("spooling the Parquet object failed: {0}")]
    Spool(String),
    /// The client went away: nothing more to send.
    #[error("the client went away")]
    Gone,
}

impl Stop {
    fn reason(&self) -> Reason {
        match self {
            Stop::Store(_) => Reason::ConsentStoreUnavailable,
            Stop::Log(_) => Reason::LogUnavailable,
            Stop::Bulk(_) | Stop::Upstream(_) | Stop::Spool(_) | Stop::Gone => {
                Reason::UpstreamUnreachable
            }
        }
    }
}

/// The upstream's body, read by the filter (see [`ResponseBody::upstream_input`]).
pub type Upstream = ResponseBody;

impl FilterJob {
    /// Starts the task; returns the receiving end the response body reads.
    pub fn spawn(self, upstream: Upstream) -> mpsc::Receiver<Piece> {
        let (tx, rx) = mpsc::channel(CHANNEL);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut run = Run {
                job: &self,
                tx: &tx,
                disclosed: Disclosed::default(),
                batch: 0,
                totals: bulk::Counts::default(),
            };
            let result = match self.spec().format {
                Format::Parquet => run.parquet(upstream).await,
                _ => run.stream(upstream).await,
            };
            let totals = std::mem::take(&mut run.totals);
            self.exchange.set_records(record_counts(&totals));
            let bulk = self.snap.metrics.dataset(Some(self.terms.dataset)).bulk();
            bulk.observe(&totals, result.is_ok());
            tracing::debug!(records.kept = totals.kept, records.dropped = totals.dropped, elapsed = ?started.elapsed(), "filtered response ended");
            match result {
                Ok(()) => {
                    let _ = tx.send(Piece::End).await;
                }
                Err(Stop::Gone) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "filtered response ended early");
                    if self.exchange.error().is_none() {
                        self.exchange.set_error(e.reason());
                    }
                    self.exchange.set_detail(e.to_string());
                    let _ = tx.send(Piece::Failed(e.to_string().into())).await;
                }
            }
        });
        rx
    }

    fn spec(&self) -> &bulk::RecordsSpec {
        &self.snap.policy.datasets[self.terms.dataset]
            .records
            .as_ref()
            .expect("a consent_filtered decision is about a records dataset")
            .spec
    }
}

/// The outcome record's counts of a filtered exchange.
pub fn record_counts(c: &bulk::Counts) -> RecordCounts {
    RecordCounts {
        dropped: c
            .dropped_by_reason()
            .map(|(r, n)| (Reason::of_bulk_code(r), n))
            .collect(),
        kept: c.kept,
        kept_bytes: c.kept_bytes,
        would_drop: c
            .would_drop_by_reason()
            .map(|(r, n)| (Reason::of_bulk_code(r), n))
            .collect(),
    }
}

/// The (subject, consent) pairs already named by this exchange's disclosures, as keyed
/// 128-bit hashes (two independent 64-bit hashers: a collision, which would leave a subject
/// unnamed, is beyond reach).
#[derive(Default)]
struct Disclosed {
    seen: HashSet<u128, foldhash::fast::RandomState>,
    keys: (foldhash::fast::RandomState, foldhash::fast::RandomState),
}

impl Disclosed {
    /// Whether the pair is new to this exchange (and remembers it, while there is room).
    fn first(&mut self, subject: &str, consent: Option<&str>) -> bool {
        let key = |s: &foldhash::fast::RandomState| s.hash_one((subject, consent));
        let k = (u128::from(key(&self.keys.0)) << 64) | u128::from(key(&self.keys.1));
        if self.seen.contains(&k) {
            return false;
        }
        if self.seen.len() < DISCLOSED_MAX {
            self.seen.insert(k);
        }
        true
    }
}

/// One subject's fate in a batch.
enum Judged {
    Keep(CompactString),
    Drop(Reason),
}

impl Judged {
    fn verdict(&self) -> Verdict {
        match self {
            Judged::Keep(_) => Verdict::Keep,
            Judged::Drop(r) => Verdict::Drop(r.bulk_code()),
        }
    }
}

/// One verdict per record from the verdicts per distinct subject (audit mode keeps what it
/// would drop), and which distinct subjects have a record that leaves.
fn per_record(
    batch: &bulk::Batch<'_>,
    per_subject: &[Verdict],
    audit: bool,
) -> (Vec<Verdict>, Vec<bool>) {
    let mut verdicts = Vec::with_capacity(batch.len());
    batch.verdicts_by_subject(per_subject, audit, &mut verdicts);
    let mut leaving = vec![false; per_subject.len()];
    for (r, v) in batch.records().zip(&verdicts) {
        if let (Some(i), Verdict::Keep | Verdict::KeepAudit(_)) = (r.subject_id(), v)
            && r.subject().is_ok()
            && let Some(l) = leaving.get_mut(i)
        {
            *l = true;
        }
    }
    (verdicts, leaving)
}

/// What the Parquet worker thread hands to the response's task.
enum Step {
    /// A row group's distinct subjects; the verdict per subject goes back on `reply`.
    Batch {
        subjects: Vec<CompactString>,
        reply: tokio::sync::oneshot::Sender<Vec<Verdict>>,
    },
    /// The row group's output (or, after the last, the file's end) and which of its
    /// subjects have records in it.
    Out {
        leaving: Vec<bool>,
        out: Box<bulk::Emitted>,
    },
}

/// Filters a spooled Parquet object on a blocking thread, row group by row group, asking
/// the response's task for each group's verdicts. Returns when the object is done or the
/// task stopped listening (the client went away).
fn parquet_worker(
    file: std::fs::File,
    spec: &bulk::RecordsSpec,
    audit: bool,
    steps: &mpsc::Sender<Step>,
) -> Result<(), BulkError> {
    let mut filter = ParquetFilter::new(file, spec)?;
    while let Some(batch) = filter.next_batch()? {
        let subjects = batch.distinct_subjects();
        let (reply, answer) = tokio::sync::oneshot::channel();
        if steps
            .blocking_send(Step::Batch { subjects, reply })
            .is_err()
        {
            return Ok(());
        }
        let Ok(per_subject) = answer.blocking_recv() else {
            return Ok(());
        };
        let batch = filter
            .current_batch()
            .expect("the batch waits for its verdicts");
        let (verdicts, leaving) = per_record(&batch, &per_subject, audit);
        let out = Box::new(filter.emit(&verdicts)?);
        if steps.blocking_send(Step::Out { leaving, out }).is_err() {
            return Ok(());
        }
    }
    let out = Box::new(filter.close()?);
    let _ = steps.blocking_send(Step::Out {
        leaving: Vec::new(),
        out,
    });
    Ok(())
}

struct Run<'j> {
    job: &'j FilterJob,
    tx: &'j mpsc::Sender<Piece>,
    disclosed: Disclosed,
    batch: u64,
    totals: bulk::Counts,
}

impl Run<'_> {
    async fn stream(&mut self, mut upstream: Upstream) -> Result<(), Stop> {
        let job = self.job;
        let mut filter = StreamFilter::new(job.spec(), job.compression, Limits::default())?
            .forward_blank_lines(job.audit);
        let mut ended = false;
        loop {
            // Every full batch the buffered input holds, each once the client can take it.
            while self.next_batch(&mut filter, false).await? {}
            if ended {
                break;
            }
            let frame = match tokio::time::timeout(LINGER, upstream.frame()).await {
                Ok(frame) => frame,
                Err(_) => {
                    // The upstream paused (a feed written as it goes): the complete records
                    // it sent so far leave now rather than wait for a full batch.
                    while self.next_batch(&mut filter, true).await? {}
                    upstream.frame().await
                }
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        filter.push(data);
                    }
                }
                Some(Err(e)) => return Err(Stop::Upstream(e.to_string())),
                None => {
                    filter.finish();
                    ended = true;
                }
            }
        }
        let permit = self.tx.reserve().await.map_err(|_| Stop::Gone)?;
        let last = filter.close()?;
        self.sent(permit, last);
        Ok(())
    }

    /// Judges, discloses and sends the next batch of the buffered input, once the client can
    /// take it: a full one, or (`now`) one cut from the complete records buffered. False when
    /// there is none.
    async fn next_batch(&mut self, filter: &mut StreamFilter, now: bool) -> Result<bool, Stop> {
        let audit = self.job.audit;
        let permit = self.tx.reserve().await.map_err(|_| Stop::Gone)?;
        let batch = if now {
            filter.next_batch_now()?
        } else {
            filter.next_batch()?
        };
        let Some(subjects) = batch.map(|b| b.distinct_subjects()) else {
            return Ok(false);
        };
        let judged = self.judge(&subjects).await?;
        let per_subject: Vec<Verdict> = judged.iter().map(Judged::verdict).collect();
        let batch = filter
            .current_batch()
            .expect("the batch waits for its verdicts");
        let (per_record, leaving) = per_record(&batch, &per_subject, audit);
        let out = filter.emit(&per_record)?;
        let disclosure = self.disclosure(&subjects, &judged, &leaving, &out);
        self.disclose(disclosure).await?;
        self.sent(permit, out);
        Ok(true)
    }

    async fn parquet(&mut self, mut upstream: Upstream) -> Result<(), Stop> {
        // The footer comes last: the object is spooled to a temporary file first (memory
        // stays flat), then filtered one row group at a time.
        let spool = tempfile::tempfile().map_err(|e| Stop::Spool(e.to_string()))?;
        let mut file = tokio::fs::File::from_std(spool);
        let mut size = 0u64;
        while let Some(frame) = upstream.frame().await {
            let frame = frame.map_err(|e| Stop::Upstream(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                size += data.len() as u64;
                if size > PARQUET_SPOOL_MAX {
                    return Err(Stop::Spool(format!(
                        "the object is larger than {PARQUET_SPOOL_MAX} bytes"
                    )));
                }
                tokio::io::AsyncWriteExt::write_all(&mut file, &data)
                    .await
                    .map_err(|e| Stop::Spool(e.to_string()))?;
            }
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| Stop::Spool(e.to_string()))?;
        let file = file.into_std().await;
        // The row groups are read and written on a blocking thread: the Parquet reader reads
        // the file synchronously, and a malformed file can make it panic, which must end
        // this response, not the worker. It hands each row group's subjects over, waits for
        // their verdicts, and hands the group's output back.
        let (steps, mut from_worker) = mpsc::channel::<Step>(1);
        let spec = self.job.spec().clone();
        let audit = self.job.audit;
        let worker =
            tokio::task::spawn_blocking(move || parquet_worker(file, &spec, audit, &steps));
        loop {
            let permit = self.tx.reserve().await.map_err(|_| Stop::Gone)?;
            match from_worker.recv().await {
                Some(Step::Batch { subjects, reply }) => {
                    let judged = self.judge(&subjects).await?;
                    let per_subject = judged.iter().map(Judged::verdict).collect();
                    if reply.send(per_subject).is_err() {
                        break;
                    }
                    let Some(Step::Out { leaving, out }) = from_worker.recv().await else {
                        break;
                    };
                    let disclosure = self.disclosure(&subjects, &judged, &leaving, &out);
                    self.disclose(disclosure).await?;
                    self.sent(permit, *out);
                }
                Some(Step::Out { out, .. }) => {
                    // The closing bytes (the footer).
                    self.sent(permit, *out);
                }
                None => break,
            }
        }
        match worker.await {
            Ok(r) => r.map_err(Stop::from),
            Err(e) if e.is_panic() => Err(Stop::Bulk(BulkError::Parquet(
                "the Parquet reader failed on the object (it is malformed)".into(),
            ))),
            Err(e) => Err(Stop::Spool(e.to_string())),
        }
    }

    /// Sends a batch's output and counts it.
    fn sent(&mut self, permit: mpsc::Permit<'_, Piece>, out: bulk::Emitted) {
        self.totals.add(&out.counts);
        if !out.bytes.is_empty() {
            permit.send(Piece::Data(out.bytes));
        }
    }

    /// Judges each distinct subject of a batch: through the cache, its misses filled in one
    /// query. A store that cannot answer is an error for the whole batch (enforce mode).
    async fn judge(&self, subjects: &[CompactString]) -> Result<Vec<Judged>, Stop> {
        let job = self.job;
        let snap = &job.snap;
        let policy = &snap.policy;
        let index = &snap.consents;
        let now = jiff::Timestamp::now().as_microsecond();
        let terms = job.terms.at(policy, now);
        let judged = |found: Lookup<'_>| {
            let lookup = match found {
                Lookup::Found(c) => ConsentLookup::Found(c),
                Lookup::NotFound => ConsentLookup::NotFound,
                Lookup::Miss => ConsentLookup::Unavailable,
            };
            match terms.judge(policy, lookup) {
                RecordVerdict::Keep(id, _) => Judged::Keep(id.clone()),
                RecordVerdict::Drop(r) => Judged::Drop(r),
            }
        };
        // As for a single request (the proxy's decision environment): a cache whose change
        // feed has been down longer than `max_staleness` answers for nobody. Checked once a
        // batch; each subject is then read under one pin of the cache.
        let stale = index.freshness().is_stale(policy.consent.max_staleness);
        let mut out: Vec<Judged> = Vec::with_capacity(subjects.len());
        let mut missed: Vec<usize> = Vec::new();
        if !stale {
            index.lookup_each(subjects.iter().map(|s| s.as_str()), true, |i, found| {
                if matches!(found, Lookup::Miss) {
                    missed.push(i);
                }
                out.push(judged(found));
            });
        } else {
            out.extend(
                subjects
                    .iter()
                    .map(|_| Judged::Drop(Reason::ConsentStoreUnavailable)),
            );
        }
        if let (Some(loader), false) = (job.shared.consent_loader.as_ref(), missed.is_empty()) {
            let wanted: Vec<CompactString> = missed.iter().map(|&i| subjects[i].clone()).collect();
            // The store's answer time is the loader's batch histogram.
            if let Err(e) = loader.fill_many(&wanted).await {
                if !job.audit {
                    return Err(Stop::Store(e.to_string()));
                }
                tracing::warn!(error = %e, "consent lookup for a batch of records failed (audit mode: the records leave)");
            }
            // Filled now (not counted again); one still missing reads as an unavailable store.
            index.lookup_each(wanted.iter().map(|s| s.as_str()), false, |k, found| {
                out[missed[k]] = judged(found);
            });
        }
        if !job.audit
            && out
                .iter()
                .any(|j| matches!(j, Judged::Drop(Reason::ConsentStoreUnavailable)))
        {
            return Err(Stop::Store(if stale {
                format!(
                    "the consent registry's change feed has been down longer than consent.max_staleness ({:?})",
                    policy.consent.max_staleness
                )
            } else {
                "subjects filled for the batch were not in the consent cache when judged".into()
            }));
        }
        Ok(out)
    }

    /// The disclosure of a batch: the subjects whose records leave in it (`leaving`, by
    /// distinct subject) and were not yet named under that consent by this exchange.
    fn disclosure(
        &mut self,
        subjects: &[CompactString],
        judged: &[Judged],
        leaving: &[bool],
        out: &bulk::Emitted,
    ) -> Option<Box<DisclosureRecord>> {
        let job = self.job;
        let pseudo = &job.snap.pseudo;
        let mut named = Vec::new();
        for ((s, j), leaves) in subjects.iter().zip(judged).zip(leaving) {
            if !leaves {
                continue;
            }
            let consent = match j {
                Judged::Keep(id) => Some(id.clone()),
                Judged::Drop(_) => None,
            };
            if self.disclosed.first(s, consent.as_deref()) {
                named.push((pseudo.pseudonym(s), consent));
            }
        }
        self.batch += 1;
        if named.is_empty() {
            return None;
        }
        Some(Box::new(DisclosureRecord {
            batch: self.batch,
            id: job.id,
            instance: None,
            kind: "disclosure",
            prev: Link::default(),
            records: out.counts.kept,
            seq: 0,
            subjects: named,
            ts: Stamp(jiff::Timestamp::now()),
            v: VERSION,
        }))
    }

    /// Writes a batch's disclosure before its records leave, as a decision record is
    /// written before its request is forwarded (same deadline, same `on_failure`).
    async fn disclose(&self, record: Option<Box<DisclosureRecord>>) -> Result<(), Stop> {
        let Some(record) = record else {
            return Ok(());
        };
        let log = &self.job.shared.log;
        let written =
            tokio::time::timeout(LOG_DEADLINE, log.append_queued(Record::Disclosure(record))).await;
        let failed = match written {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("not written within {LOG_DEADLINE:?}"),
        };
        if self.job.snap.policy.log.on_failure == OnFailure::Allow && !log.is_closed() {
            tracing::error!(error = %failed, "disclosure record not written: forwarding the batch anyway (log.on_failure = \"allow\")");
            return Ok(());
        }
        Err(Stop::Log(failed))
    }
}

/// As for decision records (see the pipeline): past this, the log counts as failing.
const LOG_DEADLINE: Duration = Duration::from_secs(5);
