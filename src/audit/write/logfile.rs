//! The log file and what is found in it: opening the active file (creating its folder),
//! finding where the chain stands (its last complete record, else the last rotated file's,
//! else the head the shipper saved for files that have left), cutting a torn record a crash
//! left, writing a batch and cutting it back off when the write fails, reopening the file by
//! its path after a failure (with a `recovery` record when it changed meanwhile), and the
//! rename that rotates it.
//!
//! Apart from the committer because none of this knows about batches, checkpoints or
//! waiting requests: it is the file's side of the writer, what a restart after a crash
//! relies on, and it is read without the group-commit machinery around it.

use super::ship;
use crate::audit::chain::GENESIS;
use crate::audit::files::{self, LogFilesError};
use crate::audit::record::{ExpectedHead, Link, RecoveryRecord, VERSION, timestamp};
use crate::policy::model::Durability;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The target of the writer's events: the module it was written in before the writer was
/// split in three, kept so that a filter (`RUST_LOG`) or a log collector's rule written for
/// it still matches.
pub(super) const EVENTS: &str = "residency_proxy::audit::writer";

/// Why the log could not be opened, or its writer not started.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open decision log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The chain in the file was written under another `[log] instance`: going on would mix
    /// two instances' records in one chain, which a fleet's verification refuses.
    #[error(
        "decision log {} is the chain of instance \"{was}\", but [log] instance is now \"{now}\": an instance's records may not continue another's chain; give the new instance a new log path (or folder), or set instance back to \"{was}\"",
        path.display()
    )]
    Renamed {
        path: PathBuf,
        was: String,
        now: String,
    },
    #[error("decision log {} ends in a record that does not parse (line {line}): {why}", path.display())]
    Tail {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error(transparent)]
    Files(#[from] LogFilesError),
    #[error("cannot start the decision log writer thread: {0}")]
    Spawn(std::io::Error),
}

/// The last record of the chain: the next record gets `seq + 1` and `prev = hash`.
pub(super) struct Head {
    pub(super) seq: u64,
    pub(super) hash: String,
}

impl Head {
    fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

/// Where the writer starts: the chain head, and a recovery record to write first if the log
/// was not closed cleanly.
pub(super) struct Start {
    pub(super) head: Head,
    pub(super) recovery: Option<RecoveryRecord>,
    /// The instance the chain's last record names, when it names one.
    pub(super) instance: Option<String>,
}

impl Start {
    pub(super) fn empty() -> Start {
        Start {
            head: Head::genesis(),
            recovery: None,
            instance: None,
        }
    }
}

/// Opens the active file and finds where the chain stands: at the end of the active file,
/// or, when that is empty (just rotated), at the end of the last rotated file.
pub(super) fn open_log(path: &Path) -> Result<(LogFile, Start), AuditError> {
    let opened = LogFile::open(path).map_err(|e| e.into_audit(path))?;
    let (tail, tail_file) = match opened.tail {
        Some(t) => (Some(t), path.to_path_buf()),
        None if opened.file.regular => match files::rotated_siblings(path)?.pop() {
            Some(last) => (read_rotated_tail(&last)?, last),
            // Every sealed file has shipped: the chain goes on from the last one's head.
            None => (shipped_tail(path)?, path.to_path_buf()),
        },
        None => (None, path.to_path_buf()),
    };
    let unclean = match &tail {
        Some(t) => !t.closed || opened.torn > 0,
        None => opened.torn > 0,
    };
    let recovery = unclean.then(|| recovery_record(&tail_file, tail.as_ref(), opened.torn, None));
    let instance = tail.as_ref().and_then(|t| t.instance.clone());
    let head = tail.map_or_else(Head::genesis, |t| t.head);
    Ok((
        opened.file,
        Start {
            head,
            recovery,
            instance,
        },
    ))
}

/// The recovery record for a chain that goes on from `tail` of `file` (after `torn` bytes of
/// a half-written record were cut), where the writer expected `expected`, if it knew.
fn recovery_record(
    file: &Path,
    tail: Option<&Tail>,
    torn: u64,
    expected: Option<ExpectedHead>,
) -> RecoveryRecord {
    RecoveryRecord {
        instance: None,
        expected,
        file: file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "recovery",
        last_kind: tail.and_then(|t| t.kind.clone()),
        last_seq: tail.map_or(0, |t| t.head.seq),
        prev: Link::default(),
        seq: 0,
        torn_bytes: torn,
        ts: timestamp(jiff::Timestamp::now()),
        v: VERSION,
    }
}

/// The head the last shipped file ended with, saved beside the log by the shipper.
fn shipped_tail(path: &Path) -> Result<Option<Tail>, AuditError> {
    let head = ship::read_head(path).map_err(|source| AuditError::Open {
        path: ship::head_path(path),
        source,
    })?;
    Ok(head.map(|h| Tail {
        closed: h.kind.as_deref() == Some("checkpoint") && h.final_,
        kind: h.kind,
        head: Head {
            seq: h.seq,
            hash: h.hash,
        },
        // The object went to `PREFIX/INSTANCE/NAME`: the chain's instance.
        instance: h.object.rsplit('/').nth(1).map(str::to_string),
    }))
}

/// The tail of a rotated file, which the writer only reads: it must end in a whole record.
fn read_rotated_tail(path: &Path) -> Result<Option<Tail>, AuditError> {
    let read = || -> Result<Option<Tail>, TailError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(read_tail(&file, len, path, false)?.1)
    };
    read().map_err(|e| e.into_audit(path))
}

