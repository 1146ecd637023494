//! What a database download is wrapped in, recognised by its first bytes rather than its name:
//! gzip (DB-IP Lite ships `.mmdb.gz`), a tar archive holding one `.mmdb` (GeoLite2 ships
//! `.tar.gz` with the database and its licence files), both, or neither (a bare `.mmdb`).

use flate2::read::MultiGzDecoder;
use std::io::Read;

/// Why a download could not be unwrapped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("it is not a complete gzip stream: {0}")]
    Gzip(String),
    #[error("it is larger than {0} bytes once decompressed")]
    TooLarge(u64),
    #[error("its tar archive {0}")]
    Tar(String),
}

/// The database a download holds, and what it was wrapped in (`gzip`, `tar member NAME`).
#[derive(Debug)]
pub struct Unwrapped {
    pub database: Vec<u8>,
    pub wrapping: Vec<String>,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const BLOCK: usize = 512;

/// Unwraps gzip and tar layers (in that order, as `.tar.gz` nests them); a database larger
/// than `limit` once decompressed is refused.
pub fn unwrap(download: Vec<u8>, limit: u64) -> Result<Unwrapped, ArchiveError> {
    let mut wrapping = Vec::new();
    let mut bytes = download;
    // A database's first bytes are its search tree, which may begin like anything: one that
    // ends as a database does is taken as it is.
    if ends_like_a_database(&bytes) {
        return Ok(Unwrapped {
            database: bytes,
            wrapping,
        });
    }
    if bytes.starts_with(&GZIP_MAGIC) {
        bytes = gunzip(&bytes, limit)?;
        wrapping.push("gzip".to_string());
    }
    if is_tar(&bytes) {
        let (name, range) = tar_member(&bytes)?;
        // In place: the database is most of the archive.
        bytes.truncate(range.end);
        bytes.drain(..range.start);
        wrapping.push(format!("tar member {name}"));
    }
    Ok(Unwrapped {
        database: bytes,
        wrapping,
    })
}

/// The metadata marker of the MaxMind DB format, which the format puts in the last 128 KiB.
const METADATA_MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";

fn ends_like_a_database(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(128 * 1024)..];
    memchr::memmem::rfind(tail, METADATA_MARKER).is_some()
}

fn gunzip(bytes: &[u8], limit: u64) -> Result<Vec<u8>, ArchiveError> {
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(2));
    // One byte past the limit tells "exactly the limit" from "more".
    MultiGzDecoder::new(bytes)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| ArchiveError::Gzip(e.to_string()))?;
    if out.len() as u64 > limit {
        return Err(ArchiveError::TooLarge(limit));
    }
    Ok(out)
}

/// POSIX (`ustar\0`) and GNU (`ustar `) archives name themselves at offset 257.
fn is_tar(bytes: &[u8]) -> bool {
    bytes.len() >= BLOCK && &bytes[257..262] == b"ustar"
}

