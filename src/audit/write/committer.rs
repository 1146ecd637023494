//! The committer: the one owner of the log file. It takes records off the queue, numbers
//! and links them (`seq`, `prev`, `hash`), writes each batch with one system call (group
//! commit), syncs it when `fsync` durability asks, and only then releases the requests
//! waiting on their records. Each worker's chain has a committer of its own. In `write`
//! durability to a file it is a task of that worker's runtime, so a chain is written by the
//! thread whose requests it records; otherwise (`fsync`, standard output) it has its own
//! thread, so that a slow device never blocks the worker.
//!
//! Signed checkpoints are lines the committer adds to a batch: after every `checkpoint_every`
//! records, on a timer tick (every `checkpoint_interval`) while records are unsigned, at the
//! end of a file being rotated, and on close (`"final": true`). Rotation (by size after a
//! batch, on a timer, or on request) renames the active file between two batches; the chain
//! runs on in the new file (names: [`crate::audit::files`]).
//!
//! A write that fails answers every record of its batch with [`LogFailed`], leaves the chain
//! head where it was, and has the file cut back and reopened before the next batch
//! ([`super::logfile`]), so the writer recovers by itself once writing works again. Every
//! batch that holds a checkpoint is followed by an info event with that checkpoint's `seq`
//! and `hash`: kept outside the log volume, these heads let `audit verify --head` prove that
//! the log was not cut back since.
//!
//! Apart from the handle (what requests call) and the file (what a restart reads) because
//! this is the one place that holds the chain head: batching, chaining, checkpoints and
//! rotation all act on the same `seq` and `prev`.

use super::logfile::{AuditError, EVENTS, Sink, Start, open_log};
use super::ship::Spool;
use crate::audit::chain::{GENESIS, link_into};
use crate::audit::checkpoint::{self, KeyFields};
use crate::audit::keys::SigningKey;
use crate::audit::record::{Record, RecoveryRecord, timestamp};
use crate::policy::model::{Durability, LogSettings, LogTarget};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Records committed by one write at most, which bounds the batch buffer and the time the
/// first request of a batch waits for the last.
const BATCH_MAX: usize = 1024;

/// The log could not take the record; nothing may be forwarded on its account.
#[derive(Clone, Debug, thiserror::Error)]
#[error("decision log unavailable: {0}")]
pub struct LogFailed(pub String);

pub(super) type Ack = oneshot::Sender<Result<(), LogFailed>>;
pub(super) type RotateAck = oneshot::Sender<Result<Option<PathBuf>, LogFailed>>;

// Records travel by value: a slot of the queue costs what the largest record costs, and an
// outcome record (queued for every request) is not boxed again.
#[allow(clippy::large_enum_variant)]
pub(super) enum Request {
    /// `ack` is `None` for records nobody waits on ([`super::handle::LogWriter::append_later`]).
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
pub(super) struct Counters {
    pub(super) written: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) dropped: AtomicU64,
    /// Whether the last batch was written (readiness).
    pub(super) failing: std::sync::atomic::AtomicBool,
    pub(super) batches: AtomicU64,
    pub(super) syncs: AtomicU64,
    pub(super) checkpoints: AtomicU64,
    pub(super) rotations: AtomicU64,
    pub(super) write_errors: AtomicU64,
}

/// Counts a record that never reached the writer, and says so.
pub(super) fn dropped(counters: &Counters, why: &'static str) {
    counters.dropped.fetch_add(1, Ordering::Relaxed);
    tracing::event!(target: EVENTS, tracing::Level::ERROR, why, "decision record dropped before reaching the log");
}

/// How often the writer looks at the clock: often enough to checkpoint every
/// `checkpoint_interval` and to seal a file within a tenth of `rotate_interval` of its due time.
pub(super) fn tick_period(settings: &LogSettings) -> Duration {
    match settings.rotate_interval {
        Some(r) => settings
            .checkpoint_interval
            .min((r / 10).max(Duration::from_millis(100))),
        None => settings.checkpoint_interval,
    }
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
pub(super) struct Committer {
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
    pub(super) spool: Option<Arc<Spool>>,
    /// Records written since the last checkpoint.
    unsigned: u64,
    /// Written (with a checkpoint) before anything else, until a write succeeds.
    recovery: Option<RecoveryRecord>,
    /// `seq`, `hash` and finality of the last checkpoint in the batch being written.
    checkpoint_head: Option<(u64, String, bool)>,
    pub(super) counters: Arc<Counters>,
}

impl Committer {
    /// Opens the log `settings` name and finds where its chain stands.
    pub(super) fn open(
        settings: &LogSettings,
        key: Option<Arc<SigningKey>>,
    ) -> Result<Committer, AuditError> {
        let (sink, start) = match &settings.target {
            LogTarget::Stdout => (Sink::Stdout(io::stdout()), Start::empty()),
            LogTarget::File(path) => {
                let (file, start) = open_log(path)?;
                if let Some(was) = &start.instance
                    && **was != *settings.instance
                {
                    // A name the operator chose is held to; the host name (the default) changes
                    // with every replaced container, and a sidecar must not stop over it.
                    if settings.instance_given {
                        return Err(AuditError::Renamed {
                            path: path.clone(),
                            was: was.clone(),
                            now: settings.instance.to_string(),
                        });
                    }
                    tracing::event!(target: EVENTS, tracing::Level::WARN,
                        log.path = %path.display(),
                        log.was = %was,
                        log.instance = %settings.instance,
                        "decision log continues a chain written under another instance name (the host name changed, and [log] instance is not set): set [log] instance so that a fleet's verification reads one chain per name"
                    );
                }
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

    /// Whether the lines go to a file (not standard output).
    pub(super) fn on_file(&self) -> bool {
        matches!(self.sink, Sink::File(_))
    }

    fn announce(&mut self) {
        tracing::event!(target: EVENTS,tracing::Level::INFO,
            log.target = %self.sink.name(),
            log.seq = self.seq,
            log.hash = %self.prev,
            log.key = self.key_fields.as_ref().map(|k| k.fingerprint.as_str()).unwrap_or("none"),
            "decision log open"
        );
        if let Some(r) = &self.recovery {
            tracing::event!(target: EVENTS,tracing::Level::WARN,
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

    /// The committer as a task of the runtime of the worker whose chain it writes (`write`
    /// durability to a file).
    pub(super) async fn run_task(mut self, mut rx: mpsc::Receiver<Request>) {
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
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Request>) {
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
        tracing::event!(target: EVENTS,tracing::Level::INFO,
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
            tracing::event!(target: EVENTS,tracing::Level::INFO,
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
        tracing::event!(target: EVENTS,tracing::Level::ERROR,
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
                tracing::event!(target: EVENTS, tracing::Level::INFO, log.path = %f.path.display(), log.rotated = %to.display(), log.seq = self.seq, "decision log rotated");
                Ok(Some(to))
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::event!(target: EVENTS, tracing::Level::ERROR, log.path = %f.path.display(), error = %e, "decision log rotation failed; writing on in the same file");
                Err(LogFailed(format!(
                    "cannot rotate {}: {e}",
                    f.path.display()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::read::verify::{VerifyReport, verify_with};
    use crate::audit::testing::{
        crash_after, lines, of_kind, policy, record, rotated, settings, test_key, trusting,
        write_log_with,
    };
    use crate::audit::write::handle::LogWriter;

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
