//! The bundle file, read strictly and written back: a header, a signed JSON manifest, the
//! signature, and the files' bytes back to back. Pure: `parse` never panics on any input
//! (it is fuzzed), and nothing here reads a file or a clock.
//!
//! ```text
//! offset  size  what
//! 0       8     "RPBUNDLE"
//! 8       4     format version, big-endian (1)
//! 12      4     manifest length M, big-endian (at most 1 MiB)
//! 16      M     the manifest: UTF-8 JSON, the exact bytes the signature covers
//! 16+M    4     signature length S, big-endian: 64 (Ed25519), or 0 for an unsigned bundle
//! 20+M    S     the signature
//! ...           each file's bytes, in the manifest's order, its `size` long; nothing after
//! ```
//!
//! Why not tar: a tar reader must refuse a long list of variants (GNU and pax headers, links,
//! sparse files, absolute names) to be strict, while every length here is given once and
//! checked against the file's end, in a parser short enough to read whole and to fuzz.

use super::Reason;
use crate::audit::keys;
use serde::{Deserialize, Serialize};

/// What every bundle starts with.
pub const MAGIC: &[u8; 8] = b"RPBUNDLE";
/// The format this proxy writes and reads.
pub const FORMAT: u32 = 1;
/// Bytes before the manifest: the magic, the format and the manifest's length.
const HEAD: usize = 16;
const MAX_MANIFEST: usize = 1 << 20;
const MAX_FILES: usize = 10_000;
const MAX_PATH: usize = 1024;
const MAX_BUILDER: usize = 256;
/// An Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// The signed description of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The format version, as in the header (here it is signed).
    pub format: u32,
    /// Newer bundles have higher revisions; a sidecar refuses one that is not newer than its
    /// live bundle, unless the bundle allows rollback.
    pub revision: u64,
    pub built_at: jiff::Timestamp,
    /// Who built it (`user@host`, or `bundle build --builder`).
    pub builder: String,
    /// A sidecar running a newer revision accepts this one.
    pub allow_rollback: bool,
    /// `sha256:` of the signing key's raw public key.
    pub signer: String,
    /// The policy file's path: the first of `files`.
    pub policy: String,
    /// The geolocation database's path, when the bundle carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo: Option<String>,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// The manifest as a bundle carries it (indented JSON, so that a reader of the raw file
    /// sees what it says), to be signed as is.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        bytes.push(b'\n');
        bytes
    }
}

/// One file of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative, `/`-separated, without `.` or `..` parts.
    pub path: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Why bytes are not a bundle, or not one to accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("not a policy bundle: it does not start with the bundle header")]
    NotABundle,
    #[error("bundle format {found} is not one this proxy reads (it reads format {FORMAT})")]
    Format { found: u32 },
    #[error("truncated: the bundle has {found} bytes and needs {needed}")]
    Truncated { needed: u64, found: u64 },
    #[error("{extra} bytes follow the last file of the bundle")]
    Trailing { extra: u64 },
    #[error("invalid manifest: {why}")]
    Manifest { why: String },
    #[error("unsigned: the bundle carries no signature")]
    Unsigned,
    #[error("signed by another key ({signer}): only bundles signed by {expected} are accepted")]
    OtherKey { signer: String, expected: String },
    #[error("the signature does not match the manifest: it was changed after it was signed")]
    BadSignature,
    #[error(
        "file {path} does not match its SHA-256 in the manifest (the manifest says {expected}, the file is {found})"
    )]
    HashMismatch {
        path: String,
        expected: String,
        found: String,
    },
}

impl BundleError {
    /// The reason a sidecar reports when it refuses such a bundle.
    pub fn reason(&self) -> Reason {
        match self {
            BundleError::Unsigned => Reason::Unsigned,
            BundleError::OtherKey { .. } => Reason::OtherKey,
            _ => Reason::Corrupt,
        }
    }
}

/// A bundle as read: its manifest and, borrowed from the input, the signed bytes, the
/// signature and each file's bytes. Nothing is verified yet but its shape ([`Bundle::verify`]).
#[derive(Debug)]
pub struct Bundle<'a> {
    pub manifest: Manifest,
    manifest_bytes: &'a [u8],
    signature: Option<&'a [u8]>,
    contents: Vec<&'a [u8]>,
}

