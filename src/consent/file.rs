//! The `file:PATH` store: JSON lines of consent records, read-only, reloaded when the file
//! is changed or replaced. A malformed line is reported with its number and grants nothing.
//!
//! Format: one [`ConsentRecord`] per line; blank lines and lines starting with `#` are
//! ignored. When several lines carry the same id, the last one is the consent's current
//! state (a revocation is appended as a later line). If that last line is malformed but its
//! id can still be read, the consent is withdrawn rather than left at an earlier state: the
//! operator's latest word on it cannot be honoured, so it grants nothing.

use super::index::ConsentIndex;
use super::record::ConsentRecord;
use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// A line that was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// One sentence saying why.
    pub message: String,
}

/// What a load found.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Consents now in the index (distinct ids).
    pub loaded: usize,
    /// Malformed lines, in file order.
    pub skipped: Vec<LineError>,
    /// Lines of valid records that a later line with the same id replaced or withdrew.
    pub superseded: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("cannot read consent file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`watch_status`] publishes after each reload attempt that changes something.
#[derive(Clone, Debug, Default)]
pub struct LoadStatus {
    /// Successful loads so far; 0 until the first one.
    pub generation: u64,
    /// What the latest successful load found.
    pub report: LoadReport,
    /// When the latest successful load finished.
    pub loaded_at: Option<SystemTime>,
    /// Set while reads fail (the content of `generation` keeps serving); cleared by the next
    /// successful load.
    pub error: Option<Arc<FileStoreError>>,
    /// Failure streaks so far (a streak is counted once, however many polls it lasts).
    pub failures: u64,
}

/// At most this many skipped lines are logged one by one per load; the rest are counted.
const WARN_LINES: usize = 100;

/// A change whose modification time is this close to the moment the file was examined may
/// share its timestamp with a later write (file system clocks are coarse), so such a load is
/// confirmed by one more read once the window has passed.
const RACY_WINDOW: Duration = Duration::from_secs(1);

/// Identifies one version of the file: a rename-replace changes the inode even when size and
/// modification time are equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    modified: SystemTime,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            // Linux always has one; without it, size and inode still tell versions apart.
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    /// Whether a write in the same clock tick could still go unnoticed, seen at `now`.
    fn racy(&self, now: SystemTime) -> bool {
        now.duration_since(self.modified)
            .map_or(true, |age| age < RACY_WINDOW)
    }
}

/// Reads `path` and replaces the content of `index` with its valid records.
pub fn load(path: &Path, index: &ConsentIndex) -> Result<LoadReport, FileStoreError> {
    load_versioned(path, index).map(|(report, _)| report)
}

/// `load`, also returning the version of the file that was read. The fingerprint is taken
/// before reading, so a change made during the read shows up as a difference at the next poll.
fn load_versioned(
    path: &Path,
    index: &ConsentIndex,
) -> Result<(LoadReport, Fingerprint), FileStoreError> {
    let read_err = |source| FileStoreError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let fingerprint = Fingerprint::of(&file.metadata().map_err(read_err)?);
    let (records, mut report) = parse(path, BufReader::new(file)).map_err(read_err)?;
    let rejected = index.replace_all(&records);
    debug_assert_eq!(rejected, 0, "parse keeps valid records only");
    report.loaded = records.len();
    Ok((report, fingerprint))
}

/// The records that stand after the last line, in the order of their last line.
fn parse(path: &Path, reader: impl BufRead) -> std::io::Result<(Vec<ConsentRecord>, LoadReport)> {
    let (latest, report) = latest(reader)?;
    for e in report.skipped.iter().take(WARN_LINES) {
        tracing::warn!(
            file = %path.display(),
            line = e.line,
            reason = %e.message,
            "consent line skipped"
        );
    }
    if report.skipped.len() > WARN_LINES {
        tracing::warn!(
            file = %path.display(),
            skipped = report.skipped.len(),
            "more consent lines skipped than were logged one by one"
        );
    }
    let records = latest
        .into_iter()
        .filter_map(|(_, word)| match word {
            Latest::Record(r) => Some(r),
            Latest::Withdrawn(_) => None,
        })
        .collect();
    Ok((records, report))
}

/// The latest word of a file on one consent id: the record on its last line, or its
/// withdrawal when that line is malformed but still names the id.
// Nearly every word is a record: boxing it would cost an allocation per consent.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Latest {
    Record(ConsentRecord),
    Withdrawn(String),
}

