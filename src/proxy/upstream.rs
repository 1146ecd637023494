//! Upstreams: host resolution kept current off the request path, and a keep-alive pool per
//! resolved address. The proxy connects only to the exact address a decision verified, and
//! checks the peer of the socket it got before sending a byte (and before any TLS
//! handshake). `https` upstreams speak HTTP/2 when ALPN agrees: one connection per address,
//! shared by every request, instead of a pool of HTTP/1.1 connections.
//!
//! Every worker has a runtime of its own for each upstream, so that its pools hold only
//! connections driven by its own runtime; a host is looked up once for all of them
//! ([`UpstreamRuntime::lookup`], then [`UpstreamRuntime::apply`] to each).
//!
//! Its connections carry the request body (`request_body`, below it); the response body
//! (`body`, above it) holds a connection until it is read whole and then gives it back here
//! (`PoolReturn`).

use super::request_body::RequestBody;
use crate::policy::model::{Scheme, Upstream};
use crate::tls::UpstreamTls;
use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_queue::ArrayQueue;
use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A connection to an upstream, ready to carry requests.
pub enum Sender {
    /// One request at a time; pooled while idle.
    H1(http1::SendRequest<RequestBody>),
    /// Many requests at once; clones share the connection.
    H2(http2::SendRequest<RequestBody>),
}

impl Sender {
    pub fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Waits until the connection can take another request.
    pub async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    /// Sends `req` (in origin form with a `Host` header, as the pipeline builds it) in the
    /// form this connection's protocol wants. A request the connection could not take is
    /// handed back in the error, to be sent elsewhere.
    pub async fn try_send_request(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        match self {
            Sender::H1(s) => s.try_send_request(origin_form(req)).await,
            Sender::H2(s) => s.try_send_request(absolute_form(req)).await,
        }
    }
}

/// HTTP/1.1: the target is the path and query; the authority travels in `Host`.
fn origin_form(mut req: Request<RequestBody>) -> Request<RequestBody> {
    if *req.version_mut() != Version::HTTP_11 {
        *req.version_mut() = Version::HTTP_11;
        if let Some(a) = req.uri().authority()
            && !req.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        let pq = req.uri().path_and_query().cloned();
        *req.uri_mut() = pq.map(Uri::from).unwrap_or_else(|| Uri::from_static("/"));
    }
    req
}

/// HTTP/2: the client's `Host` becomes `:authority` (RFC 9113 section 8.3.1), unchanged, so
/// that signatures over it (S3 SigV4) stay valid.
fn absolute_form(mut req: Request<RequestBody>) -> Request<RequestBody> {
    *req.version_mut() = Version::HTTP_2;
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok());
    if let Some(authority) = authority {
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(UriScheme::HTTPS);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
            req.headers_mut().remove(header::HOST);
        }
    }
    req
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("connected to {got}, not to the verified address {want}")]
    PeerMismatch { want: SocketAddr, got: SocketAddr },
    #[error("connected address {addr} is not inside the dataset's home jurisdiction")]
    OutsideHome { addr: SocketAddr },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("TLS handshake with {addr} ({server}) failed: {source}")]
    Tls {
        addr: SocketAddr,
        server: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} ({server}) timed out after {after:?}")]
    TlsTimeout {
        addr: SocketAddr,
        server: String,
        after: Duration,
    },
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Idle keep-alive connections to one address. Lock-free: many requests check out and give
/// back connections without contending on a mutex.
pub struct AddrPool {
    pub addr: SocketAddr,
    idle: ArrayQueue<Idle>,
    /// The HTTP/2 connection every request to this address shares, once there is one.
    shared: ArcSwapOption<http2::SendRequest<RequestBody>>,
    max_idle_time: Duration,
    pooling: bool,
}

impl AddrPool {
    pub fn new(addr: SocketAddr, capacity: usize, max_idle_time: Duration) -> Arc<AddrPool> {
        Arc::new(AddrPool {
            addr,
            idle: ArrayQueue::new(capacity.max(1)),
            shared: ArcSwapOption::empty(),
            max_idle_time,
            pooling: capacity > 0,
        })
    }

    /// The shared HTTP/2 connection, else an idle HTTP/1.1 connection that is still open,
    /// if any.
    pub fn take(&self) -> Option<Sender> {
        if let Some(h2) = self.shared.load_full() {
            if !h2.is_closed() {
                return Some(Sender::H2((*h2).clone()));
            }
            // Gone (GOAWAY, reset): the next request connects anew.
            self.shared.compare_and_swap(&h2, None);
        }
        while let Some(i) = self.idle.pop() {
            if i.sender.is_ready()
                && !i.sender.is_closed()
                && i.since.elapsed() < self.max_idle_time
            {
                return Some(i.sender);
            }
        }
        None
    }

