//! The `sqlite:PATH` store, the embedded registry: one file, created on first use, its schema
//! versioned (`PRAGMA user_version`) and migrated forward on open.
//!
//! The database runs in WAL mode, so another process (the `consent` command, an operator's
//! `sqlite3` shell) can write while the proxy reads. Triggers append every grant and
//! revocation to `consent_changes`; the proxy's feed polls `PRAGMA data_version` (a
//! per-connection counter that moves when another connection commits) a few times a second,
//! off the request path, and applies the changed consents to the index (a cache forgets
//! their subjects). Grants and revocations are immutable rows: triggers refuse to update or
//! delete them.
//!
//! The feed also watches the file itself: a file deleted or moved away makes the store
//! unreachable (the index keeps what it holds until `consent.max_staleness` runs out); a file
//! replaced by another (a new inode at the path) is reopened and read in full.

use super::import::{Chunks, Settle};
use super::index::{ConsentIndex, FeedMode as Mode};
use super::record::ConsentRecord;
use super::registry::{Batch, Change, Event, Filter, RegistryError, Written, plan, plan_distinct};
use foldhash::fast::RandomState;
use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, Row, TransactionBehavior, params};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("cannot create the folder of consent database {}: {source}", path.display())]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open consent database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("consent database {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("consent database {} is unreachable: {source}", path.display())]
    Gone {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "consent database {} has schema version {found}, newer than this build knows ({known}): upgrade residency-proxy", path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("consent database {}: {source}", path.display())]
    Query {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Schema migrations, in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE consents (
    id           TEXT PRIMARY KEY NOT NULL,
    subject      TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    purposes     TEXT NOT NULL,   -- JSON array of strings
    categories   TEXT NOT NULL,   -- JSON array of strings
    destinations TEXT NOT NULL,   -- JSON array of strings
    method       TEXT NOT NULL,
    granted_at   TEXT NOT NULL,   -- RFC 3339
    expires_at   TEXT NOT NULL,   -- RFC 3339
    evidence     TEXT,
    recorded_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    recorded_by  TEXT NOT NULL DEFAULT 'sql'
) STRICT;
CREATE INDEX consents_by_subject ON consents (subject);

CREATE TABLE consent_revocations (
    consent_id  TEXT NOT NULL REFERENCES consents (id),
    revoked_at  TEXT NOT NULL,    -- RFC 3339
    evidence    TEXT,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    recorded_by TEXT NOT NULL DEFAULT 'sql'
) STRICT;
CREATE INDEX consent_revocations_by_consent ON consent_revocations (consent_id);

CREATE TABLE consent_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    consent_id TEXT NOT NULL
);
CREATE TRIGGER consents_changed AFTER INSERT ON consents
BEGIN INSERT INTO consent_changes (consent_id) VALUES (NEW.id); END;
CREATE TRIGGER consent_revocations_changed AFTER INSERT ON consent_revocations
BEGIN INSERT INTO consent_changes (consent_id) VALUES (NEW.consent_id); END;

CREATE TRIGGER consents_never_change BEFORE UPDATE ON consents
BEGIN SELECT RAISE(ABORT, 'a grant is a fact and never changes: revoke it and grant a new consent'); END;
CREATE TRIGGER consents_never_go BEFORE DELETE ON consents
BEGIN SELECT RAISE(ABORT, 'a grant is a fact and is kept: revoke it instead'); END;
CREATE TRIGGER consent_revocations_never_change BEFORE UPDATE ON consent_revocations
BEGIN SELECT RAISE(ABORT, 'a revocation is a fact and never changes'); END;
CREATE TRIGGER consent_revocations_never_go BEFORE DELETE ON consent_revocations
BEGIN SELECT RAISE(ABORT, 'a revocation is a fact and is kept'); END;
"#];

/// The columns of a grant, in the order [`grant_from_row`] reads them.
const GRANT_COLUMNS: &str = "c.id, c.subject, c.recipient, c.purposes, c.categories, c.destinations, c.method, c.granted_at, c.expires_at, c.evidence";

/// Which file a connection has open: a path can come to name another file.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

fn file_id(path: &Path) -> Result<FileId, SqliteError> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => SqliteError::Missing { path: path.into() },
        _ => SqliteError::Gone {
            path: path.into(),
            source,
        },
    })?;
    Ok(FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Opens (and with `create`, creates) the database, sets it up for sharing with other
/// processes, and migrates its schema.
fn connect(path: &Path, create: bool) -> Result<(Connection, FileId), SqliteError> {
    let open = |source| SqliteError::Open {
        path: path.into(),
        source,
    };
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SqliteError::Folder {
                path: path.into(),
                source,
            })?;
        }
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    } else {
        file_id(path)?;
    }
    let conn = Connection::open_with_flags(path, flags).map_err(open)?;
    // Another process may hold the write lock for a moment (an import batch).
    conn.busy_timeout(Duration::from_secs(5)).map_err(open)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(open)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .map_err(open)?;
    // A grant acknowledged to the caller survives a power cut.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open)?;
    migrate(&conn, path)?;
    let id = file_id(path)?;
    Ok((conn, id))
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), SqliteError> {
    let query = |source| SqliteError::Query {
        path: path.into(),
        source,
    };
    let known = MIGRATIONS.len() as i64;
    let version =
        |c: &Connection| c.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0));
    if version(conn).map_err(query)? == known {
        return Ok(());
    }
    // Two processes opening a new file at once: the write lock makes one migrate, and the
    // other sees the result when it reads the version again under the lock.
    conn.execute_batch("BEGIN IMMEDIATE").map_err(query)?;
    let result = (|| {
        let found = version(conn).map_err(query)?;
        if found > known {
            return Err(SqliteError::TooNew {
                path: path.into(),
                found,
                known,
            });
        }
        for m in &MIGRATIONS[found as usize..] {
            conn.execute_batch(m).map_err(query)?;
        }
        conn.pragma_update(None, "user_version", known)
            .map_err(query)
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT").map_err(query),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// A grant as stored, or why its row is unreadable (written by hand, say).
fn grant_from_row(row: &Row<'_>) -> rusqlite::Result<Result<ConsentRecord, String>> {
    let id: String = row.get(0)?;
    let lists: [String; 3] = [row.get(3)?, row.get(4)?, row.get(5)?];
    let times: [String; 2] = [row.get(7)?, row.get(8)?];
    let list = |i: usize, name: &str| {
        serde_json::from_str::<Vec<String>>(&lists[i])
            .map_err(|e| format!("{name} is not a JSON array of strings: {e}"))
    };
    let time = |i: usize, name: &str| {
        times[i]
            .parse::<Timestamp>()
            .map_err(|e| format!("{name} is not an RFC 3339 time: {e}"))
    };
    let parsed = (|| {
        Ok::<_, String>((
            list(0, "purposes")?,
            list(1, "categories")?,
            list(2, "destinations")?,
            time(0, "granted_at")?,
            time(1, "expires_at")?,
        ))
    })();
    let (purposes, categories, destinations, granted_at, expires_at) = match parsed {
        Ok(p) => p,
        Err(why) => return Ok(Err(format!("consent \"{id}\": {why}"))),
    };
    Ok(Ok(ConsentRecord {
        id,
        subject: row.get(1)?,
        recipient: row.get(2)?,
        purposes,
        categories,
        destinations,
        method: row.get(6)?,
        granted_at,
        expires_at,
        revoked_at: None,
        evidence: row.get(9)?,
    }))
}

/// Which consents a query covers, as SQL over `consents c` and its one parameter.
enum Selection<'a> {
    Filter(Filter<'a>),
    /// A JSON array of ids.
    Ids(String),
}

impl Selection<'_> {
    fn condition(&self) -> (&'static str, Option<&str>) {
        match self {
            Selection::Filter(Filter::All) => ("1 = 1", None),
            Selection::Filter(Filter::Subject(s)) => ("c.subject = ?1", Some(s)),
            Selection::Filter(Filter::Id(id)) => ("c.id = ?1", Some(id)),
            Selection::Ids(json) => ("c.id IN (SELECT value FROM json_each(?1))", Some(json)),
        }
    }
}

/// Current states (grant plus earliest revocation) of the selected consents, in the order
/// they were granted. Unreadable rows are logged and left out: they grant nothing.
fn states(conn: &Connection, sel: &Selection<'_>) -> rusqlite::Result<Vec<ConsentRecord>> {
    let (cond, param) = sel.condition();
    let mut revoked: HashMap<String, Timestamp, RandomState> = HashMap::default();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT r.consent_id, r.revoked_at FROM consent_revocations r JOIN consents c ON c.id = r.consent_id WHERE {cond}"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let at: String = row.get(1)?;
        // A revocation whose time cannot be read still revokes (from the start): the row
        // says the person withdrew, and only its date is in doubt.
        let t = revocation_time(&at).unwrap_or_else(|| {
            tracing::warn!(consent.id = %id, revoked_at = %at, "revocation with an unreadable revoked_at: revoked from the grant on");
            Timestamp::MIN
        });
        let e = revoked.entry(id).or_insert(t);
        *e = (*e).min(t);
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GRANT_COLUMNS} FROM consents c WHERE {cond} ORDER BY c.rowid"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        match grant_from_row(row)? {
            Ok(mut r) => {
                r.revoked_at = revoked.get(&r.id).map(|t| (*t).max(r.granted_at));
                out.push(r);
            }
            Err(why) => tracing::warn!(reason = %why, "unreadable consent row ignored"),
        }
    }
    Ok(out)
}

