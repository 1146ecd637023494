//! The decision log: records, the hash chain, the writer that commits them before anything is
//! forwarded, and offline verification.

pub mod chain;
pub mod id;
pub mod keys;
pub mod pseudonym;
pub mod record;
pub mod verify;
pub mod writer;

pub use pseudonym::Pseudonymizer;
pub use record::{DecisionRecord, OutcomeRecord, Record};
pub use writer::{LogFailed, LogWriter};