    /// Makes a new connection available to later requests: an HTTP/2 connection is shared
    /// at once (it multiplexes); an HTTP/1.1 one returns through `PoolReturn` when free.
    pub fn adopt(&self, sender: &Sender) {
        if let (true, Sender::H2(s)) = (self.pooling, sender) {
            self.shared.store(Some(Arc::new(s.clone())));
        }
    }

    fn put(&self, sender: Sender) {
        if let Sender::H2(_) = sender {
            // Its connection is shared already; this clone was only a handle.
            return;
        }
        if self.pooling && sender.is_ready() {
            // A full pool drops the connection, which closes it.
            let _ = self.idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    pub fn idle(&self) -> usize {
        self.idle.len()
    }
}

/// A connection on loan to one exchange, returned when its response has been read whole.
pub struct PoolReturn {
    pub sender: Sender,
    pub pool: Arc<AddrPool>,
}

impl PoolReturn {
    pub fn give_back(self) {
        let PoolReturn { mut sender, pool } = self;
        if matches!(sender, Sender::H2(_)) {
            return;
        }
        if sender.is_ready() {
            pool.put(sender);
            return;
        }
        // The connection task may not have seen the end of the exchange yet (or the request
        // body is still streaming); wait for it off the response path.
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), sender.ready()).await {
                pool.put(sender);
            }
        });
    }
}

/// The addresses an upstream's host currently resolves to, each with its pool.
pub struct Resolved {
    pub addrs: Vec<SocketAddr>,
    pub pools: Vec<Arc<AddrPool>>,
    pub error: Option<String>,
    pub at: Instant,
}

impl Resolved {
    pub fn pool(&self, addr: SocketAddr) -> Option<&Arc<AddrPool>> {
        self.pools.iter().find(|p| p.addr == addr)
    }
}

/// An upstream as the running proxy knows it.
pub struct UpstreamRuntime {
    pub name: Arc<str>,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    literal: bool,
    pool_capacity: usize,
    max_idle_time: Duration,
    resolved: ArcSwap<Resolved>,
    /// For `https` upstreams; swapped on reload (connections already open keep theirs).
    tls: ArcSwapOption<UpstreamTls>,
}

impl UpstreamRuntime {
    pub fn new(
        up: &Upstream,
        pool_capacity: usize,
        max_idle_time: Duration,
        tls: Option<UpstreamTls>,
    ) -> Arc<UpstreamRuntime> {
        let literal = up.host.parse::<IpAddr>().ok();
        let resolved = match literal {
            Some(ip) => {
                let addr = SocketAddr::new(ip, up.port);
                Resolved {
                    addrs: vec![addr],
                    pools: vec![AddrPool::new(addr, pool_capacity, max_idle_time)],
                    error: None,
                    at: Instant::now(),
                }
            }
            None => Resolved {
                addrs: Vec::new(),
                pools: Vec::new(),
                error: Some("not resolved yet".into()),
                at: Instant::now(),
            },
        };
        Arc::new(UpstreamRuntime {
            name: up.name.clone(),
            scheme: up.scheme,
            host: up.host.clone(),
            port: up.port,
            literal: literal.is_some(),
            pool_capacity,
            max_idle_time,
            resolved: ArcSwap::from_pointee(resolved),
            tls: ArcSwapOption::from_pointee(tls),
        })
    }

    /// The TLS settings new connections use (`None` for plain `http`).
    pub fn tls(&self) -> Option<Arc<UpstreamTls>> {
        self.tls.load_full()
    }

    /// Replaces the TLS settings (a reload read the upstream's files again).
    pub fn set_tls(&self, tls: Option<UpstreamTls>) {
        self.tls.store(tls.map(Arc::new));
    }

    /// Whether this runtime serves `up` as written (so that a reload can keep its pools).
    pub fn same_target(&self, up: &Upstream) -> bool {
        self.scheme == up.scheme && self.host == up.host && self.port == up.port
    }

    pub fn resolved(&self) -> Arc<Resolved> {
        self.resolved.load_full()
    }

    /// A runtime for another worker: the same upstream, the addresses this one resolved,
    /// pools of its own (empty), and `tls` for its new connections.
    pub fn sibling(&self, tls: Option<UpstreamTls>) -> Arc<UpstreamRuntime> {
        let current = self.resolved.load();
        let resolved = Resolved {
            addrs: current.addrs.clone(),
            pools: current
                .addrs
                .iter()
                .map(|a| AddrPool::new(*a, self.pool_capacity, self.max_idle_time))
                .collect(),
            error: current.error.clone(),
            at: current.at,
        };
        Arc::new(UpstreamRuntime {
            name: self.name.clone(),
            scheme: self.scheme,
            host: self.host.clone(),
            port: self.port,
            literal: self.literal,
            pool_capacity: self.pool_capacity,
            max_idle_time: self.max_idle_time,
            resolved: ArcSwap::from_pointee(resolved),
            tls: ArcSwapOption::from_pointee(tls),
        })
    }

