//! `geo update`: fetch a MaxMind-format database (a URL or a file), unwrap it, check it, and
//! replace the file a policy's `[geo] database` names, as geoipupdate does. The new database
//! must open as the proxy opens one, carry country data, read whole without a damaged record,
//! and be built no earlier than the file it replaces; only then is it written beside the old
//! one, synced and renamed over it (and the folder synced), so that a reader (the running
//! proxy's reload) sees the old file or the new one, never a part. Anything refused leaves the
//! old file as it was.

use super::archive;
use super::download::{self, Credentials, DownloadError};
use super::{CountryRecord, check_carries_country, label_of};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use url::Url;

/// The largest download, and the largest database once unwrapped: the biggest commercial
/// databases are a few hundred MB.
pub const SIZE_LIMIT: u64 = 2 << 30;

/// Where a new database comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Url(Url),
    File(PathBuf),
}

impl Source {
    /// `http(s)://…`, `file:PATH`, `file:///PATH`, or a path.
    pub fn parse(s: &str) -> Result<Source, String> {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Url::parse(s)
                .map(Source::Url)
                .map_err(|e| format!("--source {}: not a URL: {e}", masked(s)));
        }
        if lower.starts_with("file://") {
            return Url::parse(s)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .map(Source::File)
                .ok_or_else(|| format!("--source {s}: not a file URL (file:///absolute/path)"));
        }
        if let Some(path) = s.strip_prefix("file:") {
            return Ok(Source::File(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "--source {s}: {scheme} is not fetched; give an http(s) URL or a file"
            ));
        }
        Ok(Source::File(PathBuf::from(s)))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Url(u) => f.write_str(&download::shown(u)),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What to update.
#[derive(Debug)]
pub struct Update {
    pub source: Source,
    /// The database file to replace (created if absent).
    pub out: PathBuf,
    /// For http(s) sources that need them (GeoLite2: the account id and licence key).
    pub credentials: Option<Credentials>,
}

/// A database as the update saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    /// `"<database_type> <build date>"`, as the decision log's `geo_db` names it.
    pub label: String,
    /// Seconds since the epoch (the metadata's `build_epoch`).
    pub epoch: u64,
}

/// What the whole read of a new database found: networks with data, and those of them with
/// a country.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coverage {
    pub networks: u64,
    pub located: u64,
}

impl Build {
    /// The build time in RFC 3339 (UTC), for when two builds share a date.
    pub fn built_at(&self) -> String {
        i64::try_from(self.epoch)
            .ok()
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
            .map_or_else(|| self.epoch.to_string(), |t| t.to_string())
    }
}

/// The file that was at `out` before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Previous {
    Absent,
    /// A file that is not a usable database (a failed copy, say): replaced.
    Unusable(String),
    Database(Build),
}

/// What an update did.
#[derive(Debug)]
pub enum Updated {
    /// `out` now holds the new database.
    Replaced {
        new: Build,
        coverage: Coverage,
        previous: Previous,
        /// What the download was wrapped in (`gzip`, `tar member NAME`).
        wrapping: Vec<String>,
    },
    /// `out` already holds this very database: nothing was written (a rewrite would only
    /// make every proxy reload it).
    Unchanged(Build),
}

/// Why an update did not replace the file.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The source could not be read or fetched (no check ran).
    #[error(transparent)]
    Download(DownloadError),
    #[error("cannot replace {}: {why}", out.display())]
    Out { out: PathBuf, why: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The new database failed a check: `why` is a sentence about it.
    #[error("refused: {why}; {} {}", out.display(), if *absent { "was not created" } else { "is unchanged" })]
    Refused {
        why: String,
        out: PathBuf,
        /// No file was at `out`.
        absent: bool,
    },
}

impl UpdateError {
    /// Whether a check refused the database (as opposed to the source being unreachable).
    pub fn is_refusal(&self) -> bool {
        matches!(self, UpdateError::Refused { .. })
    }
}

