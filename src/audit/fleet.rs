//! A fleet's logs in object storage: each instance's shipped files verified as one chain,
//! and every instance's records read in turn for `audit query|report|export`.
//!
//! Files are fetched one ahead of the one being read (the next download overlaps the
//! current file's checks) and decompressed as they are read, so memory holds about two
//! compressed files whatever the location holds.

use super::files::{LineReader, LogFilesError, Segments};
use super::store::{self, Listing, Location, Segment};
use super::verify::{Broken, Chain, VerifyError, VerifyOptions, VerifyReport};
use object_store::ObjectStoreExt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// What `audit verify` found for one instance.
#[derive(Debug)]
pub struct InstanceVerdict {
    pub instance: String,
    /// The chain verified (closed, or open with `--open`), or why not, in words that name
    /// the object or the range.
    pub result: Result<VerifyReport, String>,
}

/// What `audit verify` found at a location.
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
    if !opts.heads.is_empty()
        && let Some(first) = listing.instances.keys().next()
        && listing.instances.len() > 1
    {
        return Err(LogFilesError::Store(format!(
            "--head names a record of one chain, and {} holds {} instances: give the instance's own folder ({}/{first}/)",
            loc.url,
            listing.instances.len(),
            loc.url.trim_end_matches('/'),
        )));
    }
    let mut report = FleetReport {
        strangers: listing.strangers.iter().map(|p| p.to_string()).collect(),
        ..FleetReport::default()
    };
    for (instance, segments) in listing.instances {
        let result = verify_instance(rt, loc, &instance, segments, opts);
        report.instances.push(InstanceVerdict { instance, result });
    }
    Ok(report)
}

fn verify_instance(
    rt: &Arc<Runtime>,
    loc: &Location,
    instance: &str,
    segments: Vec<Segment>,
    opts: &VerifyOptions,
) -> Result<VerifyReport, String> {
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
            return Err(format!(
                "records {expected}-{} missing (the next object, {shown}, starts at seq {})",
                seg.name.first - 1,
                seg.name.first
            ));
        }
        if seg.name.first < expected {
            return Err(format!(
                "{shown} starts at seq {}, but records up to seq {} came before it: a duplicated or overlapping object",
                seg.name.first,
                expected - 1
            ));
        }
        let reader = fetch
            .next()
            .expect("one fetch per segment")
            .map_err(|e| e.to_string())?
            .1;
        chain.file(&name, reader, false).map_err(describe_error)?;
        if chain.seq() != seg.name.last {
            return Err(format!(
                "{shown} is named for records {}-{} but holds {}-{}: it was overwritten or edited",
                seg.name.first,
                seg.name.last,
                seg.name.first,
                chain.seq()
            ));
        }
        end = name;
    }
    let report = chain.finish(&end).map_err(describe_error)?;
    if !report.closed && !user_open {
        return Err(format!(
            "open: the chain ends at seq {} without a final checkpoint (the sidecar is still running, or stopped without one); pass --open to accept it",
            report.last_seq
        ));
    }
    Ok(report)
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
    let base = loc.url.trim_end_matches('/');
    let rel = seg
        .path
        .as_ref()
        .strip_prefix(loc.prefix.as_ref())
        .unwrap_or(seg.path.as_ref())
        .trim_start_matches('/');
    PathBuf::from(format!("{base}/{rel}"))
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
    Ok(Segments {
        count: all.len(),
        iter: Box::new(Prefetch::new(rt.clone(), loc.clone(), all)),
    })
}

/// Fetches segments in order, one ahead.
struct Prefetch {
    rt: Arc<Runtime>,
    loc: Location,
    queue: std::vec::IntoIter<Segment>,
    ahead: Option<(PathBuf, JoinHandle<Result<bytes::Bytes, String>>)>,
}

impl Prefetch {
    fn new(rt: Arc<Runtime>, loc: Location, segments: Vec<Segment>) -> Prefetch {
        let mut p = Prefetch {
            rt,
            loc,
            queue: segments.into_iter(),
            ahead: None,
        };
        p.ahead = p.start_next();
        p
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
        let (name, task) = self.ahead.take()?;
        let fetched = self.rt.block_on(task);
        self.ahead = self.start_next();
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
