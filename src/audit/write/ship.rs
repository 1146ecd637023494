//! Shipping sealed log files to object storage (SPEC section 5.1). On the write side because
//! the writer and the shipper share the spool: the writer seals files into it and refuses
//! records while it is full; the readers fetch what was shipped through
//! [`crate::audit::store`] alone.
//!
//! The spool is the log's own folder: every rotated (sealed) file beside the active one
//! waits there until its upload is confirmed. The shipper takes them in chain order,
//! compresses each with zstd, and writes it once to `PREFIX/INSTANCE/FIRST-LAST-TIME.jsonl.zst`
//! with a conditional put (create only, never overwrite). Only then is the local file
//! deleted, after the chain head it ends with is saved beside the log (`STEM.shipped`), so
//! that a restart with an empty folder continues the chain instead of starting a new one.
//!
//! An object already there under the same name is the same file shipped by an earlier
//! attempt (the process died between the upload and the delete) if its content is equal;
//! anything else is a conflict, reported, and the file stays in the spool.
//!
//! Failures retry with exponential back-off. A store that stays unreachable fills the spool;
//! once it holds `spool_max_bytes`, the writer refuses records (a log failure, and
//! `on_failure` decides), and shipping resumes where it stopped when the store comes back.

use crate::audit::files::{self, MAX_LINE};
use crate::audit::store::{self, Location, SegmentName, StoreError};
use object_store::{PutMode, PutOptions};
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// The target of the shipper's events: the module's path before it moved under `write`,
/// kept so that a filter (`RUST_LOG`) or a log collector's rule written for it still matches.
const EVENTS: &str = "residency_proxy::audit::ship";

/// zstd level: one of the fast (negative) levels, since a sidecar compresses every byte it
/// logs. On decision records level -3 compresses about 8:1 at half the CPU of level 1
/// (13:1); docs/performance.md has the figures.
const LEVEL: i32 = -3;
/// First retry after a failure; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the spool is looked at without being told (a file sealed by another process,
/// or a missed notification).
const RESCAN: Duration = Duration::from_secs(30);

/// The sealed files waiting to ship, and what shipping has done; shared by the writer (which
/// seals files and refuses records when the spool is full), the shipper, metrics and
/// readiness.
pub struct Spool {
    /// The active log file; sealed files are its rotated siblings.
    active: PathBuf,
    max_bytes: u64,
    bytes: AtomicU64,
    files: AtomicU64,
    /// Unix seconds at which the oldest file still in the spool was sealed; 0 when empty.
    oldest: AtomicI64,
    /// Held while the folder is counted, so that two counts never interleave.
    counting: Mutex<()>,
    notify: Notify,
    shipped_files: AtomicU64,
    shipped_bytes: AtomicU64,
    failures: AtomicU64,
    /// CPU time spent reading and compressing sealed files, in nanoseconds.
    cpu_nanos: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Shipping's figures, for metrics and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShipStats {
    pub spool_files: u64,
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    pub shipped_files: u64,
    /// Compressed bytes uploaded.
    pub shipped_bytes: u64,
    pub failures: u64,
    /// Seconds since the oldest file still in the spool was sealed; 0 when empty.
    pub oldest_age_secs: u64,
    /// CPU time spent reading and compressing sealed files (0 where the OS does not say).
    pub cpu: Duration,
    pub last_error: Option<String>,
}

impl Spool {
    /// Counts the sealed files already beside `active` (left by an earlier run).
    pub fn scan(active: &Path, max_bytes: u64) -> Result<Arc<Spool>, files::LogFilesError> {
        let spool = Spool {
            active: active.into(),
            max_bytes,
            bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            oldest: AtomicI64::new(0),
            counting: Mutex::new(()),
            notify: Notify::new(),
            shipped_files: AtomicU64::new(0),
            shipped_bytes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            cpu_nanos: AtomicU64::new(0),
            last_error: Mutex::new(None),
        };
        spool.recount()?;
        Ok(Arc::new(spool))
    }

    /// Counts the sealed files on disk again. The folder is the truth: the writer (after
    /// sealing) and the shipper (after shipping) both count it, one at a time.
    fn recount(&self) -> Result<Vec<PathBuf>, files::LogFilesError> {
        let _one_at_a_time = self.counting.lock().expect("not poisoned");
        let sealed = files::rotated_siblings(&self.active)?;
        let bytes = sealed
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        self.bytes.store(bytes, Ordering::Relaxed);
        self.files.store(sealed.len() as u64, Ordering::Relaxed);
        let oldest = sealed.first().and_then(|p| sealed_at(p)).unwrap_or(0);
        self.oldest.store(oldest, Ordering::Relaxed);
        Ok(sealed)
    }

