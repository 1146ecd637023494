//! The log writer: one thread owns the file, takes records from a queue, chains them
//! (`seq`, `prev`, `hash`), writes each batch with one system call (group commit), syncs it
//! when asked, and only then releases the requests waiting on their records.

use super::keys::SigningKey;
use super::record::Record;
use crate::policy::model::LogSettings;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open decision log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("decision log {} ends in a record that does not parse (line {line}): {why}", path.display())]
    Tail {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

/// The log could not take the record; nothing may be forwarded on its account.
#[derive(Clone, Debug, thiserror::Error)]
#[error("decision log unavailable: {0}")]
pub struct LogFailed(pub String);

/// A handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    _todo: Arc<()>,
}

impl LogWriter {
    /// Opens the log (creating parent directories), continues the chain of an existing file,
    /// and starts the writer thread.
    pub fn open(
        settings: &LogSettings,
        key: Option<Arc<SigningKey>>,
    ) -> Result<LogWriter, AuditError> {
        let _ = (settings, key);
        todo!()
    }

    /// Appends a record and resolves once it is durable as `durability` says.
    pub async fn append(&self, record: Record) -> Result<(), LogFailed> {
        let _ = record;
        todo!()
    }

    /// Queues a record without waiting for it (outcome records).
    pub fn append_later(&self, record: Record) {
        let _ = record;
        todo!()
    }

    /// Writes everything queued and stops the writer; later appends fail.
    pub async fn close(&self) {
        todo!()
    }
}
