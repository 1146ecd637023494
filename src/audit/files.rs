//! Where a decision log lives on disk: the active file, the rotated files beside it, and the
//! order in which they form one chain; plus a line reader shared by verify, query and report.
//!
//! Naming: the active file keeps the configured name (`decisions.jsonl`); rotation renames it
//! to `decisions-<first seq, 20 digits>-<UTC time of rotation, YYYYMMDDTHHMMSSZ>.jsonl`. The
//! zero-padded sequence number makes rotated files sort in chain order even if the clock
//! steps back, and since `-` sorts before `.`, the active file lists after all of them.
//! Readers do not rely on that last point: they always put the active file last.
//!
//! Workers: a sidecar with several workers writes one chain per worker. Worker 0 keeps the
//! configured name; worker K writes `decisions.wK.jsonl`, rotated as any log is
//! (`decisions.wK-<seq>-<time>.jsonl`). A folder holding the stems `X` and `X.wK` is one
//! sidecar's chains, read chain by chain ([`log_chains`]); any other stem beside them is
//! another log.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Digits of the sequence number in a rotated file name (`u64::MAX` has 20).
const SEQ_DIGITS: usize = 20;
/// Length of `YYYYMMDDTHHMMSSZ`.
const TIME_LEN: usize = 16;

/// Why the files of a log could not be listed or read.
#[derive(Debug, thiserror::Error)]
pub enum LogFilesError {
    #[error("cannot read decision log {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "folder {} holds files of several logs ({names}): name the active file of one, e.g. {}",
        path.display(), example.display()
    )]
    Ambiguous {
        path: PathBuf,
        names: String,
        example: PathBuf,
    },
    /// One chain was asked for (the caller reads a single chain), and the folder holds the
    /// chains of several workers.
    #[error(
        "folder {} holds the chains of {count} workers ({names}): name the active file of one, e.g. {}",
        path.display(), example.display()
    )]
    SeveralChains {
        path: PathBuf,
        count: usize,
        names: String,
        example: PathBuf,
    },
    /// `--head` names a record of one chain, and the location holds several.
    #[error("--head names a record of one chain, and {location} holds {count} {what}: give {hint}")]
    HeadOfOneChain {
        location: String,
        count: usize,
        /// `instances` or `chains`.
        what: &'static str,
        /// Where the one chain is: an instance's folder, a chain's active file.
        hint: String,
    },
    /// A shipped file in object storage could not be listed or fetched.
    #[error("{0}")]
    Store(String),
}

pub(crate) fn unreadable(path: &Path) -> impl FnOnce(io::Error) -> LogFilesError + '_ {
    move |source| LogFilesError::Read {
        path: path.into(),
        source,
    }
}

/// The name a rotated file gets: `<stem>-<first seq>-<time>.<ext>`.
pub fn rotated_name(active: &Path, first_seq: u64, at: jiff::Timestamp) -> PathBuf {
    let (stem, ext) = split_name(active);
    // `2026-11-28T04:31:53.123456Z` -> `20261128T043153Z`
    let ts = super::record::timestamp(at);
    let compact: String = ts[..19]
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let name = format!("{stem}-{first_seq:0SEQ_DIGITS$}-{compact}Z{ext}");
    active.with_file_name(name)
}

/// The active file of worker `worker` of the log whose configured file is `active`: `active`
/// itself for worker 0, `decisions.w2.jsonl` beside it for worker 2.
pub fn worker_path(active: &Path, worker: usize) -> PathBuf {
    if worker == 0 {
        return active.into();
    }
    let (stem, ext) = split_name(active);
    active.with_file_name(format!("{stem}.w{worker}{ext}"))
}

/// The log a stem belongs to and the worker that writes it: `("decisions", 2)` for
/// `decisions.w2`, `("decisions", 0)` for `decisions`. Only the form the writer gives a
/// worker's file counts (`w` and a number from 1 without leading zeros): `decisions.w0` and
/// `decisions.w01` are logs of their own.
fn worker_of(stem: &str) -> (&str, usize) {
    if let Some((base, k)) = stem.rsplit_once(".w")
        && !base.is_empty()
        && !k.is_empty()
        && !k.starts_with('0')
        && k.bytes().all(|b| b.is_ascii_digit())
        && let Ok(k) = k.parse::<usize>()
    {
        return (base, k);
    }
    (stem, 0)
}

