//! The `file:PATH` store: JSON lines of consent records, read-only, reloaded when the file
//! is changed or replaced. A malformed line is reported with its number and grants nothing.

use super::index::ConsentIndex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A line that was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// What a load found.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    pub skipped: Vec<LineError>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("cannot read consent file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads `path` and replaces the content of `index` with its valid records.
pub fn load(path: &Path, index: &ConsentIndex) -> Result<LoadReport, FileStoreError> {
    let _ = (path, index);
    todo!()
}

/// Watches `path` (polling every `interval`) and reloads `index` when the file changes or
/// is replaced. A failed read keeps the previous content.
pub fn watch(
    path: PathBuf,
    index: Arc<ConsentIndex>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    let _ = (path, index, interval);
    todo!()
}
