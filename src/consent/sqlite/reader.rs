//! Cache misses: a subject's consents, or those of a batch of subjects in one statement, read
//! for the cache on a few connections of the reader's own, off the runtime threads. Separate
//! because it serves the hot path's misses, not the registry's users, and holds its own
//! connections.

use super::rows::{Selection, json_list, states, states_by_subject};
use super::schema::{FileId, SqliteError, connect, file_id};
use crate::consent::change::Filter;
use crate::consent::record::ConsentRecord;
use foldhash::fast::RandomState;
use rusqlite::Connection;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

/// Reads subjects' consents for the cache, on a few connections of its own (each used
/// by one query at a time, off the runtime threads). A connection to a file no longer at the
/// path (replaced, or moved away) is not reused.
pub struct SqliteReader {
    path: PathBuf,
    /// Most idle connections kept.
    pool_size: usize,
    idle: Arc<Mutex<Vec<(Connection, FileId)>>>,
}

impl SqliteReader {
    /// A reader of the file at `path` keeping up to `pool_size` connections.
    pub fn new(path: PathBuf, pool_size: usize) -> SqliteReader {
        SqliteReader {
            path,
            pool_size,
            idle: Arc::default(),
        }
    }

    /// The current states of `subject`'s consents, read in one transaction.
    pub async fn subject(&self, subject: &str) -> Result<Vec<ConsentRecord>, SqliteError> {
        let subject = subject.to_string();
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let records = states(&tx, &Selection::Filter(Filter::Subject(&subject)))?;
            tx.commit()?;
            Ok(records)
        })
        .await
    }

    /// The current states of the consents of each of `subjects`, in one statement: one entry
    /// per distinct subject, in the order first asked, with no records for a subject without
    /// consent.
    pub async fn subjects(
        &self,
        subjects: &[&str],
    ) -> Result<Vec<(String, Vec<ConsentRecord>)>, SqliteError> {
        let mut seen = HashSet::with_capacity_and_hasher(subjects.len(), RandomState::default());
        let distinct: Vec<String> = subjects
            .iter()
            .filter(|s| seen.insert(**s))
            .map(|s| s.to_string())
            .collect();
        let json = json_list(&distinct);
        let mut found = self
            .read(move |conn| states_by_subject(conn, &json))
            .await?;
        Ok(distinct
            .into_iter()
            .map(|s| {
                let records = found.remove(&s).unwrap_or_default();
                (s, records)
            })
            .collect())
    }

    /// Runs `f` off the runtime threads on an idle connection to the file now at the path
    /// (or a new one), and keeps the connection for the next read.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, SqliteError> {
        let (path, idle) = (self.path.clone(), self.idle.clone());
        let pool_size = self.pool_size;
        tokio::task::spawn_blocking(move || {
            let now = file_id(&path)?;
            let held = idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let (mut conn, id) = match held {
                Some((c, id)) if id == now => (c, id),
                _ => connect(&path, false)?,
            };
            let read = f(&mut conn).map_err(|source| SqliteError::Query {
                path: path.clone(),
                source,
            })?;
            let mut pool = idle.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.len() < pool_size {
                pool.push((conn, id));
            }
            Ok(read)
        })
        .await
        .map_err(|e| SqliteError::Gone {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
    }
}
