//! Log verification: a log written by the real writer, with one byte changed, never
//! verifies. Input: two bytes of position (modulo the log's length) and the new byte.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use std::sync::OnceLock;

struct Fixture {
    dir: tempfile::TempDir,
    log: Vec<u8>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [hi, lo, byte, ..] = *data else {
        return;
    };
    let f = FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("written.jsonl");
        invariants::write_log(&path);
        let log = std::fs::read(&path).unwrap();
        Fixture { dir, log }
    });
    let at = usize::from(u16::from_be_bytes([hi, lo])) % f.log.len();
    invariants::check_mutation_fails(&f.log, at, byte, &f.dir.path().join("mutated.jsonl"));
});
