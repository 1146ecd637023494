//! The running proxy: start-up (policy, geolocation, consents, decision log, upstreams),
//! the workers, reloads and shutdown.
//!
//! `start` runs on the caller's runtime, which stays the control runtime: the consent feeds
//! and cache-miss queries, upstream resolution, reloads, shipping (and, above, the admin
//! listener and signals) run there. Requests are served by the workers (`worker`), each a
//! thread with its own runtime, listener, snapshot and decision-log chain.
//!
//! A request's modules, bottom up (each uses only those before it, and the state this file
//! shares): `stall` (how long nothing may move), `exchange` (its bookkeeping and outcome
//! record), `request_body`, `upstream` (resolution, pools, connecting), `body` (the response
//! body), `respond` (the answers the proxy writes itself), `snapshot`, `pipeline` (limits,
//! decision, decision record, then refuse or forward), `server` (the accept loop) and
//! `worker` (a thread serving one listener).

pub mod body;
pub mod exchange;
pub mod filter;
pub mod pipeline;
pub mod reload;
pub mod request_body;
pub mod respond;
pub mod server;
pub mod shipping;
pub mod snapshot;
pub mod stall;
pub mod token;
pub mod upstream;
pub mod worker;

use crate::audit::keys::KeyError;
use crate::audit::write::{AuditError, LogFailed, LogWriter, worker_settings};
use crate::consent::cache::{Loader, POOL_SIZE, Reader};
use crate::consent::file::FileStoreError;
use crate::consent::postgres::PgReader;
use crate::consent::sqlite::SqliteReader;
use crate::consent::{ConsentIndex, Registry, RegistryError};
use crate::geo::GeoError;
use crate::metrics::Metrics;
use crate::policy::model::ConsentStore;
use crate::policy::{Policy, PolicyError};
use crate::tls::ServerTls;
use arc_swap::{ArcSwap, ArcSwapOption};
use reload::{ReadPolicy, ReloadStatus, Reloader, Trigger};
use snapshot::{Overrides, Snapshot, read_policy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the policy file, its includes and the geolocation database are examined for
/// changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// How long shutdown waits for the outcome records of exchanges still ending.
pub(crate) const OUTCOME_GRACE: Duration = Duration::from_secs(2);

/// Why the proxy could not start (or a reload was rejected).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Geo(#[from] GeoError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    ConsentFile(#[from] FileStoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] token::TokenError),
    #[error("a loader task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Tls(Box<crate::tls::TlsError>),
    #[error("upstreams.{upstream}: {source}")]
    UpstreamTls {
        upstream: String,
        source: Box<crate::tls::TlsError>,
    },
    #[error(transparent)]
    Ship(#[from] shipping::ShipStartError),
    #[error("{what} cannot change on reload (restart the proxy to change it)")]
    NeedsRestart { what: &'static str },
    #[error("cannot start worker {worker}: {source}")]
    Worker {
        worker: usize,
        source: std::io::Error,
    },
}

impl From<crate::tls::TlsError> for ServeError {
    fn from(e: crate::tls::TlsError) -> Self {
        ServeError::Tls(Box::new(e))
    }
}

/// How often the SQLite feed looks for changes written by other processes.
const SQLITE_POLL: Duration = Duration::from_millis(250);

/// What every connection of one worker shares: the worker's own snapshot (whose upstream
/// runtimes hold its connection pools), its own decision-log chain and its count of open
/// exchanges, beside handles to what all workers share (the consent index, the metrics, the
/// admin's state). Every worker has one; reloads swap each worker's snapshot.
pub struct Shared {
    /// The worker's number (0 for the first, whose chain keeps the configured name).
    pub worker: usize,
    pub snapshot: ArcSwap<Snapshot>,
    /// This worker's chain.
    pub log: LogWriter,
    pub consents: Arc<ConsentIndex>,
    /// Fills the consent cache on a miss (database stores without `preload`); its queries
    /// run on the control runtime.
    pub consent_loader: Option<Arc<Loader>>,
    /// The proxy's metrics, one set for all workers.
    pub metrics: Arc<Metrics>,
    /// The last reload attempt, if any (`/v1/policy`).
    pub last_reload: Arc<ArcSwapOption<ReloadStatus>>,
    /// The consent registry (`sqlite:`/`postgres://` stores), for the admin API.
    pub registry: Option<Registry>,
    /// Exchanges of this worker whose outcome record is still to be written.
    pub exchanges: std::sync::atomic::AtomicUsize,
    /// The admin bearer token (`[admin].token_file`), read again by every reload so that a
    /// rotated token replaces the old one without a restart.
    pub admin_token: Arc<ArcSwapOption<token::AdminToken>>,
    /// This chain's sealed files waiting to ship, when the log ships.
    pub spool: Option<Arc<crate::audit::write::ship::Spool>>,
}

/// What `serve` needs to start.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub policy_path: PathBuf,
    pub overrides: Overrides,
}

/// A proxy started in this process.
pub struct RunningProxy {
    pub addr: SocketAddr,
    /// Worker 0's state (its chain keeps the configured name); what all workers share is
    /// reached through it as well.
    pub shared: Arc<Shared>,
    /// Every worker's state, worker 0 first.
    pub workers: Arc<[Arc<Shared>]>,
    /// The data listener's TLS, when `[tls]` is set: its configuration and counters.
    pub tls: Option<Arc<ServerTls>>,
    stop: watch::Sender<bool>,
    threads: Vec<worker::Worker>,
    background: Vec<JoinHandle<()>>,
    reloader: Arc<Reloader>,
    shipper: Option<shipping::Shipping>,
}

impl RunningProxy {
    /// Re-reads the policy (and what it names) and swaps it in on every worker, as SIGHUP
    /// does; on any error the running snapshots stay, and the rejection is counted, logged
    /// and returned.
    pub async fn reload(&self) -> Result<(), ServeError> {
        self.reloader.reload(Trigger::Signal).await
    }

    /// What swaps new snapshots in on every worker (reloads, new policy bundles).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Rotates every worker's chain (as SIGUSR1 does); see [`rotate_all`].
    pub async fn rotate_logs(&self) -> Vec<Result<Option<PathBuf>, LogFailed>> {
        rotate_all(&self.workers).await
    }

    /// Stops accepting, drains open connections (bounded by `drain_timeout`), closes every
    /// worker's chain with its final checkpoint and returns; when the log ships, every
    /// chain's last file is shipped within `drain_timeout`.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        // Each worker drains, waits for its outcome records and closes its chain on its own
        // thread; they do so side by side.
        futures_util::future::join_all(self.threads.into_iter().map(worker::Worker::finished))
            .await;
        for b in &self.background {
            b.abort();
        }
        // The writers sealed their active files with their final checkpoints: ship them and
        // anything still spooled, within `drain_timeout`.
        if let Some(shipper) = self.shipper {
            let drain = self.shared.snapshot.load().policy.proxy.drain_timeout;
            shipper.drain(drain).await;
        }
    }
}