/// A revocation time as the proxy writes it (RFC 3339), or as SQLite's own `datetime('now')`
/// and `CURRENT_TIMESTAMP` write it (`2026-11-28 09:30:00`, UTC): an operator revoking from
/// the `sqlite3` shell is taken at their word.
fn revocation_time(text: &str) -> Option<Timestamp> {
    text.parse::<Timestamp>().ok().or_else(|| {
        let civil: jiff::civil::DateTime = text.parse().ok()?;
        jiff::tz::TimeZone::UTC.to_timestamp(civil).ok()
    })
}

fn history(conn: &Connection, filter: Filter<'_>) -> rusqlite::Result<Vec<Event>> {
    let sel = Selection::Filter(filter);
    let (cond, param) = sel.condition();
    let recorded = |s: String| s.parse::<Timestamp>().unwrap_or(Timestamp::UNIX_EPOCH);
    let mut events = Vec::new();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GRANT_COLUMNS}, c.recorded_at, c.recorded_by FROM consents c WHERE {cond}"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    while let Some(row) = rows.next()? {
        let Ok(r) = grant_from_row(row)? else {
            continue;
        };
        events.push(Event {
            event: "grant",
            consent: r.id.clone(),
            subject: r.subject.clone(),
            at: r.granted_at,
            recorded_at: recorded(row.get(10)?),
            recorded_by: row.get(11)?,
            evidence: r.evidence.clone(),
            record: Some(r),
        });
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT r.consent_id, c.subject, r.revoked_at, r.recorded_at, r.recorded_by, r.evidence \
         FROM consent_revocations r JOIN consents c ON c.id = r.consent_id WHERE {cond}"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    while let Some(row) = rows.next()? {
        let at = revocation_time(&row.get::<_, String>(2)?).unwrap_or(Timestamp::UNIX_EPOCH);
        events.push(Event {
            event: "revoke",
            consent: row.get(0)?,
            subject: row.get(1)?,
            at,
            recorded_at: recorded(row.get(3)?),
            recorded_by: row.get(4)?,
            evidence: row.get(5)?,
            record: None,
        });
    }
    Ok(events)
}

