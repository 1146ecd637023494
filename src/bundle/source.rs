//! A sidecar's bundle source: polls `[policy.source] url` (`s3://` and `https://` with
//! `If-None-Match`, `file:` by the file's identity and modification time), verifies the
//! signature and every hash before anything is compiled, compiles the bundle with the
//! sidecar's own file, checks that the source is at home under the policy it would serve, keeps
//! it on the sidecar's volume and publishes it. Anything else is refused with a typed reason,
//! and the live bundle keeps serving.
//!
//! The source is located like an upstream, by every address its host resolves to, with the
//! live policy's overrides and database (the log's store check, called, not copied): before
//! each fetch when the addresses changed, and with each new bundle's policy before it goes
//! live. A sidecar with no bundle yet has nothing to locate it with until the first one is
//! fetched: that one is used only if its own policy puts the source at home.

use super::{Reason, Refusal, VerifiedBundle, format, keep};
use crate::audit::keys;
use crate::audit::store::{self, Location, StoreOptions};
use crate::geo::{GeoDb, Locator};
use crate::policy::model::{PolicySource, SourceUrl};
use crate::policy::{Policy, PolicyError};
use crate::proxy::shipping::{LocateError, Purpose, locate_host};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// The largest bundle fetched (a policy and a City database fit many times over).
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;

/// How the policy source is named when it is located.
const POLICY_SOURCE: Purpose = Purpose {
    what: "policy source",
    waits: "no bundle is fetched",
    why_home: "a sidecar takes its rules only from a source at home",
    only: "bundles are fetched only from a source",
};

/// Turns a verified bundle into the policy the sidecar would serve: its own file merged with
/// the bundle (`policy::compile::merge`), with whatever the command line overrides. An error
/// refuses the bundle as `does_not_compile`. Called off the runtime threads.
pub type Compile = Arc<dyn Fn(&VerifiedBundle) -> Result<Policy, PolicyError> + Send + Sync>;

/// Why a source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("policy.source.key: {0}")]
    Key(#[from] keys::KeyError),
    #[error("policy.source: {0}")]
    Open(String),
    /// The kept bundle's policy puts the source outside home.
    #[error("policy.source: {0}")]
    Abroad(String),
}

/// Where a source stands, for `/readyz`, `/v1/policy` and the metrics.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// `[policy.source] url`.
    pub url: String,
    /// The live bundle; `None` until one is verified and compiles (the sidecar is unready).
    pub live: Option<LiveBundle>,
    /// When the source last answered (with a bundle, or with "not modified").
    pub last_poll: Option<jiff::Timestamp>,
    /// Bundles downloaded since start: a poll answered "not modified" downloads nothing.
    pub downloads: u64,
    /// The bundle the source holds now, refused: why (cleared when one goes live, or the
    /// source holds the live one again).
    pub refused: Option<Failure>,
    /// The last failure of any kind.
    pub last_failure: Option<Failure>,
    /// Failures since start, by reason: once per bundle refused, once per poll that could not
    /// reach the source or found it abroad.
    pub failures: BTreeMap<Reason, u64>,
}

/// The bundle a sidecar serves.
#[derive(Clone, Debug, Serialize)]
pub struct LiveBundle {
    pub revision: u64,
    /// `sha256:` of the bundle file.
    pub digest: String,
    pub built_at: jiff::Timestamp,
    pub builder: String,
    pub signer: String,
    /// When it went live here.
    pub since: jiff::Timestamp,
    /// It is the copy kept on the volume, not (yet) confirmed by the source.
    pub from_kept: bool,
}

/// A refused bundle or a failed poll.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub at: jiff::Timestamp,
    pub reason: Reason,
    pub message: String,
}

/// A running source: the bundles it publishes, its status, and a way to make it look again.
pub struct SourceHandle {
    /// The live bundle (`None`: none yet); a new one is sent when it goes live.
    pub bundles: watch::Receiver<Option<Arc<VerifiedBundle>>>,
    status: Arc<Mutex<Status>>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

impl SourceHandle {
    /// Where the source stands now.
    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// A handle on the status alone, for the admin listener and the metrics.
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle(self.status.clone())
    }

