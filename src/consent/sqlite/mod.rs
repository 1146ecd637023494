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
//!
//! One file per seam: `schema` (opening the file, its migrations, the error) at the bottom,
//! `rows` (a consent's current state and history as SQL, and its rows) above it, and three
//! users of those that do not use one another: `writes` (the registry the admin API and the
//! `consent` command use), `reader` (cache misses) and `feed` (the change feed).

mod feed;
mod reader;
mod rows;
mod schema;
mod writes;

pub use feed::start_feed;
pub use reader::SqliteReader;
pub use schema::SqliteError;
pub use writes::SqliteRegistry;
