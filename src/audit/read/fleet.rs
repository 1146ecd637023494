//! Many chains, each verified on its own: a fleet's logs in object storage (every instance's
//! shipped files one chain), and a sidecar's log folder written by several workers (one chain
//! per worker); and every instance's records read in turn for `audit query|report|export`.
//!
//! Files are fetched a few ahead of the one being read (the downloads overlap the current
//! file's checks) and decompressed as they are read, so memory holds a handful of compressed
//! files, plus the location's listing.
//!
//! Apart from [`super::verify`] and [`super::query`] because only this module talks to
//! object storage, and knows that a location or a folder holds many chains: they read lines
//! and one chain, wherever the files come from.

use super::verify::{Broken, Chain, VerifyError, VerifyOptions, VerifyReport, verify_files};
use crate::audit::files::{ChainFiles, LineReader, LogFilesError, Segments};
use crate::audit::store::{self, Listing, Location, Segment};
use object_store::ObjectStoreExt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// What `audit verify` found for one chain: an instance of a location, or a worker's chain
/// in a sidecar's log folder.
#[derive(Debug)]
pub struct InstanceVerdict {
    /// The instance, or the chain's active file name (`decisions.w1.jsonl`).
    pub instance: String,
    /// The chain verified (closed, or open with `--open`), or why not, in words that name
    /// the object or the range.
    pub result: Result<VerifyReport, String>,
}

/// What `audit verify` found at a location, or in a folder of several chains.
#[derive(Debug, Default)]
pub struct FleetReport {
    pub instances: Vec<InstanceVerdict>,
    /// Objects under the prefix that are not shipped files.
    pub strangers: Vec<String>,
}

impl FleetReport {
    pub fn ok(&self) -> bool {
        !self.instances.is_empty() && self.instances.iter().all(|i| i.result.is_ok())
    }
}

/// Lists `loc` and verifies every instance's chain separately.
pub fn verify(
    rt: &Arc<Runtime>,
    loc: &Location,
    opts: &VerifyOptions,
) -> Result<FleetReport, LogFilesError> {
    let listing = list(rt, loc)?;
    let hint = |first: &str| {
        format!(
            "the instance's own folder ({}/{first}/)",
            loc.url.trim_end_matches('/')
        )
    };
    let instances = verify_each(
        listing.instances.into_iter().collect(),
        opts,
        (&loc.url, "instances", hint),
        |instance, segments| verify_instance(rt, loc, instance, segments, opts),
    )?;
    Ok(FleetReport {
        instances,
        strangers: listing.strangers.iter().map(|p| p.to_string()).collect(),
    })
}

/// Verifies each chain of the local folder `path` (its `chains`, one per worker, see
/// [`crate::audit::files::log_chains`]) separately, each named by its active file.
pub fn verify_local(
    path: &Path,
    chains: Vec<ChainFiles>,
    opts: &VerifyOptions,
) -> Result<FleetReport, LogFilesError> {
    let shown = path.display().to_string();
    let hint = |first: &str| format!("the chain's active file ({})", path.join(first).display());
    let instances = verify_each(
        chains.into_iter().map(|c| (c.name, c.files)).collect(),
        opts,
        (&shown, "chains", hint),
        |_, files| match verify_files(&files, path, opts) {
            Ok(r) => Ok(Ok(r)),
            Err(VerifyError::Broken(b)) => Ok(Err(b.to_string())),
            Err(VerifyError::Files(e)) => Err(e),
        },
    )?;
    Ok(FleetReport {
        instances,
        strangers: Vec::new(),
    })
}