    /// Polls at once, judging again a bundle refused before (after the sidecar's own file
    /// changed, a bundle that did not compile with it may now).
    pub fn poll_now(&self) {
        self.wake.notify_one();
    }

    /// Stops polling.
    pub fn stop(self) {
        self.task.abort();
    }

    /// A way to [`SourceHandle::poll_now`] for whoever does not hold the handle.
    pub fn waker(&self) -> Waker {
        Waker(self.wake.clone())
    }
}

/// Makes a running source poll at once, judging again a bundle refused before.
#[derive(Clone)]
pub struct Waker(Arc<Notify>);

impl Waker {
    pub fn poll_now(&self) {
        self.0.notify_one();
    }
}

/// The status of a running source, shared.
#[derive(Clone)]
pub struct StatusHandle(Arc<Mutex<Status>>);

impl StatusHandle {
    pub fn get(&self) -> Status {
        lock(&self.0).clone()
    }
}

fn lock(s: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// How bundles are fetched.
enum Fetcher {
    /// `s3://` and `https://`: an object store client with `If-None-Match`.
    Store { loc: Location, path: ObjectPath },
    /// `file:`.
    File(PathBuf),
}

/// A file's identity and modification time: a `file:` source is read again when it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    modified: SystemTime,
}

/// The bundle being served and what was found about it.
struct Live {
    bundle: Arc<VerifiedBundle>,
    policy: Arc<Policy>,
    /// The source's addresses when it was last located with this policy.
    located: Option<BTreeSet<IpAddr>>,
}

/// A bundle accepted by [`judge`]: verified, compiled, its database opened.
struct Judged {
    bundle: VerifiedBundle,
    policy: Policy,
    db: Option<Arc<GeoDb>>,
}

/// A sidecar's bundle source, opened and not yet polling.
pub struct Source {
    settings: PolicySource,
    key: Arc<Vec<u8>>,
    label: PathBuf,
    fetcher: Fetcher,
    compile: Compile,
    live: Option<Live>,
    /// The previous live bundle's database, kept on disk while a snapshot may read it.
    previous_geo: Option<PathBuf>,
    /// What was last fetched and settled (live, or refused for a fault of its own), to ask
    /// for it only if it changed. A bundle that could not be located or kept for a passing
    /// reason is not settled: the next poll fetches and judges it again.
    etag: Option<String>,
    file_version: Option<FileVersion>,
    /// The last bundle refused (its digest), so that it is judged once.
    refused_digest: Option<String>,
    /// The live bundle could not be kept on the volume.
    unkept: bool,
    /// The last failure logged: the same one again is logged at debug level.
    last_logged: Option<(Reason, String)>,
    status: Arc<Mutex<Status>>,
    tx: watch::Sender<Option<Arc<VerifiedBundle>>>,
    wake: Arc<Notify>,
}

impl Source {
    /// Opens the source (nothing is contacted) and the bundle kept on the volume, verified and
    /// compiled again; fails when the kept bundle's policy puts the source outside home.
    pub async fn open(settings: PolicySource, compile: Compile) -> Result<Source, SourceError> {
        let key = Arc::new(keys::load_public_key(&settings.key)?);
        let fetcher = fetcher(&settings).map_err(SourceError::Open)?;
        let label = PathBuf::from(settings.url.to_string());
        let (tx, _) = watch::channel(None);
        let mut source = Source {
            status: Arc::new(Mutex::new(Status {
                url: settings.url.to_string(),
                live: None,
                last_poll: None,
                downloads: 0,
                refused: None,
                last_failure: None,
                failures: BTreeMap::new(),
            })),
            settings,
            key,
            label,
            fetcher,
            compile,
            live: None,
            previous_geo: None,
            etag: None,
            file_version: None,
            refused_digest: None,
            unkept: false,
            last_logged: None,
            tx,
            wake: Arc::new(Notify::new()),
        };
        source.open_kept().await?;
        Ok(source)
    }