/// Each id's latest word with the number of the line that says it, in the order of those
/// lines, and the malformed and superseded lines (`loaded` is left 0). The file store loads
/// the records; `consent import` records the same words, so that a registry imported from a
/// file grants what the file store would.
pub fn latest(mut reader: impl BufRead) -> std::io::Result<(Vec<(usize, Latest)>, LoadReport)> {
    let mut report = LoadReport::default();
    // Each line's word on its id, in file order; `None` once a later line superseded it.
    let mut entries: Vec<(usize, Option<Latest>)> = Vec::new();
    let mut last: HashMap<String, usize, RandomState> = HashMap::default();
    judged_lines(&mut reader, |number, judged| {
        let (id, word) = match judged {
            Ok(record) => (record.id.clone(), Latest::Record(record)),
            Err((id, message)) => {
                report.skipped.push(LineError {
                    line: number,
                    message,
                });
                match id {
                    Some(id) => (id.clone(), Latest::Withdrawn(id)),
                    None => return,
                }
            }
        };
        if let Some(&earlier) = last.get(&id) {
            let (earlier_line, earlier_word) = &mut entries[earlier];
            if let Some(Latest::Record(_)) = earlier_word.take() {
                report.superseded.push(*earlier_line);
            }
        }
        last.insert(id, entries.len());
        entries.push((number, Some(word)));
    })?;
    let latest = entries
        .into_iter()
        .filter_map(|(line, word)| Some((line, word?)))
        .collect();
    Ok((latest, report))
}

/// The record lines of `reader`, each judged, with their 1-based numbers.
fn judged_lines(
    reader: &mut impl BufRead,
    mut each: impl FnMut(usize, Result<ConsentRecord, (Option<String>, String)>),
) -> std::io::Result<()> {
    record_lines(reader, |number, line| each(number, judge(line)))
}

/// The record lines of `reader` (not blank, not a `#` comment), trimmed, with their 1-based
/// numbers.
pub(super) fn record_lines(
    reader: &mut impl BufRead,
    mut each: impl FnMut(usize, &[u8]),
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        number += 1;
        let line = buf.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        each(number, line);
    }
}

/// One line's record, or why it is refused (with its id, when the line still names one).
pub(super) fn judge(line: &[u8]) -> Result<ConsentRecord, (Option<String>, String)> {
    // A record is a JSON object: serde would also take one written as an array, whose id the
    // passes that look for each id's last line (which read objects) could not see.
    if line.first() != Some(&b'{') {
        return Err((None, "a record must be a JSON object".into()));
    }
    match serde_json::from_slice::<ConsentRecord>(line) {
        Ok(record) => match record.validate() {
            Ok(()) => Ok(record),
            Err(e) => Err((
                Some(record.id.clone()),
                format!("consent \"{}\" is invalid: {e}", record.id),
            )),
        },
        Err(e) => Err((id_of(line), json_message(&e))),
    }
}

/// The id a line names, whether or not it is a valid record: the id [`judge`] reports for it.
pub(super) fn id_of(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    serde_json::from_slice::<IdOnly>(line).ok().map(|r| r.id)
}

/// serde_json's message without its "at line 1 column N" suffix, which would misstate the
/// line: the column is kept, the line number is the caller's.
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let what = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m);
    format!("not a valid consent record: {what} (column {})", e.column())
}

/// Watches `path` (polling every `interval`) and reloads `index` when the file changes or
/// is replaced. A failed read keeps the previous content.
///
/// The task loads the file once at start, so the caller need not call [`load`] first.
pub fn watch(
    path: PathBuf,
    index: Arc<ConsentIndex>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    watch_status(path, index, interval).0
}

/// [`watch`], plus a receiver of the reload status: `changed()` wakes after each successful
/// load and at the start of each failure streak. Readiness can wait for `generation >= 1`;
/// metrics can export `generation` (reloads) and `failures`.
pub fn watch_status(
    path: PathBuf,
    index: Arc<ConsentIndex>,
    interval: Duration,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<LoadStatus>) {
    let (tx, rx) = watch::channel(LoadStatus::default());
    let task = tokio::spawn(poll(path, index, interval, tx));
    (task, rx)
}

