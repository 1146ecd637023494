//! The log writer: one thread owns the file, takes records from a queue, chains them
//! (`seq`, `prev`, `hash`), writes each batch with one system call (group commit), syncs it
//! when asked, and only then releases the requests waiting on their records.
//!
//! A write that fails answers every record of its batch with [`LogFailed`], leaves the chain
//! head where it was, cuts the file back to its last complete record, and reopens the file by
//! its path before the next batch, so the writer recovers by itself once writing works again.
//!
//! Room for what comes next, in the same thread: signed checkpoints are one more line that
//! `Committer::commit` adds to the batch buffer when due (the 10 s timer can reach the thread
//! as one more `Request` variant, so it keeps a single blocking wait), and rotation is a
//! `Sink` switch between two batches.

use super::chain::{GENESIS, link_into};
use super::keys::SigningKey;
use super::record::Record;
use crate::policy::model::{Durability, LogSettings, LogTarget};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// Records that may wait for the writer before `append` itself waits for room.
const QUEUE_CAPACITY: usize = 64 * 1024;
/// Records committed by one write at most, which bounds the batch buffer and the time the
/// first request of a batch waits for the last.
const BATCH_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open decision log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("decision log {} ends in a record that does not parse (line {line}): {why}", path.display())]
    Tail {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("cannot start the decision log writer thread: {0}")]
    Spawn(std::io::Error),
}

/// The log could not take the record; nothing may be forwarded on its account.
#[derive(Clone, Debug, thiserror::Error)]
#[error("decision log unavailable: {0}")]
pub struct LogFailed(pub String);

type Ack = oneshot::Sender<Result<(), LogFailed>>;

enum Request {
    /// `ack` is `None` for records nobody waits on ([`LogWriter::append_later`]).
    Append {
        record: Record,
        ack: Option<Ack>,
    },
    Close(oneshot::Sender<()>),
}

/// What the writer has done, readable from any thread (metrics, readiness).
#[derive(Default)]
struct Counters {
    written: AtomicU64,
    failures: AtomicU64,
    dropped: AtomicU64,
    /// Whether the last batch was written (readiness).
    failing: std::sync::atomic::AtomicBool,
}

/// A handle to the writer thread; cheap to clone. When every handle is dropped without
/// [`LogWriter::close`], the thread still writes what was queued and then exits.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

impl LogWriter {
    /// Opens the log (creating parent directories), continues the chain of an existing file,
    /// and starts the writer thread.
    pub fn open(
        settings: &LogSettings,
        key: Option<Arc<SigningKey>>,
    ) -> Result<LogWriter, AuditError> {
        let (sink, head) = match &settings.target {
            LogTarget::Stdout => (Sink::Stdout(io::stdout()), None),
            LogTarget::File(path) => {
                let opened = LogFile::open(path).map_err(|e| e.into_audit(path))?;
                (Sink::File(opened.file), opened.head)
            }
        };
        let head = head.unwrap_or_else(Head::genesis);
        let counters = Arc::new(Counters::default());
        let committer = Committer {
            sink,
            durability: settings.durability,
            seq: head.seq,
            prev: head.hash,
            saved_prev: String::with_capacity(GENESIS.len()),
            buf: Vec::new(),
            key,
            counters: counters.clone(),
        };
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        // In `write` mode a batch costs one write() into the page cache, cheaper than waking
        // a thread and being woken back: the committer then runs as a task of the proxy's
        // runtime, and batches form from whatever requests are ready when it is polled.
        // `fsync` mode, and standard output (a pipe that may stall), get their own thread so
        // that a slow device never blocks the runtime.
        let inline =
            settings.durability == Durability::Write && matches!(committer.sink, Sink::File(_));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if inline => {
                runtime.spawn(committer.run_task(rx));
            }
            _ => {
                std::thread::Builder::new()
                    .name("decision-log".into())
                    .spawn(move || committer.run(rx))
                    .map_err(AuditError::Spawn)?;
            }
        }
        Ok(LogWriter { tx, counters })
    }

    /// Appends a record and resolves once it is durable as `durability` says: written to
    /// the file (and synced, in `fsync` mode) together with the rest of its batch.
    pub async fn append(&self, record: Record) -> Result<(), LogFailed> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Request::Append {
                record,
                ack: Some(ack),
            })
            .await
            .map_err(|_| stopped())?;
        done.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Queues a record without waiting for it (outcome records). Never blocks: when the
    /// queue is full, a task on the current tokio runtime waits for room instead of the
    /// caller (the record then lands a little later in the chain, which is harmless since
    /// the writer numbers records as it writes them). A record that cannot be queued at all
    /// (writer closed, or full queue outside a runtime) is counted in [`LogWriter::dropped`]
    /// and reported as an error event.
    pub fn append_later(&self, record: Record) {
        let request = Request::Append { record, ack: None };
        match self.tx.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(request)) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let tx = self.tx.clone();
                    let counters = self.counters.clone();
                    runtime.spawn(async move {
                        if tx.send(request).await.is_err() {
                            dropped(&counters, "the writer closed while the record waited");
                        }
                    });
                }
                Err(_) => dropped(&self.counters, "the queue is full"),
            },
            Err(TrySendError::Closed(_)) => dropped(&self.counters, "the writer is closed"),
        }
    }

    /// Writes everything queued and stops the writer; later appends fail.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Request::Close(ack)).await.is_ok() {
            // The thread answers after its last write and after closing the file.
            let _ = done.await;
        }
    }

    /// Records written since the writer started.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Records whose write failed (each was answered with [`LogFailed`], or, for
    /// `append_later`, only counted).
    pub fn failures(&self) -> u64 {
        self.counters.failures.load(Ordering::Relaxed)
    }

    /// Whether the writer has stopped (after `close`): nothing more can be logged.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether the last write succeeded (false after a failure, until a write works again).
    pub fn healthy(&self) -> bool {
        !self.counters.failing.load(Ordering::Relaxed)
    }

    /// `append_later` records that never reached the writer.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

