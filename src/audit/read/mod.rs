//! The read side of the decision log: the offline tools a security team and a data protection
//! officer run on a log that was written (`audit verify|query|report|subject|export`), on a
//! local log or on a fleet's files in object storage.
//!
//! Apart from the writer because nothing here runs in the proxy: these modules read the
//! records as untyped JSON (a log written by another version still reads), and share with
//! the writer only the core above them (the chain, checkpoints, files, stores).
//!
//! - [`verify`]: the hash chain, checkpoints and signatures of one chain; [`fleet`] many
//!   chains, each on its own (every instance's shipped files, a folder's workers), and
//!   reading shipped files in turn;
//! - [`query`]: streaming a log's records through filters (shared by the others);
//! - [`report`] and [`subject`]: the counts for the security team, and one person's
//!   disclosure report; [`html`] draws both as pages;
//! - [`export`]: the records as a typed Parquet file.

pub mod export;
pub mod fleet;
pub mod html;
pub mod query;
pub mod report;
pub mod subject;
pub mod verify;