async fn poll(
    path: PathBuf,
    index: Arc<ConsentIndex>,
    interval: Duration,
    tx: watch::Sender<LoadStatus>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The version in the index, and whether it must be confirmed by one more read.
    let mut current: Option<Fingerprint> = None;
    let mut unconfirmed = false;
    let mut failing = false;
    loop {
        ticks.tick().await;
        let seen = match tokio::fs::metadata(&path).await {
            Ok(meta) => Fingerprint::of(&meta),
            Err(source) => {
                let e = FileStoreError::Read {
                    path: path.clone(),
                    source,
                };
                fail(&mut failing, &tx, e);
                continue;
            }
        };
        let now = SystemTime::now();
        let due = current != Some(seen) || (unconfirmed && !seen.racy(now));
        if !due {
            continue;
        }
        let job = {
            let (path, index) = (path.clone(), index.clone());
            tokio::task::spawn_blocking(move || load_versioned(&path, &index))
        };
        match job.await {
            Ok(Ok((report, read))) => {
                current = Some(read);
                unconfirmed = read.racy(now);
                failing = false;
                tracing::info!(
                    file = %path.display(),
                    loaded = report.loaded,
                    skipped = report.skipped.len(),
                    "consent file loaded"
                );
                tx.send_modify(|s| {
                    s.generation += 1;
                    s.report = report;
                    s.loaded_at = Some(SystemTime::now());
                    s.error = None;
                });
            }
            Ok(Err(e)) => fail(&mut failing, &tx, e),
            // The load panicked: the index is unchanged (replace_all is its last step).
            Err(join) => {
                tracing::error!(file = %path.display(), error = %join, "consent file load failed")
            }
        }
    }
}