    /// The bundle kept on the volume, if it is still one to serve.
    async fn open_kept(&mut self) -> Result<(), SourceError> {
        let cache = self.settings.cache.clone();
        let read = tokio::task::spawn_blocking(move || keep::read(&cache))
            .await
            .expect("reading a file does not panic");
        let bytes = match read {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(policy.source = %self.settings.url, bundle.cache = %self.settings.cache.display(), error = %e, "the kept policy bundle cannot be read; waiting for the source");
                return Ok(());
            }
        };
        let (judged, _) = match self.judge(bytes, None).await {
            Ok(j) => j,
            Err(refusal) => {
                tracing::warn!(policy.source = %self.settings.url, bundle.cache = %self.settings.cache.display(), bundle.reason = refusal.reason.as_str(), error = %refusal.message, "the kept policy bundle is refused; waiting for the source");
                self.fail(refusal);
                return Ok(());
            }
        };
        let Judged { bundle, policy, db } = judged;
        let policy = Arc::new(policy);
        let located = match self.locate(&policy, db).await {
            Ok(found) => Some(found),
            Err(r) if r.reason == Reason::SourceAbroad => {
                return Err(SourceError::Abroad(r.message));
            }
            Err(r) => {
                tracing::warn!(policy.source = %self.settings.url, error = %r.message, "policy source not located yet; no bundle is fetched until it is");
                None
            }
        };
        tracing::info!(
            policy.source = %self.settings.url,
            bundle.revision = bundle.revision(),
            bundle.digest = %bundle.digest,
            "policy bundle kept on the volume is live until the source is polled"
        );
        self.go_live(bundle, policy, located, true);
        Ok(())
    }

    /// Starts polling: at once, then every `poll_interval` (a little less, at random, so that
    /// a fleet started together does not poll together).
    pub fn start(self) -> SourceHandle {
        let bundles = self.tx.subscribe();
        let status = self.status.clone();
        let wake = self.wake.clone();
        let task = tokio::spawn(self.run());
        SourceHandle {
            bundles,
            status,
            wake,
            task,
        }
    }

    async fn run(mut self) {
        loop {
            let outcome = self.poll().await;
            self.record(outcome);
            let every = self.settings.poll_interval;
            let wait = every.mul_f64(1.0 - fastrand::f64() * 0.1);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {
                    // Asked to look again: whatever the source holds is judged afresh.
                    self.etag = None;
                    self.file_version = None;
                    self.refused_digest = None;
                }
            }
        }
    }

    /// One poll: `Ok(true)` when a new bundle went live.
    async fn poll(&mut self) -> Result<bool, Refusal> {
        self.locate_live().await?;
        let Some((bytes, etag, version)) = self.fetch().await? else {
            lock(&self.status).last_poll = Some(jiff::Timestamp::now());
            return Ok(false);
        };
        {
            let mut status = lock(&self.status);
            status.last_poll = Some(jiff::Timestamp::now());
            status.downloads += 1;
        }
        let fetched = (etag, version);
        let digest = format!("sha256:{}", format::sha256_hex(&bytes));
        if self
            .live
            .as_ref()
            .is_some_and(|l| l.bundle.digest == digest)
        {
            lock(&self.status).refused = None;
            if self.unkept {
                // The live bundle could not be kept last time: try again.
                self.keep(bytes).await?;
            }
            self.confirm_kept();
            (self.etag, self.file_version) = fetched;
            return Ok(false);
        }
        if self.refused_digest.as_ref() == Some(&digest) {
            (self.etag, self.file_version) = fetched;
            return Ok(false);
        }
        let live_revision = self.live.as_ref().map(|l| l.bundle.revision());
        let (judged, bytes) = match self.judge(bytes, live_revision).await {
            Ok(j) => j,
            Err(refusal) => {
                if is_about_the_bundle(refusal.reason) {
                    self.refused_digest = Some(digest);
                    (self.etag, self.file_version) = fetched;
                }
                return Err(refusal);
            }
        };
        let Judged { bundle, policy, db } = judged;
        let policy = Arc::new(policy);
        let located = match self.locate(&policy, db).await {
            Ok(found) => Some(found),
            Err(r) => {
                if r.reason == Reason::SourceAbroad {
                    self.refused_digest = Some(digest);
                    (self.etag, self.file_version) = fetched;
                }
                return Err(r);
            }
        };
        // Kept before it goes live: a restart comes up on what was served.
        let kept = self.keep(bytes).await;
        self.go_live(bundle, policy, located, false);
        if kept.is_ok() {
            (self.etag, self.file_version) = fetched;
        }
        kept.map(|()| true)
    }

    /// Keeps `bytes` (the live bundle) on the sidecar's volume; until it is kept, each poll
    /// fetches the bundle again to try.
    async fn keep(&mut self, bytes: Vec<u8>) -> Result<(), Refusal> {
        let cache = self.settings.cache.clone();
        let kept = tokio::task::spawn_blocking(move || keep::write_atomic(&cache, &bytes))
            .await
            .expect("writing a file does not panic");
        self.unkept = kept.is_err();
        kept.map_err(|e| {
            Refusal::new(
                Reason::KeepFailed,
                format!(
                    "the live bundle cannot be kept in {}: {e} (a restart while the source is unreachable would not come up on it)",
                    self.settings.cache.display()
                ),
            )
        })
    }

    /// Before contacting the source: locates it with the live policy when its addresses
    /// changed since it was last located.
    async fn locate_live(&mut self) -> Result<(), Refusal> {
        let Fetcher::Store { loc, .. } = &self.fetcher else {
            return Ok(());
        };
        let (Some(live), Some((host, port))) = (&self.live, &loc.host) else {
            return Ok(());
        };
        let addrs = resolve(host, *port).await?;
        if live.located.as_ref() == Some(&addrs) {
            return Ok(());
        }
        let policy = live.policy.clone();
        let found = self.locate(&policy, None).await?;
        if let Some(live) = &mut self.live {
            live.located = Some(found);
        }
        Ok(())
    }

    /// Locates the source with `policy` (and its database, opened here unless given); returns
    /// the addresses found, all at home.
    async fn locate(
        &self,
        policy: &Arc<Policy>,
        db: Option<Arc<GeoDb>>,
    ) -> Result<BTreeSet<IpAddr>, Refusal> {
        let Fetcher::Store { loc, .. } = &self.fetcher else {
            return Ok(BTreeSet::new());
        };
        let Some((host, port)) = &loc.host else {
            return Ok(BTreeSet::new());
        };
        let db = match (db, &policy.geo_database) {
            (Some(db), _) => Some(db),
            (None, None) => None,
            (None, Some(path)) => {
                let path = path.clone();
                let opened = tokio::task::spawn_blocking(move || GeoDb::open(&path))
                    .await
                    .expect("opening a database does not panic");
                Some(Arc::new(opened.map_err(|e| {
                    Refusal::new(Reason::DoesNotCompile, e.to_string())
                })?))
            }
        };
        let locator = Locator::new(policy, db);
        match locate_host(policy, loc, &locator, &POLICY_SOURCE).await {
            Ok(_) => resolve(host, *port).await,
            Err(LocateError::Refused(why)) => Err(Refusal::new(Reason::SourceAbroad, why)),
            Err(LocateError::Resolve(why)) => Err(Refusal::new(Reason::Unreachable, why)),
        }
    }

    /// Fetches the bundle unless it is unchanged: its bytes, ETag and file version.
    async fn fetch(&self) -> Result<Option<Fetched>, Refusal> {
        let unreachable = |why: String| Refusal::new(Reason::Unreachable, why);
        match &self.fetcher {
            Fetcher::Store { loc, path } => {
                let options = GetOptions {
                    if_none_match: self.etag.clone(),
                    ..GetOptions::default()
                };
                let got = match loc.store.get_opts(path, options).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotModified { .. }) => return Ok(None),
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(unreachable(format!(
                            "the source holds no bundle at {}",
                            loc.url
                        )));
                    }
                    Err(e) => return Err(unreachable(format!("{}: {e}", loc.url))),
                };
                if got.meta.size > MAX_BUNDLE_BYTES {
                    return Err(too_large(got.meta.size));
                }
                let etag = got.meta.e_tag.clone();
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|e| unreachable(format!("{}: {e}", loc.url)))?;
                Ok(Some((bytes.to_vec(), etag, None)))
            }
            Fetcher::File(path) => {
                let path = path.clone();
                let known = self.file_version;
                tokio::task::spawn_blocking(move || {
                    let fail = |e: std::io::Error| {
                        unreachable(format!("cannot read {}: {e}", path.display()))
                    };
                    let m = std::fs::metadata(&path).map_err(fail)?;
                    let version = FileVersion {
                        dev: m.dev(),
                        ino: m.ino(),
                        size: m.size(),
                        modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    };
                    if known == Some(version) {
                        return Ok(None);
                    }
                    if version.size > MAX_BUNDLE_BYTES {
                        return Err(too_large(version.size));
                    }
                    let bytes = std::fs::read(&path).map_err(fail)?;
                    Ok(Some((bytes, None, Some(version))))
                })
                .await
                .expect("reading a file does not panic")
            }
        }
    }

    /// Verifies, checks the revision, unpacks the database, compiles and opens the database,
    /// in that order, off the runtime threads; gives the bytes back for keeping.
    async fn judge(
        &self,
        bytes: Vec<u8>,
        live_revision: Option<u64>,
    ) -> Result<(Judged, Vec<u8>), Refusal> {
        let key = self.key.clone();
        let label = self.label.clone();
        let geo_dir = keep::geo_dir(&self.settings.cache);
        let compile = self.compile.clone();
        tokio::task::spawn_blocking(move || {
            let judged = judge(&bytes, &key, label, &geo_dir, live_revision, &compile)?;
            Ok((judged, bytes))
        })
        .await
        .expect("judging a bundle does not panic")
    }

    fn go_live(
        &mut self,
        bundle: VerifiedBundle,
        policy: Arc<Policy>,
        located: Option<BTreeSet<IpAddr>>,
        from_kept: bool,
    ) {
        let bundle = Arc::new(bundle);
        let previous = self.live.replace(Live {
            bundle: bundle.clone(),
            policy,
            located,
        });
        let before = previous
            .as_ref()
            .and_then(|p| p.bundle.geo_database().map(PathBuf::from));
        if before.is_some() {
            self.previous_geo = before;
        }
        let keep_geo: Vec<&std::path::Path> = bundle
            .geo_database()
            .into_iter()
            .chain(self.previous_geo.as_deref())
            .collect();
        keep::prune_geo(&keep::geo_dir(&self.settings.cache), &keep_geo);
        let m = &bundle.manifest;
        {
            let mut status = lock(&self.status);
            status.live = Some(LiveBundle {
                revision: m.revision,
                digest: bundle.digest.clone(),
                built_at: m.built_at,
                builder: m.builder.clone(),
                signer: m.signer.clone(),
                since: jiff::Timestamp::now(),
                from_kept,
            });
            if !from_kept {
                status.refused = None;
            }
        }
        self.refused_digest = None;
        if !from_kept {
            tracing::info!(
                policy.source = %self.settings.url,
                bundle.revision = m.revision,
                bundle.previous_revision = previous.as_ref().map(|p| p.bundle.revision()),
                bundle.digest = %bundle.digest,
                bundle.builder = %m.builder,
                "policy bundle live"
            );
        }
        self.tx.send_replace(Some(bundle));
    }

    /// The source holds the bundle kept on the volume: it is confirmed.
    fn confirm_kept(&mut self) {
        if let Some(live) = &mut lock(&self.status).live {
            live.from_kept = false;
        }
    }

    /// Notes a poll's outcome in the status and the proxy's own log.
    fn record(&mut self, outcome: Result<bool, Refusal>) {
        match outcome {
            Ok(_) => self.last_logged = None,
            Err(refusal) => self.fail(refusal),
        }
    }

    fn fail(&mut self, refusal: Refusal) {
        let failure = Failure {
            at: jiff::Timestamp::now(),
            reason: refusal.reason,
            message: refusal.message.clone(),
        };
        {
            let mut status = lock(&self.status);
            *status.failures.entry(refusal.reason).or_default() += 1;
            if is_about_the_bundle(refusal.reason) {
                status.refused = Some(failure.clone());
            }
            status.last_failure = Some(failure);
        }
        let key = (refusal.reason, refusal.message);
        let again = self.last_logged.as_ref() == Some(&key);
        let (reason, message) = (key.0.as_str(), &key.1);
        let live = self.live.as_ref().map(|l| l.bundle.revision());
        match (is_about_the_bundle(key.0), again) {
            (_, true) => {
                tracing::debug!(policy.source = %self.settings.url, bundle.reason = reason, error = %message, "policy source poll failed again")
            }
            // Nothing serves yet: the sidecar is unready until a bundle is taken.
            (true, false) if live.is_none() => {
                tracing::error!(policy.source = %self.settings.url, bundle.reason = reason, error = %message, "policy bundle refused; no bundle is live yet")
            }
            (false, false) if live.is_none() => {
                tracing::warn!(policy.source = %self.settings.url, bundle.reason = reason, error = %message, "policy source poll failed; no bundle is live yet")
            }
            (true, false) => {
                tracing::error!(policy.source = %self.settings.url, bundle.reason = reason, bundle.live_revision = live, error = %message, "policy bundle refused; the live revision keeps serving")
            }
            (false, false) => {
                tracing::warn!(policy.source = %self.settings.url, bundle.reason = reason, bundle.live_revision = live, error = %message, "policy source poll failed; the live revision keeps serving")
            }
        }
        self.last_logged = Some(key);
    }
}