/// Where the lines go.
pub(super) enum Sink {
    Stdout(io::Stdout),
    File(LogFile),
}

impl Sink {
    pub(super) fn name(&self) -> String {
        match self {
            Sink::Stdout(_) => "<stdout>".into(),
            Sink::File(f) => f.path.display().to_string(),
        }
    }

    /// Before a batch: after a failed write, reopen the file by its path (it may have been
    /// replaced, or its file system remounted) and continue from its last record, if any.
    /// When that record is not the head the writer holds, the file changed under it: returns
    /// the recovery record to write first, so that the change is in the chain (and verify
    /// can fail a log that lost records) rather than only in the proxy's own logs.
    pub(super) fn prepare(
        &mut self,
        seq: &mut u64,
        prev: &mut String,
    ) -> io::Result<Option<RecoveryRecord>> {
        let Sink::File(f) = self else { return Ok(None) };
        if !f.stale {
            return Ok(None);
        }
        let opened = LogFile::open(&f.path).map_err(TailError::into_io)?;
        let mut changed = None;
        if let Some(tail) = opened.tail
            && (tail.head.seq != *seq || tail.head.hash != *prev)
        {
            tracing::event!(target: EVENTS,tracing::Level::WARN,
                log.path = %f.path.display(),
                log.seq = tail.head.seq,
                log.expected_seq = *seq,
                "decision log changed while it could not be written; continuing from its last record after a recovery record"
            );
            let expected = ExpectedHead {
                hash: std::mem::take(prev),
                seq: *seq,
            };
            changed = Some(recovery_record(
                &f.path,
                Some(&tail),
                opened.torn,
                Some(expected),
            ));
            *seq = tail.head.seq;
            *prev = tail.head.hash;
        }
        *f = opened.file;
        Ok(changed)
    }

    /// Writes a batch whose first record has `first_seq`.
    pub(super) fn write(
        &mut self,
        bytes: &[u8],
        durability: Durability,
        first_seq: u64,
    ) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(f) => f.write(bytes, durability, first_seq),
        }
    }
}

/// The open log file.
pub(super) struct LogFile {
    pub(super) path: PathBuf,
    file: File,
    /// Length up to the last complete record we know of.
    pub(super) len: u64,
    /// A write failed: reopen before the next one.
    pub(super) stale: bool,
    /// A regular file, which can be read back, cut and rotated (not a device or a pipe).
    pub(super) regular: bool,
    /// `seq` of the file's first record, which names it when rotated; `None` while empty.
    first_seq: Option<u64>,
}

/// A file opened for appending, the chain's tail in it, and the bytes of a torn record cut
/// off its end.
struct Opened {
    file: LogFile,
    tail: Option<Tail>,
    torn: u64,
}

/// The last complete record of a file.
struct Tail {
    head: Head,
    kind: Option<String>,
    /// It is a final checkpoint: the log was closed cleanly.
    closed: bool,
    /// The instance the record names (records before instances were named have none).
    instance: Option<String>,
}

enum TailError {
    Io(io::Error),
    Bad { line: usize, why: String },
}

impl From<io::Error> for TailError {
    fn from(e: io::Error) -> Self {
        TailError::Io(e)
    }
}

impl TailError {
    fn into_audit(self, path: &Path) -> AuditError {
        match self {
            TailError::Io(source) => AuditError::Open {
                path: path.into(),
                source,
            },
            TailError::Bad { line, why } => AuditError::Tail {
                path: path.into(),
                line,
                why,
            },
        }
    }

    fn into_io(self) -> io::Error {
        match self {
            TailError::Io(e) => e,
            TailError::Bad { line, why } => io::Error::other(format!(
                "ends in a record that does not parse (line {line}): {why}"
            )),
        }
    }
}