/// `("decisions", ".jsonl")` for `logs/decisions.jsonl`; the extension may be empty.
fn split_name(path: &Path) -> (String, String) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_string(), name[i..].to_string()),
        _ => (name, String::new()),
    }
}

/// If `name` is a rotated file name of the log whose active file is `<stem><ext>`, its stem.
fn rotated_stem<'n>(name: &'n str, ext: &str) -> Option<&'n str> {
    let base = name.strip_suffix(ext)?;
    let tail = SEQ_DIGITS + TIME_LEN + 2;
    if base.len() <= tail {
        return None;
    }
    // The tail is ASCII, so a cut inside a character (`€€€…€.jsonl`) is not one of ours;
    // `split_at` would panic there, on any file someone drops beside the log.
    let (stem, rest) = base.split_at_checked(base.len() - tail)?;
    let rest = rest.as_bytes();
    let ok = rest[0] == b'-'
        && rest[1..=SEQ_DIGITS].iter().all(u8::is_ascii_digit)
        && rest[SEQ_DIGITS + 1] == b'-'
        && is_compact_time(&rest[SEQ_DIGITS + 2..]);
    ok.then_some(stem)
}

fn is_compact_time(t: &[u8]) -> bool {
    t.len() == TIME_LEN
        && t[..8].iter().all(u8::is_ascii_digit)
        && t[8] == b'T'
        && t[9..15].iter().all(u8::is_ascii_digit)
        && t[15] == b'Z'
}

/// The rotated files of the log whose active file is `active`, in chain order.
pub fn rotated_siblings(active: &Path) -> Result<Vec<PathBuf>, LogFilesError> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (stem, ext) = split_name(active);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(unreadable(&dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(unreadable(&dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if rotated_stem(name, &ext) == Some(stem.as_str()) {
            out.push(entry.path());
        }
    }
    out.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(out)
}

/// The workers numbered `workers` or more whose chains of the log at `active` (a worker 0's
/// active file) have files beside it: left by a run with more workers. Their sealed files
/// must still ship.
pub fn chains_beyond(active: &Path, workers: usize) -> Result<Vec<usize>, LogFilesError> {
    let (stem, ext) = split_name(active);
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(unreadable(&dir)(e)),
    };
    let mut found = std::collections::BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(unreadable(&dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let chain = match rotated_stem(name, &ext) {
            Some(s) => s,
            None => match name.strip_suffix(ext.as_str()) {
                Some(s) => s,
                None => continue,
            },
        };
        let (base, k) = worker_of(chain);
        if base == stem && k >= workers.max(1) {
            found.insert(k);
        }
    }
    Ok(found.into_iter().collect())
}

/// One chain of a log: the files one writer wrote, in chain order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainFiles {
    /// The name of the chain's active file (`decisions.w1.jsonl`), whether or not it is
    /// there: how messages name the chain.
    pub name: String,
    pub files: Vec<PathBuf>,
}

/// The chains of the log at `path`, each with its files in chain order:
///
/// - a rotated file: one chain of that file alone;
/// - any other file: its rotated siblings, then the file itself (the active file);
/// - a folder: the one log in it (`*.jsonl` files grouped by stem), one chain per worker
///   (`X`, then `X.w1`, `X.w2`, … by number); files of several logs are an error. An empty
///   folder has no chain.
pub fn log_chains(path: &Path) -> Result<Vec<ChainFiles>, LogFilesError> {
    let meta = std::fs::metadata(path).map_err(unreadable(path))?;
    if !meta.is_dir() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (_, ext) = split_name(path);
        let files = if rotated_stem(&name, &ext).is_some() {
            vec![path.into()]
        } else {
            let mut files = rotated_siblings(path)?;
            files.push(path.into());
            files
        };
        return Ok(vec![ChainFiles { name, files }]);
    }
    // Group the folder's `*.jsonl` files by the chain they belong to.
    let mut logs: std::collections::BTreeMap<String, (Vec<PathBuf>, Option<PathBuf>)> =
        std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(path).map_err(unreadable(path))? {
        let entry = entry.map_err(unreadable(path))?;
        let p = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(".jsonl") || p.is_dir() {
            continue;
        }
        match rotated_stem(name, ".jsonl") {
            Some(stem) => logs.entry(stem.into()).or_default().0.push(p),
            None => {
                let stem = name.trim_end_matches(".jsonl").to_string();
                logs.entry(stem).or_default().1 = Some(p);
            }
        }
    }
    let bases: std::collections::BTreeSet<&str> =
        logs.keys().map(|stem| worker_of(stem).0).collect();
    if bases.len() > 1 {
        let names: Vec<&str> = bases.into_iter().collect();
        return Err(LogFilesError::Ambiguous {
            path: path.into(),
            names: names.join(", "),
            example: path.join(format!("{}.jsonl", names[0])),
        });
    }
    let mut chains: Vec<(usize, ChainFiles)> = logs
        .into_iter()
        .map(|(stem, (mut rotated, active))| {
            rotated.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            rotated.extend(active);
            let chain = ChainFiles {
                name: format!("{stem}.jsonl"),
                files: rotated,
            };
            (worker_of(&stem).1, chain)
        })
        .collect();
    chains.sort_by_key(|(worker, _)| *worker);
    Ok(chains.into_iter().map(|(_, c)| c).collect())
}

