//! The admin listener (SPEC section 6), on its own address, never on the data listener:
//! health, readiness, metrics, the loaded policy, and the routes other modules plug in (the
//! consent API). The consent API, reads included, needs the bearer token from
//! `[admin].token_file`, which every reload reads again.
//!
//! It opens before the proxy has loaded what the policy names ([`start`], [`bind`]):
//! meanwhile `/healthz` says alive and `/readyz` says not ready, so an orchestrator can tell a
//! slow start from a dead process. The admin layer sits above the proxy: it starts it, and
//! serves from its shared state; the proxy knows nothing of it.

pub mod bundle;
pub mod consents;

use crate::audit::write::LogWriter;
use crate::audit::write::ship::ShipStats;
use crate::bundle::source::StatusHandle;
use crate::proxy::{RunningProxy, ServeConfig, ServeError, Shared};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub type AdminResponse = Response<Full<Bytes>>;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 1 << 20;

/// Pause after a failed accept, as on the data listener.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Source(#[from] crate::bundle::source::SourceError),
}

/// A proxy with its admin listener: what `serve` runs. It reads as the proxy it holds.
pub struct Sidecar {
    pub proxy: RunningProxy,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    admin: RunningAdmin,
    /// The bundle source and the task swapping its bundles in, when the rules come from one.
    follower: Option<bundle::Follower>,
}

impl std::ops::Deref for Sidecar {
    type Target = RunningProxy;
    fn deref(&self) -> &RunningProxy {
        &self.proxy
    }
}

impl Sidecar {
    /// Stops the proxy (draining connections, flushing the log), then the admin listener.
    pub async fn shutdown(self) {
        if let Some(f) = self.follower {
            f.stop();
        }
        self.proxy.shutdown().await;
        self.admin.shutdown().await;
    }
}

/// Opens the admin listener (answering "starting" meanwhile), starts the proxy, then serves
/// the admin routes from it.
pub async fn start(config: ServeConfig) -> Result<Sidecar, StartError> {
    let started = start_unless(config, std::future::pending()).await?;
    Ok(started.expect("start-up is not stopped"))
}

/// [`start`], given up (`None`) when `stop` resolves while a sidecar waits for its first
/// policy bundle (a SIGTERM to a sidecar whose source is unreachable and that kept none).
pub async fn start_unless(
    config: ServeConfig,
    stop: impl Future<Output = ()>,
) -> Result<Option<Sidecar>, StartError> {
    let path = config.policy_path.clone();
    let file = tokio::task::spawn_blocking(move || {
        crate::policy::compile::load_file(&path, |p| std::fs::read_to_string(p))
    })
    .await
    .map_err(|e| ServeError::Task(e.to_string()))?
    .map_err(ServeError::from)?;
    let sidecar = match file {
        crate::policy::compile::PolicyFile::Whole(policy) => {
            let mut policy = *policy;
            config.overrides.apply(&mut policy);
            let starting = bind(policy.admin.listen).await?;
            tracing::info!(admin.listen = %starting.addr, "admin listener serving (starting)");
            let proxy = crate::proxy::start_with(config, policy).await?;
            return Ok(Some(serve_admin(starting, proxy, None, None).await));
        }
        crate::policy::compile::PolicyFile::Sidecar(sidecar) => sidecar,
    };
    let listen = config.overrides.admin.unwrap_or(sidecar.admin.listen);
    let starting = bind(listen).await?;
    tracing::info!(admin.listen = %starting.addr, policy.source = %sidecar.source.url, "admin listener serving (waiting for a policy bundle)");
    let waiting = starting.why.clone();
    let started = bundle::start(&config, sidecar.source.clone(), stop, |s| {
        let status = s.clone();
        let _ = waiting.set(Arc::new(move || bundle::waiting(&status.get())));
    })
    .await?;
    let Some(started) = started else {
        return Ok(None);
    };
    let bundle::Started {
        policy,
        read,
        status,
        mut follower,
    } = started;
    let proxy = match crate::proxy::start_reading(config, policy, Some(read)).await {
        Ok(proxy) => proxy,
        Err(e) => {
            follower.stop();
            return Err(e.into());
        }
    };
    follower.follow(proxy.reloader());
    Ok(Some(
        serve_admin(starting, proxy, Some(status), Some(follower)).await,
    ))
}