impl<'a> Bundle<'a> {
    /// Whether it carries a signature.
    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    /// The manifest's bytes as written: what the signature covers.
    pub fn manifest_bytes(&self) -> &'a [u8] {
        self.manifest_bytes
    }

    /// The signature, if any.
    pub fn signature(&self) -> Option<&'a [u8]> {
        self.signature
    }

    /// Each file's entry and bytes, in the manifest's order (the policy file first).
    pub fn files(&self) -> impl Iterator<Item = (&FileEntry, &'a [u8])> + '_ {
        self.manifest
            .files
            .iter()
            .zip(self.contents.iter().copied())
    }

    /// The bytes of the file at `path`.
    pub fn file(&self, path: &str) -> Option<&'a [u8]> {
        self.files().find(|(f, _)| f.path == path).map(|(_, b)| b)
    }

    /// Checks that the bundle was signed by `public_key` (raw Ed25519) and that every file
    /// matches its hash: the signature first, since an unsigned manifest's hashes prove
    /// nothing.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), BundleError> {
        let Some(signature) = self.signature else {
            return Err(BundleError::Unsigned);
        };
        let expected = keys::fingerprint(public_key);
        if self.manifest.signer != expected {
            return Err(BundleError::OtherKey {
                signer: self.manifest.signer.clone(),
                expected,
            });
        }
        if !keys::verify(public_key, self.manifest_bytes, signature) {
            return Err(BundleError::BadSignature);
        }
        self.check_hashes()
    }

    /// Checks every file against its hash in the manifest (not the signature).
    pub fn check_hashes(&self) -> Result<(), BundleError> {
        for (entry, bytes) in self.files() {
            let found = sha256_hex(bytes);
            if found != entry.sha256 {
                return Err(BundleError::HashMismatch {
                    path: entry.path.clone(),
                    expected: entry.sha256.clone(),
                    found,
                });
            }
        }
        Ok(())
    }
}

/// Reads a bundle's shape: the header, the manifest (strictly: unknown fields, bad paths,
/// sizes that do not add up are errors), the signature and the files, and nothing after them.
/// Never panics.
pub fn parse(bytes: &[u8]) -> Result<Bundle<'_>, BundleError> {
    let found = bytes.len() as u64;
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            BundleError::Truncated {
                needed: HEAD as u64,
                found,
            }
        } else {
            BundleError::NotABundle
        });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(BundleError::NotABundle);
    }
    let mut r = Reader { bytes, at: 8 };
    let format = r.u32()?;
    if format != FORMAT {
        return Err(BundleError::Format { found: format });
    }
    let manifest_len = r.u32()? as usize;
    if manifest_len > MAX_MANIFEST {
        return Err(manifest_error(format!(
            "{manifest_len} bytes long, more than the {MAX_MANIFEST} a bundle may have"
        )));
    }
    let manifest_bytes = r.take(manifest_len as u64)?;
    let manifest: Manifest =
        serde_json::from_slice(manifest_bytes).map_err(|e| manifest_error(e.to_string()))?;
    check_manifest(&manifest)?;
    let signature_len = r.u32()? as usize;
    let signature = match signature_len {
        0 => None,
        SIGNATURE_LEN => Some(r.take(SIGNATURE_LEN as u64)?),
        n => {
            return Err(manifest_error(format!(
                "a signature of {n} bytes: Ed25519 signatures have {SIGNATURE_LEN}"
            )));
        }
    };
    // Every size is known now: a short file is truncated by exactly this much.
    let total = manifest
        .files
        .iter()
        .try_fold(r.at as u64, |sum, f| sum.checked_add(f.size))
        .ok_or_else(|| manifest_error("the files' sizes add up to more than 2^64 bytes".into()))?;
    if total > found {
        return Err(BundleError::Truncated {
            needed: total,
            found,
        });
    }
    let contents = manifest
        .files
        .iter()
        .map(|f| r.take(f.size))
        .collect::<Result<Vec<_>, _>>()?;
    if found > total {
        return Err(BundleError::Trailing {
            extra: found - total,
        });
    }
    Ok(Bundle {
        manifest,
        manifest_bytes,
        signature,
        contents,
    })
}

