//! Decision ids: ULIDs (48-bit millisecond time, 80 random bits, Crockford base32), so that
//! ids sort by time and never need coordination.

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A new id for a decision taken at `ts`.
pub fn new_id(ts: jiff::Timestamp) -> String {
    let ms = ts.as_millisecond().max(0) as u128 & ((1 << 48) - 1);
    let rand = fastrand::u128(..) & ((1 << 80) - 1);
    let mut n = ms << 80 | rand;
    let mut buf = [0u8; 26];
    for slot in buf.iter_mut().rev() {
        *slot = CROCKFORD[(n & 31) as usize];
        n >>= 5;
    }
    String::from_utf8(buf.to_vec()).expect("Crockford base32 is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_differ() {
        let a = new_id("2026-11-28T04:31:53Z".parse().unwrap());
        let b = new_id("2026-11-28T04:31:54Z".parse().unwrap());
        assert_eq!(a.len(), 26);
        assert!(a < b);
        assert_ne!(
            new_id(jiff::Timestamp::UNIX_EPOCH),
            new_id(jiff::Timestamp::UNIX_EPOCH)
        );
    }
}
