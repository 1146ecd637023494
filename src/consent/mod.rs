//! The consent registry: the record and its validity rules, the in-memory index the hot path
//! reads, the stores that feed it (`file:`, `sqlite:`, `postgres://`), and the cache's misses.
//!
//! Bottom up: `record`, `freshness` and `index` (what the hot path reads); `change` (what a
//! change to a registry is and how it is planned); `file` and `import` (JSON lines); the
//! backends `sqlite/` and `postgres/`; then their users, `registry` (the façade the admin API
//! and the `consent` command write through) and `cache` (filling the index on a miss).

pub mod cache;
pub mod change;
pub mod file;
pub mod freshness;
pub mod import;
pub mod index;
pub mod postgres;
pub mod record;
pub mod registry;
pub mod sqlite;

pub use index::ConsentIndex;
pub use record::{Consent, ConsentRecord, FieldError};
pub use registry::{Registry, RegistryError};
