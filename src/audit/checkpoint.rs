//! Signed checkpoints: what exactly is signed, and how a signature is checked.
//!
//! A checkpoint is a record of the chain like any other (`seq`, `prev`, `hash`). Its `sig` is
//! an Ed25519 signature over
//!
//! ```text
//! "residency-proxy checkpoint v1\n" ‖ canonical JSON of the checkpoint without "hash" and "sig"
//! ```
//!
//! The signed bytes hold `prev`, the hash of the record before the checkpoint: the head of
//! the chain, which commits to every earlier record. They also hold `seq`, `ts`, `final` and
//! the key's fingerprint and public key. `hash` is then computed over the record *with* its
//! `sig`, so the next record's `prev` commits to the signature too.

use super::keys::{self, SigningKey};
use super::record::{CheckpointRecord, Link, VERSION};

/// Prefixed to the signed bytes so that a checkpoint signature can never be mistaken for a
/// signature over anything else made with the same key.
pub const CONTEXT: &[u8] = b"residency-proxy checkpoint v1\n";

/// What a checkpoint carries to identify its key: fingerprint and raw public key (hex).
#[derive(Clone, Debug)]
pub struct KeyFields {
    pub fingerprint: String,
    pub public_key: String,
}

impl KeyFields {
    pub fn of(key: &SigningKey) -> KeyFields {
        KeyFields {
            fingerprint: key.fingerprint(),
            public_key: hex::encode(key.public_key()),
        }
    }
}

/// A checkpoint to be chained; the writer fills `seq` and `prev`, then [`sign`] fills `sig`.
pub fn unsigned(key: Option<&KeyFields>, final_: bool, ts: String) -> CheckpointRecord {
    CheckpointRecord {
        instance: None,
        final_,
        key: key.map(|k| k.fingerprint.clone()),
        kind: "checkpoint",
        prev: Link::default(),
        public_key: key.map(|k| k.public_key.clone()),
        seq: 0,
        sig: None,
        ts,
        v: VERSION,
    }
}

/// The bytes a checkpoint's signature covers, given its canonical JSON without `hash` and
/// `sig`.
pub fn signed_bytes(canonical: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(CONTEXT);
    out.extend_from_slice(canonical);
}

/// Signs a chained checkpoint (its `seq` and `prev` set) in place; `scratch` is reused.
pub fn sign(cp: &mut CheckpointRecord, key: &SigningKey, scratch: &mut Vec<u8>) {
    cp.sig = None;
    let canonical = serde_json::to_vec(cp).expect("checkpoints serialise to JSON");
    signed_bytes(&canonical, scratch);
    cp.sig = Some(hex::encode(key.sign(scratch)));
}

/// Checks `sig` (hex) over the checkpoint whose canonical form without `hash` and `sig` is
/// `canonical`, against a raw Ed25519 public key.
pub fn verify(public_key: &[u8], canonical: &[u8], sig: &[u8], scratch: &mut Vec<u8>) -> bool {
    signed_bytes(canonical, scratch);
    keys::verify(public_key, scratch, sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_the_chain_head_and_nothing_else_verifies() {
        let pem = SigningKey::generate_pem();
        let key = SigningKey::from_pem(pem.as_bytes(), "k".as_ref()).unwrap();
        let fields = KeyFields::of(&key);
        let mut cp = unsigned(Some(&fields), true, "2026-01-01T00:00:00.000000Z".into());
        cp.seq = 7;
        cp.prev = "ab".repeat(32).as_str().into();
        let mut scratch = Vec::new();
        sign(&mut cp, &key, &mut scratch);
        let sig = hex::decode(cp.sig.clone().unwrap()).unwrap();
        cp.sig = None;
        let canonical = serde_json::to_vec(&cp).unwrap();
        assert!(verify(key.public_key(), &canonical, &sig, &mut scratch));
        // Another chain head under the same signature does not verify.
        cp.prev = "cd".repeat(32).as_str().into();
        let other = serde_json::to_vec(&cp).unwrap();
        assert!(!verify(key.public_key(), &other, &sig, &mut scratch));
        assert_eq!(
            fields.fingerprint,
            keys::fingerprint(&hex::decode(&fields.public_key).unwrap())
        );
    }
}
