//! Policy compilation: never panics on any text, and every diagnostic has a message and a
//! line inside the file. Seed the corpus with `policies/*.toml`.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    invariants::check_policy(&String::from_utf8_lossy(data));
});
