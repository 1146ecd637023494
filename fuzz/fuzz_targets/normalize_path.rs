//! Path normalisation: never panics; an accepted path is absolute, has no `//`, dot segment
//! or decodable escape, is a fixed point, and never climbs above the root.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    invariants::check_normalize(&String::from_utf8_lossy(data));
});
