//! The decision log: records, the hash chain, signed checkpoints, the writer that commits
//! them before anything is forwarded, rotation, and the offline tools (verify, query, report).

pub mod chain;
pub mod checkpoint;
pub mod export;
pub mod files;
pub mod fleet;
pub mod id;
mod json;
pub mod keys;
pub mod pseudonym;
pub mod query;
pub mod record;
pub mod report;
pub mod report_html;
pub mod ship;
pub mod store;
pub mod subject;
pub mod verify;
pub mod writer;

pub use pseudonym::Pseudonymizer;
pub use record::{DecisionRecord, OutcomeRecord, Record};
pub use writer::{LogFailed, LogStats, LogWriter};