/// Runs the update. Blocking (file I/O, and a runtime of its own for a download): call it
/// off any async runtime.
pub fn run(update: &Update) -> Result<Updated, UpdateError> {
    let out = &update.out;
    let dir = folder_of(out);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(UpdateError::Out {
                out: out.clone(),
                why: format!("{} is not a folder", dir.display()),
            });
        }
        Err(e) => {
            return Err(UpdateError::Out {
                out: out.clone(),
                why: format!("its folder {}: {e}", dir.display()),
            });
        }
    }
    let (previous, current_digest) = previous(out)?;
    let absent = previous == Previous::Absent;
    let refused = |why: String| UpdateError::Refused {
        why,
        out: out.clone(),
        absent,
    };
    let what = match &update.source {
        Source::Url(_) => format!("the download from {}", update.source),
        Source::File(p) => p.display().to_string(),
    };

    let fetched = fetch(update).map_err(|e| match e {
        // A download cut short or too large is refused like a bad database; a source that
        // cannot be reached at all is not a check that failed.
        e @ (DownloadError::Truncated { .. } | DownloadError::TooLarge { .. }) => {
            refused(e.to_string())
        }
        e => UpdateError::Download(e),
    })?;
    let unwrapped =
        archive::unwrap(fetched, SIZE_LIMIT).map_err(|e| refused(format!("{what}: {e}")))?;
    let (new, coverage) =
        examine(&unwrapped.database).map_err(|why| refused(format!("{what} {why}")))?;
    if let Previous::Database(old) = &previous {
        if new.epoch < old.epoch {
            let (new_at, old_at) = if new.label == old.label {
                (new.built_at(), old.built_at())
            } else {
                (new.label.clone(), old.label.clone())
            };
            return Err(refused(format!(
                "{what} is {new_at}, older than {} ({old_at})",
                out.display()
            )));
        }
        if current_digest == Some(sha256(&unwrapped.database)) {
            return Ok(Updated::Unchanged(new));
        }
    }
    replace(out, &unwrapped.database)?;
    Ok(Updated::Replaced {
        new,
        coverage,
        previous,
        wrapping: unwrapped.wrapping,
    })
}

/// The folder `out` is in (`.` for a bare file name).
fn folder_of(out: &Path) -> &Path {
    out.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The file at `out` now, and the SHA-256 of a database there (to tell the same file again).
/// Only opened and checked for country data, not read whole: it is the proxy's already.
fn previous(out: &Path) -> Result<(Previous, Option<Digest>), UpdateError> {
    match std::fs::read(out) {
        Ok(bytes) => Ok(match open(&bytes) {
            Ok((build, _)) => (Previous::Database(build), Some(sha256(&bytes))),
            Err(why) => (Previous::Unusable(why), None),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Previous::Absent, None)),
        Err(e) => Err(UpdateError::Out {
            out: out.to_path_buf(),
            why: format!("the current file cannot be read: {e}"),
        }),
    }
}

/// The source's bytes: a file's, or a download's.
fn fetch(update: &Update) -> Result<Vec<u8>, DownloadError> {
    let url = match &update.source {
        Source::File(path) => {
            return std::fs::read(path).map_err(|e| DownloadError::Unreadable {
                path: path.clone(),
                source: e,
            });
        }
        Source::Url(url) => url,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DownloadError::Failed {
            url: download::shown(url),
            why: format!("cannot start a runtime: {e}"),
        })?;
    rt.block_on(download::get(url, update.credentials.as_ref(), SIZE_LIMIT))
}

/// The checks a new database passes, beyond what [`super::GeoDb::open`] checks: every
/// network of its search tree leads to a record that reads whole. Returns what it found, or
/// why it is refused (a phrase that follows the database's name: "is not a MaxMind DB: …").
pub fn examine(bytes: &[u8]) -> Result<(Build, Coverage), String> {
    let (build, reader) = open(bytes)?;
    let damaged = |e: maxminddb::MaxMindDbError| format!("is damaged: {e}");
    let (mut networks, mut located) = (0u64, 0u64);
    for item in reader
        .networks(maxminddb::WithinOptions::default())
        .map_err(damaged)?
    {
        let found = item.map_err(damaged)?;
        // The whole record, whatever it holds, must decode.
        found
            .decode::<serde::de::IgnoredAny>()
            .map_err(|e| match found.network() {
                Ok(net) => format!("is damaged: the record of {net} cannot be read: {e}"),
                Err(_) => format!("is damaged: {e}"),
            })?;
        networks += 1;
        if let Ok(Some(record)) = found.decode::<CountryRecord<'_>>()
            && record.country().is_some()
        {
            located += 1;
        }
    }
    Ok((build, Coverage { networks, located }))
}

/// What [`super::GeoDb::open`] checks: a MaxMind DB, with a build date, carrying country data.
fn open(bytes: &[u8]) -> Result<(Build, maxminddb::Reader<&[u8]>), String> {
    let reader =
        maxminddb::Reader::from_source(bytes).map_err(|e| format!("is not a MaxMind DB: {e}"))?;
    let label = label_of(reader.metadata()).map_err(|why| format!("is not usable: {why}"))?;
    check_carries_country(&reader).map_err(|why| format!("is not usable: {why}"))?;
    let build = Build {
        label,
        epoch: reader.metadata().build_epoch,
    };
    Ok((build, reader))
}

type Digest = [u8; 32];

fn sha256(bytes: &[u8]) -> Digest {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("a SHA-256 digest is 32 bytes")
}

/// Writes `bytes` to a new file beside `out`, syncs it, renames it over `out` and syncs the
/// folder, so that `out` is the old file or the new one whatever happens. The new file keeps
/// the old one's permissions (a new one is readable by all: the proxy may run as another
/// user).
fn replace(out: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let dir = folder_of(out);
    let write = |source: std::io::Error| UpdateError::Write {
        path: out.to_path_buf(),
        source,
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "geo.mmdb".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(write)?;
    tmp.write_all(bytes).map_err(write)?;
    let old = std::fs::metadata(out).ok();
    let permissions = old
        .as_ref()
        .map(|m| m.permissions())
        .unwrap_or_else(|| std::fs::Permissions::from_mode(0o644));
    tmp.as_file().set_permissions(permissions).map_err(write)?;
    // The replaced file's owner and group too: a job running as root that replaced a
    // `root:proxy 0640` file with a `root:root` one would leave the proxy unable to read it.
    // Only root may give a file away; anyone else writes files that are their own already.
    if let Some(m) = &old {
        use std::os::unix::fs::MetadataExt;
        let mine = tmp.as_file().metadata().map_err(write)?;
        if (mine.uid(), mine.gid()) != (m.uid(), m.gid()) {
            std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid())).map_err(
                |e| {
                    write(std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot give the new file the owner and group of the one it replaces ({}:{}): {e}",
                            m.uid(),
                            m.gid()
                        ),
                    ))
                },
            )?;
        }
    }
    tmp.as_file().sync_all().map_err(write)?;
    tmp.persist(out).map_err(|e| write(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write)?;
    Ok(())
}

