//! Cache misses: a subject's consents (or a batch of subjects' in one query) read for the
//! cache over a small pool of connections, from a read replica when one is configured, except
//! for a subject whose latest change the replica has not replayed yet ([`Recent`], which the
//! feed keeps). Separate because it serves the hot path's misses, not the registry's users,
//! and holds its own connections.

use super::connect::{PgError, bounded, config, connect};
use super::rows::{STATE_COLUMNS, state_from_row_at, warn_unreadable};
use crate::consent::record::ConsentRecord;
use foldhash::fast::RandomState;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio_postgres::{Client, Config};

/// Subjects changed lately, with the number of their latest change: a read from a replica
/// that has not replayed that change yet is done again on the primary. The map is bounded:
/// past [`RECENT_MAX`] subjects it is emptied, and any replica read older than what was
/// emptied goes to the primary.
#[derive(Default)]
pub struct Recent {
    inner: std::sync::Mutex<RecentInner>,
}

#[derive(Default)]
struct RecentInner {
    subjects: std::collections::HashMap<String, i64, foldhash::fast::RandomState>,
    /// Every change numbered up to here has left the map.
    forgotten: i64,
}

const RECENT_MAX: usize = 65_536;

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecentInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn note(&self, subject: &str, seq: i64) {
        let mut r = self.lock();
        if r.subjects.len() >= RECENT_MAX {
            let top = r.subjects.values().copied().max().unwrap_or(0);
            r.forgotten = r.forgotten.max(top);
            r.subjects.clear();
        }
        r.subjects.insert(subject.to_string(), seq);
    }

    pub(super) fn forget_upto(&self, seq: i64) {
        let mut r = self.lock();
        r.forgotten = r.forgotten.max(seq);
        r.subjects.clear();
    }

    /// The change a read of each of `subjects` must reflect.
    fn required_of(&self, subjects: &[&str]) -> Vec<i64> {
        let r = self.lock();
        subjects
            .iter()
            .map(|s| r.subjects.get(*s).copied().unwrap_or(0).max(r.forgotten))
            .collect()
    }

    /// The change a read of `subject` must reflect.
    fn required(&self, subject: &str) -> i64 {
        let r = self.lock();
        r.subjects
            .get(subject)
            .copied()
            .unwrap_or(0)
            .max(r.forgotten)
    }
}

/// A connection of the reader, with its prepared lookups.
struct ReadConn {
    client: Client,
    lookup: tokio_postgres::Statement,
    batch: tokio_postgres::Statement,
}

/// A pool of connections to one database for cache misses: each connection runs its
/// queries pipelined; a failed one is opened again on next use.
struct ReadPool {
    config: Config,
    target: String,
    slots: Vec<tokio::sync::Mutex<Option<Arc<ReadConn>>>>,
    next: std::sync::atomic::AtomicUsize,
}

/// The point query of a miss: the subject's consents (by the subject index) and the change
/// number the database has reached, in one statement and so one snapshot.
fn lookup_sql() -> String {
    format!(
        "SELECT (SELECT coalesce(max(seq), 0) FROM consent_changes), x.* FROM (SELECT 1) AS one \
         LEFT JOIN LATERAL (SELECT {STATE_COLUMNS} FROM consents c WHERE c.subject = $1) AS x ON TRUE"
    )
}

/// The query of a batch of misses: [`lookup_sql`] for an array of subjects (the subject index
/// is read once per subject of the array).
fn batch_sql() -> String {
    format!(
        "SELECT (SELECT coalesce(max(seq), 0) FROM consent_changes), x.* FROM (SELECT 1) AS one \
         LEFT JOIN LATERAL (SELECT {STATE_COLUMNS} FROM consents c WHERE c.subject = ANY($1)) AS x ON TRUE"
    )
}

/// The consents of the rows of [`lookup_sql`] or [`batch_sql`], and the change number they
/// reflect. Unreadable rows are logged and left out: they grant nothing.
fn consents_of(rows: &[tokio_postgres::Row]) -> (Vec<ConsentRecord>, i64) {
    let seq: i64 = rows.first().map_or(0, |r| r.get(0));
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        // The left join's one row of nothing: no consent.
        if row.try_get::<_, Option<String>>(1).ok().flatten().is_none() {
            continue;
        }
        match state_from_row_at(row, 1) {
            Ok(r) => out.push(r),
            Err(u) => warn_unreadable(u),
        }
    }
    (out, seq)
}

impl ReadPool {
    fn new(url: &str, size: usize) -> Result<ReadPool, PgError> {
        let (config, target) = config(url)?;
        Ok(ReadPool {
            config,
            target,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: Default::default(),
        })
    }

