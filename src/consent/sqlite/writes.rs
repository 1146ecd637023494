//! The registry's writer and reader for the admin API and the `consent` command: writes
//! planned by [`crate::consent::change::plan`] and committed in one transaction, bulk imports
//! in transactions of about a second each, listings. Separate from the reader and the feed, which serve the proxy
//! and never write.

use super::rows::{Selection, held, history, json_list, states};
use super::schema::{FileId, SqliteError, connect, file_id};
use crate::consent::change::{
    Batch, Change, Event, Filter, Outcome, Refusal, Written, plan, plan_distinct,
};
use crate::consent::import::{Chunks, Fresh, Settle};
use crate::consent::record::ConsentRecord;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Page cache of an import's connection (negative: KiB), 64 MiB.
const IMPORT_CACHE_KIB: i64 = -65536;

/// Inserts the facts of a planned batch.
fn insert(tx: &Connection, batch: &Batch, by: &str) -> rusqlite::Result<()> {
    let mut grant = tx.prepare_cached(
        "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at, evidence, recorded_by) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for r in &batch.grants {
        grant.execute(params![
            r.id,
            r.subject,
            r.recipient,
            json_list(&r.purposes),
            json_list(&r.categories),
            json_list(&r.destinations),
            r.method,
            r.granted_at.to_string(),
            r.expires_at.to_string(),
            r.evidence,
            by,
        ])?;
    }
    let mut revoke = tx.prepare_cached(
        "INSERT INTO consent_revocations (consent_id, revoked_at, evidence, recorded_by) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for r in &batch.revocations {
        revoke.execute(params![
            r.consent_id,
            r.revoked_at.to_string(),
            r.evidence,
            by
        ])?;
    }
    Ok(())
}

/// How long an import holds the write lock at a time: a grant made meanwhile waits up to
/// this long (and a chunk), within the 5 s every connection waits for the lock. Each
/// commit writes the pages the transaction changed (most of the id index, whose ids come in
/// no order): longer transactions write fewer times.
const IMPORT_HOLD: Duration = Duration::from_secs(2);
/// How long an import lets go of the write lock between its transactions: longer than the
/// 100 ms a writer waiting for the lock sleeps between its tries, so that one waiting gets it.
const IMPORT_GAP: Duration = Duration::from_millis(110);

/// See [`SqliteRegistry::import`].
fn import_chunks(
    conn: &Connection,
    chunks: &mut Chunks,
    by: &str,
    settle: &mut Settle,
) -> rusqlite::Result<Option<std::io::Error>> {
    let mut open: Option<(Transaction<'_>, Instant)> = None;
    // Whether the last chunk found ids held: then the next one reads before it writes.
    let mut read_first = false;
    while let Some(chunk) = chunks.blocking_recv() {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // Dropping the transaction rolls it back.
            Err(e) => return Ok(Some(e)),
        };
        if open.is_none() {
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
            open = Some((tx, Instant::now()));
        }
        let (tx, since) = open.as_ref().expect("opened above");
        let (changes, chunk) = chunk.take();
        let results = match read_first {
            true => {
                let (results, found) = import_planned(tx, changes, by)?;
                read_first = found > 0;
                results
            }
            false => {
                let (results, found) = import_chunk(tx, changes, by)?;
                read_first = found > 0;
                results
            }
        };
        settle.chunk(chunk, results);
        if since.elapsed() >= IMPORT_HOLD {
            let (tx, _) = open.take().expect("open");
            tx.commit()?;
            std::thread::sleep(IMPORT_GAP);
        }
    }
    if let Some((tx, _)) = open {
        tx.commit()?;
    }
    Ok(None)
}

