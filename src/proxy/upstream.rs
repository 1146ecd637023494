//! Upstreams: host resolution kept current off the request path, and a keep-alive pool per
//! resolved address. The proxy connects only to the exact address a decision verified, and
//! checks the peer of the socket it got before sending a byte.

use super::body::RequestBody;
use crate::policy::model::{Scheme, Upstream};
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub type Sender = SendRequest<RequestBody>;

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
    max_idle_time: Duration,
    pooling: bool,
}

impl AddrPool {
    pub fn new(addr: SocketAddr, capacity: usize, max_idle_time: Duration) -> Arc<AddrPool> {
        Arc::new(AddrPool {
            addr,
            idle: ArrayQueue::new(capacity.max(1)),
            max_idle_time,
            pooling: capacity > 0,
        })
    }

    /// An idle connection that is still open, if any.
    pub fn take(&self) -> Option<Sender> {
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

    fn put(&self, sender: Sender) {
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
}

impl UpstreamRuntime {
    pub fn new(
        up: &Upstream,
        pool_capacity: usize,
        max_idle_time: Duration,
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
        })
    }

    /// Whether this runtime serves `up` as written (so that a reload can keep its pools).
    pub fn same_target(&self, up: &Upstream) -> bool {
        self.scheme == up.scheme && self.host == up.host && self.port == up.port
    }

    pub fn resolved(&self) -> Arc<Resolved> {
        self.resolved.load_full()
    }

    /// Resolves the host again; pools of addresses that remain are kept. A failed lookup
    /// keeps the previous addresses only if there were some (a transient DNS error should
    /// not cut a working upstream off).
    pub async fn refresh(&self) {
        if self.literal {
            return;
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port)).await;
        let old = self.resolved.load_full();
        let next = match found {
            Ok(addrs) => {
                let mut list: Vec<SocketAddr> = addrs
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
}

/// Opens a connection to exactly `addr` and checks, on the socket itself, that its peer is
/// that address and that `allowed` accepts it, before the HTTP handshake.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    allowed: impl Fn(IpAddr) -> bool,
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
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream.addr = %addr, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