/// The one regular file named `*.mmdb` in a tar archive, and where its bytes are.
fn tar_member(bytes: &[u8]) -> Result<(String, std::ops::Range<usize>), ArchiveError> {
    let fail = |why: String| ArchiveError::Tar(why);
    let mut found: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    // A long name (GNU `L` entry, or a pax `path` record) for the entry that follows.
    let mut long_name: Option<String> = None;
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + BLOCK)
            .ok_or_else(|| fail(format!("ends inside a header at byte {at}")))?;
        if header.iter().all(|b| *b == 0) {
            break;
        }
        check_sum(header)
            .map_err(|why| fail(format!("has a damaged header at byte {at}: {why}")))?;
        let name = match long_name.take() {
            Some(n) => n,
            None => {
                let name = field(&header[..100]);
                let prefix = field(&header[345..500]);
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let size = size_of(&header[124..136])
            .ok_or_else(|| fail(format!("has an unreadable size for {name}")))?;
        let start = at + BLOCK;
        let end = usize::try_from(size)
            .ok()
            .and_then(|s| start.checked_add(s))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| {
                fail(format!(
                    "ends inside {name} ({size} bytes announced, {} present)",
                    bytes.len().saturating_sub(start)
                ))
            })?;
        match header[156] {
            b'0' | 0 | b'7' => {
                if name.ends_with(".mmdb") {
                    found.push((name, start..end));
                } else {
                    others.push(name);
                }
            }
            b'L' => long_name = Some(field(&bytes[start..end])),
            b'x' => long_name = pax_path(&bytes[start..end]),
            _ => {}
        }
        at = start + (end - start).div_ceil(BLOCK) * BLOCK;
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 if others.is_empty() => Err(fail("holds no file".into())),
        0 => Err(fail(format!(
            "holds no .mmdb file (it holds {})",
            others.join(", ")
        ))),
        _ => Err(fail(format!(
            "holds several .mmdb files ({}): unpack the one to use and give it as the source",
            found
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A NUL-terminated text field.
fn field(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// An octal number (NUL- or space-terminated), or GNU's base-256 form for large sizes.
fn size_of(raw: &[u8]) -> Option<u64> {
    if raw[0] & 0x80 != 0 {
        return raw[1..].iter().try_fold(u64::from(raw[0] & 0x7f), |n, b| {
            n.checked_mul(256)?.checked_add(u64::from(*b))
        });
    }
    let text = std::str::from_utf8(raw).ok()?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

/// The header checksum: the sum of its bytes with the checksum field read as spaces.
fn check_sum(header: &[u8]) -> Result<(), String> {
    let stored = size_of(&header[148..156]).ok_or("its checksum is not a number")?;
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(*b)
            }
        })
        .sum();
    if sum == stored {
        Ok(())
    } else {
        Err(format!("checksum {stored} stored, {sum} computed"))
    }
}

/// The `path` record of a pax extended header (`LEN path=VALUE\n` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    let mut path = None;
    while !rest.is_empty() {
        let space = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        let record = rest.get(space + 1..len)?;
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"path=") {
            path = Some(String::from_utf8_lossy(value).into_owned());
        }
        rest = &rest[len..];
    }
    path
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    /// A ustar header for a regular file (or `kind`) of `size` bytes.
    fn header(name: &str, size: usize, kind: u8) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"15011426500");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    /// A tar archive of `files`, as GeoLite2's: a folder, then its files.
    pub(crate) fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = header("GeoLite2-Country_20261125/", 0, b'5').to_vec();
        for (name, data) in files {
            out.extend_from_slice(&header(name, data.len(), b'0'));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        out.extend_from_slice(&[0u8; 2 * BLOCK]);
        out
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    const DB: &[u8] = b"pretend this is a MaxMind DB";

    #[test]
    fn bare_gzip_and_tar_gz_are_unwrapped() {
        let bare = unwrap(DB.to_vec(), 1 << 20).unwrap();
        assert_eq!((bare.database.as_slice(), bare.wrapping.len()), (DB, 0));

        let gz = unwrap(gzip(DB), 1 << 20).unwrap();
        assert_eq!(gz.database, DB);
        assert_eq!(gz.wrapping, ["gzip"]);

        let archive = tar(&[
            (
                "GeoLite2-Country_20261125/COPYRIGHT.txt",
                b"Database and Contents Copyright (c)",
            ),
            ("GeoLite2-Country_20261125/GeoLite2-Country.mmdb", DB),
            (
                "GeoLite2-Country_20261125/LICENSE.txt",
                b"GeoLite2 End User License Agreement",
            ),
        ]);
        let tgz = unwrap(gzip(&archive), 1 << 20).unwrap();
        assert_eq!(tgz.database, DB);
        assert_eq!(
            tgz.wrapping,
            [
                "gzip",
                "tar member GeoLite2-Country_20261125/GeoLite2-Country.mmdb"
            ]
        );
    }

    #[test]
    fn truncated_and_damaged_archives_are_refused() {
        let gz = gzip(DB);
        let e = unwrap(gz[..gz.len() - 4].to_vec(), 1 << 20).unwrap_err();
        assert!(matches!(e, ArchiveError::Gzip(_)), "{e}");

        let archive = tar(&[("d/GeoLite2-Country.mmdb", &[7u8; 2000])]);
        let cut = &archive[..BLOCK * 2 + 100];
        let e = unwrap(cut.to_vec(), 1 << 20).unwrap_err();
        assert!(
            e.to_string()
                .contains("ends inside d/GeoLite2-Country.mmdb"),
            "{e}"
        );

        let mut damaged = archive.clone();
        damaged[BLOCK + 3] ^= 0x20;
        let e = unwrap(damaged, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("damaged header"), "{e}");
    }

    #[test]
    fn a_tar_without_exactly_one_database_is_refused() {
        let none = tar(&[("d/LICENSE.txt", b"licence")]);
        let e = unwrap(none, 1 << 20).unwrap_err();
        assert_eq!(
            e,
            ArchiveError::Tar("holds no .mmdb file (it holds d/LICENSE.txt)".into())
        );
        let two = tar(&[("d/a.mmdb", DB), ("d/b.mmdb", DB)]);
        let e = unwrap(two, 1 << 20).unwrap_err();
        assert!(
            e.to_string()
                .contains("several .mmdb files (d/a.mmdb, d/b.mmdb)"),
            "{e}"
        );
    }

    #[test]
    fn long_names_are_read() {
        let long = format!("{}/GeoLite2-City.mmdb", "x".repeat(120));
        // GNU: an `L` entry holding the name, then the file under a truncated one.
        let mut gnu = header("././@LongLink", long.len() + 1, b'L').to_vec();
        gnu.extend_from_slice(long.as_bytes());
        gnu.push(0);
        gnu.resize(gnu.len().div_ceil(BLOCK) * BLOCK, 0);
        gnu.extend_from_slice(&header("truncated", DB.len(), b'0'));
        gnu.extend_from_slice(DB);
        gnu.resize(gnu.len().div_ceil(BLOCK) * BLOCK + 2 * BLOCK, 0);
        let u = unwrap(gnu, 1 << 20).unwrap();
        assert_eq!(u.database, DB);
        assert_eq!(u.wrapping, [format!("tar member {long}")]);

        // pax: a `path` record.
        let record = format!("path={long}\n");
        let len = record.len() + 4; // "NNN " with a three-digit length
        let pax_data = format!("{len} {record}");
        assert_eq!(pax_data.len(), len);
        let mut pax = header("PaxHeaders/x", pax_data.len(), b'x').to_vec();
        pax.extend_from_slice(pax_data.as_bytes());
        pax.resize(pax.len().div_ceil(BLOCK) * BLOCK, 0);
        pax.extend_from_slice(&header("truncated", DB.len(), b'0'));
        pax.extend_from_slice(DB);
        pax.resize(pax.len().div_ceil(BLOCK) * BLOCK + 2 * BLOCK, 0);
        assert_eq!(unwrap(pax, 1 << 20).unwrap().database, DB);
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let big = gzip(&vec![0u8; 100_000]);
        assert_eq!(
            unwrap(big.clone(), 99_999).unwrap_err(),
            ArchiveError::TooLarge(99_999)
        );
        assert_eq!(unwrap(big, 100_000).unwrap().database.len(), 100_000);
    }
}
