//! The log writer: one committer owns the file, takes records from a queue, chains them
//! (`seq`, `prev`, `hash`), writes each batch with one system call (group commit), syncs it
//! when asked, and only then releases the requests waiting on their records. In `write`
//! durability to a file the committer is a task of the proxy's runtime; otherwise (`fsync`,
//! standard output) it has its own thread, so that a slow device never blocks the runtime.
//!
//! Signed checkpoints are lines the committer adds to a batch: after every `checkpoint_every`
//! records, on a timer tick (every `checkpoint_interval`) while records are unsigned, at the
//! end of a file being rotated, and on close (`"final": true`). Rotation (by size after a
//! batch, or on request) renames the active file between two batches; the chain runs on in
//! the new file (names: [`super::files`]).
//!
//! A write that fails answers every record of its batch with [`LogFailed`], leaves the chain
//! head where it was, cuts the file back to its last complete record, and reopens the file by
//! its path before the next batch, so the writer recovers by itself once writing works again.
//! If the reopened file no longer ends with the head the writer holds (cut back, replaced,
//! or a failed batch that could not be cut off), the chain goes on from the file's last
//! record after a `recovery` record naming both, which `audit verify` judges.
//!
//! Every batch that holds a checkpoint is followed by an info event with that checkpoint's
//! `seq` and `hash`: kept outside the log volume (the proxy's own logs, shipped elsewhere),
//! these heads let `audit verify --head` prove that the log was not cut back since.
//!
//! At open, a log that does not end in a final checkpoint was not closed cleanly (a crash,
//! kill -9, a power cut): the torn tail of a half-written record is cut, and the first lines
//! written are a `recovery` record saying what was found and a checkpoint that signs it.
//!
//! One file for one idea, the committer's ownership of the file: opening and recovery,
//! batching, chaining, writing and rotating all act on the same head (`seq`, `prev`) and the
//! same open file. About 1,300 of its lines are code, the rest its tests.

use super::chain::{GENESIS, link_into};
use super::checkpoint::{self, KeyFields};
use super::files::{self, LogFilesError};
use super::keys::SigningKey;
use super::record::{ExpectedHead, Link, Record, RecoveryRecord, VERSION, timestamp};
use super::ship::{self, Spool};
use crate::policy::model::{Durability, LogSettings, LogTarget};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
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
    #[error(transparent)]
    Files(#[from] LogFilesError),
    #[error("cannot start the decision log writer thread: {0}")]
    Spawn(std::io::Error),
}

/// The log could not take the record; nothing may be forwarded on its account.
#[derive(Clone, Debug, thiserror::Error)]
#[error("decision log unavailable: {0}")]
pub struct LogFailed(pub String);

type Ack = oneshot::Sender<Result<(), LogFailed>>;
type RotateAck = oneshot::Sender<Result<Option<PathBuf>, LogFailed>>;

// Records travel by value: a slot of the queue costs what the largest record costs, and an
// outcome record (queued for every request) is not boxed again.
#[allow(clippy::large_enum_variant)]
enum Request {
    /// `ack` is `None` for records nobody waits on ([`LogWriter::append_later`]).
    Append {
        record: Record,
        ack: Option<Ack>,
    },
    /// The checkpoint timer: sign what is unsigned.
    Tick,
    Rotate(RotateAck),
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
    batches: AtomicU64,
    syncs: AtomicU64,
    checkpoints: AtomicU64,
    rotations: AtomicU64,
    write_errors: AtomicU64,
}

/// What the writer has done so far, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Decision and outcome records written.
    pub written: u64,
    /// Records whose write failed (each answered with [`LogFailed`], or only counted).
    pub failures: u64,
    /// `append_later` records that never reached the writer.
    pub dropped: u64,
    /// Successful writes, one system call each (group commit: `written / batches` records
    /// share one).
    pub batches: u64,
    /// Successful fsyncs in `fsync` durability (`written / syncs` records share one).
    pub syncs: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Files rotated.
    pub rotations: u64,
    /// Failed writes of any kind (a batch, a checkpoint, a rotation): each is also an error
    /// event.
    pub write_errors: u64,
}

/// A handle to the writer; cheap to clone. When every handle is dropped without
/// [`LogWriter::close`], the writer still writes what was queued, then a final checkpoint,
/// and exits.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

impl LogWriter {
    /// Opens the log (creating parent directories), continues the chain of an existing log
    /// (after a `recovery` record if it was not closed cleanly), and starts the writer.
    /// Checkpoints are signed with `key`, or written unsigned without one.
    pub fn open(
        settings: &LogSettings,
        key: Option<Arc<SigningKey>>,
    ) -> Result<LogWriter, AuditError> {
        LogWriter::open_spooled(settings, key, None)
    }

