//! Decision ids: ULIDs (48-bit millisecond time, 80 random bits, Crockford base32), so that
//! ids sort by time and never need coordination.

use serde::{Serialize, Serializer};
use std::fmt;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A decision id: 26 ASCII characters held inline, so that the request, its exchange and its
/// two records each carry it by copy rather than by a string allocated and cloned for each.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecisionId {
    len: u8,
    text: [u8; 26],
}

impl DecisionId {
    /// A new id for a decision taken at `ts`.
    pub fn new(ts: jiff::Timestamp) -> DecisionId {
        let ms = ts.as_millisecond().max(0) as u128 & ((1 << 48) - 1);
        let rand = fastrand::u128(..) & ((1 << 80) - 1);
        let mut n = ms << 80 | rand;
        let mut buf = [0u8; 26];
        for slot in buf.iter_mut().rev() {
            *slot = CROCKFORD[(n & 31) as usize];
            n >>= 5;
        }
        DecisionId { len: 26, text: buf }
    }

    /// A fixed id for a record that stands for no real request (`explain` shows one); at
    /// most 26 ASCII characters.
    pub fn named(name: &str) -> DecisionId {
        assert!(
            name.is_ascii() && name.len() <= 26,
            "a decision id is 26 ASCII characters"
        );
        let mut text = [0u8; 26];
        text[..name.len()].copy_from_slice(name.as_bytes());
        DecisionId {
            len: name.len() as u8,
            text,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..usize::from(self.len)]).expect("ids are ASCII")
    }
}

impl From<&str> for DecisionId {
    fn from(name: &str) -> DecisionId {
        DecisionId::named(name)
    }
}

impl fmt::Display for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for DecisionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A new id for a decision taken at `ts`, as a string (consent ids are built from it).
pub fn new_id(ts: jiff::Timestamp) -> String {
    DecisionId::new(ts).as_str().to_string()
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
            DecisionId::new(jiff::Timestamp::UNIX_EPOCH),
            DecisionId::new(jiff::Timestamp::UNIX_EPOCH)
        );
        let id = DecisionId::new(jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
    }
}
