//! The log-signing key (Ed25519, PKCS#8 PEM): it signs checkpoints, and the pseudonym key
//! that hides subjects in the log is derived from it.

use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing key {} is not a PKCS#8 PEM private key: {why}", path.display())]
    Format { path: PathBuf, why: String },
    #[error("signing key {} is not an Ed25519 key: {why}", path.display())]
    NotEd25519 { path: PathBuf, why: String },
}

/// An Ed25519 signing key loaded from disk.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    seed: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.fingerprint())
    }
}

impl SigningKey {
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_pem(&pem, path)
    }

    pub fn from_pem(pem: &[u8], path: &Path) -> Result<SigningKey, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| KeyError::Format {
            path: path.into(),
            why: e.to_string(),
        })?;
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()).map_err(|e| {
                KeyError::NotEd25519 {
                    path: path.into(),
                    why: e.to_string(),
                }
            })?;
        let seed_bin = pair.seed().map_err(|_| KeyError::NotEd25519 {
            path: path.into(),
            why: "no seed".into(),
        })?;
        let seed_be: aws_lc_rs::encoding::Curve25519SeedBin<'_> =
            seed_bin.as_be_bytes().map_err(|_| KeyError::NotEd25519 {
                path: path.into(),
                why: "no seed".into(),
            })?;
        let mut seed = [0u8; 32];
        seed.copy_from_slice(seed_be.as_ref());
        Ok(SigningKey { pair, seed })
    }

    /// Generates a new key and returns it as a PKCS#8 PEM document.
    pub fn generate_pem() -> String {
        let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .expect("the system RNG works");
        pem("PRIVATE KEY", doc.as_ref())
    }

    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The public key as a SubjectPublicKeyInfo PEM document.
    pub fn public_pem(&self) -> String {
        // SPKI for Ed25519 is a fixed 12-byte prefix followed by the 32-byte key (RFC 8410).
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(self.public_key());
        pem("PUBLIC KEY", &der)
    }

    /// `sha256:` of the raw public key, as checkpoints name it.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.public_key())
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// The key that pseudonymises subjects: SHA-256 over a fixed label and the key's seed,
    /// so that the pseudonyms stay the same for as long as the signing key does.
    pub fn pseudonym_key(&self) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"residency-proxy/pseudonym/v1\0");
        ctx.update(&self.seed);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// `sha256:` of a raw Ed25519 public key.
pub fn fingerprint(public_key: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public_key).as_ref())
    )
}

/// Reads an Ed25519 public key from an SPKI PEM file (as written by `certs init`).
pub fn load_public_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    let pem_bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.into(),
        source,
    })?;
    let der =
        rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(&pem_bytes).map_err(|e| {
            KeyError::Format {
                path: path.into(),
                why: e.to_string(),
            }
        })?;
    let der = der.as_ref();
    if der.len() != 44
        || der[..12]
            != [
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
            ]
    {
        return Err(KeyError::NotEd25519 {
            path: path.into(),
            why: "not an Ed25519 SubjectPublicKeyInfo".into(),
        });
    }
    Ok(der[12..].to_vec())
}

/// Verifies an Ed25519 signature.
pub fn verify(public_key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, public_key)
        .verify(msg, sig)
        .is_ok()
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64_lines::encode;
    format!(
        "-----BEGIN {label}-----\n{}-----END {label}-----\n",
        encode(der)
    )
}

mod base64_lines {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Standard base64 with padding, wrapped at 64 columns as PEM requires.
    pub fn encode(data: &[u8]) -> String {
        let mut s = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    s.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    s.push('=');
                }
            }
        }
        let mut out = String::new();
        for line in s.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let pem = SigningKey::generate_pem();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, &pem).unwrap();
        let k = SigningKey::load(&path).unwrap();
        let again = SigningKey::load(&path).unwrap();
        assert_eq!(k.pseudonym_key(), again.pseudonym_key());
        let sig = k.sign(b"head");
        assert!(verify(k.public_key(), b"head", &sig));
        assert!(!verify(k.public_key(), b"tail", &sig));
        let pubp = dir.path().join("k.pub");
        std::fs::write(&pubp, k.public_pem()).unwrap();
        assert_eq!(load_public_key(&pubp).unwrap(), k.public_key());
    }

    #[test]
    fn garbage_is_refused_with_the_path() {
        let err = SigningKey::from_pem(b"not a key", Path::new("x.key")).unwrap_err();
        assert!(err.to_string().contains("x.key"), "{err}");
    }
}