/// The files of the one chain at `path`, in chain order (see [`log_chains`]); a folder
/// holding the chains of several workers is an error, naming them.
pub fn log_files(path: &Path) -> Result<Vec<PathBuf>, LogFilesError> {
    let mut chains = log_chains(path)?;
    if chains.len() > 1 {
        let names: Vec<&str> = chains.iter().map(|c| c.name.as_str()).collect();
        return Err(LogFilesError::SeveralChains {
            path: path.into(),
            count: chains.len(),
            names: names.join(", "),
            example: path.join(names[0]),
        });
    }
    Ok(chains.pop().map(|c| c.files).unwrap_or_default())
}

/// The files of a log, or of many instances' logs in object storage, in the order they are
/// read: each with the name messages give it and a reader of its lines.
pub struct Segments {
    /// How many files there are, over all chains.
    pub count: usize,
    /// What is read side by side, each in its own order: the chains of a sidecar's log
    /// folder (one per worker), whose records the readers merge by time; or a single stream
    /// (one log, or a location's instances read in turn).
    pub chains: Vec<SegmentIter>,
}

/// The files of one chain, opened as they are reached.
pub type SegmentIter = Box<dyn Iterator<Item = Result<(PathBuf, LineReader), LogFilesError>>>;

impl Segments {
    /// The files of the local log at `path`, chain by chain (see [`log_chains`]).
    pub fn local(path: &Path) -> Result<Segments, LogFilesError> {
        let chains = log_chains(path)?;
        Ok(Segments {
            count: chains.iter().map(|c| c.files.len()).sum(),
            chains: chains
                .into_iter()
                .map(|c| -> SegmentIter {
                    Box::new(
                        c.files
                            .into_iter()
                            .map(|f| LineReader::open(&f).map(|r| (f, r))),
                    )
                })
                .collect(),
        })
    }

    /// `count` files read one after another, as one stream.
    pub fn one(count: usize, iter: SegmentIter) -> Segments {
        Segments {
            count,
            chains: vec![iter],
        }
    }
}

/// The longest line the readers hold in memory. Records are a few hundred bytes, and even a
/// request at the largest header block the proxy accepts by default, its subject
/// pseudonymised in every segment, stays far below this; a longer line (a damaged file full
/// of NUL bytes, a hostile one with no newline) is skipped unread and reported as not a
/// record, so that memory stays flat whatever the file holds.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// Reads a log file (local, or fetched from object storage) line by line without holding
/// more than one line, of at most [`MAX_LINE`] bytes.
pub struct LineReader {
    reader: Box<dyn BufRead + Send>,
    line: Vec<u8>,
    number: usize,
}

/// One line of a log file.
pub struct Line<'a> {
    /// 1-based.
    pub number: usize,
    /// Without its `\n`; empty when `oversized`.
    pub bytes: &'a [u8],
    /// False for a last line without `\n`: cut short, or still being written.
    pub complete: bool,
    /// Longer than [`MAX_LINE`]: skipped without being read into memory, so not a record.
    pub oversized: bool,
}

impl LineReader {
    pub fn open(path: &Path) -> Result<LineReader, LogFilesError> {
        let file = File::open(path).map_err(unreadable(path))?;
        Ok(LineReader::new(Box::new(BufReader::with_capacity(
            256 * 1024,
            file,
        ))))
    }

    pub fn new(reader: Box<dyn BufRead + Send>) -> LineReader {
        LineReader {
            reader,
            line: Vec::with_capacity(4096),
            number: 0,
        }
    }