    /// [`LogWriter::open`] for a log that ships: sealed files are counted in `spool`, whose
    /// shipper is told of each, and records are refused while the spool is full. On close
    /// the active file is sealed too, so that its final checkpoint ships.
    pub fn open_spooled(
        settings: &LogSettings,
        key: Option<Arc<SigningKey>>,
        spool: Option<Arc<Spool>>,
    ) -> Result<LogWriter, AuditError> {
        let mut committer = Committer::open(settings, key)?;
        committer.spool = spool;
        let counters = committer.counters.clone();
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
        start_timer(&tx, tick_period(settings));
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

    /// Queues `record` now and returns the wait for the writer's answer. Unlike
    /// [`LogWriter::append`], the record is in the queue when this returns, so a caller that
    /// gives up on the answer (a deadline, a client that went away) does not take the record
    /// with it. When the queue is full, a task waits for room instead of the caller.
    pub fn append_queued(
        &self,
        record: Record,
    ) -> impl Future<Output = Result<(), LogFailed>> + use<> {
        let (ack, done) = oneshot::channel();
        let request = Request::Append {
            record,
            ack: Some(ack),
        };
        let queued = match self.tx.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(request)) => {
                // Dropped unsent (writer closed), the request drops its ack: `done` says so.
                let tx = self.tx.clone();
                tokio::spawn(async move { tx.send(request).await });
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(stopped()),
        };
        async move {
            queued?;
            done.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// Closes the active file with a checkpoint, renames it to its rotated name, and goes on
    /// in a new active file. Returns the rotated file's new path, or `None` when there was
    /// nothing to rotate (an empty file, or standard output).
    pub async fn rotate(&self) -> Result<Option<PathBuf>, LogFailed> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Request::Rotate(ack))
            .await
            .map_err(|_| stopped())?;
        done.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Writes everything queued and a final checkpoint, and stops the writer; later appends
    /// fail.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Request::Close(ack)).await.is_ok() {
            // The writer answers after its last write and after closing the file.
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

    /// Everything the writer counts.
    pub fn stats(&self) -> LogStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LogStats {
            written: get(&c.written),
            failures: get(&c.failures),
            dropped: get(&c.dropped),
            batches: get(&c.batches),
            syncs: get(&c.syncs),
            checkpoints: get(&c.checkpoints),
            rotations: get(&c.rotations),
            write_errors: get(&c.write_errors),
        }
    }
}

fn stopped() -> LogFailed {
    LogFailed("the decision log writer has stopped".into())
}

fn dropped(counters: &Counters, why: &'static str) {
    counters.dropped.fetch_add(1, Ordering::Relaxed);
    tracing::error!(why, "decision record dropped before reaching the log");
}

/// How often the writer looks at the clock: often enough to checkpoint every
/// `checkpoint_interval` and to seal a file within a tenth of `rotate_interval` of its due time.
fn tick_period(settings: &LogSettings) -> Duration {
    match settings.rotate_interval {
        Some(r) => settings
            .checkpoint_interval
            .min((r / 10).max(Duration::from_millis(100))),
        None => settings.checkpoint_interval,
    }
}

/// Sends the writer a `Tick` every `every`, for as long as a handle to it exists. It holds
/// only a weak sender, so it never keeps the writer alive.
fn start_timer(tx: &mpsc::Sender<Request>, every: Duration) {
    let weak = tx.downgrade();
    // False once the writer is gone.
    let tick = move || match weak.upgrade() {
        None => false,
        // A full queue means the writer is busy and checkpoints by count anyway.
        Some(tx) => !matches!(tx.try_send(Request::Tick), Err(TrySendError::Closed(_))),
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                let start = tokio::time::Instant::now() + every;
                let mut timer = tokio::time::interval_at(start, every);
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    timer.tick().await;
                    if !tick() {
                        return;
                    }
                }
            });
        }
        Err(_) => {
            let spawned = std::thread::Builder::new()
                .name("decision-log-timer".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        if !tick() {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no checkpoint timer: checkpoints are written by count and on close only");
            }
        }
    }
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

/// Where the writer starts: the chain head, and a recovery record to write first if the log
/// was not closed cleanly.
struct Start {
    head: Head,
    recovery: Option<RecoveryRecord>,
}

impl Start {
    fn empty() -> Start {
        Start {
            head: Head::genesis(),
            recovery: None,
        }
    }
}

/// Opens the active file and finds where the chain stands: at the end of the active file,
/// or, when that is empty (just rotated), at the end of the last rotated file.
fn open_log(path: &Path) -> Result<(LogFile, Start), AuditError> {
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
    let head = tail.map_or_else(Head::genesis, |t| t.head);
    Ok((opened.file, Start { head, recovery }))
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

/// What a batch ends with besides its records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Nothing,
    /// A checkpoint, if any record is unsigned.
    Checkpoint,
    /// The final checkpoint of a clean close.
    Final,
}

