//! The running proxy: start-up (policy, geolocation, consents, decision log, upstreams),
//! the accept loop, reloads and shutdown.
//!
//! A request's modules, bottom up (each uses only those before it, and the state this file
//! shares): `stall` (how long nothing may move), `exchange` (its bookkeeping and outcome
//! record), `request_body`, `upstream` (resolution, pools, connecting), `body` (the response
//! body), `respond` (the answers the proxy writes itself), `snapshot`, `pipeline` (limits,
//! decision, decision record, then refuse or forward) and `server` (the accept loop).

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

use crate::audit::keys::KeyError;
use crate::audit::write::{AuditError, LogWriter};
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
use reload::{ReloadStatus, Reloader, Trigger};
use snapshot::{Overrides, Snapshot, read_policy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the policy file, its includes and the geolocation database are examined for
/// changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// How long shutdown waits for the outcome records of exchanges still ending.
const OUTCOME_GRACE: Duration = Duration::from_secs(2);

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
}

impl From<crate::tls::TlsError> for ServeError {
    fn from(e: crate::tls::TlsError) -> Self {
        ServeError::Tls(Box::new(e))
    }
}

/// How often the SQLite feed looks for changes written by other processes.
const SQLITE_POLL: Duration = Duration::from_millis(250);

/// State shared by every connection.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub log: LogWriter,
    pub consents: Arc<ConsentIndex>,
    /// Fills the consent cache on a miss (database stores without `preload`).
    pub consent_loader: Option<Arc<Loader>>,
    pub metrics: Metrics,
    /// The last reload attempt, if any (`/v1/policy`).
    pub last_reload: ArcSwapOption<ReloadStatus>,
    /// The consent registry (`sqlite:`/`postgres://` stores), for the admin API.
    pub registry: Option<Registry>,
    /// Exchanges whose outcome record is still to be written.
    pub exchanges: std::sync::atomic::AtomicUsize,
    /// The admin bearer token (`[admin].token_file`), read again by every reload so that a
    /// rotated token replaces the old one without a restart.
    pub admin_token: ArcSwapOption<token::AdminToken>,
    /// Sealed log files waiting to ship, when the log ships.
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
    pub shared: Arc<Shared>,
    /// The data listener's TLS, when `[tls]` is set: its configuration and counters.
    pub tls: Option<Arc<ServerTls>>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    reloader: Arc<Reloader>,
    shipper: Option<shipping::Shipping>,
}

impl RunningProxy {
    /// Re-reads the policy (and what it names) and swaps it in, as SIGHUP does; on any
    /// error the running snapshot stays, and the rejection is counted, logged and returned.
    pub async fn reload(&self) -> Result<(), ServeError> {
        self.reloader.reload(Trigger::Signal).await
    }

    /// Stops accepting, drains open connections (bounded by `drain_timeout`), flushes the
    /// decision log and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        for b in &self.background {
            b.abort();
        }
        // An exchange can outlive its client connection: an upstream connection still sending
        // an upload holds it, and so does an HTTP/2 stream task. Its outcome record is waited
        // for (briefly) before the log is closed.
        let deadline = tokio::time::Instant::now() + OUTCOME_GRACE;
        while self
            .shared
            .exchanges
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shared.log.close().await;
        // The writer sealed the active file with its final checkpoint: ship it and anything
        // still spooled, within `drain_timeout`.
        if let Some(shipper) = self.shipper {
            let drain = self.shared.snapshot.load().policy.proxy.drain_timeout;
            shipper.drain(drain).await;
        }
    }
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
    let metrics = Metrics::new();
    let snapshot = Snapshot::build(policy, None, consents.clone(), &metrics).await?;
    let shipping = shipping::prepare(&snapshot.policy, &snapshot.locator).await?;
    let spool = shipping.as_ref().map(|p| p.spool().clone());
    let log = LogWriter::open_spooled(
        &snapshot.policy.log,
        snapshot.signing_key.clone(),
        spool.clone(),
    )?;
    let shipper = shipping.map(|prepared| {
        let locator =
            crate::geo::Locator::new(&snapshot.policy, snapshot.locator.database().cloned());
        shipping::start(&snapshot.policy, locator, prepared)
    });
    let listen = snapshot.policy.proxy.listen;
    let drain = snapshot.policy.proxy.drain_timeout;
    let resolve_every = snapshot.policy.proxy.resolve_interval;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen,
        source,
    })?;
    tracing::info!(
        listen = %addr,
        policy.name = %snapshot.policy.name,
        policy.hash = %snapshot.policy.hash,
        geo.db = snapshot.geo_label.as_deref().unwrap_or("none"),
        tls = match &snapshot.policy.tls {
            None => "off",
            Some(t) if t.client_ca.is_some() => "mtls",
            Some(_) => "on",
        },
        "residency-proxy serving"
    );
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        log,
        consents,
        consent_loader,
        metrics,
        last_reload: ArcSwapOption::empty(),
        registry,
        exchanges: Default::default(),
        admin_token: ArcSwapOption::new(token.map(Arc::new)),
        spool,
    });
    let (stop, stop_rx) = watch::channel(false);
    background.push(tokio::spawn(resolver(shared.clone(), resolve_every)));
    let reloader = Arc::new(Reloader::new(shared.clone(), config, tls.clone()));
    background.push(tokio::spawn(reload::watch(
        reloader.clone(),
        WATCH_INTERVAL,
        watched,
    )));
    if let Some(t) = &tls {
        background.push(t.clone().watch(Duration::from_secs(1)));
    }
    let server = tokio::spawn(server::accept_loop(
        listener,
        shared.clone(),
        stop_rx,
        drain,
        tls.clone(),
    ));
    Ok(RunningProxy {
        addr,
        shared,
        tls,
        stop,
        server,
        background,
        reloader,
        shipper,
    })
}

/// Keeps upstream host resolutions current, off the request path.
async fn resolver(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let snap = shared.snapshot.load_full();
        for up in &snap.upstreams {
            up.refresh().await;
        }
    }
}