/// Hands the admin listener to the full routes of the running `proxy`.
async fn serve_admin(
    starting: Starting,
    proxy: RunningProxy,
    source: Option<StatusHandle>,
    follower: Option<bundle::Follower>,
) -> Sidecar {
    let admin = starting
        .serve(Arc::new(AdminState {
            shared: proxy.shared.clone(),
            workers: proxy.workers.clone(),
            source,
        }))
        .await;
    tracing::info!(admin.listen = %admin.addr, "admin listener serving");
    Sidecar {
        admin_addr: admin.addr,
        proxy,
        admin,
        follower,
    }
}

/// What the admin listener serves from; the bearer token is `shared.admin_token`.
pub struct AdminState {
    /// Worker 0's state, through which what all workers share is reached.
    pub shared: Arc<Shared>,
    /// Every worker's state (each with its own chain), worker 0 first.
    pub workers: Arc<[Arc<Shared>]>,
    /// The policy bundle source, when the rules come from one.
    pub source: Option<StatusHandle>,
}

/// The credentials of an `Authorization` header of the `Bearer` scheme. Schemes are
/// case-insensitive (RFC 9110 section 11.1): `bearer …` is the same scheme.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, credentials) = value.split_at(value.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| credentials.trim_ascii())
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> AdminResponse {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON error body `{"error": code, "message": …}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> AdminResponse {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message.into() }),
    )
}

/// A plain-text response.
pub fn text(status: StatusCode, content_type: &'static str, body: String) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

impl AdminState {
    /// Whether the request carries the bearer token (see [`crate::proxy::token::AdminToken`]).
    pub fn authorized(&self, req: &Request<Incoming>) -> bool {
        let token = self.shared.admin_token.load();
        let Some(token) = token.as_deref() else {
            return false;
        };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .is_some_and(|given| token.matches(given))
    }

    /// Whether `[admin].token_file` is set (without it, the routes that need the token are
    /// closed).
    pub fn has_token(&self) -> bool {
        self.shared.admin_token.load().is_some()
    }
}

/// Reads a request body of at most `MAX_BODY` bytes.
pub async fn read_body(req: Request<Incoming>) -> Result<Bytes, AdminResponse> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {MAX_BODY} bytes"),
        )),
    }
}

/// What readiness found; `failing` names each check that did not pass.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub failing: Vec<String>,
    /// The policy bundle source, when the rules come from one: the live revision and how old
    /// the last successful poll is. A refused bundle does not make the sidecar unready: the
    /// live revision keeps serving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_source: Option<bundle::SourceReadiness>,
}

/// Readiness: a policy is loaded (always, once `AdminState` exists: until then the start-up
/// responder answers), the consent registry is reachable and the decision log is writable:
/// every worker's chain (no failure since its last success), and no chain's shipping spool
/// full.
pub fn readiness(workers: &[Arc<Shared>]) -> Readiness {
    let shared = &workers[0];
    let mut failing = Vec::new();
    if let Err(why) = consent_store_ready(shared) {
        failing.push(format!("consent store: {why}"));
    }
    // One worker's chain is "the decision log"; with several, the failing one is named.
    let chain = |w: &Shared| match workers.len() {
        1 => String::new(),
        _ => format!(" (worker {})", w.worker),
    };
    for w in workers {
        if !w.log.healthy() {
            failing.push(format!("decision log{}: the last write failed", chain(w)));
        }
        if let Some(why) = w.spool.as_ref().and_then(|s| s.full()) {
            failing.push(format!("decision log shipping{}: {why}", chain(w)));
        }
    }
    let max_staleness = shared.snapshot.load().policy.consent.max_staleness;
    failing.extend(shared.consents.freshness().stale_reason(max_staleness));
    Readiness {
        ready: failing.is_empty(),
        failing,
        policy_source: None,
    }
}

/// Whether the consent registry can answer. The `file:` store is read whole at start-up
/// (start-up fails if it cannot be) and keeps its last content when a re-read fails, so it
/// is always reachable once serving. A database store read through the cache is not ready
/// while its lookups fail (the latest failure, within the last 10 s, with no success since);
/// its change feed is judged by the staleness check.
fn consent_store_ready(shared: &Shared) -> Result<(), String> {
    match shared
        .consent_loader
        .as_ref()
        .and_then(|l| l.failing(std::time::Duration::from_secs(10)))
    {
        Some(why) => Err(format!("cache-miss lookups failing ({why})")),
        None => Ok(()),
    }
}

/// The metrics exposition (Prometheus text format). The decision log's figures add up every
/// worker's chain; it counts as writable only while every chain is.
pub fn metrics(workers: &[Arc<Shared>], source: Option<&StatusHandle>) -> AdminResponse {
    let shared = &workers[0];
    let snap = shared.snapshot.load();
    let logs = || workers.iter().map(|w| &w.log);
    let body = shared.metrics.render(&crate::metrics::Scrape {
        policy: &snap.policy,
        policy_loaded_at: snap.loaded_at,
        geo_db: snap.geo_label.as_deref(),
        log_written: logs().map(LogWriter::written).sum(),
        log_failures: logs().map(LogWriter::failures).sum(),
        log_dropped: logs().map(LogWriter::dropped).sum(),
        log_healthy: logs().all(LogWriter::healthy),
        consents: shared.consents.len(),
        consent_subjects: shared.consents.subjects(),
        consent_cache: shared.consent_loader.as_ref().map(|l| {
            let st = l.index().stats();
            let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            crate::metrics::CacheScrape {
                hits: n(&st.hits),
                misses: n(&st.misses),
                evictions: n(&st.evictions),
                invalidations: n(&st.invalidations),
                bytes: st.bytes.load(std::sync::atomic::Ordering::Relaxed) as u64,
                max_bytes: snap.policy.consent.cache_max_bytes as u64,
                feed_lag: std::time::Duration::from_micros(n(&st.feed_lag_micros)),
                miss_time: &l.miss_time,
                batch_time: &l.batch_time,
            }
        }),
        ship: ship_stats(workers),
        source: source.map(|s| bundle::source_scrape(&s.get())),
    });
    text(StatusCode::OK, crate::metrics::CONTENT_TYPE, body)
}

/// Shipping's figures over every chain's spool: counts and bytes add up, the oldest file
/// waiting is the oldest of all, and the last error is the first chain's that has one.
fn ship_stats(workers: &[Arc<Shared>]) -> Option<ShipStats> {
    let mut all = workers
        .iter()
        .filter_map(|w| w.spool.as_ref().map(|s| s.stats()));
    let mut sum = all.next()?;
    for s in all {
        sum.spool_files += s.spool_files;
        sum.spool_bytes += s.spool_bytes;
        sum.spool_max_bytes += s.spool_max_bytes;
        sum.shipped_files += s.shipped_files;
        sum.shipped_bytes += s.shipped_bytes;
        sum.failures += s.failures;
        sum.oldest_age_secs = sum.oldest_age_secs.max(s.oldest_age_secs);
        sum.cpu += s.cpu;
        if sum.last_error.is_none() {
            sum.last_error = s.last_error;
        }
    }
    Some(sum)
}

async fn route(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<AdminResponse, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/v1/consents" || path.starts_with("/v1/consents/") {
        return Ok(consents::handle(&state, req).await);
    }
    if path == "/v1/log/rotate" {
        return Ok(rotate_log(&state, &req).await);
    }
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            let mut r = readiness(&state.workers);
            r.policy_source = state
                .source
                .as_ref()
                .map(|s| bundle::SourceReadiness::of(&s.get(), jiff::Timestamp::now()));
            json(
                if r.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                &r,
            )
        }
        (&Method::GET, "/metrics") => metrics(&state.workers, state.source.as_ref()),
        (&Method::GET, "/v1/policy") => {
            let snap = state.shared.snapshot.load();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "name": snap.policy.name,
                    "hash": snap.policy.hash,
                    "loaded_at": crate::audit::record::timestamp(snap.loaded_at),
                    "geo_db": snap.geo_label.as_deref(),
                    "sources": snap.policy.sources.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                    "last_reload": state.shared.last_reload.load_full().as_deref(),
                    "revision": snap.policy.revision,
                    "source": state.source.as_ref().map(|s| bundle::source_json(&s.get(), jiff::Timestamp::now())),
                }),
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint {} {path}", req.method()),
        ),
    };
    Ok(resp)
}

/// `POST /v1/log/rotate` (token required): closes every worker's active decision-log file
/// with a signed checkpoint and renames it, as `SIGUSR1` does, and answers where they went.
async fn rotate_log(state: &AdminState, req: &Request<Incoming>) -> AdminResponse {
    if !state.authorized(req) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs the bearer token of [admin].token_file",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "rotate with POST",
        );
    }
    let mut rotated = Vec::with_capacity(state.workers.len());
    for r in crate::proxy::rotate_all(&state.workers).await {
        match r {
            Ok(to) => rotated.push(to.map(|p| p.display().to_string())),
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "log_unavailable",
                    e.to_string(),
                );
            }
        }
    }
    tracing::info!(log.rotated = ?rotated, "decision log rotated on an admin call");
    // `rotated` is worker 0's file (the one a single worker writes); `chains` lists every
    // worker's, worker 0 first.
    json(
        StatusCode::OK,
        &serde_json::json!({ "rotated": rotated[0], "chains": rotated }),
    )
}

/// A running admin listener.
pub struct RunningAdmin {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningAdmin {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The admin listener while the proxy starts: `/healthz` answers alive, `/readyz` and every
/// other route answer 503. Dropping it closes the listener.
pub struct Starting {
    pub addr: SocketAddr,
    /// Why the proxy is not ready yet, when something other than loading keeps it (a sidecar
    /// waiting for its first policy bundle).
    why: Arc<std::sync::OnceLock<Why>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Option<TcpListener>>,
}

/// Says why the proxy is not ready yet, in one sentence.
type Why = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` and answers with [`Starting`]'s routes until [`Starting::serve`].
pub async fn bind(addr: SocketAddr) -> Result<Starting, AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let why: Arc<std::sync::OnceLock<Why>> = Arc::default();
    let told = why.clone();
    let task = tokio::spawn(async move {
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        loop {
            let (stream, _) = tokio::select! {
                c = next_connection(|| listener.accept()) => c,
                r = &mut stop_rx => return r.ok().map(|()| listener),
            };
            let builder = builder.clone();
            let told = told.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let why = told.get().map(|f| f());
                    async move { Ok::<_, Infallible>(starting_route(&req, why)) }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(Starting {
        addr: bound,
        why,
        stop: Some(stop),
        task,
    })
}

/// The next connection `accept` gives. A failure (EMFILE, when file descriptors run out) is
/// logged and retried after [`ACCEPT_RETRY`]: retried at once, it would keep a runtime
/// thread busy at full CPU while the probes this listener serves fail.
async fn next_connection<T, F: Future<Output = std::io::Result<T>>>(
    mut accept: impl FnMut() -> F,
) -> T {
    loop {
        match accept().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// What the admin routes answer before the proxy has loaded its policy. Each answer closes
/// its connection, so that the next probe reaches the full listener once it runs.
fn starting_route(req: &Request<Incoming>, why: Option<String>) -> AdminResponse {
    let mut r = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Readiness {
                ready: false,
                failing: vec![why.unwrap_or_else(|| {
                    "policy: not loaded yet (loading the geolocation database, consents and upstreams)"
                        .to_string()
                })],
                policy_source: None,
            },
        ),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            why.unwrap_or_else(|| "the proxy is starting: its policy is not loaded yet".into()),
        ),
    };
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

impl Starting {
    /// Hands the listener to the full admin routes.
    pub async fn serve(mut self, state: Arc<AdminState>) -> RunningAdmin {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let listener = (&mut self.task)
            .await
            .ok()
            .flatten()
            .expect("the start-up responder hands its listener back");
        serve_on(listener, self.addr, state)
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve_on(listener: TcpListener, addr: SocketAddr, state: Arc<AdminState>) -> RunningAdmin {
    let (stop, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        loop {
            let (stream, _) = tokio::select! {
                c = next_connection(|| listener.accept()) => c,
                _ = stop_rx.changed() => return,
            };
            let state = state.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| route(state.clone(), req));
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    RunningAdmin { addr, stop, task }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::token::AdminToken;

    #[tokio::test(start_paused = true)]
    async fn a_failed_accept_is_retried_after_a_pause_not_at_once() {
        let started = tokio::time::Instant::now();
        let mut attempts = 0;
        let accepted = next_connection(|| {
            attempts += 1;
            let n = attempts;
            async move {
                match n {
                    1..=3 => Err(std::io::Error::from_raw_os_error(24)), // EMFILE
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(accepted, 4);
        assert!(
            started.elapsed() >= ACCEPT_RETRY * 3,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_bearer_scheme_is_matched_whatever_its_case() {
        for header in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret "] {
            assert_eq!(bearer(header.as_bytes()), Some(&b"s3cret"[..]), "{header}");
        }
        for header in ["Basic s3cret", "Bearers3cret", "Bearer", "Token s3cret"] {
            assert_eq!(bearer(header.as_bytes()), None, "{header}");
        }
    }

    #[test]
    fn only_the_token_itself_matches() {
        let token = AdminToken::new(b"s3cret-token");
        assert!(token.matches(b"s3cret-token"));
        for other in [
            "",
            "s3cret",
            "s3cret-token-and-more",
            "S3CRET-TOKEN",
            "s3cret-tokeN",
        ] {
            assert!(!token.matches(other.as_bytes()), "{other:?}");
        }
    }
}
