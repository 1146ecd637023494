//! The consent registry: the record and its validity rules, the in-memory index the hot path
//! reads, and the stores that feed it.

pub mod file;
pub mod index;
pub mod record;

pub use index::ConsentIndex;
pub use record::{Consent, ConsentRecord, FieldError};
