//! Signed policy bundles: `parse` never panics on any bytes; what it accepts encodes back to
//! the same bytes; a truncated one says so; only a bundle the fixture signed verifies.
//! The fixture and the body are `invariants::PolicyBundle`, which `cargo test` runs too.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use invariants::{PolicyBundle, Target};
use std::sync::OnceLock;

static TARGET: OnceLock<PolicyBundle> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(PolicyBundle::new).run(data));