/// `s` as an error may show it: a user and password, or a `license_key` parameter, masked
/// (a source that is not a URL cannot be masked by parsing it).
fn masked(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(start) = out.find("://").map(|i| i + 3)
        && let Some(at) = out[start..].find('@').map(|i| start + i)
        && !out[start..at].contains('/')
    {
        out.replace_range(start..at, "…");
    }
    if let Some(i) = out.find("license_key=").map(|i| i + "license_key=".len()) {
        let end = out[i..].find('&').map_or(out.len(), |e| i + e);
        out.replace_range(i..end, "…");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmdb_writer::{Value, Writer};

    #[test]
    fn a_source_that_is_not_a_url_is_shown_without_its_secrets() {
        let e = Source::parse("https://123:s3cret@[bad/app?edition_id=X&license_key=s3cret&x=1")
            .err()
            .unwrap();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("edition_id=X"), "{e}");
    }
    use std::time::{Duration, UNIX_EPOCH};

    const NOV_25: u64 = 1_795_649_400;
    const DAY: u64 = 86_400;

    fn db(epoch: u64, code: &str) -> Vec<u8> {
        let mut w = Writer::builder("GeoLite2-Country")
            .build_epoch(UNIX_EPOCH + Duration::from_secs(epoch))
            .build();
        let iso = Value::map([("iso_code", Value::from(code))]);
        for cidr in ["8.8.8.0/24", "1.1.1.0/24"] {
            w.insert_value(
                cidr.parse::<ipnet::IpNet>().unwrap(),
                Value::map([("country", iso.clone())]),
            )
            .unwrap();
        }
        w.to_bytes().unwrap()
    }

    fn update(dir: &Path, source: &Path) -> Update {
        Update {
            source: Source::File(source.to_path_buf()),
            out: dir.join("country.mmdb"),
            credentials: None,
        }
    }

    #[test]
    fn sources_are_urls_or_files() {
        assert!(matches!(
            Source::parse("https://download.db-ip.com/free/dbip-country-lite-2026-11.mmdb.gz"),
            Ok(Source::Url(_))
        ));
        let file = |s: &str| match Source::parse(s) {
            Ok(Source::File(p)) => p,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(file("geo/new.mmdb"), Path::new("geo/new.mmdb"));
        assert_eq!(file("file:geo/new.mmdb"), Path::new("geo/new.mmdb"));
        assert_eq!(
            file("file:///srv/geo/new.mmdb"),
            Path::new("/srv/geo/new.mmdb")
        );
        let e = Source::parse("ftp://example.com/x.mmdb").unwrap_err();
        assert!(e.contains("ftp is not fetched"), "{e}");
    }

    #[test]
    fn a_newer_database_replaces_the_file_and_keeps_its_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (db(NOV_25 - 28 * DAY, "US"), db(NOV_25, "DE"));
        let src = dir.path().join("new.mmdb");
        std::fs::write(&src, &new).unwrap();
        let u = update(dir.path(), &src);
        std::fs::write(&u.out, &old).unwrap();
        std::fs::set_permissions(&u.out, std::fs::Permissions::from_mode(0o640)).unwrap();
        // Run as root (as a cron job may be), the file's owner and group are another's: the
        // new file must keep them, or the proxy's user could no longer read it.
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata(dir.path()).unwrap().uid() == 0;
        if root {
            std::os::unix::fs::chown(&u.out, Some(4321), Some(4322)).unwrap();
        }

        let Updated::Replaced {
            new: b,
            coverage,
            previous,
            ..
        } = run(&u).unwrap()
        else {
            panic!("not replaced")
        };
        assert_eq!(b.label, "GeoLite2-Country 2026-11-25");
        assert_eq!((coverage.networks, coverage.located), (2, 2));
        assert!(
            matches!(previous, Previous::Database(p) if p.label == "GeoLite2-Country 2026-10-28")
        );
        assert_eq!(std::fs::read(&u.out).unwrap(), new);
        let mode = std::fs::metadata(&u.out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        if root {
            let m = std::fs::metadata(&u.out).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 4322));
        }
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // The same database again: nothing to write.
        assert!(matches!(run(&u).unwrap(), Updated::Unchanged(_)));
    }

    #[test]
    fn an_older_or_broken_database_is_refused_and_the_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let current = db(NOV_25, "US");
        let src = dir.path().join("candidate.mmdb");
        let u = update(dir.path(), &src);
        std::fs::write(&u.out, &current).unwrap();

        let older = db(NOV_25 - 3600, "DE");
        let cut = &older[..older.len() / 2];
        let mut asn = Writer::builder("GeoLite2-ASN").build();
        asn.insert_value(
            "8.8.8.0/24".parse::<ipnet::IpNet>().unwrap(),
            Value::map([("autonomous_system_number", Value::from(15169u32))]),
        )
        .unwrap();
        for (candidate, expected) in [
            (older.clone(), "is 2026-11-25T22:30:00Z, older than"),
            (cut.to_vec(), "is not a MaxMind DB"),
            (b"<html>Not found</html>".to_vec(), "is not a MaxMind DB"),
            (asn.to_bytes().unwrap(), "carries a country code"),
        ] {
            std::fs::write(&src, &candidate).unwrap();
            let e = run(&u).unwrap_err();
            assert!(e.is_refusal(), "{e}");
            let text = e.to_string();
            assert!(text.contains(expected), "{text}");
            assert!(text.ends_with("country.mmdb is unchanged"), "{text}");
            assert_eq!(std::fs::read(&u.out).unwrap(), current);
        }
        // With no file there yet, none is made.
        std::fs::remove_file(&u.out).unwrap();
        let e = run(&u).unwrap_err();
        assert!(
            e.to_string().ends_with("country.mmdb was not created"),
            "{e}"
        );
        assert!(!u.out.exists());
    }

    #[test]
    fn an_unusable_current_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("new.mmdb");
        std::fs::write(&src, db(NOV_25, "DE")).unwrap();
        let u = update(dir.path(), &src);
        std::fs::write(&u.out, b"half a cop").unwrap();
        let Updated::Replaced { previous, .. } = run(&u).unwrap() else {
            panic!("not replaced")
        };
        assert!(matches!(previous, Previous::Unusable(_)), "{previous:?}");
        let fresh = tempfile::tempdir().unwrap();
        let u = update(fresh.path(), &src);
        assert!(matches!(
            run(&u).unwrap(),
            Updated::Replaced {
                previous: Previous::Absent,
                ..
            }
        ));
        let mode = std::fs::metadata(&u.out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_damaged_record_is_found() {
        let good = db(NOV_25, "DE");
        // Corrupt a byte of the data section (after the search tree and its 16-byte
        // separator): the record's type or length no longer reads.
        let marker = memchr::memmem::find(&good, &[0u8; 16]).unwrap() + 16;
        let mut bad = good.clone();
        bad[marker] = 0xff;
        bad[marker + 1] = 0xff;
        let e = examine(&bad).unwrap_err();
        assert!(e.contains("damaged") || e.contains("not usable"), "{e}");
        assert!(examine(&good).is_ok());
    }
}