/// Verifies named chains one after another, each on its own with `one`: a chain that fails
/// is a verdict, not an error (the others are still verified); a chain that cannot be read
/// stops everything. `--head` names a record of one chain, so it is refused when there are
/// several (`location`, what they are, and where the one chain is).
fn verify_each<C>(
    chains: Vec<(String, C)>,
    opts: &VerifyOptions,
    (location, what, hint): (&str, &'static str, impl FnOnce(&str) -> String),
    mut one: impl FnMut(&str, C) -> Result<Result<VerifyReport, String>, LogFilesError>,
) -> Result<Vec<InstanceVerdict>, LogFilesError> {
    if !opts.heads.is_empty()
        && chains.len() > 1
        && let Some((first, _)) = chains.first()
    {
        return Err(LogFilesError::HeadOfOneChain {
            location: location.to_string(),
            count: chains.len(),
            what,
            hint: hint(first),
        });
    }
    let mut out = Vec::with_capacity(chains.len());
    for (name, chain) in chains {
        let result = one(&name, chain)?;
        out.push(InstanceVerdict {
            instance: name,
            result,
        });
    }
    Ok(out)
}

fn verify_instance(
    rt: &Arc<Runtime>,
    loc: &Location,
    instance: &str,
    segments: Vec<Segment>,
    opts: &VerifyOptions,
) -> Result<Result<VerifyReport, String>, LogFilesError> {
    let user_open = opts.open;
    let opts = VerifyOptions {
        instance: Some(instance.to_string()),
        // Judged below, so that an open chain is reported as one.
        open: true,
        ..opts.clone()
    };
    let mut chain = Chain::new(&opts, segments.len());
    let mut fetch = Prefetch::new(rt.clone(), loc.clone(), segments.clone());
    let mut end = PathBuf::new();
    for seg in &segments {
        let name = object_name(loc, seg);
        let shown = name.display();
        let expected = chain.seq() + 1;
        if seg.name.first > expected {
            return Ok(Err(format!(
                "records {expected}-{} missing (the next object, {shown}, starts at seq {})",
                seg.name.first - 1,
                seg.name.first
            )));
        }
        if seg.name.first < expected {
            return Ok(Err(format!(
                "{shown} starts at seq {}, but records up to seq {} came before it: a duplicated or overlapping object",
                seg.name.first,
                expected - 1
            )));
        }
        // An object that cannot be fetched says nothing about the chain: the location is
        // unreadable (exit 2), not broken. What it holds, once fetched, is judged.
        let reader = fetch.next().expect("one fetch per segment")?.1;
        if let Err(e) = chain.file(&name, reader, false) {
            return Ok(Err(describe_error(e)));
        }
        if chain.seq() != seg.name.last {
            return Ok(Err(format!(
                "{shown} is named for records {}-{} but holds {}-{}: it was overwritten or edited",
                seg.name.first,
                seg.name.last,
                seg.name.first,
                chain.seq()
            )));
        }
        end = name;
    }
    let report = match chain.finish(&end) {
        Ok(r) => r,
        Err(e) => return Ok(Err(describe_error(e))),
    };
    if !report.closed && !user_open {
        return Ok(Err(format!(
            "open: the chain ends at seq {} without a final checkpoint (the sidecar is still running, or stopped without one); pass --open to accept it",
            report.last_seq
        )));
    }
    Ok(Ok(report))
}

fn describe_error(e: VerifyError) -> String {
    match e {
        VerifyError::Broken(Broken { file, line, why }) => {
            format!("{}:{line}: {why}", file.display())
        }
        VerifyError::Files(e) => e.to_string(),
    }
}

/// `s3://bucket/prefix/INSTANCE/FILE` for messages.
fn object_name(loc: &Location, seg: &Segment) -> PathBuf {
    PathBuf::from(store::object_url(loc, &seg.path))
}

fn list(rt: &Runtime, loc: &Location) -> Result<Listing, LogFilesError> {
    rt.block_on(store::list(loc))
        .map_err(|e| LogFilesError::Store(e.to_string()))
}

/// Every instance's shipped files at `loc`, instance by instance, each in chain order: for
/// `audit query|report|export`.
pub fn segments(rt: &Arc<Runtime>, loc: &Location) -> Result<Segments, LogFilesError> {
    let listing = list(rt, loc)?;
    let all: Vec<Segment> = listing.instances.into_values().flatten().collect();
    Ok(Segments::one(
        all.len(),
        Box::new(Prefetch::new(rt.clone(), loc.clone(), all)),
    ))
}

/// Fetches segments in order, one ahead.
struct Prefetch {
    rt: Arc<Runtime>,
    loc: Location,
    queue: std::vec::IntoIter<Segment>,
    ahead: std::collections::VecDeque<(PathBuf, JoinHandle<Result<bytes::Bytes, String>>)>,
}

/// Objects fetched ahead of the one being read: enough to hide a store's latency behind the
/// checks, few enough to keep memory at a handful of compressed files.
const AHEAD: usize = 4;

impl Prefetch {
    fn new(rt: Arc<Runtime>, loc: Location, segments: Vec<Segment>) -> Prefetch {
        let mut p = Prefetch {
            rt,
            loc,
            queue: segments.into_iter(),
            ahead: std::collections::VecDeque::new(),
        };
        p.fill();
        p
    }

    fn fill(&mut self) {
        while self.ahead.len() < AHEAD {
            match self.start_next() {
                Some(f) => self.ahead.push_back(f),
                None => return,
            }
        }
    }

    fn start_next(&mut self) -> Option<(PathBuf, JoinHandle<Result<bytes::Bytes, String>>)> {
        let seg = self.queue.next()?;
        let name = object_name(&self.loc, &seg);
        let loc = self.loc.clone();
        let shown = name.display().to_string();
        let task = self.rt.spawn(async move {
            let got = async { loc.store.get(&seg.path).await?.bytes().await };
            got.await.map_err(|e| format!("{shown}: {e}"))
        });
        Some((name, task))
    }
}

impl Iterator for Prefetch {
    type Item = Result<(PathBuf, LineReader), LogFilesError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (name, task) = self.ahead.pop_front()?;
        let fetched = self.rt.block_on(task);
        self.fill();
        let bytes = match fetched {
            Ok(Ok(b)) => b,
            Ok(Err(why)) => return Some(Err(LogFilesError::Store(why))),
            Err(e) => return Some(Err(LogFilesError::Store(e.to_string()))),
        };
        let decoder = match zstd::stream::read::Decoder::new(std::io::Cursor::new(bytes)) {
            Ok(d) => d,
            Err(e) => {
                return Some(Err(LogFilesError::Store(format!(
                    "{}: not a zstd stream: {e}",
                    name.display()
                ))));
            }
        };
        let reader = LineReader::new(Box::new(BufReader::with_capacity(256 * 1024, decoder)));
        Some(Ok((name, reader)))
    }
}