/// Writes a chunk's changes: each grant first as if the registry did not hold its id (the
/// common case, without reading first; `INSERT OR IGNORE` inserts nothing when it does),
/// then the grants whose ids it holds and the withdrawals as [`plan_distinct`] plans them
/// against what it holds. Returns the results and how many grants found their ids held.
fn import_chunk(
    tx: &Connection,
    changes: Vec<Change>,
    by: &str,
) -> rusqlite::Result<(Vec<Result<Outcome, Refusal>>, usize)> {
    let fresh = Fresh::plan(&changes);
    let mut outcomes = fresh.outcomes;
    let mut found = 0;
    {
        // OR IGNORE applies to the trigger's insertion too: no statement can fail half
        // done, so none keeps a statement journal.
        let mut grant = tx.prepare_cached(
            "INSERT OR IGNORE INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at, evidence, recorded_by, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let mut revoke = tx.prepare_cached(
            "INSERT INTO consent_revocations (consent_id, revoked_at, evidence, recorded_by, recorded_at) VALUES (?1, ?2, NULL, ?3, ?4)",
        )?;
        // The time the default would give each row, read once for the chunk.
        let now: String =
            tx.query_row("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", [], |row| {
                row.get(0)
            })?;
        for &i in &fresh.grants {
            let (Change::Record(r) | Change::Undated(r)) = &changes[i] else {
                unreachable!("only records are granted")
            };
            let inserted = grant.execute(params![
                r.id,
                r.subject,
                r.recipient,
                json_list(&r.purposes),
                json_list(&r.categories),
                json_list(&r.destinations),
                r.method,
                r.granted_at.to_string(),
                r.expires_at.to_string(),
                r.evidence,
                by,
                now,
            ])?;
            match (inserted, r.revoked_at) {
                (0, _) => {
                    outcomes[i] = None;
                    found += 1;
                }
                (_, Some(at)) => {
                    revoke.execute(params![r.id, at.to_string(), by, now])?;
                }
                (_, None) => {}
            }
        }
    }
    let (planned, later): (Vec<_>, Vec<_>) = changes
        .into_iter()
        .zip(&outcomes)
        .partition(|(_, outcome)| outcome.is_some());
    drop(planned);
    let later: Vec<Change> = later.into_iter().map(|(c, _)| c).collect();
    if !later.is_empty() {
        let ids: Vec<&str> = later.iter().map(Change::id).collect();
        let held = held(tx, &json_list(&ids))?;
        drop(ids);
        let (batch, results) = plan_distinct(held, later);
        insert(tx, &batch, by)?;
        let mut results = results.into_iter();
        for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
            *outcome = results.next();
        }
    }
    let results = outcomes
        .into_iter()
        .map(|o| o.expect("every change planned"))
        .collect();
    Ok((results, found))
}

/// Writes a chunk's changes as [`plan_distinct`] plans them after reading what the registry
/// holds for their ids; returns the results and how many of the ids were held.
fn import_planned(
    tx: &Connection,
    changes: Vec<Change>,
    by: &str,
) -> rusqlite::Result<(Vec<Result<Outcome, Refusal>>, usize)> {
    let ids: Vec<&str> = changes.iter().map(Change::id).collect();
    let held = held(tx, &json_list(&ids))?;
    drop(ids);
    let found = held.len();
    let (batch, results) = plan_distinct(held, changes);
    insert(tx, &batch, by)?;
    Ok((results, found))
}

/// The registry's writer and reader for the admin API and the `consent` command.
pub struct SqliteRegistry {
    path: PathBuf,
    create: bool,
    conn: Mutex<Option<(Connection, FileId)>>,
}