/// The state of the writer.
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
    /// The bytes a checkpoint signs, reused.
    scratch: Vec<u8>,
    key: Option<Arc<SigningKey>>,
    key_fields: Option<KeyFields>,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    /// How often a tick comes ([`tick_period`]).
    tick_every: Duration,
    /// When the last checkpoint was written: a tick that comes more often than
    /// `checkpoint_interval` (to seal on time) adds one only once this is that old.
    last_checkpoint: std::time::Instant,
    rotate_bytes: u64,
    rotate_interval: Option<Duration>,
    /// When the active file got its first record (it is sealed once `rotate_interval` old).
    file_started: Option<std::time::Instant>,
    /// The chain's name, written into every record.
    instance: Arc<str>,
    /// Sealed files waiting to ship, when the log ships.
    spool: Option<Arc<Spool>>,
    /// Records written since the last checkpoint.
    unsigned: u64,
    /// Written (with a checkpoint) before anything else, until a write succeeds.
    recovery: Option<RecoveryRecord>,
    /// `seq`, `hash` and finality of the last checkpoint in the batch being written.
    checkpoint_head: Option<(u64, String, bool)>,
    counters: Arc<Counters>,
}

impl Committer {
    /// Opens the log `settings` name and finds where its chain stands.
    fn open(settings: &LogSettings, key: Option<Arc<SigningKey>>) -> Result<Committer, AuditError> {
        let (sink, start) = match &settings.target {
            LogTarget::Stdout => (Sink::Stdout(io::stdout()), Start::empty()),
            LogTarget::File(path) => {
                let (file, start) = open_log(path)?;
                (Sink::File(file), start)
            }
        };
        Ok(Committer {
            sink,
            durability: settings.durability,
            seq: start.head.seq,
            prev: start.head.hash,
            saved_prev: String::with_capacity(GENESIS.len()),
            buf: Vec::new(),
            scratch: Vec::new(),
            key_fields: key.as_deref().map(KeyFields::of),
            key,
            checkpoint_every: settings.checkpoint_every.max(1),
            checkpoint_interval: settings.checkpoint_interval,
            tick_every: tick_period(settings),
            last_checkpoint: std::time::Instant::now(),
            rotate_bytes: settings.rotate_bytes,
            rotate_interval: settings.rotate_interval,
            file_started: None,
            instance: settings.instance.clone(),
            spool: None,
            unsigned: 0,
            recovery: start.recovery,
            checkpoint_head: None,
            counters: Arc::new(Counters::default()),
        })
    }

    fn announce(&mut self) {
        tracing::info!(
            log.target = %self.sink.name(),
            log.seq = self.seq,
            log.hash = %self.prev,
            log.key = self.key_fields.as_ref().map(|k| k.fingerprint.as_str()).unwrap_or("none"),
            "decision log open"
        );
        if let Some(r) = &self.recovery {
            tracing::warn!(
                log.target = %self.sink.name(),
                log.file = %r.file,
                log.last_seq = r.last_seq,
                log.torn_bytes = r.torn_bytes,
                "decision log was not closed cleanly (a crash?): continuing the chain with a recovery record"
            );
            // Written now rather than with the first request, so that the records found are
            // signed at once.
            let _ = self.commit(&mut Vec::new(), End::Nothing);
        }
    }

    /// The committer as a task of the proxy's runtime (`write` durability to a file).
    async fn run_task(mut self, mut rx: mpsc::Receiver<Request>) {
        self.announce();
        let mut batch: Vec<(Record, Option<Ack>)> = Vec::with_capacity(BATCH_MAX);
        loop {
            let first = rx.recv().await;
            // The runtime polls a task it has just woken first: without stepping aside once,
            // every record would be a batch of its own. Yielding lets the requests that are
            // ready queue their records, and one write then takes them all.
            if rx.is_empty() {
                tokio::task::yield_now().await;
            }
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

    /// Takes `first` and whatever else is queued, commits it as one batch, then carries out
    /// a control request if one came. Returns `Some` when the writer must stop, holding the
    /// closer to answer once the file is closed.
    fn step(
        &mut self,
        first: Option<Request>,
        rx: &mut mpsc::Receiver<Request>,
        batch: &mut Vec<(Record, Option<Ack>)>,
    ) -> Option<Option<oneshot::Sender<()>>> {
        let mut control = match first {
            // Every handle is gone and the queue is empty.
            None => {
                self.finish();
                return Some(None);
            }
            Some(Request::Append { record, ack }) => {
                batch.push((record, ack));
                None
            }
            Some(other) => Some(other),
        };
        while control.is_none() && batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(Request::Append { record, ack }) => batch.push((record, ack)),
                Ok(other) => control = Some(other),
                Err(_) => break,
            }
        }
        if !batch.is_empty() && self.commit(batch, End::Nothing).is_ok() {
            self.rotate_if_full();
        }
        match control? {
            Request::Append { .. } => None,
            Request::Tick => {
                let now = std::time::Instant::now();
                let due = self.tick_every >= self.checkpoint_interval
                    || now.duration_since(self.last_checkpoint) >= self.checkpoint_interval;
                if (due && self.unsigned > 0) || self.recovery.is_some() {
                    let _ = self.commit(&mut Vec::new(), End::Checkpoint);
                }
                if let (Some(every), Some(started)) = (self.rotate_interval, self.file_started)
                    && now.duration_since(started) >= every
                {
                    let _ = self.rotate();
                }
                None
            }
            Request::Rotate(ack) => {
                let _ = ack.send(self.rotate());
                None
            }
            Request::Close(ack) => {
                rx.close();
                // Requests that raced with the close: waiters see their ack dropped (an error).
                while let Ok(request) = rx.try_recv() {
                    if let Request::Append { ack: None, .. } = request {
                        dropped(&self.counters, "the writer is closed");
                    }
                }
                self.finish();
                if self.spool.is_some() {
                    // The final checkpoint ships with the rest.
                    let _ = self.rotate();
                }
                Some(Some(ack))
            }
        }
    }

