//! `consent import` in bulk: a JSON lines file read as the file store reads it (each id's
//! last line is its state, see [`super::file`]), streamed to a registry in chunks without
//! holding the records in memory.
//!
//! The file is read three times. The first pass hashes the id of every line and sorts the
//! hashes; lines whose hash no other line shares are the last (and only) word on their id.
//! The second pass reads the exact ids of the few lines that do share a hash and keeps the
//! number of the last line of each. The third pass judges every line and sends the latest
//! words (grants, or withdrawals when a last line is malformed) to the store, chunk by chunk,
//! from a thread of its own while the store writes the previous chunk.
//!
//! Memory: 16 bytes per record line during the first pass (an id hash and a line number),
//! then, for the rest of the import, one map entry (the id and a line number, about
//! 40 bytes plus the id) per line whose id hash another line shares — the ids that occur more
//! than once, and hash collisions — plus the chunks in flight. The records themselves are
//! never all held.

use super::change::{Change, ImportReport, Outcome, Refusal, Revocation};
use super::file::{id_of, judge, record_lines};
use super::record::ConsentRecord;
use foldhash::fast::{FixedState, RandomState};
use jiff::Timestamp;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::io::Read as _;
use std::io::{BufReader, Seek};
use std::path::Path;
use tokio::sync::mpsc;

/// Latest words sent to the store at a time.
pub const CHUNK: usize = 5000;
/// Chunks read ahead of the store.
const AHEAD: usize = 4;
const READ_BUFFER: usize = 1 << 20;

/// A part of the file, in line order: the latest words on their ids, and the lines refused
/// while reading it.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The number of the line of each change.
    pub lines: Vec<usize>,
    pub changes: Vec<Change>,
    /// Malformed lines (number, why).
    pub refused: Vec<(usize, String)>,
}

/// A chunk whose changes the store took (see [`Chunk::take`]).
pub struct Taken {
    lines: Vec<usize>,
    /// Which changes were withdrawals ([`Change::Revoke`]).
    withdrawals: Vec<bool>,
    refused: Vec<(usize, String)>,
}

impl Chunk {
    fn with_capacity() -> Chunk {
        Chunk {
            lines: Vec::with_capacity(CHUNK),
            changes: Vec::with_capacity(CHUNK),
            refused: Vec::new(),
        }
    }

    /// The changes, to plan by value, and what [`Settle::chunk`] needs to count their outcomes.
    pub fn take(self) -> (Vec<Change>, Taken) {
        let withdrawals = self
            .changes
            .iter()
            .map(|c| matches!(c, Change::Revoke(_)))
            .collect();
        let taken = Taken {
            lines: self.lines,
            withdrawals,
            refused: self.refused,
        };
        (self.changes, taken)
    }

    /// The ids of the changes.
    pub fn ids(&self) -> Vec<&str> {
        self.changes.iter().map(Change::id).collect()
    }
}

/// What the store gets: chunks, then the end of the file, or the failure that stopped the
/// reading (the store then writes no more).
pub type Chunks = mpsc::Receiver<std::io::Result<Chunk>>;

/// A chunk's changes planned as if the registry held none of their ids, as an import into a
/// registry that does not hold them yet finds: what [`plan_distinct`] plans then, without
/// reading the registry first. The store inserts the grants, and a grant whose id it turns
/// out to hold (a unique key says so) sends the change to [`plan_distinct`] after all, with
/// what the registry holds. A withdrawal always depends on what the registry holds.
///
/// [`plan_distinct`]: super::change::plan_distinct
#[derive(Debug, Default)]
pub struct Fresh {
    /// The changes to insert as new grants (valid records), by position in the chunk.
    pub grants: Vec<usize>,
    /// Each change's outcome; `None` for a withdrawal.
    pub outcomes: Vec<Option<Result<Outcome, Refusal>>>,
}

impl Fresh {
    pub fn plan(changes: &[Change]) -> Fresh {
        let mut fresh = Fresh {
            grants: Vec::with_capacity(changes.len()),
            outcomes: Vec::with_capacity(changes.len()),
        };
        for (i, change) in changes.iter().enumerate() {
            let outcome = match change {
                Change::Record(r) | Change::Undated(r) => Some(match r.validate() {
                    Err(source) => Err(Refusal::Invalid {
                        id: r.id.clone(),
                        source,
                    }),
                    Ok(()) => {
                        fresh.grants.push(i);
                        Ok(match r.revoked_at {
                            Some(_) => Outcome::GrantedRevoked,
                            None => Outcome::Granted,
                        })
                    }
                }),
                Change::Revoke(_) => None,
            };
            fresh.outcomes.push(outcome);
        }
        fresh
    }