    /// The next line, or `None` at the end of the file.
    pub fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        self.line.clear();
        // One byte more than the limit (its `\n`, for a line of exactly `MAX_LINE`).
        let read = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.line)?;
        if read == 0 {
            return Ok(None);
        }
        self.number += 1;
        let mut complete = self.line.last() == Some(&b'\n');
        let oversized = !complete && self.line.len() > MAX_LINE;
        if oversized {
            self.line.clear();
            self.line.shrink_to(4096);
            complete = self.skip_line()?;
        } else if complete {
            self.line.pop();
        }
        Ok(Some(Line {
            number: self.number,
            bytes: &self.line,
            complete,
            oversized,
        }))
    }

    /// Consumes the rest of the current line without keeping it; returns whether a `\n`
    /// ended it (rather than the end of the file).
    fn skip_line(&mut self) -> io::Result<bool> {
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                return Ok(false);
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.reader.consume(i + 1);
                    return Ok(true);
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                }
            }
        }
    }
}

/// Why an oversized line is not a record, as verify, query and report say it.
pub fn oversized_why() -> String {
    format!(
        "line longer than {} MiB: not a record (skipped unread)",
        MAX_LINE / (1024 * 1024)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_sort_in_chain_order_before_the_active_file() {
        let active = Path::new("/var/log/rp/decisions.jsonl");
        let t: jiff::Timestamp = "2026-11-28T04:31:53.123456Z".parse().unwrap();
        let a = rotated_name(active, 9, t);
        // An earlier clock on the later file: the sequence number still orders them.
        let b = rotated_name(active, 10, "2026-11-27T00:00:00Z".parse().unwrap());
        assert_eq!(
            a.file_name().unwrap(),
            "decisions-00000000000000000009-20261128T043153Z.jsonl"
        );
        let mut names = vec![
            active.file_name().unwrap().to_owned(),
            b.file_name().unwrap().to_owned(),
            a.file_name().unwrap().to_owned(),
        ];
        names.sort();
        assert_eq!(
            names,
            [
                a.file_name().unwrap(),
                b.file_name().unwrap(),
                active.file_name().unwrap()
            ]
        );
        assert_eq!(
            rotated_stem(a.file_name().unwrap().to_str().unwrap(), ".jsonl"),
            Some("decisions")
        );
        assert_eq!(rotated_stem("decisions-old.jsonl", ".jsonl"), None);
    }

    /// Found by review: a line without a newline was read whole into memory, however
    /// long (a damaged file full of NUL bytes could take the machine's memory).
    #[test]
    fn regression_a_line_longer_than_the_limit_is_skipped_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let mut bytes = b"{\"seq\":1}\n".to_vec();
        bytes.resize(bytes.len() + MAX_LINE + 1, 0);
        bytes.extend_from_slice(b"\n{\"seq\":3}\n");
        // A line of exactly the limit is still read.
        bytes.extend(std::iter::repeat_n(b'x', MAX_LINE));
        bytes.extend_from_slice(b"\n");
        // And a last one over the limit, without its `\n`.
        bytes.resize(bytes.len() + MAX_LINE + 10, b' ');
        std::fs::write(&path, &bytes).unwrap();

        let mut reader = LineReader::open(&path).unwrap();
        let mut seen = Vec::new();
        while let Some(l) = reader.next_line().unwrap() {
            seen.push((l.number, l.bytes.len(), l.complete, l.oversized));
        }
        assert_eq!(
            seen,
            [
                (1, 9, true, false),
                (2, 0, true, true),
                (3, 9, true, false),
                (4, MAX_LINE, true, false),
                (5, 0, false, true),
            ]
        );
    }

    /// Found by review: a name whose rotated-name tail would start inside a multi-byte
    /// character made `audit verify|query|report` panic, and the proxy fail to start.
    #[test]
    fn regression_a_non_ascii_file_name_beside_the_log_panicked() {
        let dir = tempfile::tempdir().unwrap();
        // 13 × 3 bytes: the 38-byte tail would start at byte 1, inside the first `€`.
        let odd = "€".repeat(13);
        std::fs::write(dir.path().join(format!("{odd}.jsonl")), "").unwrap();
        assert_eq!(rotated_stem(&format!("{odd}.jsonl"), ".jsonl"), None);
        let active = dir.path().join("decisions.jsonl");
        std::fs::write(&active, "").unwrap();
        assert_eq!(log_files(&active).unwrap(), vec![active.clone()]);
        // In a folder it is a log of its own, as any other `*.jsonl` name would be.
        let err = log_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("several logs"), "{err}");
        // A multi-byte stem with a real rotated tail is still recognised.
        let rotated = rotated_name(&dir.path().join("é.jsonl"), 1, jiff::Timestamp::UNIX_EPOCH);
        let name = rotated.file_name().unwrap().to_str().unwrap();
        assert_eq!(rotated_stem(name, ".jsonl"), Some("é"));
    }

    #[test]
    fn a_file_brings_its_rotated_siblings_and_a_folder_its_one_log() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("decisions.jsonl");
        let t = jiff::Timestamp::UNIX_EPOCH;
        let r2 = rotated_name(&active, 20, t);
        let r1 = rotated_name(&active, 1, t);
        for p in [&active, &r2, &r1] {
            std::fs::write(p, "").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("other-log.jsonl.bak"), "x").unwrap();
        let want = vec![r1.clone(), r2.clone(), active.clone()];
        assert_eq!(log_files(&active).unwrap(), want);
        assert_eq!(log_files(dir.path()).unwrap(), want);
        assert_eq!(log_files(&r2).unwrap(), vec![r2.clone()]);

        std::fs::write(dir.path().join("consents.jsonl"), "").unwrap();
        let err = log_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("several logs (consents, decisions)"), "{err}");
        assert_eq!(log_files(&active).unwrap(), want);
    }

    #[test]
    fn a_folder_of_worker_chains_is_one_log_read_chain_by_chain() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("decisions.jsonl");
        let t = jiff::Timestamp::UNIX_EPOCH;
        let w1 = worker_path(&active, 1);
        let w2 = worker_path(&active, 2);
        let w10 = worker_path(&active, 10);
        assert_eq!(worker_path(&active, 0), active);
        assert_eq!(w1.file_name().unwrap(), "decisions.w1.jsonl");
        let (r0, r1, r1b) = (
            rotated_name(&active, 1, t),
            rotated_name(&w1, 1, t),
            rotated_name(&w1, 40, t),
        );
        assert_eq!(
            r1.file_name().unwrap(),
            "decisions.w1-00000000000000000001-19700101T000000Z.jsonl"
        );
        for p in [&active, &w1, &w2, &w10, &r0, &r1, &r1b] {
            std::fs::write(p, "").unwrap();
        }
        let chains = log_chains(dir.path()).unwrap();
        let names: Vec<&str> = chains.iter().map(|c| c.name.as_str()).collect();
        // Worker order, by number (w10 after w2).
        assert_eq!(
            names,
            [
                "decisions.jsonl",
                "decisions.w1.jsonl",
                "decisions.w2.jsonl",
                "decisions.w10.jsonl"
            ]
        );
        assert_eq!(chains[0].files, [r0.clone(), active.clone()]);
        assert_eq!(chains[1].files, [r1.clone(), r1b.clone(), w1.clone()]);
        assert_eq!(chains[3].files, std::slice::from_ref(&w10));

        // A chain's active file, or worker 0's, is that chain alone.
        assert_eq!(log_files(&w1).unwrap(), [r1, r1b, w1.clone()]);
        assert_eq!(log_files(&active).unwrap(), [r0, active.clone()]);
        // Asked for one chain, the folder names them.
        let err = log_files(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("holds the chains of 4 workers (decisions.jsonl, decisions.w1.jsonl, decisions.w2.jsonl, decisions.w10.jsonl)"),
            "{err}"
        );

        // Anything else beside them is another log, as before.
        for other in [
            "consents.jsonl",
            "decisions.w0.jsonl",
            "decisions.w01.jsonl",
        ] {
            let p = dir.path().join(other);
            std::fs::write(&p, "").unwrap();
            let err = log_chains(dir.path()).unwrap_err().to_string();
            let stem = other.trim_end_matches(".jsonl");
            assert!(err.contains("several logs ("), "{other}: {err}");
            assert!(err.contains(stem), "{other}: {err}");
            std::fs::remove_file(&p).unwrap();
        }
        // Workers of another log are that log's.
        std::fs::write(dir.path().join("consents.w1.jsonl"), "").unwrap();
        let err = log_chains(dir.path()).unwrap_err().to_string();
        assert!(err.contains("several logs (consents, decisions)"), "{err}");
    }
}