    /// The writer sealed a file: count it, and wake the shipper.
    pub(crate) fn sealed(&self) {
        if let Err(e) = self.recount() {
            tracing::event!(target: EVENTS, tracing::Level::WARN, error = %e, "cannot count the decision log's shipping spool");
        }
        self.notify.notify_one();
    }

    /// Why the log must refuse records: the spool holds `spool_max_bytes` or more.
    pub fn full(&self) -> Option<String> {
        let bytes = self.bytes.load(Ordering::Relaxed);
        (bytes >= self.max_bytes).then(|| {
            let last = self.last_error.lock().expect("not poisoned").clone();
            format!(
                "the shipping spool is full ({bytes} of {} bytes sealed and not yet shipped; last error: {})",
                self.max_bytes,
                last.as_deref().unwrap_or("none")
            )
        })
    }

    pub fn stats(&self) -> ShipStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let oldest = self.oldest.load(Ordering::Relaxed);
        ShipStats {
            spool_files: get(&self.files),
            spool_bytes: get(&self.bytes),
            spool_max_bytes: self.max_bytes,
            shipped_files: get(&self.shipped_files),
            shipped_bytes: get(&self.shipped_bytes),
            failures: get(&self.failures),
            oldest_age_secs: if oldest == 0 {
                0
            } else {
                (jiff::Timestamp::now().as_second() - oldest).max(0) as u64
            },
            cpu: Duration::from_nanos(get(&self.cpu_nanos)),
            last_error: self.last_error.lock().expect("not poisoned").clone(),
        }
    }
}

/// CPU time of the calling thread so far (Linux: user and system time in
/// `/proc/thread-self/stat`, in clock ticks of 10 ms); zero where it cannot be read.
fn thread_cpu() -> Duration {
    let ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces:
        // state is field 3, utime 14 and stime 15.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(11);
        Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
    };
    ticks().map_or(Duration::ZERO, |t| Duration::from_millis(t * 10))
}

/// Unix seconds in a rotated file's name (`…-YYYYMMDDTHHMMSSZ.jsonl`).
fn sealed_at(path: &Path) -> Option<i64> {
    let compact = compact_time(path)?;
    let dt = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", compact).ok()?;
    Some(jiff::tz::TimeZone::UTC.to_timestamp(dt).ok()?.as_second())
}

/// `YYYYMMDDTHHMMSSZ` of a rotated file's name.
fn compact_time(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    let base = &name[..name.rfind('.').unwrap_or(name.len())];
    base.get(base.len().checked_sub(16)?..)
}

/// The chain head a shipped file ended with, kept beside the log once the file is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedHead {
    pub seq: u64,
    pub hash: String,
    pub kind: Option<String>,
    #[serde(rename = "final")]
    pub final_: bool,
    /// The object it went to.
    pub object: String,
}

/// `logs/decisions.shipped` for `logs/decisions.jsonl`.
pub fn head_path(active: &Path) -> PathBuf {
    active.with_extension("shipped")
}