/// Writes a bundle: `manifest_bytes` (exactly the bytes `signature` covers), the signature
/// (`None`: unsigned) and each file's bytes in the manifest's order.
pub fn encode(manifest_bytes: &[u8], signature: Option<&[u8]>, contents: &[&[u8]]) -> Vec<u8> {
    let size = HEAD
        + manifest_bytes.len()
        + 4
        + signature.map_or(0, <[u8]>::len)
        + contents.iter().map(|c| c.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_be_bytes());
    out.extend_from_slice(&len32(manifest_bytes.len()).to_be_bytes());
    out.extend_from_slice(manifest_bytes);
    let signature = signature.unwrap_or(&[]);
    out.extend_from_slice(&len32(signature.len()).to_be_bytes());
    out.extend_from_slice(signature);
    for c in contents {
        out.extend_from_slice(c);
    }
    out
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("a manifest and a signature are far below 4 GiB")
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

fn manifest_error(why: String) -> BundleError {
    BundleError::Manifest { why }
}

/// Everything about a manifest that does not need the files or a key.
fn check_manifest(m: &Manifest) -> Result<(), BundleError> {
    if m.format != FORMAT {
        return Err(manifest_error(format!(
            "it says format {} and the header says {FORMAT}",
            m.format
        )));
    }
    if m.files.is_empty() || m.files.len() > MAX_FILES {
        return Err(manifest_error(format!(
            "{} files: a bundle has 1 to {MAX_FILES}",
            m.files.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &m.files {
        if let Err(why) = check_path(&f.path) {
            return Err(manifest_error(why));
        }
        if !seen.insert(f.path.as_str()) {
            return Err(manifest_error(format!("file {:?} is listed twice", f.path)));
        }
        if !is_hex64(&f.sha256) {
            return Err(manifest_error(format!(
                "file {:?}: sha256 is not 64 lower-case hex digits",
                f.path
            )));
        }
    }
    if m.policy != m.files[0].path {
        return Err(manifest_error(format!(
            "the policy file {:?} is not the first file",
            m.policy
        )));
    }
    if let Some(geo) = &m.geo
        && (*geo == m.policy || !seen.contains(geo.as_str()))
    {
        return Err(manifest_error(format!(
            "the geolocation database {geo:?} is not one of the other files"
        )));
    }
    if !m.signer.strip_prefix("sha256:").is_some_and(is_hex64) {
        return Err(manifest_error(format!(
            "signer {:?} is not sha256: and 64 hex digits",
            m.signer
        )));
    }
    if m.builder.len() > MAX_BUILDER || m.builder.chars().any(char::is_control) {
        return Err(manifest_error(format!(
            "builder must be at most {MAX_BUILDER} bytes without control characters"
        )));
    }
    Ok(())
}

/// A file's path inside a bundle: relative, `/`-separated, without empty, `.` or `..` parts,
/// backslashes or control characters.
pub fn check_path(path: &str) -> Result<(), String> {
    let fine = !path.is_empty()
        && path.len() <= MAX_PATH
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
        && path
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..");
    if fine {
        Ok(())
    } else {
        Err(format!(
            "file path {path:?} is not a relative path of at most {MAX_PATH} bytes without empty, . or .. parts"
        ))
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads lengths and slices off the front of the input, as far as it goes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], BundleError> {
        let found = self.bytes.len() as u64;
        let end = (self.at as u64).saturating_add(n);
        if end > found {
            return Err(BundleError::Truncated { needed: end, found });
        }
        // `end` is at most the input's length, so it fits a usize.
        let end = end as usize;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, BundleError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::keys::SigningKey;
    use std::path::Path;

    fn key() -> SigningKey {
        SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("k")).unwrap()
    }

    /// A bundle of `files` signed by `key`.
    fn bundle(key: &SigningKey, files: &[(&str, &[u8])]) -> Vec<u8> {
        let manifest = Manifest {
            format: FORMAT,
            revision: 7,
            built_at: "2026-12-01T10:00:00Z".parse().unwrap(),
            builder: "ci@build-01".into(),
            allow_rollback: false,
            signer: key.fingerprint(),
            policy: files[0].0.into(),
            geo: None,
            files: files
                .iter()
                .map(|(p, b)| FileEntry {
                    path: (*p).into(),
                    size: b.len() as u64,
                    sha256: sha256_hex(b),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let contents: Vec<&[u8]> = files.iter().map(|(_, b)| *b).collect();
        encode(&bytes, Some(&key.sign(&bytes)), &contents)
    }

    const FILES: &[(&str, &[u8])] = &[
        ("cn.toml", b"[policy]\nname = 'cn'\n"),
        ("rules/datasets.toml", b"# datasets\n"),
    ];

    #[test]
    fn a_bundle_round_trips_and_verifies() {
        let k = key();
        let bytes = bundle(&k, FILES);
        let b = parse(&bytes).unwrap();
        assert_eq!(b.manifest.revision, 7);
        assert_eq!(b.file("rules/datasets.toml"), Some(&b"# datasets\n"[..]));
        b.verify(k.public_key()).unwrap();
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let k = key();
        let good = bundle(&k, FILES);
        // Every proper prefix is truncated (or, within the magic, not a bundle at all).
        for n in 0..good.len() {
            match parse(&good[..n]) {
                Err(BundleError::Truncated { found, .. }) => assert_eq!(found, n as u64),
                other => panic!("{n}: {other:?}"),
            }
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            parse(&longer).unwrap_err(),
            BundleError::Trailing { extra: 1 }
        );
        // The last byte is the second file's.
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let err = parse(&flipped).unwrap().verify(k.public_key()).unwrap_err();
        assert!(
            matches!(&err, BundleError::HashMismatch { path, .. } if path == "rules/datasets.toml"),
            "{err}"
        );
        assert_eq!(err.reason(), Reason::Corrupt);
        let other = key();
        let err = parse(&good)
            .unwrap()
            .verify(other.public_key())
            .unwrap_err();
        assert!(matches!(err, BundleError::OtherKey { .. }), "{err}");
        assert_eq!(err.reason(), Reason::OtherKey);
        // Bytes of the manifest changed after signing (its revision raised).
        let needle = b"\"revision\":7";
        let at = good
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
            + needle.len()
            - 1;
        let mut edited = good.clone();
        edited[at] = b'8';
        let err = parse(&edited).unwrap().verify(k.public_key()).unwrap_err();
        assert_eq!(err, BundleError::BadSignature);
        assert_eq!(
            parse(b"PK\x03\x04 zip").unwrap_err(),
            BundleError::NotABundle
        );
    }

    #[test]
    fn an_unsigned_bundle_parses_and_is_refused_as_unsigned() {
        let k = key();
        let signed = bundle(&k, FILES);
        let b = parse(&signed).unwrap();
        let unsigned = encode(
            b.manifest_bytes,
            None,
            &b.files().map(|(_, c)| c).collect::<Vec<_>>(),
        );
        let u = parse(&unsigned).unwrap();
        assert!(!u.is_signed());
        assert_eq!(u.verify(k.public_key()).unwrap_err(), BundleError::Unsigned);
        assert_eq!(BundleError::Unsigned.reason(), Reason::Unsigned);
    }

    #[test]
    fn manifests_are_read_strictly() {
        let k = key();
        for (files, says) in [
            (&[("../etc/passwd", &b"x"[..])][..], "not a relative path"),
            (&[("/abs.toml", &b"x"[..])][..], "not a relative path"),
            (&[("a//b.toml", &b"x"[..])][..], "not a relative path"),
            (
                &[("a.toml", &b"x"[..]), ("a.toml", &b"y"[..])][..],
                "listed twice",
            ),
        ] {
            match parse(&bundle(&k, files)) {
                Err(BundleError::Manifest { why }) => assert!(why.contains(says), "{why}"),
                other => panic!("{files:?}: {other:?}"),
            }
        }
        // An unknown field, even signed, is refused: a newer format says so in its version.
        let m = br#"{"format":1,"revision":1,"built_at":"2026-12-01T10:00:00Z","builder":"b","allow_rollback":false,"signer":"sha256:0000000000000000000000000000000000000000000000000000000000000000","policy":"p","files":[{"path":"p","size":0,"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}],"extra":1}"#;
        match parse(&encode(m, None, &[b""])) {
            Err(BundleError::Manifest { why }) => assert!(why.contains("unknown field"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