/// Logs and publishes the first failure of a streak; later ones stay quiet.
fn fail(failing: &mut bool, tx: &watch::Sender<LoadStatus>, e: FileStoreError) {
    if std::mem::replace(failing, true) {
        return;
    }
    tracing::error!(error = %e, "consent file unreadable; the consents loaded before stay in force");
    tx.send_modify(|s| {
        s.error = Some(Arc::new(e));
        s.failures += 1;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2027-01-01T00:00:00Z";

    fn line(id: &str, subject: &str, method: &str) -> String {
        format!(
            r#"{{"id":"{id}","subject":"{subject}","recipient":"credit-bureau-us","purposes":["credit_scoring"],"categories":["user.financial"],"destinations":["US"],"method":"{method}","granted_at":"{T0}","expires_at":"{T1}"}}"#
        )
    }

    fn write(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    fn ids(index: &ConsentIndex, subject: &str) -> Vec<String> {
        index
            .get(subject)
            .map(|s| s.iter().map(|c| c.id.to_string()).collect())
            .unwrap_or_default()
    }

    fn skipped_lines(report: &LoadReport) -> Vec<usize> {
        report.skipped.iter().map(|e| e.line).collect()
    }

    #[test]
    fn malformed_lines_are_skipped_with_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consents.jsonl");
        let no_purpose = line("c4", "u1", "explicit").replace(r#"["credit_scoring"]"#, "[]");
        write(
            &path,
            &[
                "# consents exported 2026-01-02".into(),
                line("c1", "u1", "explicit"),
                "".into(),
                r#"{"id": "c2", oops"#.into(),
                line("c3", "u1", "explicit").replace(r#""method""#, r#""channel":"web","method""#),
                line("c5", "u1", "pre_ticked"),
                no_purpose,
                "   ".into(),
            ],
        );
        let index = ConsentIndex::new();
        let report = load(&path, &index).unwrap();

        assert_eq!(skipped_lines(&report), [4, 5, 7]);
        assert_eq!(report.loaded, 2);
        assert_eq!(ids(&index, "u1"), ["c1", "c5"]);
        // Whether a pre-ticked consent counts is the policy's call, not the store's.
        assert_eq!(&*index.get("u1").unwrap()[1].scope.method, "pre_ticked");
        let messages: Vec<&str> = report.skipped.iter().map(|e| &*e.message).collect();
        assert!(
            messages[0].starts_with("not a valid consent record"),
            "{}",
            messages[0]
        );
        assert!(!messages[0].contains("line 1"), "{}", messages[0]);
        assert!(messages[2].contains("purposes"), "{}", messages[2]);
    }

    #[test]
    fn an_unknown_field_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consents.jsonl");
        let extra =
            line("c1", "u1", "explicit").replace(r#""method""#, r#""scope":"all","method""#);
        write(&path, &[extra]);
        let index = ConsentIndex::new();
        let report = load(&path, &index).unwrap();
        assert_eq!(report.loaded, 0);
        assert!(index.get("u1").is_none());
        assert_eq!(report.skipped[0].line, 1);
        assert!(
            report.skipped[0].message.contains("`scope`"),
            "{:?}",
            report.skipped
        );
    }

    #[test]
    fn the_last_line_of_an_id_wins_and_a_malformed_one_withdraws_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consents.jsonl");
        let revoked = line("c1", "u1", "explicit").replace(
            r#""expires_at""#,
            &format!(r#""revoked_at":"{T1}","expires_at""#),
        );
        let broken_c2 = line("c2", "u2", "telepathy");
        write(
            &path,
            &[
                line("c1", "u1", "explicit"),
                line("c2", "u2", "explicit"),
                revoked,
                broken_c2,
            ],
        );
        let index = ConsentIndex::new();
        let report = load(&path, &index).unwrap();

        assert_eq!(report.superseded, [1, 2]);
        assert_eq!(skipped_lines(&report), [4]);
        let c1 = index.get("u1").unwrap();
        assert_eq!(c1.len(), 1);
        assert!(c1[0].revoked_at.is_some(), "line 3 replaced line 1");
        assert!(
            index.get("u2").is_none(),
            "the unreadable last word on c2 grants nothing"
        );
        assert_eq!(report.loaded, 1);

        // What an import records: the same latest words, the withdrawal included.
        let text = std::fs::read(&path).unwrap();
        let (words, report) = latest(&text[..]).unwrap();
        let words: Vec<(usize, String)> = words
            .into_iter()
            .map(|(line, word)| match word {
                Latest::Record(r) => (line, format!("{} revoked {}", r.id, r.revoked_at.is_some())),
                Latest::Withdrawn(id) => (line, format!("{id} withdrawn")),
            })
            .collect();
        assert_eq!(
            words,
            [(3, "c1 revoked true".into()), (4, "c2 withdrawn".into())]
        );
        assert_eq!(report.superseded, [1, 2]);
        assert_eq!(skipped_lines(&report), [4]);
    }

    #[test]
    fn a_missing_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.jsonl");
        let e = load(&path, &ConsentIndex::new()).unwrap_err();
        assert!(e.to_string().contains("absent.jsonl"), "{e}");
    }

    const POLL: Duration = Duration::from_millis(20);
    const DEADLINE: Duration = Duration::from_secs(10);

    async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
        tokio::time::timeout(DEADLINE, f)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting: {what}"))
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = tokio::time::Instant::now();
        while !cond() {
            assert!(start.elapsed() < DEADLINE, "timed out waiting: {what}");
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts a watcher on `path` and waits for its first load.
    async fn watching(
        path: &Path,
    ) -> (
        Arc<ConsentIndex>,
        tokio::task::JoinHandle<()>,
        watch::Receiver<LoadStatus>,
    ) {
        let index = Arc::new(ConsentIndex::new());
        let (task, mut status) = watch_status(path.to_owned(), index.clone(), POLL);
        within("first load", status.wait_for(|s| s.generation >= 1))
            .await
            .unwrap();
        (index, task, status)
    }

    fn moved_to_u2(index: &ConsentIndex) -> bool {
        index.get("u1").is_none() && ids(index, "u2") == ["c1"]
    }

    #[tokio::test]
    async fn an_in_place_rewrite_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consents.jsonl");
        write(&path, &[line("c1", "u1", "explicit")]);
        let (index, task, _status) = watching(&path).await;
        assert_eq!(ids(&index, "u1"), ["c1"]);

        // Same inode and the same size: only the modification time tells.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all((line("c1", "u2", "explicit") + "\n").as_bytes())
            .unwrap();
        drop(f);
        until("c1 moved to u2", || moved_to_u2(&index)).await;
        task.abort();
    }

    #[tokio::test]
    async fn a_rename_replace_is_reloaded_even_with_the_same_size_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consents.jsonl");
        write(&path, &[line("c1", "u1", "explicit")]);
        // An old time, so that nothing but the inode can reveal the new file.
        let mtime = SystemTime::now() - Duration::from_secs(3600);
        let set_mtime = |p: &Path| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(mtime)
                .unwrap()
        };
        set_mtime(&path);
        let (index, task, _status) = watching(&path).await;

        let next = dir.path().join("consents.jsonl.new");
        write(&next, &[line("c1", "u2", "explicit")]);
        set_mtime(&next);
        std::fs::rename(&next, &path).unwrap();
        until("c1 moved to u2", || moved_to_u2(&index)).await;
        task.abort();
    }

    #[tokio::test]
    async fn a_deleted_file_keeps_the_consents_until_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consents.jsonl");
        write(&path, &[line("c1", "u1", "explicit")]);
        let (index, task, mut status) = watching(&path).await;

        std::fs::remove_file(&path).unwrap();
        let s = within("failure", status.wait_for(|s| s.error.is_some()))
            .await
            .unwrap()
            .clone();
        assert_eq!(s.failures, 1);
        assert_eq!(ids(&index, "u1"), ["c1"], "the previous content stays");

        write(&path, &[line("c2", "u2", "explicit")]);
        let s = within("recovery", status.wait_for(|s| s.error.is_none()))
            .await
            .unwrap()
            .clone();
        assert_eq!(s.failures, 1, "one streak, however many polls it lasted");
        until("u2 loaded", || ids(&index, "u2") == ["c2"]).await;
        assert!(index.get("u1").is_none());
        task.abort();
    }
}
