//! The decision log.
//!
//! Here, the core both sides share: the records and their canonical JSON ([`record`],
//! `json`), decision ids ([`id`]), the hash chain ([`chain`]), signed checkpoints
//! ([`checkpoint`]), the signing key and the pseudonyms derived from it ([`keys`],
//! [`pseudonym`]), where a log's files are on disk ([`files`]) and the object stores shipped
//! files go to ([`store`]), and the application's trace a request belongs to ([`trace`]).
//!
//! [`write`](mod@write): the writer the proxy runs (group commit, checkpoints, rotation, recovery,
//! shipping). [`read`]: the offline tools (`audit verify`, `query`, `report`, `subject`,
//! `export`, and their HTML pages). The two never import each other, and the core imports
//! neither, so a change to a reader cannot reach the request path.

pub mod chain;
pub mod checkpoint;
pub mod files;
pub mod id;
mod json;
pub mod keys;
pub mod pseudonym;
pub mod read;
pub mod record;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod trace;
pub mod write;

pub use pseudonym::Pseudonymizer;
pub use record::{DecisionRecord, OutcomeRecord, Record};
pub use write::{LogFailed, LogStats, LogWriter};