/// Locates `policy`'s source (its `[policy.source]`) as a sidecar does before fetching, with
/// the policy's overrides and database `db`: every address, one `ADDR (COUNTRY)` each.
pub async fn locate_source(
    policy: &Policy,
    db: Option<Arc<GeoDb>>,
) -> Result<Vec<String>, LocateError> {
    let Some(settings) = &policy.source else {
        return Ok(Vec::new());
    };
    let loc = match fetcher(settings).map_err(LocateError::Refused)? {
        Fetcher::Store { loc, .. } => loc,
        Fetcher::File(_) => return Ok(vec!["local file".into()]),
    };
    locate_host(policy, &loc, &Locator::new(policy, db), &POLICY_SOURCE).await
}

/// What a fetch brought: the bytes, the ETag (object stores) or the file's version (`file:`).
type Fetched = (Vec<u8>, Option<String>, Option<FileVersion>);

/// Whether a failure is about the bundle the source holds (not about reaching it).
fn is_about_the_bundle(reason: Reason) -> bool {
    !matches!(reason, Reason::Unreachable | Reason::KeepFailed)
}

fn too_large(size: u64) -> Refusal {
    Refusal::new(
        Reason::Corrupt,
        format!("the bundle is {size} bytes, more than the {MAX_BUNDLE_BYTES} a bundle may have"),
    )
}