/// Whether a path given on the command line names object storage.
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(store::is_url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::store::StoreOptions;
    use crate::audit::testing::{policy, record, settings, test_key};
    use crate::audit::write::LogWriter;
    use crate::audit::write::ship::{self, Spool};
    use crate::policy::model::Durability;
    use std::time::Duration;

    /// Writes `instance`'s chain (three sealed files, then a final one on close) with the real
    /// writer and ships it to `store` with the real shipper.
    async fn ship_chain(dir: &Path, store: &url::Url, instance: &str) {
        let p = policy();
        let active = dir.join(instance).join("decisions.jsonl");
        let mut s = settings(&p, &active, Durability::Write);
        s.instance = Arc::from(instance);
        std::fs::create_dir_all(active.parent().unwrap()).unwrap();
        let spool = Spool::scan(&active, 1 << 30).unwrap();
        let log = LogWriter::open_spooled(&s, Some(test_key()), Some(spool.clone())).unwrap();
        for _ in 0..3 {
            for n in 0..4 {
                log.append(record(&p, n)).await.unwrap();
            }
            log.rotate().await.unwrap();
        }
        log.append(record(&p, 9)).await.unwrap();
        // Seals the active file with its final checkpoint.
        log.close().await;
        let loc = store::open(store, &StoreOptions::default()).unwrap();
        let shipper = ship::start(spool.clone(), loc, Arc::from(instance));
        for _ in 0..400 {
            if spool.stats().spool_files == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(spool.stats().spool_files, 0, "{:?}", spool.stats());
        shipper.drain(Duration::from_secs(1)).await;
    }

    fn runtime() -> Arc<Runtime> {
        Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        )
    }

    fn check(rt: &Arc<Runtime>, url: &url::Url) -> Vec<(String, Result<VerifyReport, String>)> {
        let loc = store::open(url, &StoreOptions::default()).unwrap();
        verify(rt, &loc, &VerifyOptions::default())
            .unwrap()
            .instances
            .into_iter()
            .map(|i| (i.instance, i.result))
            .collect()
    }

    fn objects(folder: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn each_instance_is_its_own_chain_and_every_kind_of_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store").join("fleet");
        let url = url::Url::from_directory_path(&store_dir).unwrap();
        let rt = runtime();
        rt.block_on(ship_chain(&dir.path().join("a"), &url, "a"));
        rt.block_on(ship_chain(&dir.path().join("b"), &url, "b"));

        let found = check(&rt, &url);
        assert_eq!(found.len(), 2);
        for (name, result) in &found {
            let r = result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(r.closed);
            // 13 decision records; a checkpoint ends each of the four files.
            assert_eq!((r.records, r.checkpoints), (13, 4), "{name}");
        }
        // One instance's folder is a location too, named by the folder.
        let only_a = url::Url::from_directory_path(store_dir.join("a")).unwrap();
        let found = check(&rt, &only_a);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "a");
        assert!(found[0].1.is_ok());

        let (a, b) = (objects(&store_dir.join("a")), objects(&store_dir.join("b")));
        let why = |found: Vec<(String, Result<VerifyReport, String>)>, who: &str| {
            found
                .into_iter()
                .find(|(n, _)| n == who)
                .unwrap()
                .1
                .unwrap_err()
        };

        // a's first file in b's place: its chain links, but it is a's.
        let b0 = std::fs::read(&b[0]).unwrap();
        std::fs::copy(&a[0], &b[0]).unwrap();
        let e = why(check(&rt, &url), "b");
        assert!(
            e.contains("record of instance a among instance b's files"),
            "{e}"
        );
        std::fs::write(&b[0], b0).unwrap();

        // A file renamed to claim more records than it holds.
        let name = a[1].file_name().unwrap().to_str().unwrap().to_string();
        let seg = store::SegmentName::parse(&name).unwrap();
        let claimed = store::SegmentName {
            last: seg.last + 5,
            ..seg.clone()
        };
        let renamed = a[1].with_file_name(claimed.to_string());
        std::fs::rename(&a[1], &renamed).unwrap();
        let e = why(check(&rt, &url), "a");
        assert!(
            e.contains(&format!(
                "is named for records {}-{} but holds {}-{}",
                seg.first,
                seg.last + 5,
                seg.first,
                seg.last
            )),
            "{e}"
        );
        std::fs::rename(&renamed, &a[1]).unwrap();

        // The same records twice, under a later seal time.
        let again = store::SegmentName {
            sealed: "29991231T235959Z".into(),
            ..seg.clone()
        };
        std::fs::copy(&a[1], a[1].with_file_name(again.to_string())).unwrap();
        let e = why(check(&rt, &url), "a");
        assert!(e.contains("a duplicated or overlapping object"), "{e}");
        assert!(check(&rt, &url).iter().any(|(n, r)| n == "b" && r.is_ok()));
    }

    /// Three workers' chains in one folder, written by the real writer: each verified on its
    /// own and named by its file; a tampered one fails alone, naming its file and line.
    #[test]
    fn each_worker_chain_of_a_folder_is_verified_on_its_own() {
        use crate::audit::files::log_chains;
        use crate::audit::testing::{subject_decision, trusting, write_worker_chains};
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let p = policy();
        let chains = (0..3)
            .map(|k| {
                (0..4 + k)
                    .map(|n| subject_decision(&p, &format!("w{k}-{n}"), n as i64, "u1"))
                    .collect()
            })
            .collect();
        let active = runtime().block_on(write_worker_chains(dir.path(), Some(key.clone()), chains));
        let verified = |opts: &VerifyOptions| {
            verify_local(dir.path(), log_chains(dir.path()).unwrap(), opts)
                .unwrap()
                .instances
                .into_iter()
                .map(|i| (i.instance, i.result))
                .collect::<Vec<_>>()
        };
        let found = verified(&trusting(&key));
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "decisions.jsonl",
                "decisions.w1.jsonl",
                "decisions.w2.jsonl"
            ]
        );
        for (k, (name, r)) in found.iter().enumerate() {
            let r = r.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(r.closed, "{name}");
            assert_eq!((r.records, r.checkpoints), (4 + k as u64, 1), "{name}");
        }

        // One status edited in worker 1's chain.
        let text = std::fs::read_to_string(&active[1]).unwrap();
        let edited = text.replacen("\"status\":200", "\"status\":204", 1);
        assert_ne!(edited, text);
        std::fs::write(&active[1], edited).unwrap();
        let found = verified(&trusting(&key));
        assert!(found[0].1.is_ok() && found[2].1.is_ok(), "{found:?}");
        let why = found[1].1.as_ref().unwrap_err();
        assert_eq!(
            why,
            &format!(
                "{}:1: hash mismatch: record was edited",
                active[1].display()
            )
        );

        // A head is one chain's: refused over several, pointing at one chain's file.
        let head = VerifyOptions {
            heads: vec![format!("1:{}", "0".repeat(64)).parse().unwrap()],
            ..VerifyOptions::default()
        };
        let err = verify_local(dir.path(), log_chains(dir.path()).unwrap(), &head)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "holds 3 chains: give the chain's active file ({})",
                active[0].display()
            )),
            "{err}"
        );
    }
}