    /// Resolves the host again; pools of addresses that remain are kept. A failed lookup
    /// keeps the previous addresses only if there were some (a transient DNS error should
    /// not cut a working upstream off).
    pub async fn refresh(&self) {
        if let Some(found) = self.lookup().await {
            self.apply(&found);
        }
    }

    /// Looks the host up (`None` for an address literal, which never changes): what
    /// [`UpstreamRuntime::apply`] takes, so that one lookup serves every worker's runtime of
    /// the same upstream.
    pub async fn lookup(&self) -> Option<Lookup> {
        if self.literal {
            return None;
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port)).await;
        Some(
            found
                .map(|addrs| addrs.collect())
                .map_err(|e| e.to_string()),
        )
    }

    /// Takes the addresses a lookup of this upstream's host found.
    pub fn apply(&self, found: &Lookup) {
        let old = self.resolved.load_full();
        let next = match found {
            Ok(addrs) => {
                let mut list: Vec<SocketAddr> = addrs
                    .iter()
                    .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                    .collect();
                list.sort();
                list.dedup();
                if list.is_empty() {
                    Resolved {
                        addrs: Vec::new(),
                        pools: Vec::new(),
                        error: Some("resolves to no address".into()),
                        at: Instant::now(),
                    }
                } else {
                    let pools = list
                        .iter()
                        .map(|a| {
                            old.pool(*a).cloned().unwrap_or_else(|| {
                                AddrPool::new(*a, self.pool_capacity, self.max_idle_time)
                            })
                        })
                        .collect();
                    Resolved {
                        addrs: list,
                        pools,
                        error: None,
                        at: Instant::now(),
                    }
                }
            }
            Err(e) if old.addrs.is_empty() => Resolved {
                addrs: Vec::new(),
                pools: Vec::new(),
                error: Some(format!("does not resolve: {e}")),
                at: Instant::now(),
            },
            Err(e) => {
                tracing::warn!(upstream = %self.name, host = %self.host, error = %e, "upstream re-resolution failed; keeping the previous addresses");
                return;
            }
        };
        self.resolved.store(Arc::new(next));
    }

    /// The host and port a lookup asks for.
    pub fn target(&self) -> (&str, u16) {
        (&self.host, self.port)
    }
}

/// What a lookup of an upstream's host found: its addresses, or why there are none.
pub type Lookup = Result<Vec<SocketAddr>, String>;

/// Opens a connection to exactly `addr` and checks, on the socket itself, that its peer is
/// that address and that `allowed` accepts it, before the TLS (if `tls`) and HTTP
/// handshakes. Each of the TCP connect and the TLS handshake gets `timeout`.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    allowed: impl Fn(IpAddr) -> bool,
    tls: Option<&UpstreamTls>,
) -> Result<Sender, UpstreamError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(UpstreamError::ConnectTimeout {
                addr,
                after: timeout,
            });
        }
        Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
        Ok(Ok(s)) => s,
    };
    let got = stream
        .peer_addr()
        .map_err(|source| UpstreamError::Connect { addr, source })?;
    let got = SocketAddr::new(got.ip().to_canonical(), got.port());
    if got != addr {
        return Err(UpstreamError::PeerMismatch { want: addr, got });
    }
    if !allowed(got.ip()) {
        return Err(UpstreamError::OutsideHome { addr: got });
    }
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        return http1_over(stream, addr).await;
    };
    let server = || tls.server_name.to_str().into_owned();
    let stream = match tokio::time::timeout(
        timeout,
        tls.connector.connect(tls.server_name.clone(), stream),
    )
    .await
    {
        Err(_) => {
            return Err(UpstreamError::TlsTimeout {
                addr,
                server: server(),
                after: timeout,
            });
        }
        Ok(Err(source)) => {
            return Err(UpstreamError::Tls {
                addr,
                server: server(),
                source,
            });
        }
        Ok(Ok(s)) => s,
    };
    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        return http1_over(stream, addr).await;
    }
    // One HTTP/2 connection carries every request to this address: a connection window of
    // many stream windows, so that a few slow readers do not stall the others, and pings, so
    // that a peer gone silent (a dropped NAT entry) is noticed in seconds, not minutes.
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_STREAM_WINDOW * 8)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream.addr = %addr, error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(Sender::H2(sender))
}

/// The flow-control window of one upstream HTTP/2 stream.
const H2_STREAM_WINDOW: u32 = 1 << 20;

async fn http1_over<S>(stream: S, addr: SocketAddr) -> Result<Sender, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream.addr = %addr, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(Sender::H1(sender))
}
