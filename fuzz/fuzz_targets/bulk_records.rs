//! Bulk objects filtered record by record (JSON lines and CSV, plain, gzip or zstd): never
//! panics; every byte is accounted for; the output is the kept records in order, whatever
//! the chunking; keeping everything gives the input back.
//! The fixture and the body are `invariants::BulkRecords`, which `cargo test` runs too.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use invariants::{BulkRecords, Target};
use std::sync::OnceLock;

static TARGET: OnceLock<BulkRecords> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(BulkRecords::new).run(data));