    /// The records to grant, each with the revocation it carries (an imported record that
    /// was already revoked), as [`plan_distinct`](super::change::plan_distinct) writes them.
    pub fn records<'a>(&self, changes: &'a [Change]) -> impl Iterator<Item = &'a ConsentRecord> {
        self.grants.iter().map(move |&i| match &changes[i] {
            Change::Record(r) | Change::Undated(r) => r,
            Change::Revoke(_) => unreachable!("only records are granted"),
        })
    }

    /// The revocations that records granted already carry.
    pub fn revocations(&self, changes: &[Change]) -> Vec<Revocation> {
        self.records(changes)
            .filter_map(|r| {
                r.revoked_at.map(|at| Revocation {
                    consent_id: r.id.clone(),
                    revoked_at: at,
                    evidence: None,
                })
            })
            .collect()
    }
}

/// What an import did, in numbers (the refused lines are passed on as they are found).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportCounts {
    pub granted: usize,
    pub revoked: usize,
    pub unchanged: usize,
    /// Lines of valid records that a later line of the same id replaced or withdrew.
    pub superseded: usize,
    pub refused: usize,
}

/// Hears each refused line (number, why), in line order.
pub type OnRefused = Box<dyn FnMut(usize, &str) + Send>;

/// Counts what the store did with a chunk and passes its refused lines on, in line order.
pub struct Settle {
    pub counts: ImportCounts,
    refused: OnRefused,
}

impl Settle {
    pub fn new(refused: OnRefused) -> Settle {
        Settle {
            counts: ImportCounts::default(),
            refused,
        }
    }

    /// Takes the store's outcome for each change of a chunk.
    pub fn chunk(&mut self, chunk: Taken, results: Vec<Result<Outcome, Refusal>>) {
        let mut part = ImportReport::default();
        for ((line, withdrawal), result) in chunk.lines.iter().zip(chunk.withdrawals).zip(results) {
            part.count_outcome(*line, withdrawal, result);
        }
        self.counts.granted += part.granted;
        self.counts.revoked += part.revoked;
        self.counts.unchanged += part.unchanged;
        let mut refused = chunk.refused;
        refused.append(&mut part.refused);
        refused.sort_by_key(|(line, _)| *line);
        self.counts.refused += refused.len();
        for (line, why) in &refused {
            (self.refused)(*line, why);
        }
    }
}

/// The input of an import, read three times through one open file: a regular file as it was
/// when opened (bytes appended later are not read; a file changed meanwhile fails the import,
/// keeping what it wrote before it noticed), or anything else (standard input as `-`, a pipe, a
/// FIFO) spooled first to an unnamed temporary file, which the system removes however the
/// process ends.
pub struct Input {
    file: std::fs::File,
    /// The bytes read, and the file's modification time, when opened.
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// What messages call it.
    name: String,
}