/// The head saved by the last shipment, if any.
pub fn read_head(active: &Path) -> io::Result<Option<ShippedHead>> {
    match std::fs::read(head_path(active)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Saves the head atomically and durably: the sealed file is deleted only after this, so the
/// rename must reach the disk first.
fn write_head(active: &Path, head: &ShippedHead) -> io::Result<()> {
    let path = head_path(active);
    let tmp = path.with_extension("shipped.tmp");
    std::fs::write(&tmp, serde_json::to_vec(head).expect("serialises"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

/// The running shipper; [`ShipperHandle::drain`] ships what is sealed and stops.
pub struct ShipperHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    spool: Arc<Spool>,
}

/// Starts shipping the spool's files to `loc` under `instance`.
pub fn start(spool: Arc<Spool>, loc: Location, instance: Arc<str>) -> ShipperHandle {
    let (stop, stop_rx) = watch::channel(false);
    let shipper = Shipper {
        spool: spool.clone(),
        loc,
        instance,
    };
    let task = tokio::spawn(shipper.run(stop_rx));
    ShipperHandle { stop, task, spool }
}

impl ShipperHandle {
    /// Ships everything sealed, then stops; gives up after `timeout`, leaving what could not
    /// ship in the spool for the next start.
    pub async fn drain(self, timeout: Duration) {
        let _ = self.stop.send(true);
        self.spool.notify.notify_one();
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            let left = self.spool.stats();
            tracing::event!(target: EVENTS,tracing::Level::WARN,
                log.spool_files = left.spool_files,
                log.spool_bytes = left.spool_bytes,
                "decision log shipping did not finish within drain_timeout: the rest ships at the next start"
            );
        }
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }
}

struct Shipper {
    spool: Arc<Spool>,
    loc: Location,
    instance: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {source}", path.display())]
    Local { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Files(#[from] files::LogFilesError),
    #[error(
        "{object} already exists with other content: refusing to overwrite it ({} stays in the spool)",
        path.display()
    )]
    Conflict { object: String, path: PathBuf },
}

impl Shipper {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let draining = *stop.borrow();
            match self.ship_pending().await {
                Ok(()) => {
                    backoff = BACKOFF_MIN;
                    if draining {
                        return;
                    }
                    tokio::select! {
                        _ = self.spool.notify.notified() => {}
                        _ = tokio::time::sleep(RESCAN) => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    self.spool.failures.fetch_add(1, Ordering::Relaxed);
                    let why = e.to_string();
                    tracing::event!(target: EVENTS,tracing::Level::WARN,
                        log.ship = %self.loc.url,
                        error = %why,
                        retry_in_ms = backoff.as_millis() as u64,
                        "decision log shipping failed; the file stays in the spool"
                    );
                    *self.spool.last_error.lock().expect("not poisoned") = Some(why);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        // Draining starts a last attempt at once.
                        _ = stop.changed(), if !draining => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Ships every sealed file, oldest first; stops at the first failure (the chain's order
    /// is kept in the store too).
    async fn ship_pending(&self) -> Result<(), ShipError> {
        let sealed = self.spool.recount()?;
        for path in sealed {
            self.ship(&path).await?;
            self.spool.recount()?;
        }
        *self.spool.last_error.lock().expect("not poisoned") = None;
        Ok(())
    }

    async fn ship(&self, path: &Path) -> Result<(), ShipError> {
        let local = |source| ShipError::Local {
            path: path.into(),
            source,
        };
        let owned = path.to_path_buf();
        let sealed = tokio::task::spawn_blocking(move || {
            let before = thread_cpu();
            Sealed::read(&owned).map(|s| (s, thread_cpu().saturating_sub(before)))
        })
        .await
        .map_err(|e| local(io::Error::other(e)))?
        .map_err(local)?;
        let (sealed, cpu) = sealed;
        self.spool
            .cpu_nanos
            .fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
        let name = SegmentName {
            first: sealed.first,
            last: sealed.head.seq,
            sealed: compact_time(path).unwrap_or("00000000T000000Z").to_string(),
        };
        let object = store::instance_prefix(&self.loc, &self.instance).join(name.to_string());
        let size = sealed.compressed.len() as u64;
        let put = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let store_err = |source| {
            ShipError::Store(StoreError::Store {
                url: store::object_url(&self.loc, &object),
                source,
            })
        };
        match self
            .loc
            .store
            .put_opts(&object, sealed.compressed.into(), put)
            .await
        {
            Ok(_) => {}
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                // An earlier attempt may have landed before the process could delete the file.
                let there = store::fetch(&self.loc, &object).await?;
                let here = std::fs::read(path).map_err(local)?;
                if there != here {
                    return Err(ShipError::Conflict {
                        object: object.to_string(),
                        path: path.into(),
                    });
                }
            }
            Err(e) => return Err(store_err(e)),
        }
        let head = ShippedHead {
            object: object.to_string(),
            ..sealed.head
        };
        write_head(&self.spool.active, &head).map_err(local)?;
        std::fs::remove_file(path).map_err(local)?;
        self.spool.shipped_files.fetch_add(1, Ordering::Relaxed);
        self.spool.shipped_bytes.fetch_add(size, Ordering::Relaxed);
        tracing::event!(target: EVENTS,tracing::Level::INFO,
            log.object = %object,
            log.first_seq = name.first,
            log.last_seq = name.last,
            bytes = size,
            "decision log file shipped"
        );
        Ok(())
    }
}

/// A sealed file read for shipping: its first `seq`, its last record, compressed content.
struct Sealed {
    first: u64,
    head: ShippedHead,
    compressed: Vec<u8>,
}

impl Sealed {
    fn read(path: &Path) -> io::Result<Sealed> {
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a sealed log file: {why}"),
            )
        };
        let mut file = std::fs::File::open(path)?;
        let mut first_line = Vec::new();
        BufReader::new(&mut file)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut first_line)?;
        let first: serde_json::Value =
            serde_json::from_slice(&first_line).map_err(|e| bad(format!("first line: {e}")))?;
        let first = first
            .get("seq")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("first line has no seq".into()))?;
        let last = last_line(&mut file)?;
        let last: serde_json::Value =
            serde_json::from_slice(&last).map_err(|e| bad(format!("last line: {e}")))?;
        let field = |k: &str| last.get(k);
        let head = ShippedHead {
            seq: field("seq")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| bad("last line has no seq".into()))?,
            hash: field("hash")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| bad("last line has no hash".into()))?
                .to_string(),
            kind: field("kind")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
            final_: field("final")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            object: String::new(),
        };
        file.seek(SeekFrom::Start(0))?;
        let mut compressed = Vec::new();
        zstd::stream::copy_encode(
            BufReader::with_capacity(256 * 1024, file),
            &mut compressed,
            LEVEL,
        )?;
        Ok(Sealed {
            first,
            head,
            compressed,
        })
    }
}

