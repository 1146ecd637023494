//! The write side of the decision log: what the proxy runs to commit every decision before
//! anything is forwarded, and to ship the sealed files.
//!
//! - `handle`: the [`LogWriter`] requests hold: append, rotate, close, counters; and the
//!   name of each worker's chain ([`worker_settings`]);
//! - `committer`: the one owner of the chain head: batches (group commit), checkpoints,
//!   rotation;
//! - `logfile`: the file itself: opening, finding the tail, cutting a torn record, recovery
//!   after a crash or a failed write;
//! - [`ship`]: sealed files to object storage.
//!
//! The handle uses the committer, the committer the file: none reaches back up.

mod committer;
mod handle;
mod logfile;
pub mod ship;

pub use committer::LogFailed;
pub use handle::{LogStats, LogWriter, WriterStart, worker_settings};
pub use logfile::AuditError;
