//! The writer's handle: what the proxy holds and clones into every request. It opens the
//! log and starts the committer (a task of the runtime of the worker whose chain it is, or
//! its own thread), queues records
//! (waiting for their commit, or not), asks for rotation and close, reads the writer's
//! counters, and drives the checkpoint timer.
//!
//! Apart from the committer because this side runs on the request path, on any thread, and
//! shares nothing with the committer but the queue and the counters: a reader of the hot path
//! finds here everything a request does with the log.

use super::committer::{Committer, Counters, LogFailed, Request, dropped, tick_period};
use super::logfile::{AuditError, EVENTS};
use super::ship::Spool;
use crate::audit::keys::SigningKey;
use crate::audit::record::Record;
use crate::policy::model::{Durability, LogSettings, LogTarget};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// Records that may wait for the writer before `append` itself waits for room.
const QUEUE_CAPACITY: usize = 64 * 1024;

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

/// The committer of a log opened by [`LogWriter::prepare`], not yet running.
pub struct WriterStart {
    committer: Committer,
    rx: mpsc::Receiver<Request>,
    /// For the checkpoint timer, which must not keep the writer alive.
    timer: mpsc::WeakSender<Request>,
    tick: Duration,
    /// Whether the committer runs as a task of the runtime that starts it.
    inline: bool,
}

impl WriterStart {
    /// Starts the committer and its checkpoint timer: in `write` durability to a file, as
    /// tasks of the calling thread's runtime (outside a runtime, on threads of their own);
    /// otherwise on a thread of its own.
    pub fn start(self) -> Result<(), AuditError> {
        let WriterStart {
            committer,
            rx,
            timer,
            tick,
            inline,
        } = self;
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
        start_timer(timer, tick);
        Ok(())
    }
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
        let (writer, start) = LogWriter::prepare(settings, key, spool)?;
        start.start()?;
        Ok(writer)
    }

    /// Opens the log as [`LogWriter::open_spooled`] does (every error of the file is found
    /// here), without starting its committer: [`WriterStart::start`] starts it on the thread
    /// that will own the chain (a worker starts its own, on its own runtime). Records
    /// appended meanwhile wait in the queue.
    pub fn prepare(
        settings: &LogSettings,
        key: Option<Arc<SigningKey>>,
        spool: Option<Arc<Spool>>,
    ) -> Result<(LogWriter, WriterStart), AuditError> {
        let mut committer = Committer::open(settings, key)?;
        committer.spool = spool;
        let counters = committer.counters.clone();
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        // In `write` mode a batch costs one write() into the page cache, cheaper than waking
        // a thread and being woken back: the committer then runs as a task of the runtime
        // that starts it (a worker's own), and batches form from whatever requests are ready
        // when it is polled. `fsync` mode, and standard output (a pipe that may stall), get
        // their own thread so that a slow device never blocks the runtime.
        let inline = settings.durability == Durability::Write && committer.on_file();
        let start = WriterStart {
            committer,
            rx,
            timer: tx.downgrade(),
            tick: tick_period(settings),
            inline,
        };
        Ok((LogWriter { tx, counters }, start))
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

/// The settings of worker `worker`'s chain of the log `settings` describe: worker 0's are
/// `settings` themselves (so one worker writes exactly the log it always did); worker K
/// writes `decisions.wK.jsonl` beside the configured file under the instance name
/// `INSTANCE-wK`, and is rotated, checkpointed and signed as any chain. Standard output
/// stays standard output: each line names its chain.
pub fn worker_settings(settings: &LogSettings, worker: usize) -> LogSettings {
    let mut chain = settings.clone();
    if worker == 0 {
        return chain;
    }
    if let LogTarget::File(path) = &settings.target {
        chain.target = LogTarget::File(crate::audit::files::worker_path(path, worker));
    }
    chain.instance = format!("{}-w{worker}", settings.instance).into();
    chain
}

fn stopped() -> LogFailed {
    LogFailed("the decision log writer has stopped".into())
}

/// Sends the writer a `Tick` every `every`, for as long as a handle to it exists. It holds
/// only a weak sender, so it never keeps the writer alive.
fn start_timer(weak: mpsc::WeakSender<Request>, every: Duration) {
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
                tracing::event!(target: EVENTS, tracing::Level::WARN, error = %e, "no checkpoint timer: checkpoints are written by count and on close only");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::read::verify::{VerifyOptions, verify_with};
    use crate::audit::testing::{
        append_all, assert_chain, lines, of_kind, policy, record, settings, test_key, trusting,
        write_log,
    };

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
    async fn a_log_is_not_continued_under_another_instance_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        write_log(&path, 0..3).await;
        let p = policy();
        let mut renamed = settings(&p, &path, Durability::Write);
        renamed.instance = format!("{}-renamed", p.log.instance).into();
        renamed.instance_given = true;
        let e = LogWriter::open(&renamed, None)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains(&format!("is the chain of instance \"{}\"", p.log.instance)),
            "{e}"
        );
        assert!(e.contains("give the new instance a new log path"), "{e}");
        // The log is untouched, and the old name still continues it.
        assert_chain(&path, 3);
        write_log(&path, 3..5).await;
        assert_chain(&path, 5);
        // Left to its default (the host name, which every replaced container changes), a new
        // name continues the chain rather than stopping the sidecar.
        renamed.instance_given = false;
        let w = LogWriter::open(&renamed, None).unwrap();
        w.append(record(&p, 5)).await.unwrap();
        w.close().await;
        assert_chain(&path, 6);
    }

    #[tokio::test]
    async fn a_renamed_instance_is_refused_after_everything_shipped_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        write_log(&path, 0..3).await;
        // As after a clean stop with shipping: the sealed file is gone, its head kept.
        let last = lines(&path).pop().unwrap();
        let head = serde_json::json!({
            "seq": last["seq"], "hash": last["hash"], "kind": last["kind"], "final": true,
            "object": "logs/shanghai-0/00000000000000000001-00000000000000000004-20261207T000000Z.jsonl.zst",
        });
        std::fs::write(super::super::ship::head_path(&path), head.to_string()).unwrap();
        std::fs::write(&path, "").unwrap();
        let p = policy();
        let mut renamed = settings(&p, &path, Durability::Write);
        renamed.instance = "shanghai-1".into();
        renamed.instance_given = true;
        let e = LogWriter::open(&renamed, None)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("is the chain of instance \"shanghai-0\""), "{e}");
        renamed.instance = "shanghai-0".into();
        LogWriter::open(&renamed, None).unwrap().close().await;
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
}