impl Input {
    /// `-` is standard input.
    pub fn open(path: &Path) -> std::io::Result<Input> {
        let name = path.display().to_string();
        let file = if name == "-" {
            spool(&mut std::io::stdin().lock())?
        } else {
            let mut file = std::fs::File::open(path)?;
            if file.metadata()?.is_file() {
                file
            } else {
                spool(&mut file)?
            }
        };
        let meta = file.metadata()?;
        Ok(Input {
            len: meta.len(),
            modified: meta.modified().ok(),
            file,
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pass over the input from its start, up to its length when opened.
    fn read(&self) -> std::io::Result<BufReader<std::io::Take<std::fs::File>>> {
        self.unchanged()?;
        let mut file = self.file.try_clone()?;
        file.rewind()?;
        Ok(BufReader::with_capacity(READ_BUFFER, file.take(self.len)))
    }

    /// Fails if the file was written since it was opened: its passes would disagree.
    fn unchanged(&self) -> std::io::Result<()> {
        let meta = self.file.metadata()?;
        if meta.len() != self.len || meta.modified().ok() != self.modified {
            return Err(std::io::Error::other(format!(
                "{} changed while it was being imported: import it again once it is written (what this import wrote is kept, and the next one completes it)",
                self.name
            )));
        }
        Ok(())
    }
}

/// Copies `from` into an unnamed temporary file, rewound.
fn spool(from: &mut impl std::io::Read) -> std::io::Result<std::fs::File> {
    let mut spool = tempfile::tempfile()?;
    std::io::copy(from, &mut spool)?;
    spool.rewind()?;
    Ok(spool)
}

/// The hash of the id a line names, as [`id_of`] reads it (without copying it).
fn id_hash(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Cow<'a, str>,
    }
    let r = serde_json::from_slice::<IdOnly<'_>>(line).ok()?;
    Some(hash(&r.id))
}

fn hash(id: &str) -> u64 {
    FixedState::with_seed(0x7270_636f_6e73_6e74).hash_one(id)
}

/// The number of the last line of each id that occurs on more than one line (and of each id
/// whose hash another id shares); any other id's one line is its last.
fn last_lines(input: &Input) -> std::io::Result<HashMap<String, usize, RandomState>> {
    let mut hashes: Vec<(u64, usize)> = Vec::new();
    record_lines(&mut input.read()?, |number, line| {
        if let Some(h) = id_hash(line) {
            hashes.push((h, number));
        }
    })?;
    hashes.sort_unstable();
    let mut shared: Vec<usize> = Vec::new();
    for group in hashes.chunk_by(|a, b| a.0 == b.0) {
        if group.len() > 1 {
            shared.extend(group.iter().map(|(_, line)| *line));
        }
    }
    drop(hashes);
    shared.sort_unstable();
    let mut last = HashMap::default();
    if shared.is_empty() {
        return Ok(last);
    }
    let mut next = shared.iter().peekable();
    record_lines(&mut input.read()?, |number, line| {
        if next.next_if(|&&n| n == number).is_some() {
            if let Some(id) = id_of(line) {
                last.insert(id, number);
            }
        }
    })?;
    Ok(last)
}

/// Reads `input` and sends its latest words to `chunks`; returns the number of superseded
/// lines. Runs on a thread of its own (it blocks). A withdrawal is dated `now`.
pub fn read(
    input: &Input,
    now: Timestamp,
    chunks: &mpsc::Sender<std::io::Result<Chunk>>,
) -> std::io::Result<usize> {
    let last = last_lines(input)?;
    let mut superseded = 0;
    let mut chunk = Chunk::with_capacity();
    let mut stopped = false;
    record_lines(&mut input.read()?, |number, line| {
        if stopped {
            return;
        }
        let judged = judge(line);
        let id = match &judged {
            Ok(r) => Some(r.id.as_str()),
            Err((id, _)) => id.as_deref(),
        };
        let latest = id.is_none_or(|id| last.get(id).is_none_or(|&l| l == number));
        let change = match judged {
            Ok(r) if latest => Some(Change::Record(r)),
            Ok(_) => {
                superseded += 1;
                None
            }
            Err((id, why)) => {
                chunk.refused.push((number, why));
                match id {
                    Some(id) if latest => Some(Change::Revoke(Revocation {
                        consent_id: id,
                        revoked_at: now,
                        evidence: Some(format!(
                            "consent import: line {number} of {}, the last for this consent, is unreadable",
                            input.name
                        )),
                    })),
                    _ => None,
                }
            }
        };
        if let Some(change) = change {
            chunk.lines.push(number);
            chunk.changes.push(change);
        }
        if chunk.changes.len() >= CHUNK || chunk.refused.len() >= CHUNK {
            // Chunks are written as they come: one read from a file being rewritten must not
            // be (a torn line would withdraw its consent), so the file is checked first.
            let next = input.unchanged().map(|()| std::mem::take(&mut chunk));
            let changed = next.is_err();
            // The store stopped (it failed), or the file changed: nothing more to read.
            stopped = chunks.blocking_send(next).is_err() || changed;
        }
    })?;
    // The three passes read the same bytes, or the import is refused whole.
    input.unchanged()?;
    if !stopped && (!chunk.changes.is_empty() || !chunk.refused.is_empty()) {
        let _ = chunks.blocking_send(Ok(chunk));
    }
    Ok(superseded)
}

/// Starts reading `input` on a thread of its own; the store receives from the channel.
pub fn start(
    input: std::sync::Arc<Input>,
    now: Timestamp,
) -> (Chunks, std::thread::JoinHandle<std::io::Result<usize>>) {
    let (tx, rx) = mpsc::channel(AHEAD);
    let reader = std::thread::spawn(move || {
        // A panic must fail the import too: the channel closing alone would read as its end.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&input, now, &tx)))
                .unwrap_or_else(|_| Err(std::io::Error::other("the import reader panicked")));
        if let Err(e) = &result {
            // The store must write no more of the file (the chunks it wrote stay).
            let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
        result
    });
    (rx, reader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::file::{Latest, latest};

    fn line(id: &str, purpose: &str) -> String {
        let mut r = crate::consent::record::sample(id, "u1");
        r.purposes = vec![purpose.into()];
        serde_json::to_string(&r).unwrap()
    }

    /// The latest words `read` sends, as (line, id, withdrawn), and the superseded count.
    fn streamed(text: &str) -> (Vec<(usize, String, bool)>, Vec<usize>, usize) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        let input = Input::open(f.path()).unwrap();
        let (tx, mut rx) = mpsc::channel(1000);
        let superseded = read(&input, Timestamp::now(), &tx).unwrap();
        drop(tx);
        let (mut words, mut refused) = (Vec::new(), Vec::new());
        while let Some(chunk) = rx.blocking_recv() {
            let chunk = chunk.unwrap();
            for (line, change) in chunk.lines.iter().zip(&chunk.changes) {
                let withdrawn = matches!(change, Change::Revoke(_));
                words.push((*line, change.id().to_string(), withdrawn));
            }
            refused.extend(chunk.refused.iter().map(|(l, _)| *l));
        }
        (words, refused, superseded)
    }

    #[test]
    fn the_stream_holds_the_same_latest_words_as_the_file_store() {
        let mut lines = Vec::new();
        for i in 0..(3 * CHUNK) {
            lines.push(line(&format!("c{}", i % 4000), "p"));
            if i % 7 == 0 {
                lines.push(format!(r#"{{"id": "c{}", "purposes": 1}}"#, i % 5000));
            }
            if i % 11 == 0 {
                lines.push(line(&format!("c{}", i % 3000), "other"));
                lines.push("# comment".into());
                lines.push(String::new());
                lines.push(r#"{"id": "#.into());
            }
        }
        let text = lines.join("\n");
        let (expected, report) = latest(text.as_bytes()).unwrap();
        let expected: Vec<(usize, String, bool)> = expected
            .into_iter()
            .map(|(line, word)| match word {
                Latest::Record(r) => (line, r.id, false),
                Latest::Withdrawn(id) => (line, id, true),
            })
            .collect();
        let (words, refused, superseded) = streamed(&text);
        assert_eq!(words, expected);
        assert_eq!(superseded, report.superseded.len());
        let skipped: Vec<usize> = report.skipped.iter().map(|e| e.line).collect();
        assert_eq!(refused, skipped);
    }

    #[test]
    fn a_repeated_id_is_written_once_at_its_last_line() {
        let text = [line("a", "p"), line("b", "p"), line("a", "q")].join("\n");
        let (words, _, superseded) = streamed(&text);
        assert_eq!(
            words,
            [(2, "b".to_string(), false), (3, "a".to_string(), false)]
        );
        assert_eq!(superseded, 1);
    }

    /// Chunks are written as they are read: once the file changes, no chunk read after it
    /// is sent as one (a line torn by the rewrite would otherwise withdraw its consent).
    #[test]
    fn no_chunk_is_sent_once_the_file_changed_under_the_read() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let chunks = 8;
        let text: String = (0..chunks * CHUNK)
            .map(|i| line(&format!("c{i}"), "p") + "\n")
            .collect();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        let input = Input::open(f.path()).unwrap();
        // One chunk in flight at a time: the reader waits for each to be taken.
        let (tx, mut rx) = mpsc::channel(1);
        let reader = std::thread::spawn(move || read(&input, Timestamp::now(), &tx));
        let first = rx.blocking_recv().unwrap();
        assert!(first.is_ok());
        std::io::Write::write_all(&mut f, line("late", "p").as_bytes()).unwrap();
        let (mut sent, mut failed) = (1, false);
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Ok(_) => sent += 1,
                Err(e) => {
                    assert!(e.to_string().contains("changed while"), "{e}");
                    failed = true;
                }
            }
        }
        assert!(failed, "the change was not reported");
        // The first, the one waiting in the channel, and one read before the write landed.
        assert!(
            sent <= 3,
            "{sent} of {chunks} chunks sent after the file changed"
        );
        assert!(reader.join().unwrap().is_err());
    }

    #[test]
    fn a_file_written_during_the_import_fails_it() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, format!("{}\n", line("c1", "scoring")).as_bytes())
            .unwrap();
        let input = Input::open(f.path()).unwrap();
        assert!(input.read().is_ok());
        std::io::Write::write_all(&mut f, format!("{}\n", line("c1", "other")).as_bytes()).unwrap();
        let e = input.read().unwrap_err();
        assert!(
            e.to_string()
                .contains("changed while it was being imported"),
            "{e}"
        );
    }
}