    async fn conn(&self) -> Result<Arc<ReadConn>, PgError> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        *slot = None;
        let client = connect(&self.config, &self.target, None).await?;
        let (one, many) = (lookup_sql(), batch_sql());
        let (lookup, batch) = bounded(&self.target, async {
            tokio::try_join!(client.prepare(&one), client.prepare(&many))
        })
        .await?;
        let c = Arc::new(ReadConn {
            client,
            lookup,
            batch,
        });
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The subject's consents and the change number they reflect.
    async fn subject(&self, subject: &str) -> Result<(Vec<ConsentRecord>, i64), PgError> {
        let c = self.conn().await?;
        let rows = bounded(&self.target, c.client.query(&c.lookup, &[&subject])).await?;
        Ok(consents_of(&rows))
    }

    /// The consents of `subjects`, in one query, and the change number they reflect.
    async fn subjects(&self, subjects: &[&str]) -> Result<(Vec<ConsentRecord>, i64), PgError> {
        let c = self.conn().await?;
        let rows = bounded(&self.target, c.client.query(&c.batch, &[&subjects])).await?;
        Ok(consents_of(&rows))
    }
}

/// Reads subjects' consents for the cache (SPEC section 4.1): from the replica when
/// `[consent] read_url` names one, else from the primary; a replica that has not yet
/// replayed a subject's latest change known to the feed is passed over for the primary, for
/// that subject.
pub struct PgReader {
    primary: ReadPool,
    replica: Option<ReadPool>,
    recent: Arc<Recent>,
}

impl PgReader {
    /// A reader of the database at `url` (and of its replica at `read_url`), with
    /// `pool_size` connections to each.
    pub fn new(url: &str, read_url: Option<&str>, pool_size: usize) -> Result<PgReader, PgError> {
        Ok(PgReader {
            primary: ReadPool::new(url, pool_size)?,
            replica: read_url.map(|u| ReadPool::new(u, pool_size)).transpose()?,
            recent: Arc::default(),
        })
    }

    /// What the feed shares with this reader.
    pub fn recent(&self) -> Option<Arc<Recent>> {
        self.replica.as_ref().map(|_| self.recent.clone())
    }

    pub async fn subject(&self, subject: &str) -> Result<Vec<ConsentRecord>, PgError> {
        if let Some(replica) = &self.replica {
            let required = self.recent.required(subject);
            match replica.subject(subject).await {
                Ok((records, seq)) if seq >= required => return Ok(records),
                Ok((_, seq)) => {
                    tracing::debug!(
                        replica_seq = seq,
                        required,
                        "consent replica behind: read from the primary"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consent replica failed: read from the primary");
                }
            }
        }
        Ok(self.primary.subject(subject).await?.0)
    }

    /// The consents of each of `subjects`, in one query (two when the replica is behind for
    /// some of them: those are read again from the primary, together): one entry per distinct
    /// subject, in the order first asked, with no records for a subject without consent.
    pub async fn subjects(
        &self,
        subjects: &[&str],
    ) -> Result<Vec<(String, Vec<ConsentRecord>)>, PgError> {
        let mut seen = HashSet::with_capacity_and_hasher(subjects.len(), RandomState::default());
        let distinct: Vec<&str> = subjects
            .iter()
            .copied()
            .filter(|s| seen.insert(*s))
            .collect();
        let mut found: HashMap<String, Vec<ConsentRecord>, RandomState> = HashMap::default();
        let mut group = |records: Vec<ConsentRecord>, keep: &dyn Fn(&str) -> bool| {
            for r in records.into_iter().filter(|r| keep(&r.subject)) {
                found.entry(r.subject.clone()).or_default().push(r);
            }
        };
        let mut from_primary = distinct.clone();
        if let Some(replica) = &self.replica {
            // Read before the query, as for one subject: a change noted after it marks the
            // fill doubtful anyway.
            let required = self.recent.required_of(&distinct);
            match replica.subjects(&distinct).await {
                Ok((records, seq)) => {
                    let behind: HashSet<&str, RandomState> = distinct
                        .iter()
                        .zip(&required)
                        .filter(|(_, r)| **r > seq)
                        .map(|(s, _)| *s)
                        .collect();
                    if !behind.is_empty() {
                        tracing::debug!(
                            replica_seq = seq,
                            subjects = behind.len(),
                            "consent replica behind for some subjects: those read from the primary"
                        );
                    }
                    group(records, &|s| !behind.contains(s));
                    from_primary.retain(|s| behind.contains(s));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consent replica failed: read from the primary");
                }
            }
        }
        if !from_primary.is_empty() {
            let (records, _) = self.primary.subjects(&from_primary).await?;
            group(records, &|_| true);
        }
        Ok(distinct
            .into_iter()
            .map(|s| (s.to_string(), found.remove(s).unwrap_or_default()))
            .collect())
    }
}