/// The last complete line of a file (without its `\n`), read from the end.
fn last_line(file: &mut std::fs::File) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = vec![0; (len - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        match buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => return Ok(buf.split_off(i + 1)),
            None if start == 0 => return Ok(buf),
            None if window >= MAX_LINE as u64 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "last line too long",
                ));
            }
            None => window *= 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::store::StoreOptions;
    use object_store::ObjectStoreExt;

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// A conditional put never replaces what is there: an object of other content under the
    /// name keeps the file in the spool (a failure, with why); the same content is an
    /// earlier upload that landed, and the file goes.
    #[tokio::test]
    async fn an_object_already_there_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("logs").join("decisions.jsonl");
        std::fs::create_dir_all(active.parent().unwrap()).unwrap();
        let t: jiff::Timestamp = "2026-11-28T04:31:53Z".parse().unwrap();
        let sealed = files::rotated_name(&active, 7, t);
        let content = "{\"kind\":\"decision\",\"seq\":7}\n{\"final\":false,\"hash\":\"ab\",\"kind\":\"checkpoint\",\"seq\":8}\n";
        std::fs::write(&sealed, content).unwrap();
        let url = url::Url::from_directory_path(dir.path().join("store")).unwrap();
        let loc = store::open(&url, &StoreOptions::default()).unwrap();
        let object = store::instance_prefix(&loc, "i-1").join(
            SegmentName {
                first: 7,
                last: 8,
                sealed: "20261128T043153Z".into(),
            }
            .to_string(),
        );
        let put = |bytes: &[u8]| zstd::encode_all(bytes, 1).unwrap();
        loc.store
            .put(&object, put(b"someone else's records\n").into())
            .await
            .unwrap();

        let spool = Spool::scan(&active, 1 << 20).unwrap();
        assert_eq!(
            (spool.stats().spool_files, spool.stats().spool_bytes),
            (1, content.len() as u64)
        );
        let shipper = start(spool.clone(), loc.clone(), Arc::from("i-1"));
        eventually("a refused upload", || spool.stats().failures >= 1).await;
        let why = spool.stats().last_error.unwrap();
        assert!(why.contains("already exists with other content"), "{why}");
        assert!(sealed.exists());
        let there = store::fetch(&loc, &object).await.unwrap();
        assert_eq!(there, b"someone else's records\n");

        loc.store
            .put(&object, put(content.as_bytes()).into())
            .await
            .unwrap();
        spool.notify.notify_one();
        eventually("the file to go", || !sealed.exists()).await;
        assert_eq!(spool.stats().spool_files, 0);
        let head = read_head(&active).unwrap().unwrap();
        assert_eq!(
            (head.seq, head.hash.as_str(), head.final_),
            (8, "ab", false)
        );
        assert_eq!(head.object, object.to_string());
        shipper.drain(Duration::from_secs(1)).await;
    }
}
