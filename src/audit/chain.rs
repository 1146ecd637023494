//! The hash chain: `hash = SHA-256(prev ‖ canonical JSON of the record without "hash")`,
//! both as lower-case hex; the first record's `prev` is 64 zeros.

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a record given its predecessor's hash and its canonical bytes.
pub fn link(prev: &str, canonical: &[u8]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev.as_bytes());
    ctx.update(canonical);
    hex::encode(ctx.finish().as_ref())
}
