//! The proxy's change feed: polls `PRAGMA data_version` off the request path and applies what
//! `consent_changes` says changed to the index (a cache forgets the changed subjects, a
//! complete index reads their new states); a file deleted, moved or replaced is noticed.
//! Separate because it is a long-running task of its own, the only part that follows changes.

use super::rows::{Selection, json_list, states};
use super::schema::{FileId, SqliteError, connect, file_id};
use crate::consent::change::Filter;
use crate::consent::index::{ConsentIndex, FeedMode as Mode};
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Most changes a cache's feed applies one by one; past that it forgets the whole cache.
const CHANGES_AT_ONCE: i64 = 10_000;

/// The proxy's change feed: keeps `index` equal to the registry (see the module doc).
struct Feed {
    path: PathBuf,
    index: Arc<ConsentIndex>,
    held: Option<(Connection, FileId)>,
    /// `PRAGMA data_version` when the index was last brought up to date.
    data_version: i64,
    /// The last `consent_changes.seq` applied.
    last_seq: i64,
    failing: bool,
    mode: Mode,
}

impl Feed {
    /// Connects to the file now at the path and reads everything.
    fn reload(&mut self, create: bool) -> Result<(), SqliteError> {
        self.held = None;
        let (mut conn, id) = connect(&self.path, create)?;
        let query = |source| SqliteError::Query {
            path: self.path.clone(),
            source,
        };
        let started = std::time::Instant::now();
        // The version is read before the content: a commit landing while the content is
        // read and indexed then moves it again and the next poll looks for changes. Read
        // after, it would already count that commit and the change would wait for the next
        // unrelated write.
        let data_version = conn
            .pragma_query_value(None, "data_version", |r| r.get(0))
            .map_err(query)?;
        let last_seq = |c: &Connection| {
            c.query_row(
                "SELECT coalesce(max(seq), 0) FROM consent_changes",
                [],
                |r| r.get::<_, i64>(0),
            )
        };
        if self.mode == Mode::Invalidate {
            // A cache loads nothing: it forgets what it held of the file it had, and follows
            // the changes from here.
            let seq = last_seq(&conn).map_err(query)?;
            self.index.invalidate_all();
            tracing::info!(consent.store = %format!("sqlite:{}", self.path.display()), change_seq = seq, "consent store connected (cache mode: nothing loaded)");
            self.last_seq = seq;
            self.data_version = data_version;
            self.held = Some((conn, id));
            return Ok(());
        }
        // One read transaction: the sequence number and the content agree.
        let (seq, records) = (|| {
            let tx = conn.transaction()?;
            let seq = last_seq(&tx)?;
            let records = states(&tx, &Selection::Filter(Filter::All))?;
            tx.commit()?;
            Ok((seq, records))
        })()
        .map_err(query)?;
        let read = started.elapsed();
        let rejected = self.index.replace_all(&records);
        tracing::info!(
            consent.store = %format!("sqlite:{}", self.path.display()),
            consents = records.len() - rejected,
            rejected,
            read_ms = read.as_millis() as u64,
            ms = started.elapsed().as_millis() as u64,
            "consents loaded"
        );
        self.last_seq = seq;
        self.data_version = data_version;
        self.held = Some((conn, id));
        Ok(())
    }

