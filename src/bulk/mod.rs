//! Bulk objects filtered record by record: the pure core that turns an object's bytes into
//! records and their subjects, and, given a keep/drop verdict per record, into the bytes
//! that may leave. No I/O beyond reading a spooled Parquet file, no async, no consent
//! lookups: the proxy, `explain --body` and policy tests drive it alike.
//!
//! JSON lines and CSV stream through [`StreamFilter`]; Parquet, whose footer comes last, is
//! spooled by the caller and filtered one row group at a time by [`ParquetFilter`]. Both
//! hand out [`Batch`]es: the caller looks up the batch's distinct subjects, logs the
//! disclosure, then `emit`s one [`Verdict`] per record and sends the bytes returned.

mod batch;
mod codec;
mod csv;
mod drive;
mod fuzz;
mod jsonl;
mod parquet;
pub mod spec;
mod stream;

pub use batch::{Batch, Counts, Emitted, Reason, Record, Verdict};
pub use codec::Decoder;
pub use drive::{run_parquet, run_stream};
pub use fuzz::{FuzzReport, fuzz_bytes, fuzz_one};
pub use parquet::ParquetFilter;
pub use spec::{
    Compression, Format, PointerToken, RecordsSpec, SubjectPath, SubjectPathError,
    UnsupportedEncoding,
};
pub use stream::{Limits, StreamFilter};

/// Why an object could not be filtered (to the end). The caller ends the response with an
/// error: the records after the failure cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BulkError {
    #[error("the object's {codec} stream is corrupt at byte {offset}: {detail}")]
    Corrupt {
        codec: &'static str,
        offset: u64,
        detail: String,
    },
    #[error("the object's {codec} stream ends in the middle (after {offset} bytes)")]
    Truncated { codec: &'static str, offset: u64 },
    #[error("compressing the filtered records as {codec} failed: {detail}")]
    Compress { codec: &'static str, detail: String },
    #[error("{format} objects are not streamed: spool the object and filter it with ParquetFilter")]
    NotStreamable { format: Format },
    #[error("the Parquet object cannot be filtered: {0}")]
    Parquet(String),
    #[error("{got} verdicts were given for a batch of {expected} records")]
    VerdictCount { expected: usize, got: usize },
    #[error("the bulk filter was misused: {0}")]
    Misuse(&'static str),
}

#[cfg(test)]
mod tests;
