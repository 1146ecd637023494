//! Log verification: a log written by the real writer, with one byte changed, never
//! verifies. Input: two bytes of position (modulo the log's length) and the new byte.
//! The fixture and the body are `invariants::VerifyMutation`, which `cargo test` runs too.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use invariants::{Target, VerifyMutation};
use std::sync::OnceLock;

static TARGET: OnceLock<VerifyMutation> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(VerifyMutation::new).run(data));
