//! Path normalisation: never panics; an accepted path is absolute, has no `//`, dot segment
//! or decodable escape, is a fixed point, and never climbs above the root.
//! The fixture and the body are `invariants::NormalizePath`, which `cargo test` runs too.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use invariants::{NormalizePath, Target};
use std::sync::OnceLock;

static TARGET: OnceLock<NormalizePath> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(NormalizePath::new).run(data));