async fn resolve(host: &str, port: u16) -> Result<BTreeSet<IpAddr>, Refusal> {
    tokio::net::lookup_host((host, port))
        .await
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .map_err(|e| {
            Refusal::new(
                Reason::Unreachable,
                format!("cannot resolve the policy source's host {host}: {e}"),
            )
        })
}

/// Everything about a fetched bundle but where its source is: the signature and every hash,
/// then the revision, then (only now) its files are unpacked and compiled.
fn judge(
    bytes: &[u8],
    key: &[u8],
    label: PathBuf,
    geo_dir: &std::path::Path,
    live_revision: Option<u64>,
    compile: &Compile,
) -> Result<Judged, Refusal> {
    let bundle = format::parse(bytes)?;
    bundle.verify(key)?;
    let m = &bundle.manifest;
    if let Some(live) = live_revision
        && m.revision <= live
        && !m.allow_rollback
    {
        return Err(Refusal::new(
            Reason::OlderRevision,
            format!(
                "revision {} is not newer than the live revision {live} (a bundle built with --allow-rollback may replace a newer one)",
                m.revision
            ),
        ));
    }
    let bundle = VerifiedBundle::from_checked(&bundle, bytes, label, geo_dir)?;
    let policy = compile(&bundle).map_err(|e| {
        Refusal::new(
            Reason::DoesNotCompile,
            format!("revision {}: {}", bundle.revision(), compile_errors(&e)),
        )
    })?;
    let db = match &policy.geo_database {
        None => None,
        Some(path) => Some(Arc::new(GeoDb::open(path).map_err(|e| {
            Refusal::new(
                Reason::DoesNotCompile,
                format!("revision {}: {e}", bundle.revision()),
            )
        })?)),
    };
    Ok(Judged { bundle, policy, db })
}