fn stopped() -> LogFailed {
    LogFailed("the decision log writer has stopped".into())
}

fn dropped(counters: &Counters, why: &'static str) {
    counters.dropped.fetch_add(1, Ordering::Relaxed);
    tracing::error!(why, "decision record dropped before reaching the log");
}

/// The last record of the chain: the next record gets `seq + 1` and `prev = hash`.
struct Head {
    seq: u64,
    hash: String,
}

impl Head {
    fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

/// The state of the writer thread.
struct Committer {
    sink: Sink,
    durability: Durability,
    /// `seq` of the last record written.
    seq: u64,
    /// `hash` of the last record written.
    prev: String,
    /// The head before the batch in flight, restored if its write fails.
    saved_prev: String,
    /// The batch being written, reused from batch to batch.
    buf: Vec<u8>,
    /// Signs checkpoints (not yet written).
    key: Option<Arc<SigningKey>>,
    counters: Arc<Counters>,
}

impl Committer {
    fn announce(&self) {
        tracing::info!(
            log.target = %self.sink.name(),
            log.seq = self.seq,
            log.key = self.key.as_ref().map(|k| k.fingerprint()).as_deref().unwrap_or("none"),
            "decision log open"
        );
    }

    /// The committer as a task of the proxy's runtime (`write` durability to a file).
    async fn run_task(mut self, mut rx: mpsc::Receiver<Request>) {
        self.announce();
        let mut batch: Vec<(Record, Option<Ack>)> = Vec::with_capacity(BATCH_MAX);
        loop {
            let first = rx.recv().await;
            if let Some(ack) = self.step(first, &mut rx, &mut batch) {
                // The file closes before the closer hears back.
                drop(self);
                ack.map(|a| a.send(()));
                return;
            }
        }
    }

    /// The committer on its own thread.
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        self.announce();
        let mut batch: Vec<(Record, Option<Ack>)> = Vec::with_capacity(BATCH_MAX);
        loop {
            let first = rx.blocking_recv();
            if let Some(ack) = self.step(first, &mut rx, &mut batch) {
                drop(self);
                ack.map(|a| a.send(()));
                return;
            }
        }
    }

