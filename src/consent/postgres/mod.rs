//! The `postgres://` store, for fleets: many sidecars share one database.
//!
//! Every grant and revocation, however written (any sidecar's admin API, the `consent`
//! command, straight SQL), is numbered in `consent_changes` by statement-level triggers,
//! under the writers' advisory lock so that numbers follow commit order, and NOTIFYs its
//! subject on the `residency_consents` channel (an empty notification for a large
//! statement). Each proxy's feed LISTENs on one connection and reads the change table after
//! every notification, heartbeat and reconnection: a cache forgets the changed subjects, a
//! complete index (`preload`) applies their consents' new states and is also reloaded every
//! [`RESYNC_EVERY`]. A feed that fell behind what the table keeps starts over. The heartbeat
//! proves the database reachable for the staleness bound; a lost connection is re-established
//! with capped, jittered exponential backoff. Cache misses are point queries over a small
//! pool ([`PgReader`]; a batch of misses is one query for all its subjects), from a read
//! replica when one is configured.
//!
//! Rows are facts: triggers refuse to update, delete or truncate them. The schema is
//! versioned in `residency_consent_schema` and migrated under an advisory lock, so sidecars
//! starting together migrate once.
//!
//! One file per seam: `connect` (URLs, connections, bounded calls, the error) and `schema`
//! (migrations, the change table's limits) at the bottom, `rows` (a consent's current state
//! as SQL and its decoding) above them, and three users of those that do not use one
//! another, except that the feed tells the reader which subjects changed lately: `writes`
//! (the registry the admin API and the `consent` command use), `reader` (cache misses) and
//! `feed` (the change feed).

mod connect;
mod feed;
mod reader;
mod rows;
mod schema;
mod writes;

pub use connect::{PgError, redact};
pub use feed::{FEED_APPLICATION, RESYNC_EVERY, start_feed};
pub use reader::{PgReader, Recent};
pub use schema::{CHANGES_KEPT, CHANNEL};
pub use writes::PgRegistry;
