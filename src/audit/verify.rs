//! Offline verification of a decision log: chain, sequence numbers, and (later) signed
//! checkpoints; names the first broken record by file and line.

use std::path::{Path, PathBuf};

/// A log that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub checkpoints: u64,
}

/// The first place where a log is broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {why}", file.display())]
pub struct Broken {
    pub file: PathBuf,
    pub line: usize,
    pub why: String,
}

/// Verifies the log at `path` (a file, or a folder of rotated files).
pub fn verify(path: &Path) -> Result<VerifyReport, Broken> {
    let _ = path;
    todo!()
}