    /// Takes `first` and whatever else is queued, commits it as one batch. Returns `Some` when
    /// the writer must stop, holding the closer to answer once the file is closed.
    fn step(
        &mut self,
        first: Option<Request>,
        rx: &mut mpsc::Receiver<Request>,
        batch: &mut Vec<(Record, Option<Ack>)>,
    ) -> Option<Option<oneshot::Sender<()>>> {
        {
            let mut close = None;
            match first {
                // Every handle is gone and the queue is empty.
                None => return Some(None),
                Some(Request::Close(ack)) => close = Some(ack),
                Some(Request::Append { record, ack }) => {
                    batch.push((record, ack));
                    while batch.len() < BATCH_MAX {
                        match rx.try_recv() {
                            Ok(Request::Append { record, ack }) => batch.push((record, ack)),
                            Ok(Request::Close(ack)) => {
                                close = Some(ack);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            if let Some(ack) = close {
                rx.close();
                // Requests that raced with the close: waiters see their ack dropped (an error).
                while let Ok(request) = rx.try_recv() {
                    if let Request::Append { ack: None, .. } = request {
                        dropped(&self.counters, "the writer is closed");
                    }
                }
                return Some(Some(ack));
            }
        }
        None
    }

    /// Chains, writes and acknowledges one batch; empties `batch`.
    fn commit(&mut self, batch: &mut Vec<(Record, Option<Ack>)>) {
        let n = batch.len() as u64;
        let result = self
            .sink
            .prepare(&mut self.seq, &mut self.prev)
            .and_then(|()| {
                let first_seq = self.seq;
                self.saved_prev.clear();
                self.saved_prev.push_str(&self.prev);
                self.chain(batch);
                let written = self.sink.write(&self.buf, self.durability);
                if written.is_err() {
                    self.seq = first_seq;
                    std::mem::swap(&mut self.prev, &mut self.saved_prev);
                }
                written
            });
        let answer = match result {
            Ok(()) => {
                self.counters.written.fetch_add(n, Ordering::Relaxed);
                self.counters.failing.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.failures.fetch_add(n, Ordering::Relaxed);
                self.counters.failing.store(true, Ordering::Relaxed);
                tracing::error!(
                    log.target = %self.sink.name(),
                    log.next_seq = self.seq + 1,
                    records = n,
                    error = %e,
                    "decision log write failed"
                );
                Err(LogFailed(format!("{}: {e}", self.sink.name())))
            }
        };
        for (_, ack) in batch.drain(..) {
            if let Some(ack) = ack {
                let _ = ack.send(answer.clone());
            }
        }
    }

    /// Numbers and links the batch into `buf`, one line per record.
    fn chain(&mut self, batch: &mut [(Record, Option<Ack>)]) {
        self.buf.clear();
        let mut hash = [0u8; 64];
        for (record, _) in batch.iter_mut() {
            self.seq += 1;
            record.set_chain(self.seq, &self.prev);
            let start = self.buf.len();
            record.write_canonical(&mut self.buf);
            link_into(&self.prev, &self.buf[start..], &mut hash);
            // The canonical form is one JSON object: `hash` goes in before its closing brace.
            debug_assert_eq!(self.buf.last(), Some(&b'}'));
            self.buf.pop();
            self.buf.extend_from_slice(br#","hash":""#);
            self.buf.extend_from_slice(&hash);
            self.buf.extend_from_slice(b"\"}\n");
            self.prev.clear();
            self.prev
                .push_str(std::str::from_utf8(&hash).expect("hex is ASCII"));
        }
    }
}

/// Where the lines go.
enum Sink {
    Stdout(io::Stdout),
    File(LogFile),
}

impl Sink {
    fn name(&self) -> String {
        match self {
            Sink::Stdout(_) => "<stdout>".into(),
            Sink::File(f) => f.path.display().to_string(),
        }
    }

    /// Before a batch: after a failed write, reopen the file by its path (it may have been
    /// replaced, or its file system remounted) and continue from its last record, if any.
    fn prepare(&mut self, seq: &mut u64, prev: &mut String) -> io::Result<()> {
        let Sink::File(f) = self else { return Ok(()) };
        if !f.stale {
            return Ok(());
        }
        let opened = LogFile::open(&f.path).map_err(TailError::into_io)?;
        if let Some(head) = opened.head
            && (head.seq != *seq || head.hash != *prev)
        {
            tracing::warn!(
                log.path = %f.path.display(),
                log.seq = head.seq,
                "decision log changed while it could not be written; continuing from its last record"
            );
            *seq = head.seq;
            *prev = head.hash;
        }
        *f = opened.file;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8], durability: Durability) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(f) => f.write(bytes, durability),
        }
    }
}

/// The open log file.
struct LogFile {
    path: PathBuf,
    file: File,
    /// Length up to the last complete record we know of.
    len: u64,
    /// A write failed: reopen before the next one.
    stale: bool,
}

/// A file opened for appending, and the head of the chain it holds.
struct Opened {
    file: LogFile,
    head: Option<Head>,
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
    /// reads the chain head from the last complete one.
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
        let (len, head) = if meta.is_file() {
            read_tail(&file, meta.len(), path)?
        } else {
            // A device or a pipe: nothing to continue from, nothing to cut.
            (0, None)
        };
        Ok(Opened {
            file: LogFile {
                path: path.into(),
                file,
                len,
                stale: false,
            },
            head,
        })
    }

    fn write(&mut self, bytes: &[u8], durability: Durability) -> io::Result<()> {
        let result = self.file.write_all(bytes).and_then(|()| match durability {
            Durability::Fsync => self.file.sync_data(),
            Durability::Write => Ok(()),
        });
        match result {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Best effort: a partly written batch must not stay in front of the next one.
                if self.file.metadata().is_ok_and(|m| m.is_file())
                    && let Err(t) = self.file.set_len(self.len)
                {
                    tracing::warn!(
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
}

/// Finds the last complete line of a file of `len` bytes, reading backwards from the end.
/// Returns the length to keep (a torn last line is cut off) and the head it names.
fn read_tail(file: &File, len: u64, path: &Path) -> Result<(u64, Option<Head>), TailError> {
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
        let head = if complete == 0 {
            None
        } else {
            let head = parse_head(&buf[line_start..complete - 1]).map_err(|why| {
                match count_newlines(file, keep) {
                    Ok(line) => TailError::Bad { line, why },
                    Err(e) => TailError::Io(e),
                }
            })?;
            Some(head)
        };
        let torn = &buf[complete..];
        if !torn.is_empty() {
            // A crash mid-write leaves the start of a record; anything else is not ours to cut.
            if torn[0] != b'{' {
                return Err(TailError::Bad {
                    line: count_newlines(file, keep)? + 1,
                    why: format!("{} bytes after the last line are not a record", torn.len()),
                });
            }
            file.set_len(keep)?;
            tracing::warn!(
                log.path = %path.display(),
                bytes = torn.len(),
                "decision log ended in a torn record (a crash mid-write); cut it off"
            );
        }
        return Ok((keep, head));
    }
}

fn parse_head(line: &[u8]) -> Result<Head, String> {
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
    Ok(Head {
        seq,
        hash: hash.to_string(),
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
pub(crate) mod tests {
    use super::*;
    use crate::audit::record::{RequestContext, failure_record};
    use crate::audit::verify::verify;
    use crate::policy::{Policy, Reason};
    use serde_json::Value;

    fn policy() -> Policy {
        crate::policy::compile::from_str(
            "t.toml",
            "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n[[upstreams]]\nname='u'\nurl='http://127.0.0.1:1'\n",
        )
        .unwrap()
    }

    /// A realistic decision record whose id and path name `n`.
    fn record(policy: &Policy, n: usize) -> Record {
        let headers = http::HeaderMap::new();
        let path = format!("/payments/u{n}/2026-01.json");
        let cx = RequestContext {
            id: format!("r{n}"),
            ts: jiff::Timestamp::UNIX_EPOCH,
            method: "GET",
            host: Some("store.example"),
            raw_path: &path,
            query: None,
            headers: &headers,
            peer: "203.0.113.9".parse().unwrap(),
        };
        Record::Decision(Box::new(failure_record(
            policy,
            &cx,
            Reason::LogUnavailable,
            "log.on_failure",
        )))
    }

    fn settings(policy: &Policy, path: &Path, durability: Durability) -> LogSettings {
        let mut s = policy.log.clone();
        s.target = LogTarget::File(path.into());
        s.durability = durability;
        s
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Opens the log at `path`, appends records `ids` one by one, and closes it.
    pub(crate) async fn write_log(path: &Path, ids: std::ops::Range<usize>) {
        let p = policy();
        let w = LogWriter::open(&settings(&p, path, Durability::Write), None).unwrap();
        for n in ids {
            w.append(record(&p, n)).await.unwrap();
        }
        w.close().await;
    }

    /// Asserts the file holds records 1..=n, each linked to the one before.
    fn assert_chain(path: &Path, n: u64) -> Vec<Value> {
        let lines = lines(path);
        assert_eq!(lines.len() as u64, n);
        let mut prev = GENESIS.to_string();
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["seq"], i as u64 + 1, "line {}", i + 1);
            assert_eq!(l["prev"], prev.as_str(), "line {}", i + 1);
            prev = l["hash"].as_str().unwrap().to_string();
        }
        let report = verify(path).unwrap();
        assert_eq!(report.records, n);
        lines
    }

    #[tokio::test]
    async fn records_are_chained_in_order_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/logs/decisions.jsonl");
        let p = policy();
        let w = LogWriter::open(&settings(&p, &path, Durability::Write), None).unwrap();
        for n in 0..5 {
            w.append(record(&p, n)).await.unwrap();
        }
        // Concurrent appends share batches; each still gets its own place in the chain.
        let results = append_all(&w, (5..45).map(|n| record(&p, n)).collect()).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(w.written(), 45);
        w.close().await;
        let lines = assert_chain(&path, 45);
        let ids: Vec<_> = lines[..5].iter().map(|l| l["id"].clone()).collect();
        assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4"]);
        assert_eq!(lines[0]["request"]["path"], "/payments/u0/2026-01.json");
    }

    #[tokio::test]
    async fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        write_log(&path, 0..3).await;
        write_log(&path, 3..6).await;
        let lines = assert_chain(&path, 6);
        assert_eq!(lines[3]["id"], "r3");
    }

    #[tokio::test]
    async fn fsync_mode_acknowledges_after_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let p = policy();
        let w = LogWriter::open(&settings(&p, &path, Durability::Fsync), None).unwrap();
        for n in 0..3 {
            w.append(record(&p, n)).await.unwrap();
            // Acknowledged means on disk, not merely queued: the line is already there.
            assert_eq!(lines(&path).len(), n + 1);
        }
        w.close().await;
        assert_chain(&path, 3);
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_and_the_writer_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        // /dev/full fails every write with ENOSPC, for root too.
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let p = policy();
        let w = LogWriter::open(&settings(&p, &path, Durability::Fsync), None).unwrap();
        let results = append_all(&w, (0..3).map(|n| record(&p, n)).collect::<Vec<_>>()).await;
        for r in &results {
            let e = r.as_ref().unwrap_err();
            assert!(e.0.contains("d.jsonl"), "{e}");
            assert!(e.to_string().contains("space"), "{e}");
        }
        assert_eq!(w.failures(), 3);
        assert_eq!(w.written(), 0);
        // Space is back: the path now leads to a regular file.
        std::fs::remove_file(&path).unwrap();
        w.append(record(&p, 10)).await.unwrap();
        w.append(record(&p, 11)).await.unwrap();
        w.close().await;
        assert_eq!((w.written(), w.failures()), (2, 3));
        // The failed records took no place in the chain.
        let lines = assert_chain(&path, 2);
        assert_eq!(lines[0]["id"], "r10");
    }

    /// Appends all records concurrently, so that they can share a batch.
    async fn append_all(w: &LogWriter, records: Vec<Record>) -> Vec<Result<(), LogFailed>> {
        let tasks: Vec<_> = records
            .into_iter()
            .map(|r| {
                let w = w.clone();
                tokio::spawn(async move { w.append(r).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        write_log(&path, 0..3).await;
        let complete = std::fs::read(&path).unwrap();
        let mut torn = complete.clone();
        torn.extend_from_slice(br#"{"category":null,"client":{"coun"#);
        std::fs::write(&path, &torn).unwrap();

        write_log(&path, 3..4).await;
        assert_chain(&path, 4);
        assert!(std::fs::read(&path).unwrap().starts_with(&complete));
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

    #[tokio::test]
    async fn close_drains_the_queue_and_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let p = policy();
        let w = LogWriter::open(&settings(&p, &path, Durability::Write), None).unwrap();
        for n in 0..200 {
            w.append_later(record(&p, n));
        }
        w.close().await;
        assert_eq!(w.written(), 200);
        assert_chain(&path, 200);
        assert!(w.append(record(&p, 200)).await.is_err());
        w.append_later(record(&p, 201));
        assert_eq!(w.dropped(), 1);
        assert_eq!(lines(&path).len(), 200);
    }
}
