//! Log verification: never panics on any file contents.
//! The fixture and the body are `invariants::VerifyLog`, which `cargo test` runs too.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use invariants::{Target, VerifyLog};
use std::sync::OnceLock;

static TARGET: OnceLock<VerifyLog> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(VerifyLog::new).run(data));