/// A policy's errors in one line: the first few, and how many more.
fn compile_errors(e: &PolicyError) -> String {
    const SHOWN: usize = 5;
    match e {
        PolicyError::Invalid(diags) => {
            let mut s: Vec<String> = diags.iter().take(SHOWN).map(ToString::to_string).collect();
            if diags.len() > SHOWN {
                s.push(format!("and {} more", diags.len() - SHOWN));
            }
            s.join("; ")
        }
        other => other.to_string(),
    }
}

/// The client for the source's URL (nothing is contacted).
fn fetcher(settings: &PolicySource) -> Result<Fetcher, String> {
    match &settings.url {
        SourceUrl::File(path) => Ok(Fetcher::File(path.clone())),
        SourceUrl::S3(url) => {
            let opts = StoreOptions::new(
                settings.endpoint.clone(),
                settings.region.clone(),
                &settings.credentials,
            );
            let loc = store::open(url, &opts).map_err(|e| e.to_string())?;
            let path = loc.prefix.clone();
            Ok(Fetcher::Store { loc, path })
        }
        SourceUrl::Http(url) => http_store(url).map(|(loc, path)| Fetcher::Store { loc, path }),
    }
}

/// An `https://` (or `http://`) source as an object store: the URL's folder is the store, its
/// last segment the object.
fn http_store(url: &url::Url) -> Result<(Location, ObjectPath), String> {
    let mut base = url.clone();
    let name = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{url} does not name a file"))?;
    let name = percent_encoding::percent_decode_str(name)
        .decode_utf8()
        .map_err(|_| format!("{url}: the file name is not UTF-8"))?
        .into_owned();
    base.path_segments_mut()
        .map_err(|()| format!("{url} has no path"))?
        .pop();
    let options = object_store::ClientOptions::new()
        .with_allow_http(url.scheme() == "http")
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120));
    let store = object_store::http::HttpBuilder::new()
        .with_url(base.as_str())
        .with_client_options(options)
        .with_retry(object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..object_store::RetryConfig::default()
        })
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("{url} has no host"))?
        .trim_matches(['[', ']'])
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let loc = Location {
        store: Arc::new(store),
        prefix: ObjectPath::default(),
        url: url.to_string(),
        host: Some((host, port)),
    };
    Ok((loc, ObjectPath::from(name)))
}
