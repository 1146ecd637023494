//! Forwarding headers: never panics on any header bytes, and an untrusted peer is always the
//! client. Input: a byte choosing the peer, then lines of a byte choosing the header name
//! followed by the value.
//! The fixture and the body are `invariants::Forwarded`, which `cargo test` runs too.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use invariants::{Forwarded, Target};
use std::sync::OnceLock;

static TARGET: OnceLock<Forwarded> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(Forwarded::new).run(data));
