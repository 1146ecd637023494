//! The registry's writer and reader for the admin API and the `consent` command: writes
//! planned by [`crate::consent::change::plan`] and committed in one transaction, bulk imports
//! in one transaction, listings. Separate from the reader and the feed, which serve the proxy
//! and never write.

use super::rows::{Selection, held, history, json_list, states};
use super::schema::{FileId, SqliteError, connect, file_id};
use crate::consent::change::{Batch, Change, Event, Filter, Refusal, Written, plan, plan_distinct};
use crate::consent::import::{Chunks, Settle};
use crate::consent::record::ConsentRecord;
use rusqlite::{Connection, TransactionBehavior, params};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

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

    /// Writes the chunks of an import (see [`crate::consent::import`]) in one transaction, reading
    /// what the registry holds for each chunk's ids in one go. Returns the read failure that
    /// stopped it, if any: then nothing is written.
    pub fn import(
        &self,
        chunks: &mut Chunks,
        by: &str,
        settle: &mut Settle,
    ) -> Result<Option<std::io::Error>, SqliteError> {
        self.with(|conn| {
            // The pages an import touches stay in memory (a bounded cache) instead of
            // going to and from the WAL file at the default 2 MiB.
            let cache: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0))?;
            conn.pragma_update(None, "cache_size", IMPORT_CACHE_KIB)?;
            let result = (|| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                while let Some(chunk) = chunks.blocking_recv() {
                    let chunk = match chunk {
                        Ok(chunk) => chunk,
                        // Dropping the transaction rolls it back.
                        Err(e) => return Ok(Some(e)),
                    };
                    let held = held(&tx, &json_list(&chunk.ids()))?;
                    let (changes, chunk) = chunk.take();
                    let (batch, results) = plan_distinct(held, changes);
                    insert(&tx, &batch, by)?;
                    settle.chunk(chunk, results);
                }
                tx.commit()?;
                Ok(None)
            })();
            conn.pragma_update(None, "cache_size", cache)?;
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