/// Rotates every chain of `workers` at once (each closes its active file with a checkpoint
/// and renames it): one answer per worker, worker 0 first, each the rotated file's path or
/// `None` when that chain had nothing to rotate.
pub async fn rotate_all(workers: &[Arc<Shared>]) -> Vec<Result<Option<PathBuf>, LogFailed>> {
    futures_util::future::join_all(workers.iter().map(|w| w.log.rotate())).await
}

/// Starts the proxy: everything is checked before the data listener opens, so that a bad
/// policy, key, database or log path fails start-up with a clear error. The admin listener
/// is the caller's (the admin layer, `admin::start`, opens it first and serves it from the proxy's
/// shared state).
pub async fn start(config: ServeConfig) -> Result<RunningProxy, ServeError> {
    let policy = read_policy(&config.policy_path, &config.overrides)?;
    start_with(config, policy).await
}

/// [`start`] with the policy already read from `config.policy_path`.
pub async fn start_with(config: ServeConfig, policy: Policy) -> Result<RunningProxy, ServeError> {
    start_reading(config, policy, None).await
}

/// [`start_with`] for a policy that reloads read through `read` (a sidecar's own file merged
/// with its live bundle) rather than from `config.policy_path` alone.
pub async fn start_reading(
    config: ServeConfig,
    policy: Policy,
    read: Option<ReadPolicy>,
) -> Result<RunningProxy, ServeError> {
    let watched = reload::baseline(&policy).await;
    let token = policy
        .admin
        .token_file
        .as_deref()
        .map(token::read_token)
        .transpose()?;
    // Database stores keep a bounded cache of the subjects seen, filled on a miss, unless
    // `preload` asks for the whole registry (SPEC section 4.1).
    let settings = &policy.consent;
    let cached = matches!(
        settings.store,
        ConsentStore::Sqlite(_) | ConsentStore::Postgres(_)
    ) && !settings.preload;
    let consents = Arc::new(if cached {
        ConsentIndex::cache(settings.cache_max_bytes)
    } else {
        ConsentIndex::new()
    });
    let mut background = Vec::new();
    let mut consent_loader = None;
    match &settings.store {
        ConsentStore::None => {
            tracing::warn!(
                "no consent.store configured: no consent exists, so every transfer that needs consent is refused"
            );
        }
        ConsentStore::File(path) => {
            let report = crate::consent::file::load(path, &consents)?;
            tracing::info!(consent.file = %path.display(), consents = report.loaded, skipped = report.skipped.len(), "consents loaded");
            background.push(crate::consent::file::watch(
                path.clone(),
                consents.clone(),
                Duration::from_secs(1),
            ));
        }
        ConsentStore::Sqlite(path) => {
            background.push(
                crate::consent::sqlite::start_feed(path.clone(), consents.clone(), SQLITE_POLL)
                    .await
                    .map_err(RegistryError::from)?,
            );
            if cached {
                let reader = Reader::Sqlite(SqliteReader::new(path.clone(), POOL_SIZE));
                consent_loader = Some(Arc::new(Loader::new(
                    consents.clone(),
                    reader,
                    settings.lookup_timeout,
                )));
            }
        }
        ConsentStore::Postgres(url) => {
            let reader = PgReader::new(url, settings.read_url.as_deref(), POOL_SIZE)
                .map_err(RegistryError::from)?;
            background.push(
                crate::consent::postgres::start_feed(
                    url,
                    consents.clone(),
                    settings.max_staleness,
                    reader.recent(),
                )
                .await
                .map_err(RegistryError::from)?,
            );
            if cached {
                consent_loader = Some(Arc::new(Loader::new(
                    consents.clone(),
                    Reader::Postgres(Box::new(reader)),
                    settings.lookup_timeout,
                )));
            }
        }
    }
    // The feed has created the SQLite file; the API's writer must not create another if it
    // goes away.
    let registry = match &policy.consent.store {
        ConsentStore::Sqlite(_) | ConsentStore::Postgres(_) => {
            Some(Registry::open(&policy.consent.store, false).await?)
        }
        ConsentStore::None | ConsentStore::File(_) => None,
    };
    let tls = match policy.tls.clone() {
        None => None,
        Some(settings) => {
            let loaded = tokio::task::spawn_blocking(move || ServerTls::load(&settings))
                .await
                .map_err(|e| ServeError::Task(e.to_string()))??;
            Some(Arc::new(loaded))
        }
    };
    let metrics = Arc::new(Metrics::new());
    let workers = worker::count(&policy);
    let snapshots =
        Snapshot::build_workers(policy, &[], workers, consents.clone(), &metrics).await?;
    let first = &snapshots[0];
    let shipping = shipping::prepare(&first.policy, &first.locator, workers).await?;
    // Every chain is opened (and its tail checked) before anything serves.
    let mut chains = Vec::with_capacity(workers);
    for w in 0..workers {
        let spool = shipping.as_ref().map(|p| p.spool(w).clone());
        let settings = worker_settings(&first.policy.log, w);
        let (log, committer) =
            LogWriter::prepare(&settings, first.signing_key.clone(), spool.clone())?;
        chains.push((log, committer, spool));
    }
    let shipper = shipping.map(|prepared| {
        let locator = crate::geo::Locator::new(&first.policy, first.locator.database().cloned());
        shipping::start(&first.policy, locator, prepared)
    });
    let proxy = first.policy.proxy.clone();
    let (listeners, addr) = worker::bind(proxy.listen, workers).await?;
    tracing::info!(
        listen = %addr,
        workers,
        policy.name = %first.policy.name,
        policy.hash = %first.policy.hash,
        policy.revision = first.policy.revision,
        geo.db = first.geo_label.as_deref().unwrap_or("none"),
        tls = match &first.policy.tls {
            None => "off",
            Some(t) if t.client_ca.is_some() => "mtls",
            Some(_) => "on",
        },
        "residency-proxy serving"
    );
    let last_reload = Arc::new(ArcSwapOption::empty());
    let admin_token = Arc::new(ArcSwapOption::new(token.map(Arc::new)));
    let mut committers = Vec::with_capacity(workers);
    let shared: Arc<[Arc<Shared>]> = snapshots
        .into_iter()
        .zip(chains)
        .enumerate()
        .map(|(w, (snapshot, (log, committer, spool)))| {
            committers.push(committer);
            Arc::new(Shared {
                worker: w,
                snapshot: ArcSwap::from_pointee(snapshot),
                log,
                consents: consents.clone(),
                consent_loader: consent_loader.clone(),
                metrics: metrics.clone(),
                last_reload: last_reload.clone(),
                registry: registry.clone(),
                exchanges: Default::default(),
                admin_token: admin_token.clone(),
                spool,
            })
        })
        .collect();
    let (stop, stop_rx) = watch::channel(false);
    background.push(tokio::spawn(resolver(
        shared.clone(),
        proxy.resolve_interval,
    )));
    let reloader = Arc::new(Reloader::new(shared.clone(), config, read, tls.clone()));
    background.push(tokio::spawn(reload::watch(
        reloader.clone(),
        WATCH_INTERVAL,
        watched,
    )));
    if let Some(t) = &tls {
        background.push(t.clone().watch(Duration::from_secs(1)));
    }
    let mut threads = Vec::with_capacity(workers);
    for ((w, listener), committer) in shared.iter().zip(listeners).zip(committers) {
        let assignment = worker::Assignment {
            shared: w.clone(),
            listener,
            committer,
            stop: stop_rx.clone(),
            drain: proxy.drain_timeout,
            tls: tls.clone(),
            max_connections: proxy.max_connections.div_ceil(workers),
        };
        match worker::spawn(w.worker, assignment).await {
            Ok(t) => threads.push(t),
            Err(e) => {
                // Those already serving stop, and their chains close cleanly.
                let _ = stop.send(true);
                futures_util::future::join_all(threads.into_iter().map(worker::Worker::finished))
                    .await;
                for b in &background {
                    b.abort();
                }
                return Err(e);
            }
        }
    }
    Ok(RunningProxy {
        addr,
        shared: shared[0].clone(),
        workers: shared,
        tls,
        stop,
        threads,
        background,
        reloader,
        shipper,
    })
}

/// Keeps upstream host resolutions current, off the request path: each host is looked up
/// once per round, and what was found goes to every worker's runtime of that upstream.
async fn resolver(workers: Arc<[Arc<Shared>]>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let snaps: Vec<Arc<Snapshot>> = workers.iter().map(|w| w.snapshot.load_full()).collect();
        let mut found: Vec<((String, u16), upstream::Lookup)> = Vec::new();
        for up in snaps.iter().flat_map(|s| s.upstreams.iter()) {
            let (host, port) = up.target();
            let known = found.iter().position(|((h, p), _)| h == host && *p == port);
            let i = match known {
                Some(i) => i,
                None => match up.lookup().await {
                    Some(f) => {
                        found.push(((host.to_string(), port), f));
                        found.len() - 1
                    }
                    None => continue,
                },
            };
            up.apply(&found[i].1);
        }
    }
}