impl LogFile {
    /// Opens `path` for appending (creating its directories), cuts a torn last line, and
    /// reads the chain's tail from the last complete one.
    fn open(path: &Path) -> Result<Opened, TailError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let meta = file.metadata()?;
        let regular = meta.is_file();
        let (len, tail, torn) = if regular {
            read_tail(&file, meta.len(), path, true)?
        } else {
            // A device or a pipe: nothing to continue from, nothing to cut.
            (0, None, 0)
        };
        let first_seq = if len > 0 { first_seq(&file, len) } else { None };
        Ok(Opened {
            file: LogFile {
                path: path.into(),
                file,
                len,
                stale: false,
                regular,
                first_seq,
            },
            tail,
            torn,
        })
    }

    fn write(&mut self, bytes: &[u8], durability: Durability, first_seq: u64) -> io::Result<()> {
        let result = self.file.write_all(bytes).and_then(|()| match durability {
            Durability::Fsync => self.file.sync_data(),
            Durability::Write => Ok(()),
        });
        match result {
            Ok(()) => {
                self.len += bytes.len() as u64;
                self.first_seq.get_or_insert(first_seq);
                Ok(())
            }
            Err(e) => {
                // Best effort: a partly written batch must not stay in front of the next one.
                if self.regular
                    && let Err(t) = self.file.set_len(self.len)
                {
                    tracing::event!(target: EVENTS,tracing::Level::WARN,
                        log.path = %self.path.display(),
                        error = %t,
                        "cannot cut a failed batch off the decision log"
                    );
                }
                self.stale = true;
                Err(e)
            }
        }
    }

    /// Renames the file to its rotated name and opens a new, empty one at `path`. `last_seq`
    /// names the file if its first record could not be read. In `fsync` durability the
    /// closed file, the rename and the new file are synced; in `write` durability (where
    /// this runs on a runtime thread) the OS is trusted with them, as with every record.
    pub(super) fn rotate(&mut self, last_seq: u64, durability: Durability) -> io::Result<PathBuf> {
        let sync = durability == Durability::Fsync;
        if sync {
            // The closed file is whole on disk before it takes its final name.
            self.file.sync_data()?;
        }
        let first = self.first_seq.unwrap_or(last_seq);
        let to = files::rotated_name(&self.path, first, jiff::Timestamp::now());
        if to.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", to.display()),
            ));
        }
        std::fs::rename(&self.path, &to)?;
        self.len = 0;
        self.first_seq = None;
        match OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)
        {
            Ok(file) => self.file = file,
            // The next batch reopens the path (and continues the chain from memory).
            Err(e) => {
                tracing::event!(target: EVENTS, tracing::Level::WARN, log.path = %self.path.display(), error = %e, "cannot create the new decision log file; retrying before the next write");
                self.stale = true;
            }
        }
        // The rename and the new file survive a power cut once the directory is synced.
        if let Some(dir) = self
            .path
            .parent()
            .filter(|d| sync && !d.as_os_str().is_empty())
            && let Err(e) = File::open(dir).and_then(|d| d.sync_all())
        {
            tracing::event!(target: EVENTS, tracing::Level::WARN, log.dir = %dir.display(), error = %e, "cannot sync the decision log directory after rotation");
        }
        Ok(to)
    }
}

/// `seq` of the first record of a non-empty file, read from its first line.
fn first_seq(file: &File, len: u64) -> Option<u64> {
    let mut buf = vec![0u8; 4096.min(len as usize)];
    loop {
        file.read_exact_at(&mut buf, 0).ok()?;
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let v: serde_json::Value = serde_json::from_slice(&buf[..end]).ok()?;
            return v.get("seq")?.as_u64();
        }
        // A long first line: read more, up to the whole file.
        if buf.len() as u64 >= len {
            return None;
        }
        buf.resize((buf.len() * 4).min(len as usize), 0);
    }
}

/// Finds the last complete line of a file of `len` bytes, reading backwards from the end.
/// Returns the length to keep, the tail it names, and the length of a torn last line, which
/// is cut off when `cut` (and is an error otherwise).
fn read_tail(
    file: &File,
    len: u64,
    path: &Path,
    cut: bool,
) -> Result<(u64, Option<Tail>, u64), TailError> {
    let mut window: u64 = 8 * 1024;
    let mut buf = Vec::new();
    loop {
        let start = len.saturating_sub(window);
        buf.resize((len - start) as usize, 0);
        file.read_exact_at(&mut buf, start)?;
        let complete = match buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if start > 0 => {
                window *= 2;
                continue;
            }
            None => 0,
        };
        let line_start = match buf[..complete.saturating_sub(1)]
            .iter()
            .rposition(|&b| b == b'\n')
        {
            Some(i) => i + 1,
            None if start > 0 => {
                window *= 2;
                continue;
            }
            None => 0,
        };
        let keep = start + complete as u64;
        let tail = if complete == 0 {
            None
        } else {
            let tail = parse_tail(&buf[line_start..complete - 1]).map_err(|why| {
                match count_newlines(file, keep) {
                    Ok(line) => TailError::Bad { line, why },
                    Err(e) => TailError::Io(e),
                }
            })?;
            Some(tail)
        };
        let torn = &buf[complete..];
        if !torn.is_empty() {
            // A crash mid-write leaves the start of a record; anything else is not ours to cut.
            if torn[0] != b'{' || !cut {
                return Err(TailError::Bad {
                    line: count_newlines(file, keep)? + 1,
                    why: format!("{} bytes after the last line are not a record", torn.len()),
                });
            }
            file.set_len(keep)?;
            tracing::event!(target: EVENTS,tracing::Level::WARN,
                log.path = %path.display(),
                bytes = torn.len(),
                "decision log ended in a torn record (a crash mid-write); cut it off"
            );
        }
        return Ok((keep, tail, torn.len() as u64));
    }
}

