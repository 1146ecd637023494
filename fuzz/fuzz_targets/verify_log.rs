//! Log verification: never panics on any file contents.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    invariants::check_verify_any(data, &dir.path().join("any.jsonl"));
});
