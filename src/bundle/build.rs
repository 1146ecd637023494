//! Making a bundle from a policy on disk: the policy is compiled first as a bundle's policy
//! (a bundle that does not compile is never built), the files it read are collected exactly as
//! compiled (paths relative to the policy's folder), the database is checked to open, and the
//! manifest is signed over its exact bytes.

use super::format::{self, FORMAT, FileEntry, Manifest, sha256_hex};
use crate::audit::keys::SigningKey;
use crate::geo::GeoDb;
use crate::policy::PolicyError;
use crate::policy::compile::{BundlePolicy, bundle_path, load_rules};
use std::path::{Path, PathBuf};

/// What to build.
pub struct BuildOptions<'a> {
    pub policy: &'a Path,
    /// A MaxMind-format database to carry as the policy's `[geo] database`.
    pub geo: Option<&'a Path>,
    pub signing_key: &'a SigningKey,
    pub revision: u64,
    pub built_at: jiff::Timestamp,
    pub builder: String,
    pub allow_rollback: bool,
}

/// Why no bundle was built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The policy does not compile as a bundle's (or cannot be read).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "{} is outside the folder of the policy {} ({}): a bundle holds the policy's folder only",
        path.display(), policy.display(), base.display()
    )]
    Outside {
        path: PathBuf,
        policy: PathBuf,
        base: PathBuf,
    },
    #[error(
        "--geo {}: the policy has no [geo] database for it to be: add `[geo] database = \"geo/country.mmdb\"`",
        path.display()
    )]
    GeoUnnamed { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Geo(#[from] crate::geo::GeoError),
    #[error("the database would be {name} in the bundle, which a policy file already is")]
    GeoName { name: String },
}

/// A bundle built, with what its report shows.
pub struct Built {
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
    pub policy: BundlePolicy,
    /// The carried database's type and build date (`GeoLite2-Country 2026-11-25`).
    pub geo_label: Option<String>,
}

/// Compiles the policy, collects its files and the database, and signs the manifest.
pub fn build(opts: &BuildOptions<'_>) -> Result<Built, BuildError> {
    // The texts compiled are the texts bundled: each file is read once.
    let mut read: Vec<(PathBuf, String)> = Vec::new();
    let policy = load_rules(opts.policy, |p| {
        let text = std::fs::read_to_string(p)?;
        read.push((p.to_path_buf(), text.clone()));
        Ok(text)
    })?;
    let base = opts.policy.parent().unwrap_or(Path::new(""));
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for path in &policy.sources {
        let name = bundle_path(base, path).ok_or_else(|| BuildError::Outside {
            path: path.clone(),
            policy: opts.policy.to_path_buf(),
            base: base.to_path_buf(),
        })?;
        let text = read
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, t)| t.as_bytes().to_vec())
            .expect("every source of a compiled policy was read");
        // The same file included under two spellings (`a/../x.toml`) is carried once.
        if !files.iter().any(|(n, _)| *n == name) {
            files.push((name, text));
        }
    }
    let mut geo_label = None;
    let mut geo_name = None;
    if let Some(geo) = opts.geo {
        let named = policy
            .geo_database
            .as_ref()
            .ok_or_else(|| BuildError::GeoUnnamed { path: geo.into() })?;
        let bytes = std::fs::read(geo).map_err(|source| BuildError::Read {
            path: geo.into(),
            source,
        })?;
        let db = GeoDb::from_bytes(bytes.clone(), geo)?;
        geo_label = Some(db.label().to_string());
        let file = named
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("country.mmdb");
        let name = format!("geo/{file}");
        if files.iter().any(|(n, _)| *n == name) {
            return Err(BuildError::GeoName { name });
        }
        geo_name = Some(name.clone());
        files.push((name, bytes));
    }
    let manifest = Manifest {
        format: FORMAT,
        revision: opts.revision,
        built_at: opts.built_at,
        builder: opts.builder.clone(),
        allow_rollback: opts.allow_rollback,
        signer: opts.signing_key.fingerprint(),
        policy: files[0].0.clone(),
        geo: geo_name,
        files: files
            .iter()
            .map(|(path, bytes)| FileEntry {
                path: path.clone(),
                size: bytes.len() as u64,
                sha256: sha256_hex(bytes),
            })
            .collect(),
    };
    let manifest_bytes = manifest.to_bytes();
    let signature = opts.signing_key.sign(&manifest_bytes);
    let contents: Vec<&[u8]> = files.iter().map(|(_, b)| b.as_slice()).collect();
    let bytes = format::encode(&manifest_bytes, Some(&signature), &contents);
    Ok(Built {
        bytes,
        manifest,
        policy,
        geo_label,
    })
}

/// Who builds, when not told: `user@host`.
pub fn default_builder() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::parse;

    fn key() -> SigningKey {
        SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("k")).unwrap()
    }

    fn opts<'a>(policy: &'a Path, key: &'a SigningKey) -> BuildOptions<'a> {
        BuildOptions {
            policy,
            geo: None,
            signing_key: key,
            revision: 3,
            built_at: "2026-12-01T10:00:00Z".parse().unwrap(),
            builder: "ci@build".into(),
            allow_rollback: false,
        }
    }

    #[test]
    fn a_policy_and_its_includes_are_carried_relative_to_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cn");
        std::fs::create_dir_all(root.join("rules")).unwrap();
        std::fs::write(
            root.join("cn.toml"),
            "include = ['rules/up.toml']\n[policy]\nname = 'cn'\nhome = 'CN'\n",
        )
        .unwrap();
        std::fs::write(
            root.join("rules/up.toml"),
            "[[upstreams]]\nname = 's'\nurl = 'http://127.0.0.2:9000'\n",
        )
        .unwrap();
        let k = key();
        let policy = root.join("cn.toml");
        let built = build(&opts(&policy, &k)).unwrap();
        let b = parse(&built.bytes).unwrap();
        b.verify(k.public_key()).unwrap();
        let names: Vec<&str> = b.files().map(|(f, _)| f.path.as_str()).collect();
        assert_eq!(names, ["cn.toml", "rules/up.toml"]);
        assert_eq!(b.manifest.policy, "cn.toml");
        assert_eq!(b.manifest.revision, 3);
    }

    #[test]
    fn an_include_outside_the_policy_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cn")).unwrap();
        std::fs::write(
            dir.path().join("cn/cn.toml"),
            "include = ['../shared.toml']\n[policy]\nname = 'cn'\nhome = 'CN'\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("shared.toml"),
            "[jurisdictions]\nX = ['CN']\n",
        )
        .unwrap();
        let k = key();
        let policy = dir.path().join("cn/cn.toml");
        let err = build(&opts(&policy, &k)).err().unwrap();
        assert!(matches!(err, BuildError::Outside { .. }), "{err}");
    }
}
