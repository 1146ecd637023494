//! The hash chain: `hash = SHA-256(prev ‖ canonical JSON of the record without "hash")`,
//! both as lower-case hex; the first record's `prev` is 64 zeros.

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a record given its predecessor's hash and its canonical bytes.
pub fn link(prev: &str, canonical: &[u8]) -> String {
    let mut out = [0u8; 64];
    link_into(prev, canonical, &mut out);
    String::from_utf8(out.to_vec()).expect("hex is ASCII")
}

/// [`link`] into a caller's buffer, for the writer, which chains every record without
/// allocating.
pub fn link_into(prev: &str, canonical: &[u8], out: &mut [u8; 64]) {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev.as_bytes());
    ctx.update(canonical);
    hex::encode_to_slice(ctx.finish().as_ref(), out).expect("64 hex digits fit 32 bytes");
}