    /// The final checkpoint of a clean close.
    fn finish(&mut self) {
        let ok = self.commit(&mut Vec::new(), End::Final).is_ok();
        let stats = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        tracing::info!(
            log.target = %self.sink.name(),
            log.seq = self.seq,
            log.final_checkpoint = ok,
            records = stats(&c.written),
            batches = stats(&c.batches),
            syncs = stats(&c.syncs),
            checkpoints = stats(&c.checkpoints),
            "decision log closed"
        );
    }

    /// Chains, writes and acknowledges one batch (with whatever checkpoints and recovery
    /// record are due); empties `batch`.
    fn commit(
        &mut self,
        batch: &mut Vec<(Record, Option<Ack>)>,
        end: End,
    ) -> Result<(), LogFailed> {
        let n = batch.len() as u64;
        match self.sink.prepare(&mut self.seq, &mut self.prev) {
            Ok(None) => {}
            // Replaces a recovery still pending: the chain now goes on from this file.
            Ok(Some(changed)) => self.recovery = Some(changed),
            Err(e) => return self.failed(batch, e),
        }
        if !batch.is_empty()
            && let Some(why) = self.spool.as_ref().and_then(|s| s.full())
        {
            return self.failed(batch, io::Error::other(why));
        }
        let (first_seq, unsigned) = (self.seq, self.unsigned);
        self.saved_prev.clear();
        self.saved_prev.push_str(&self.prev);
        let (checkpoints, recovered) = self.chain(batch, end);
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.sink.write(&self.buf, self.durability, first_seq + 1) {
            self.seq = first_seq;
            self.unsigned = unsigned;
            std::mem::swap(&mut self.prev, &mut self.saved_prev);
            return self.failed(batch, e);
        }
        self.file_started
            .get_or_insert_with(std::time::Instant::now);
        let c = &self.counters;
        c.written.fetch_add(n, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.failing.store(false, Ordering::Relaxed);
        c.checkpoints.fetch_add(checkpoints, Ordering::Relaxed);
        if self.durability == Durability::Fsync && matches!(self.sink, Sink::File(_)) {
            c.syncs.fetch_add(1, Ordering::Relaxed);
        }
        if recovered {
            self.recovery = None;
        }
        if let Some((seq, hash, final_)) = self.checkpoint_head.take() {
            tracing::info!(
                log.target = %self.sink.name(),
                log.seq = seq,
                log.hash = %hash,
                log.final_checkpoint = final_,
                log.signed = self.key.is_some(),
                "decision log checkpoint"
            );
        }
        for (_, ack) in batch.drain(..) {
            if let Some(ack) = ack {
                let _ = ack.send(Ok(()));
            }
        }
        Ok(())
    }

    /// Counts a failed write, reports it, and answers the batch with the error.
    fn failed(
        &mut self,
        batch: &mut Vec<(Record, Option<Ack>)>,
        e: io::Error,
    ) -> Result<(), LogFailed> {
        let n = batch.len() as u64;
        self.counters.failures.fetch_add(n, Ordering::Relaxed);
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        self.counters.failing.store(true, Ordering::Relaxed);
        tracing::error!(
            log.target = %self.sink.name(),
            log.next_seq = self.seq + 1,
            records = n,
            error = %e,
            "decision log write failed"
        );
        let err = LogFailed(format!("{}: {e}", self.sink.name()));
        for (_, ack) in batch.drain(..) {
            if let Some(ack) = ack {
                let _ = ack.send(Err(err.clone()));
            }
        }
        Err(err)
    }

    /// Numbers and links into `buf`, one line each: a pending recovery record and its
    /// checkpoint, the batch with a checkpoint after every `checkpoint_every` records, and
    /// what `end` asks for. Returns the checkpoints added and whether the recovery record is.
    fn chain(&mut self, batch: &mut [(Record, Option<Ack>)], end: End) -> (u64, bool) {
        self.buf.clear();
        self.checkpoint_head = None;
        let mut checkpoints = 0;
        let recovered = match self.recovery.clone() {
            Some(r) => {
                self.push(&mut Record::Recovery(r));
                self.push_checkpoint(false);
                checkpoints += 1;
                true
            }
            None => false,
        };
        for (record, _) in batch.iter_mut() {
            self.push(record);
            self.unsigned += 1;
            if self.unsigned >= self.checkpoint_every {
                self.push_checkpoint(false);
                checkpoints += 1;
            }
        }
        let checkpoint = match end {
            End::Nothing => None,
            End::Checkpoint => (self.unsigned > 0).then_some(false),
            End::Final => Some(true),
        };
        if let Some(final_) = checkpoint {
            self.push_checkpoint(final_);
            checkpoints += 1;
        }
        (checkpoints, recovered)
    }

    /// Appends one record to `buf` as the next link of the chain.
    fn push(&mut self, record: &mut Record) {
        let mut hash = [0u8; 64];
        self.seq += 1;
        record.set_chain(self.seq, &self.prev, Some(&self.instance));
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

    /// Appends a checkpoint over the current head, signed when there is a key.
    fn push_checkpoint(&mut self, final_: bool) {
        let mut cp = checkpoint::unsigned(
            self.key_fields.as_ref(),
            final_,
            timestamp(jiff::Timestamp::now()),
        );
        cp.seq = self.seq + 1;
        cp.prev.set(&self.prev);
        // Signed with the chain's name: a checkpoint cannot be moved to another instance.
        cp.instance = Some(self.instance.clone());
        if let Some(key) = &self.key {
            checkpoint::sign(&mut cp, key, &mut self.scratch);
        }
        self.push(&mut Record::Checkpoint(cp));
        self.unsigned = 0;
        self.last_checkpoint = std::time::Instant::now();
        self.checkpoint_head = Some((self.seq, self.prev.clone(), final_));
    }

    fn rotate_if_full(&mut self) {
        if let Sink::File(f) = &self.sink
            && f.regular
            && f.len >= self.rotate_bytes
        {
            let _ = self.rotate();
        }
    }

    /// Closes the active file with a checkpoint and renames it; the chain goes on in a new
    /// active file.
    fn rotate(&mut self) -> Result<Option<PathBuf>, LogFailed> {
        match &self.sink {
            Sink::File(f) if f.regular && (f.len > 0 || f.stale) => {}
            _ => return Ok(None),
        }
        // Every rotated file ends in a checkpoint: it is signed to its last record.
        self.commit(&mut Vec::new(), End::Checkpoint)?;
        let Sink::File(f) = &mut self.sink else {
            return Ok(None);
        };
        if f.len == 0 {
            return Ok(None);
        }
        match f.rotate(self.seq, self.durability) {
            Ok(to) => {
                self.file_started = None;
                if let Some(spool) = &self.spool {
                    spool.sealed();
                }
                self.counters.rotations.fetch_add(1, Ordering::Relaxed);
                tracing::info!(log.path = %f.path.display(), log.rotated = %to.display(), log.seq = self.seq, "decision log rotated");
                Ok(Some(to))
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(log.path = %f.path.display(), error = %e, "decision log rotation failed; writing on in the same file");
                Err(LogFailed(format!(
                    "cannot rotate {}: {e}",
                    f.path.display()
                )))
            }
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
    /// When that record is not the head the writer holds, the file changed under it: returns
    /// the recovery record to write first, so that the change is in the chain (and verify
    /// can fail a log that lost records) rather than only in the proxy's own logs.
    fn prepare(&mut self, seq: &mut u64, prev: &mut String) -> io::Result<Option<RecoveryRecord>> {
        let Sink::File(f) = self else { return Ok(None) };
        if !f.stale {
            return Ok(None);
        }
        let opened = LogFile::open(&f.path).map_err(TailError::into_io)?;
        let mut changed = None;
        if let Some(tail) = opened.tail
            && (tail.head.seq != *seq || tail.head.hash != *prev)
        {
            tracing::warn!(
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
    fn write(&mut self, bytes: &[u8], durability: Durability, first_seq: u64) -> io::Result<()> {
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
struct LogFile {
    path: PathBuf,
    file: File,
    /// Length up to the last complete record we know of.
    len: u64,
    /// A write failed: reopen before the next one.
    stale: bool,
    /// A regular file, which can be read back, cut and rotated (not a device or a pipe).
    regular: bool,
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

    /// Renames the file to its rotated name and opens a new, empty one at `path`. `last_seq`
    /// names the file if its first record could not be read. In `fsync` durability the
    /// closed file, the rename and the new file are synced; in `write` durability (where
    /// this runs on a runtime thread) the OS is trusted with them, as with every record.
    fn rotate(&mut self, last_seq: u64, durability: Durability) -> io::Result<PathBuf> {
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
                tracing::warn!(log.path = %self.path.display(), error = %e, "cannot create the new decision log file; retrying before the next write");
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
            tracing::warn!(log.dir = %dir.display(), error = %e, "cannot sync the decision log directory after rotation");
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
            tracing::warn!(
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
    use crate::audit::verify::{VerifyOptions, VerifyReport, verify, verify_with};
    use crate::policy::{Policy, Reason};
    use serde_json::Value;

    pub(crate) fn policy() -> Policy {
        crate::policy::compile::from_str(
            "t.toml",
            "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n[[upstreams]]\nname='u'\nurl='http://127.0.0.1:1'\n",
        )
        .unwrap()
    }

    /// A fresh Ed25519 signing key.
    pub(crate) fn test_key() -> Arc<SigningKey> {
        let pem = SigningKey::generate_pem();
        Arc::new(SigningKey::from_pem(pem.as_bytes(), Path::new("test.key")).unwrap())
    }

    fn trusting(key: &SigningKey) -> VerifyOptions {
        VerifyOptions {
            keys: vec![key.public_key().to_vec()],
            ..VerifyOptions::default()
        }
    }

    /// A realistic decision record whose id and path name `n`.
    pub(crate) fn record(policy: &Policy, n: usize) -> Record {
        let headers = http::HeaderMap::new();
        let path = format!("/payments/u{n}/2026-01.json");
        let cx = RequestContext {
            id: format!("r{n}").as_str().into(),
            ts: jiff::Timestamp::UNIX_EPOCH,
            method: &http::Method::GET,
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

    pub(crate) fn settings(policy: &Policy, path: &Path, durability: Durability) -> LogSettings {
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

    fn of_kind(lines: &[Value], kind: &str) -> Vec<Value> {
        lines
            .iter()
            .filter(|l| l["kind"] == kind)
            .cloned()
            .collect()
    }

    /// Opens the log at `path`, appends records `ids` one by one, and closes it.
    pub(crate) async fn write_log(path: &Path, ids: std::ops::Range<usize>) {
        write_log_with(path, ids, None, |_| {}).await;
    }

    /// [`write_log`] with a signing key and settings changed by `tweak`.
    pub(crate) async fn write_log_with(
        path: &Path,
        ids: std::ops::Range<usize>,
        key: Option<Arc<SigningKey>>,
        tweak: impl FnOnce(&mut LogSettings),
    ) {
        let p = policy();
        let mut s = settings(&p, path, Durability::Write);
        tweak(&mut s);
        let w = LogWriter::open(&s, key).unwrap();
        for n in ids {
            w.append(record(&p, n)).await.unwrap();
        }
        w.close().await;
    }

    /// Asserts the file is one chain from the genesis, that it verifies, and that it holds
    /// `n` decision records; returns them.
    fn assert_chain(path: &Path, n: usize) -> Vec<Value> {
        let lines = lines(path);
        let mut prev = GENESIS.to_string();
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["seq"], i as u64 + 1, "line {}", i + 1);
            assert_eq!(l["prev"], prev.as_str(), "line {}", i + 1);
            prev = l["hash"].as_str().unwrap().to_string();
        }
        verify(path).unwrap_or_else(|e| panic!("the log does not verify: {e}"));
        let decisions = of_kind(&lines, "decision");
        assert_eq!(decisions.len(), n);
        decisions
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
    async fn reopening_a_cleanly_closed_log_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        write_log(&path, 0..3).await;
        write_log(&path, 3..6).await;
        let lines = assert_chain(&path, 6);
        assert_eq!(lines[3]["id"], "r3");
        let all = self::lines(&path);
        // Each run ends in a final checkpoint, and a clean close needs no recovery record.
        assert_eq!(all[3]["kind"], "checkpoint");
        assert_eq!(all[3]["final"], true);
        assert!(of_kind(&all, "recovery").is_empty());
    }

    #[tokio::test]
    async fn checkpoints_are_signed_every_n_records_and_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let key = test_key();
        write_log_with(&path, 0..25, Some(key.clone()), |s| s.checkpoint_every = 10).await;
        let all = lines(&path);
        let checkpoints = of_kind(&all, "checkpoint");
        let at: Vec<_> = checkpoints
            .iter()
            .map(|c| c["seq"].as_u64().unwrap())
            .collect();
        // After records 10 and 20 (seq 11 and 22), and the final one after record 25.
        assert_eq!(at, [11, 22, 28]);
        let finals: Vec<_> = checkpoints.iter().map(|c| c["final"].clone()).collect();
        assert_eq!(finals, [false, false, true]);
        for c in &checkpoints {
            assert_eq!(c["key"], key.fingerprint().as_str());
            assert_eq!(c["public_key"], hex::encode(key.public_key()).as_str());
            assert_eq!(c["sig"].as_str().unwrap().len(), 128);
        }
        let report = verify_with(&path, &trusting(&key)).unwrap();
        assert_eq!(
            (report.records, report.checkpoints, report.signed),
            (25, 3, 3)
        );
    }

    #[tokio::test]
    async fn a_checkpoint_is_written_on_the_timer_while_records_are_unsigned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let p = policy();
        let key = test_key();
        let mut s = settings(&p, &path, Durability::Write);
        s.checkpoint_interval = Duration::from_millis(50);
        let w = LogWriter::open(&s, Some(key.clone())).unwrap();
        w.append(record(&p, 0)).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while of_kind(&lines(&path), "checkpoint").is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no timed checkpoint"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The open log is signed up to its last record.
        let open = VerifyOptions {
            open: true,
            ..trusting(&key)
        };
        let report = verify_with(&path, &open).unwrap();
        assert_eq!((report.records, report.unsigned_tail), (1, 0));
        assert_eq!(of_kind(&lines(&path), "checkpoint")[0]["final"], false);
        w.close().await;
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
        // One sync per batch; appends one at a time make one batch each.
        assert_eq!(w.stats().syncs, 3);
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
        assert!(w.stats().write_errors >= 1);
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

    /// Runs `f` on a runtime that is then dropped without closing the writer: for a writer
    /// in `write` mode, whose committer is a task of that runtime, this is a crash.
    fn crash_after<F: std::future::Future<Output = ()>>(f: F) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f);
        drop(rt);
    }

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

    /// Commits `records` as one batch on a committer driven by hand, ending as `end` says.
    fn commit_all(c: &mut Committer, records: impl Iterator<Item = Record>, end: End) {
        let mut batch: Vec<_> = records.map(|r| (r, None)).collect();
        c.commit(&mut batch, end).unwrap();
    }

    /// Found by review: a file that changed while it could not be written (cut back,
    /// replaced) was adopted with only a warning in the proxy's own logs, and the next
    /// checkpoint signed the shortened chain. The chain now says so, and verify fails it.
    #[test]
    fn regression_a_file_cut_back_during_a_failed_write_was_adopted_silently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let key = test_key();
        let p = policy();
        let mut s = settings(&p, &path, Durability::Write);
        s.checkpoint_every = 4;
        let mut c = Committer::open(&s, Some(key.clone())).unwrap();
        // Records 1-4, a checkpoint (seq 5), records 6-9, a checkpoint (seq 10).
        commit_all(&mut c, (0..8).map(|n| record(&p, n)), End::Nothing);
        let written = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = written.split_inclusive('\n').take(5).collect();
        // A write fails (the file is then reopened before the next batch), and meanwhile
        // someone cuts the file back to its first checkpoint.
        let Sink::File(f) = &mut c.sink else {
            unreachable!()
        };
        f.stale = true;
        std::fs::write(&path, kept.concat()).unwrap();
        commit_all(&mut c, (8..10).map(|n| record(&p, n)), End::Final);

        let all = lines(&path);
        let recovery = &all[5];
        assert_eq!(recovery["kind"], "recovery", "{recovery}");
        assert_eq!(recovery["last_seq"], 5);
        assert_eq!(recovery["expected"]["seq"], 10);
        assert_eq!(all[6]["kind"], "checkpoint");
        let b = verify_with(&path, &trusting(&key)).unwrap_err();
        assert_eq!(b.line, 6, "{b}");
        assert!(
            b.why.contains(
                "records removed while the proxy ran: the writer had written up to seq 10, but its file, reopened after a failed write, ended at seq 5 (5 records gone)"
            ),
            "{b}"
        );

        // A file replaced by another chain of the same length is caught the same way.
        let path = dir.path().join("replaced.jsonl");
        let other = dir.path().join("other.jsonl");
        let mut o =
            Committer::open(&settings(&p, &other, Durability::Write), Some(key.clone())).unwrap();
        commit_all(&mut o, (100..104).map(|n| record(&p, n)), End::Final);
        let s = settings(&p, &path, Durability::Write);
        let mut c = Committer::open(&s, Some(key.clone())).unwrap();
        // Four records and a checkpoint: seq 5, as long as the other log.
        commit_all(&mut c, (0..4).map(|n| record(&p, n)), End::Checkpoint);
        let Sink::File(f) = &mut c.sink else {
            unreachable!()
        };
        f.stale = true;
        std::fs::copy(&other, &path).unwrap();
        commit_all(&mut c, (4..5).map(|n| record(&p, n)), End::Final);
        let b = verify_with(&path, &trusting(&key)).unwrap_err();
        assert!(
            b.why.contains("records replaced while the proxy ran"),
            "{b}"
        );
    }

    /// A failed batch the writer could not cut off stays in the file: the chain goes on
    /// after it with a recovery record saying the file held more than the writer wrote.
    #[test]
    fn a_file_that_grew_during_a_failed_write_is_named_in_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let key = test_key();
        let p = policy();
        let s = settings(&p, &path, Durability::Write);
        let mut c = Committer::open(&s, Some(key.clone())).unwrap();
        commit_all(&mut c, (0..2).map(|n| record(&p, n)), End::Checkpoint);
        // The lines of a batch whose write was reported failed, left in the file.
        let (seq, prev) = (c.seq, c.prev.clone());
        commit_all(&mut c, (2..4).map(|n| record(&p, n)), End::Nothing);
        let Sink::File(f) = &mut c.sink else {
            unreachable!()
        };
        f.stale = true;
        (c.seq, c.prev) = (seq, prev);
        commit_all(&mut c, (4..5).map(|n| record(&p, n)), End::Final);
        let report = verify_with(&path, &trusting(&key)).unwrap();
        let r = &report.recoveries[0];
        assert_eq!((r.last_seq, r.expected_seq), (5, Some(3)));
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
        // 200 records and the final checkpoint; nothing after the close.
        assert_eq!(lines(&path).len(), 201);
    }

    /// The rotated files of the log at `active`, oldest first.
    fn rotated(active: &Path) -> Vec<PathBuf> {
        files::rotated_siblings(active).unwrap()
    }

    #[tokio::test]
    async fn rotation_by_size_keeps_one_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let key = test_key();
        write_log_with(&path, 0..20, Some(key.clone()), |s| s.rotate_bytes = 4000).await;
        let files = rotated(&path);
        assert!(files.len() >= 3, "rotated files: {files:?}");
        let mut next_seq = 1;
        for f in &files {
            let lines = lines(f);
            // Named after its first record, ended by a checkpoint that signs it.
            assert_eq!(lines[0]["seq"], next_seq, "{}", f.display());
            let name = f.file_name().unwrap().to_str().unwrap();
            assert!(
                name.starts_with(&format!("decisions-{next_seq:020}-")),
                "{name}"
            );
            assert_eq!(lines.last().unwrap()["kind"], "checkpoint");
            assert!(std::fs::metadata(f).unwrap().len() >= 4000);
            next_seq = lines.last().unwrap()["seq"].as_u64().unwrap() + 1;
        }
        assert_eq!(lines(&path)[0]["seq"], next_seq);
        for target in [path.as_path(), dir.path()] {
            let report = verify_with(target, &trusting(&key)).unwrap();
            assert_eq!((report.records, report.files), (20, files.len() + 1));
        }
    }

    #[test]
    fn rotation_on_request_and_a_restart_right_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let key = test_key();
        let p = policy();
        let s = settings(&p, &path, Durability::Write);
        let mut first = PathBuf::new();
        crash_after(async {
            let w = LogWriter::open(&s, Some(key.clone())).unwrap();
            for n in 0..3 {
                w.append(record(&p, n)).await.unwrap();
            }
            first = w.rotate().await.unwrap().expect("a rotated file");
            assert_eq!(rotated(&path), [first.clone()]);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
            // Nothing new to rotate.
            assert_eq!(w.rotate().await.unwrap(), None);
            assert_eq!(w.stats().rotations, 1);
            w.close().await;
        });
        // The new file holds only the final checkpoint; the chain runs on from the old one.
        let last = lines(&path);
        assert_eq!(last.len(), 1);
        let first_end = lines(&first).last().unwrap()["seq"].as_u64().unwrap();
        assert_eq!(last[0]["seq"], first_end + 1);

        // A run that stops just after rotating leaves an empty active file: the next run
        // continues from the rotated file, with a recovery record naming it.
        let mut second = PathBuf::new();
        crash_after(async {
            let w = LogWriter::open(&s, Some(key.clone())).unwrap();
            w.append(record(&p, 3)).await.unwrap();
            second = w.rotate().await.unwrap().unwrap();
        });
        crash_after(async {
            let w = LogWriter::open(&s, Some(key.clone())).unwrap();
            w.append(record(&p, 4)).await.unwrap();
            w.close().await;
        });
        let recovery = of_kind(&lines(&path), "recovery");
        assert_eq!(recovery.len(), 1);
        assert_eq!(
            recovery[0]["file"],
            second.file_name().unwrap().to_str().unwrap()
        );
        assert_eq!(recovery[0]["last_kind"], "checkpoint");
        let report: VerifyReport = verify_with(&path, &trusting(&key)).unwrap();
        assert_eq!((report.records, report.files), (6, 3));
    }
}
