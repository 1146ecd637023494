//! The SQLite file itself: opening (and creating) it for sharing with other processes, its
//! schema and forward migrations (`PRAGMA user_version`), which file a connection has open,
//! and what can go wrong with any of it ([`SqliteError`]). Separate because every other part
//! of the backend opens the file through here and nothing here reads a consent.

use rusqlite::{Connection, OpenFlags};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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

/// Which file a connection has open: a path can come to name another file.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

pub(super) fn file_id(path: &Path) -> Result<FileId, SqliteError> {
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
pub(super) fn connect(path: &Path, create: bool) -> Result<(Connection, FileId), SqliteError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::sqlite::SqliteRegistry;

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
}
