//! The sidecar's own copy of its bundle: the last verified bundle file (written, flushed to the
//! disk and renamed into place, so that a crash leaves the old or the new one whole), and the
//! geolocation database it carries, unpacked beside it under a name made of its hash so that
//! each revision's policy names its own file and a new one never changes an old one.

use super::FileEntry;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The folder the databases of a kept bundle are unpacked into: `CACHE.d` beside it.
pub fn geo_dir(cache: &Path) -> PathBuf {
    let mut name = cache.as_os_str().to_owned();
    name.push(".d");
    PathBuf::from(name)
}

/// Writes the database `entry` (verified bytes `content`) into `dir` unless it is there
/// already, whole; returns its path.
pub fn unpack_geo(dir: &Path, entry: &FileEntry, content: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("geo-{}.mmdb", &entry.sha256[..16]));
    let intact = std::fs::read(&path).is_ok_and(|b| super::format::sha256_hex(&b) == entry.sha256);
    if !intact {
        write_atomic(&path, content)?;
    }
    Ok(path)
}

/// Removes the unpacked databases of `dir` but those in `keep` (the live revision's and the
/// one before, which a snapshot being built may still be reading).
pub fn prune_geo(dir: &Path, keep: &[&Path]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| n.starts_with("geo-") && n.ends_with(".mmdb"));
        if ours && !keep.contains(&path.as_path()) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Reads the kept bundle; `None` when there is none.
pub fn read(cache: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(cache) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `bytes`: written to a file beside it, flushed to the disk, renamed
/// over it, and the folder flushed so that the rename survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::format::sha256_hex;

    #[test]
    fn a_database_is_unpacked_once_and_repaired_when_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"not really a database";
        let entry = FileEntry {
            path: "geo/country.mmdb".into(),
            size: content.len() as u64,
            sha256: sha256_hex(content),
        };
        let path = unpack_geo(dir.path(), &entry, content).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
        std::fs::write(&path, b"damaged").unwrap();
        assert_eq!(unpack_geo(dir.path(), &entry, content).unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), content);
        let other = dir.path().join("geo-0000000000000000.mmdb");
        std::fs::write(&other, b"old").unwrap();
        prune_geo(dir.path(), &[&path]);
        assert!(path.exists() && !other.exists());
        assert_eq!(
            geo_dir(Path::new("logs/policy.bundle")),
            Path::new("logs/policy.bundle.d")
        );
    }
}
