//! The consent registry: the record and its validity rules, the in-memory index the hot path
//! reads, the stores that feed it (`file:`, `sqlite:`, `postgres://`), and the admin API.

pub mod cache;
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