    /// Applies what changed since the last poll.
    fn catch_up(&mut self) -> Result<(), SqliteError> {
        let id = file_id(&self.path)?;
        let conn = match &self.held {
            Some((conn, held)) if *held == id => conn,
            _ => return self.reload(false),
        };
        let query = |source| SqliteError::Query {
            path: self.path.clone(),
            source,
        };
        let version: i64 = conn
            .pragma_query_value(None, "data_version", |r| r.get(0))
            .map_err(query)?;
        if version == self.data_version {
            return Ok(());
        }
        // A cache forgets everything rather than read a large change (an import) row by row.
        let limit = match self.mode {
            Mode::Invalidate => CHANGES_AT_ONCE + 1,
            Mode::Preload => i64::MAX,
        };
        let changed = (|| {
            let mut stmt = conn.prepare_cached(
                "SELECT ch.seq, ch.consent_id, c.subject FROM consent_changes ch \
                 LEFT JOIN consents c ON c.id = ch.consent_id WHERE ch.seq > ?1 ORDER BY ch.seq LIMIT ?2",
            )?;
            let rows = stmt.query_map([self.last_seq, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })()
        .map_err(query)?;
        if changed.len() as i64 > CHANGES_AT_ONCE {
            let seq: i64 = conn
                .query_row(
                    "SELECT coalesce(max(seq), 0) FROM consent_changes",
                    [],
                    |r| r.get(0),
                )
                .map_err(query)?;
            tracing::info!(consent.store = %self.path.display(), "over {CHANGES_AT_ONCE} consent changes at once: the whole cache is forgotten");
            self.index.invalidate_all();
            self.last_seq = seq;
            self.data_version = version;
            return Ok(());
        }
        if let Some((seq, _, _)) = changed.last() {
            match self.mode {
                Mode::Invalidate => {
                    for (_, _, subject) in &changed {
                        match subject {
                            Some(s) => {
                                self.index.invalidate(s);
                            }
                            // A change of a consent the table no longer holds (edited by
                            // hand): what it affected is unknown.
                            None => self.index.invalidate_all(),
                        }
                    }
                }
                Mode::Preload => {
                    let ids: Vec<&str> = changed.iter().map(|(_, id, _)| id.as_str()).collect();
                    let records = states(conn, &Selection::Ids(json_list(&ids))).map_err(query)?;
                    for r in &records {
                        if let Err(e) = self.index.upsert(r) {
                            tracing::warn!(consent.id = %r.id, error = %e, "invalid consent in the registry ignored");
                        }
                    }
                }
            }
            tracing::debug!(changes = changed.len(), "consent changes applied");
            self.last_seq = *seq;
        }
        self.data_version = version;
        Ok(())
    }

    fn poll(&mut self) {
        match self.catch_up() {
            Ok(()) => {
                if std::mem::replace(&mut self.failing, false) {
                    tracing::info!(consent.store = %self.path.display(), "consent database reachable again");
                }
                self.index.freshness().confirm();
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(error = %e, "consent database unreachable; the consents loaded stay in force until consent.max_staleness");
                }
                self.index.freshness().fail(e.to_string());
            }
        }
    }
}

/// Opens (creating it if needed) the database at `path`, loads it into `index` (unless the
/// index is a cache), and starts the task that keeps the index current, polling every `every`.
pub async fn start_feed(
    path: PathBuf,
    index: Arc<ConsentIndex>,
    every: Duration,
) -> Result<tokio::task::JoinHandle<()>, SqliteError> {
    index.freshness().track();
    let mode = index.feed_mode();
    let mut feed = Feed {
        path,
        index,
        held: None,
        data_version: 0,
        last_seq: 0,
        failing: false,
        mode,
    };
    let feed = tokio::task::spawn_blocking(move || {
        feed.reload(true)?;
        feed.index.freshness().confirm();
        Ok::<_, SqliteError>(feed)
    })
    .await
    .expect("the consent loader does not panic")?;
    Ok(tokio::spawn(async move {
        let mut feed = Some(feed);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let mut f = feed.take().expect("the feed comes back after each poll");
            match tokio::task::spawn_blocking(move || {
                f.poll();
                f
            })
            .await
            {
                Ok(f) => feed = Some(f),
                Err(e) => {
                    tracing::error!(error = %e, "consent feed stopped");
                    return;
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_feed_applies_a_write_made_by_another_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consent.db");
        let index = Arc::new(ConsentIndex::new());
        let task = start_feed(path.clone(), index.clone(), Duration::from_millis(20))
            .await
            .unwrap();
        assert!(index.is_empty());
        assert!(!index.freshness().is_stale(Duration::from_secs(5)));

        // As an operator would, with plain SQL in another connection.
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at) \
             VALUES ('c9', 'u9', 'credit-bureau-us', '[\"credit_scoring\"]', '[\"user\"]', '[\"US\"]', 'explicit', '2026-01-01T00:00:00Z', '2030-01-01T00:00:00+08:00')",
            [],
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while index.get("u9").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the feed never applied the insert"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(&*index.get("u9").unwrap()[0].scope.categories[0], "user");
        task.abort();
    }
}