fn parse_tail(line: &[u8]) -> Result<Tail, String> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let seq = v
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or("missing field seq")?;
    let hash = v
        .get("hash")
        .and_then(serde_json::Value::as_str)
        .ok_or("missing field hash")?;
    if hash.len() != GENESIS.len() || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("field hash is not a SHA-256 hex digest: {hash:?}"));
    }
    let kind = v.get("kind").and_then(serde_json::Value::as_str);
    let closed =
        kind == Some("checkpoint") && v.get("final") == Some(&serde_json::Value::Bool(true));
    Ok(Tail {
        head: Head {
            seq,
            hash: hash.to_string(),
        },
        kind: kind.map(str::to_string),
        closed,
        instance: v
            .get("instance")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
    })
}

/// Lines in the first `upto` bytes: only to name the line of a bad tail.
fn count_newlines(file: &File, upto: u64) -> io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut at, mut lines) = (0u64, 0usize);
    while at < upto {
        let n = buf.len().min((upto - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        at += n as u64;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::read::verify::verify_with;
    use crate::audit::testing::{crash_after, lines, policy, record, settings, test_key, trusting};
    use crate::audit::write::handle::LogWriter;

    #[test]
    fn a_crash_leaves_a_recovery_record_with_the_torn_tail_and_the_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let key = test_key();
        let p = policy();
        let s = settings(&p, &path, Durability::Write);
        crash_after(async {
            let w = LogWriter::open(&s, Some(key.clone())).unwrap();
            for n in 0..3 {
                w.append(record(&p, n)).await.unwrap();
            }
        });
        let complete = std::fs::read(&path).unwrap();
        let torn = br#"{"category":null,"client":{"coun"#;
        let mut with_tail = complete.clone();
        with_tail.extend_from_slice(torn);
        std::fs::write(&path, &with_tail).unwrap();

        crash_after(async {
            let w = LogWriter::open(&s, Some(key.clone())).unwrap();
            w.append(record(&p, 3)).await.unwrap();
            w.close().await;
        });
        assert!(std::fs::read(&path).unwrap().starts_with(&complete));
        let all = lines(&path);
        assert_eq!(all[3]["kind"], "recovery");
        assert_eq!(all[3]["seq"], 4);
        assert_eq!(all[3]["last_seq"], 3);
        assert_eq!(all[3]["last_kind"], "decision");
        assert_eq!(all[3]["torn_bytes"], torn.len());
        assert_eq!(all[3]["file"], "d.jsonl");
        // The recovery record is signed at once, before any new record.
        assert_eq!(all[4]["kind"], "checkpoint");
        assert_eq!(all[5]["id"], "r3");
        let report = verify_with(&path, &trusting(&key)).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(report.recoveries.len(), 1);
        assert_eq!(
            (
                report.recoveries[0].last_seq,
                report.recoveries[0].torn_bytes
            ),
            (3, torn.len() as u64)
        );
    }

    #[test]
    fn a_log_ending_in_a_bad_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let cases: [(&str, usize, &str); 4] = [
            ("{\"seq\":1}\nnot json\n", 2, "not JSON"),
            ("{\"kind\":\"decision\"}\n", 1, "missing field seq"),
            ("{\"seq\":3,\"hash\":\"zz\"}\n", 1, "not a SHA-256"),
            (
                "{\"seq\":1,\"hash\":\"00000000000000000000000000000000000000000000000000000000000000aa\"}\n\x00\x00\x00",
                2,
                "3 bytes after the last line",
            ),
        ];
        for (i, (text, line, why)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("bad{i}.jsonl"));
            std::fs::write(&path, text).unwrap();
            match LogWriter::open(&settings(&p, &path, Durability::Write), None) {
                Err(AuditError::Tail {
                    line: l, why: w, ..
                }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert!(w.contains(why), "{text:?}: {w}");
                }
                Err(e) => panic!("{text:?}: {e}"),
                Ok(_) => panic!("{text:?} was accepted"),
            }
            // Nothing was cut from a file the writer refused.
            assert_eq!(std::fs::read(&path).unwrap(), text.as_bytes());
        }
    }
}
