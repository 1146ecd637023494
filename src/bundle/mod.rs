//! Signed policy bundles for a fleet: one file that carries a policy, the files it includes and
//! optionally the geolocation database, with a manifest (each file's SHA-256, the revision,
//! when and by whom it was built) signed with Ed25519.
//!
//! `format` reads and writes the file (pure; fuzzed), `build` makes one from a policy on
//! disk, `keep` holds the last verified one on the sidecar's volume, and `source` fetches,
//! verifies and compiles new ones as a sidecar runs. This file holds what they share: why a
//! bundle is refused, and a bundle that passed verification.

pub mod build;
pub mod format;
pub mod keep;
pub mod source;

pub use format::{Bundle, BundleError, FileEntry, Manifest, parse};

use crate::policy::compile::BundleRules;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Why a sidecar refused a bundle, or a poll of its source failed: the label of the metric,
/// the cause in `/readyz` and the proxy's own log.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The bundle carries no signature.
    Unsigned,
    /// Signed, by a key other than `[policy.source] key`.
    OtherKey,
    /// Truncated, not a bundle, a file that does not match its hash, a signature that does
    /// not match the manifest.
    Corrupt,
    /// Not newer than the live revision, and not built to allow rollback.
    OlderRevision,
    /// Merged with the sidecar's own file it does not compile (or its database is unusable).
    DoesNotCompile,
    /// The source is located outside the home jurisdiction.
    SourceAbroad,
    /// The source could not be reached (or named no bundle).
    Unreachable,
    /// Accepted, but it could not be kept on the sidecar's volume (a restart while the
    /// source is unreachable would not come up on it).
    KeepFailed,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Unsigned,
        Reason::OtherKey,
        Reason::Corrupt,
        Reason::OlderRevision,
        Reason::DoesNotCompile,
        Reason::SourceAbroad,
        Reason::Unreachable,
        Reason::KeepFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unsigned => "unsigned",
            Reason::OtherKey => "other_key",
            Reason::Corrupt => "corrupt",
            Reason::OlderRevision => "older_revision",
            Reason::DoesNotCompile => "does_not_compile",
            Reason::SourceAbroad => "source_abroad",
            Reason::Unreachable => "unreachable",
            Reason::KeepFailed => "keep_failed",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused bundle or a failed poll: the reason and one sentence.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

impl From<BundleError> for Refusal {
    fn from(e: BundleError) -> Refusal {
        Refusal::new(e.reason(), e.to_string())
    }
}

/// A bundle whose signature and every hash were checked, its policy files decoded, and the
/// geolocation database it carries (if any) on disk where the policy reads it.
#[derive(Debug)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    /// `sha256:` of the whole bundle file: two bundles are the same when this is.
    pub digest: String,
    /// The bundle file's size in bytes.
    pub size: u64,
    /// How the policy and its diagnostics name the bundle: its URL or file.
    pub label: PathBuf,
    /// The policy files (the entry first): path in the bundle, text.
    policy_files: Vec<(String, String)>,
    /// Where the carried database is on disk.
    geo_database: Option<PathBuf>,
}

impl VerifiedBundle {
    /// Checks `bytes` (signed by `public_key`, every hash), decodes its policy files and
    /// writes the database it carries into `geo_dir` (see [`keep::unpack_geo`]).
    pub fn open(
        bytes: &[u8],
        public_key: &[u8],
        label: PathBuf,
        geo_dir: &Path,
    ) -> Result<VerifiedBundle, Refusal> {
        let bundle = parse(bytes)?;
        bundle.verify(public_key)?;
        VerifiedBundle::from_checked(&bundle, bytes, label, geo_dir)
    }

    /// As [`VerifiedBundle::open`], for a bundle already parsed and verified from `bytes`.
    pub fn from_checked(
        bundle: &Bundle<'_>,
        bytes: &[u8],
        label: PathBuf,
        geo_dir: &Path,
    ) -> Result<VerifiedBundle, Refusal> {
        let geo = bundle.manifest.geo.as_deref();
        let mut policy_files = Vec::new();
        let mut geo_database = None;
        for (entry, content) in bundle.files() {
            if Some(entry.path.as_str()) == geo {
                let path = keep::unpack_geo(geo_dir, entry, content).map_err(|e| {
                    Refusal::new(
                        Reason::KeepFailed,
                        format!(
                            "cannot write the bundle's geolocation database into {}: {e}",
                            geo_dir.display()
                        ),
                    )
                })?;
                geo_database = Some(path);
                continue;
            }
            let text = String::from_utf8(content.to_vec()).map_err(|_| {
                Refusal::new(
                    Reason::DoesNotCompile,
                    format!("policy file {} is not UTF-8 text", entry.path),
                )
            })?;
            policy_files.push((entry.path.clone(), text));
        }
        Ok(VerifiedBundle {
            manifest: bundle.manifest.clone(),
            digest: format!("sha256:{}", format::sha256_hex(bytes)),
            size: bytes.len() as u64,
            label,
            policy_files,
            geo_database,
        })
    }

    pub fn revision(&self) -> u64 {
        self.manifest.revision
    }

    /// Where the geolocation database the bundle carries is on disk.
    pub fn geo_database(&self) -> Option<&Path> {
        self.geo_database.as_deref()
    }

    /// The policy files (the entry first): path in the bundle and text.
    pub fn policy_files(&self) -> &[(String, String)] {
        &self.policy_files
    }

    /// What `policy::compile::merge` reads of it.
    pub fn rules(&self) -> BundleRules<'_> {
        BundleRules {
            label: &self.label,
            entry: &self.manifest.policy,
            files: &self.policy_files,
            geo_database: self.geo_database.as_deref(),
            revision: self.manifest.revision,
        }
    }
}