impl SqliteRegistry {
    /// Opens the database at `path` (creating it if `create`).
    pub fn open(path: &Path, create: bool) -> Result<SqliteRegistry, SqliteError> {
        let held = connect(path, create)?;
        Ok(SqliteRegistry {
            path: path.into(),
            create,
            conn: Mutex::new(Some(held)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a connection to the file now at the path, reconnecting when the file was
    /// replaced; a failed query drops the connection so that the next call starts afresh.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, SqliteError> {
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let now = file_id(&self.path);
        let current = matches!((&*guard, &now), (Some((_, held)), Ok(id)) if held == id);
        if !current {
            *guard = None;
            now?;
            *guard = Some(connect(&self.path, self.create)?);
        }
        let (conn, _) = guard.as_mut().expect("connected above");
        f(conn).map_err(|source| {
            *guard = None;
            SqliteError::Query {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// See [`crate::consent::Registry::write`].
    pub fn write(
        &self,
        changes: &[Change],
        by: &str,
    ) -> Result<Vec<Result<Written, Refusal>>, SqliteError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let ids: Vec<&str> = changes.iter().map(Change::id).collect();
            let held = states(&tx, &Selection::Ids(json_list(&ids)))?
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect();
            let (batch, results) = plan(held, changes);
            insert(&tx, &batch, by)?;
            tx.commit()?;
            Ok(results)
        })
    }

    /// Writes the chunks of an import (see [`crate::consent::import`]) in transactions of
    /// about [`IMPORT_HOLD`] each, with a pause of [`IMPORT_GAP`] between them, so that a
    /// grant made meanwhile (the admin API's, another `consent` command's) waits for one
    /// transaction, not for the import. An import cut short leaves the registry holding the
    /// transactions before the cut, which running it again completes. Returns the read
    /// failure that stopped it, if any: the transaction it was in is rolled back.
    pub fn import(
        &self,
        chunks: &mut Chunks,
        by: &str,
        settle: &mut Settle,
    ) -> Result<Option<std::io::Error>, SqliteError> {
        self.with(|conn| {
            // The pages an import touches stay in memory (a bounded cache) instead of
            // going to and from the WAL file at the default 2 MiB; the statement journal,
            // which keeps the pages each insertion changes until it completes, too.
            let cache: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0))?;
            conn.pragma_update(None, "cache_size", IMPORT_CACHE_KIB)?;
            let temp: i64 = conn.pragma_query_value(None, "temp_store", |r| r.get(0))?;
            conn.pragma_update(None, "temp_store", "MEMORY")?;
            let result = import_chunks(conn, chunks, by, settle);
            conn.pragma_update(None, "cache_size", cache)?;
            conn.pragma_update(None, "temp_store", temp)?;
            result
        })
    }

    pub fn list(&self, filter: Filter<'_>) -> Result<Vec<ConsentRecord>, SqliteError> {
        self.with(|conn| states(conn, &Selection::Filter(filter)))
    }

    pub fn history(&self, filter: Filter<'_>) -> Result<Vec<Event>, SqliteError> {
        self.with(|conn| history(conn, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::record::sample as record;

    #[test]
    fn grants_and_revocations_are_kept_as_facts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consent.db");
        let reg = SqliteRegistry::open(&path, true).unwrap();
        let revoke = Change::Revoke(crate::consent::change::Revocation {
            consent_id: "c1".into(),
            revoked_at: "2026-02-01T00:00:00Z".parse().unwrap(),
            evidence: Some("user clicked withdraw".into()),
        });
        reg.write(&[Change::Record(record("c1", "u1"))], "tester")
            .unwrap();
        reg.write(&[revoke], "tester").unwrap();
        let now = reg.list(Filter::Id("c1")).unwrap();
        assert_eq!(now.len(), 1);
        assert!(now[0].revoked_at.is_some());
        let events = reg.history(Filter::Subject("u1")).unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.event).collect();
        assert_eq!(kinds.len(), 2);
        assert!(kinds.contains(&"grant") && kinds.contains(&"revoke"));
        assert!(events.iter().all(|e| e.recorded_by == "tester"));

        // Straight SQL cannot rewrite or erase a fact.
        let conn = Connection::open(&path).unwrap();
        for sql in [
            "UPDATE consents SET method = 'explicit' WHERE id = 'c1'",
            "DELETE FROM consents WHERE id = 'c1'",
            "DELETE FROM consent_revocations",
        ] {
            let e = conn.execute(sql, []).unwrap_err();
            assert!(e.to_string().contains("fact"), "{sql}: {e}");
        }
    }
}
