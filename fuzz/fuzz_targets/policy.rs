//! Policy compilation: never panics on any text, and every diagnostic has a message and a
//! line inside the file. Seed the corpus with `policies/*.toml`.
//! The fixture and the body are `invariants::Policy`, which `cargo test` runs too.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use invariants::{Policy, Target};
use std::sync::OnceLock;

static TARGET: OnceLock<Policy> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(Policy::new).run(data));