fn json_list<S: serde::Serialize>(v: &[S]) -> String {
    serde_json::to_string(v).expect("strings serialise")
}

/// The current states of consents `ids` (a JSON array) that the registry holds, as [`states`]
/// reads them, in one query driven by the ids (an index lookup each, where an `IN` would
/// first build a temporary index of them).
fn held(
    conn: &Connection,
    ids: &str,
) -> rusqlite::Result<HashMap<String, ConsentRecord, RandomState>> {
    // CROSS JOIN keeps the ids as the outer loop.
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GRANT_COLUMNS}, r.revoked_at FROM json_each(?1) AS j CROSS JOIN consents c ON c.id = j.value \
         LEFT JOIN consent_revocations r ON r.consent_id = c.id"
    ))?;
    let mut rows = stmt.query([ids])?;
    let mut out: HashMap<String, ConsentRecord, RandomState> = HashMap::default();
    while let Some(row) = rows.next()? {
        let revoked = row.get::<_, Option<String>>(10)?.map(|at| {
            revocation_time(&at).unwrap_or_else(|| {
                tracing::warn!(revoked_at = %at, "revocation with an unreadable revoked_at: revoked from the grant on");
                Timestamp::MIN
            })
        });
        let id: String = row.get(0)?;
        if let Some(r) = out.get_mut(&id) {
            // Another revocation of the same consent: the earliest counts.
            if let Some(at) = revoked {
                let at = at.max(r.granted_at);
                r.revoked_at = Some(r.revoked_at.map_or(at, |t| t.min(at)));
            }
            continue;
        }
        match grant_from_row(row)? {
            Ok(mut r) => {
                r.revoked_at = revoked.map(|t| t.max(r.granted_at));
                out.insert(id, r);
            }
            Err(why) => tracing::warn!(reason = %why, "unreadable consent row ignored"),
        }
    }
    Ok(out)
}

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

    /// See [`super::Registry::write`].
    pub fn write(
        &self,
        changes: &[Change],
        by: &str,
    ) -> Result<Vec<Result<Written, RegistryError>>, SqliteError> {
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

    /// Writes the chunks of an import (see [`super::import`]) in one transaction, reading
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

/// Reads one subject's consents for the cache, on a few connections of its own (each used
/// by one query at a time, off the runtime threads). A connection to a file no longer at the
/// path (replaced, or moved away) is not reused.
pub struct SqliteReader {
    path: PathBuf,
    idle: Arc<Mutex<Vec<(Connection, FileId)>>>,
}

impl SqliteReader {
    pub fn new(path: PathBuf) -> SqliteReader {
        SqliteReader {
            path,
            idle: Arc::default(),
        }
    }

    /// The current states of `subject`'s consents, read in one transaction.
    pub async fn subject(&self, subject: &str) -> Result<Vec<ConsentRecord>, SqliteError> {
        let (path, idle, subject) = (self.path.clone(), self.idle.clone(), subject.to_string());
        tokio::task::spawn_blocking(move || {
            let now = file_id(&path)?;
            let held = idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let (mut conn, id) = match held {
                Some((c, id)) if id == now => (c, id),
                _ => connect(&path, false)?,
            };
            let read = (|| {
                let tx = conn.transaction()?;
                let records = states(&tx, &Selection::Filter(Filter::Subject(&subject)))?;
                tx.commit()?;
                Ok(records)
            })()
            .map_err(|source| SqliteError::Query {
                path: path.clone(),
                source,
            })?;
            let mut pool = idle.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.len() < super::cache::POOL_SIZE {
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

    use crate::consent::record::sample as record;

    #[test]
    fn a_new_file_is_created_with_the_current_schema_and_reopened_without_migrating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/consent.db");
        SqliteRegistry::open(&path, true).unwrap();
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(conn);
        SqliteRegistry::open(&path, false).unwrap();
    }

    #[test]
    fn a_missing_file_is_not_created_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consent.db");
        let e = SqliteRegistry::open(&path, false).err().unwrap();
        assert!(matches!(e, SqliteError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!path.exists());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consent.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let e = SqliteRegistry::open(&path, true).err().unwrap();
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }

    #[test]
    fn grants_and_revocations_are_kept_as_facts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consent.db");
        let reg = SqliteRegistry::open(&path, true).unwrap();
        let revoke = Change::Revoke(super::super::registry::Revocation {
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
