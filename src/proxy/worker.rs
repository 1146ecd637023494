//! Workers, as an nginx worker or a Pingora/Envoy worker thread runs: each is a thread with a
//! single-threaded runtime of its own, a listener of its own on the shared address
//! (`SO_REUSEPORT`: the kernel spreads connections between them), its own snapshot (so its
//! own upstream connection pools) and its own decision-log chain, whose committer runs on
//! the worker's runtime. A request is accepted, decided, logged and forwarded on one thread:
//! nothing on its path waits for another thread. What the workers share is read-mostly (the
//! policy, the consent index) or counted (metrics).
//!
//! The caller's runtime is the control runtime: the admin listener, the consent feeds and
//! cache-miss queries, log shipping, reloads and signals run there, beside the workers.

use super::server::accept_loop;
use super::{OUTCOME_GRACE, ServeError, Shared};
use crate::audit::write::WriterStart;
use crate::policy::Policy;
use crate::tls::ServerTls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};

/// The most workers a proxy runs (`--workers`, `[proxy] workers`): each is a thread, a
/// runtime, a listening socket and a log chain.
pub const MAX_WORKERS: usize = 1024;

/// Listen backlog of each worker's socket (tokio's own default for one listener).
const BACKLOG: u32 = 1024;

/// How many workers `policy` asks for (`[proxy] workers`, or `serve --workers` applied to
/// it): else one per core the process may run on (`available_parallelism` counts the CPU
/// affinity mask and the cgroup's CPU quota).
pub fn count(policy: &Policy) -> usize {
    policy
        .proxy
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, MAX_WORKERS)
}

/// Binds `n` listening sockets to `addr`, one per worker, and returns them with the address
/// they listen on (the port the first one got, when `addr`'s port is 0). One worker binds as
/// a plain listener; several set `SO_REUSEPORT` on each socket, after checking that nothing
/// listens on `addr` yet: without that check a second proxy started by mistake on the same
/// port would share its connections instead of failing to start.
pub async fn bind(
    addr: SocketAddr,
    n: usize,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), ServeError> {
    let failed = |source| ServeError::Bind { addr, source };
    if n <= 1 {
        let listener = TcpListener::bind(addr).await.map_err(failed)?;
        let bound = listener.local_addr().map_err(failed)?;
        return Ok((vec![listener.into_std().map_err(failed)?], bound));
    }
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr).map_err(failed)?);
    }
    let mut listeners = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n {
        let socket = if at.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(failed)?;
        socket.set_reuseaddr(true).map_err(failed)?;
        socket.set_reuseport(true).map_err(failed)?;
        socket.bind(at).map_err(failed)?;
        let listener = socket.listen(BACKLOG).map_err(failed)?;
        // Port 0: the others join the port the first one got.
        at = listener.local_addr().map_err(failed)?;
        listeners.push(listener.into_std().map_err(failed)?);
    }
    Ok((listeners, at))
}

/// What one worker thread is given.
pub struct Assignment {
    pub shared: Arc<Shared>,
    pub listener: std::net::TcpListener,
    pub committer: WriterStart,
    pub stop: watch::Receiver<bool>,
    pub drain: Duration,
    pub tls: Option<Arc<ServerTls>>,
    /// The worker's share of `[proxy] max_connections`.
    pub max_connections: usize,
}

/// A running worker thread.
pub struct Worker {
    index: usize,
    /// Answered once the worker has drained and closed its chain.
    done: oneshot::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts worker `index` on a thread of its own and waits until it serves: its runtime
/// runs, its chain's committer is started there, its listener is registered there.
pub async fn spawn(index: usize, work: Assignment) -> Result<Worker, ServeError> {
    let (ready_tx, ready) = oneshot::channel::<Result<(), ServeError>>();
    let (done_tx, done) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || run(work, ready_tx, done_tx));
    let thread = spawned.map_err(|source| ServeError::Worker {
        worker: index,
        source,
    })?;
    match ready.await {
        Ok(Ok(())) => Ok(Worker {
            index,
            done,
            thread,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ServeError::Worker {
            worker: index,
            source: std::io::Error::other("the worker thread ended while starting"),
        }),
    }
}

/// The worker thread: serves until `stop`, drains, waits briefly for the outcome records of
/// exchanges still ending, and writes the chain's final checkpoint.
fn run(
    work: Assignment,
    ready: oneshot::Sender<Result<(), ServeError>>,
    done: oneshot::Sender<()>,
) {
    let index = work.shared.worker;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(source) => {
            let _ = ready.send(Err(ServeError::Worker {
                worker: index,
                source,
            }));
            return;
        }
    };
    let Assignment {
        shared,
        listener,
        committer,
        stop,
        drain,
        tls,
        max_connections,
    } = work;
    runtime.block_on(async move {
        // The committer becomes a task of this runtime (in `write` durability): the chain is
        // written by the thread whose requests it records.
        let started = committer.start().map_err(ServeError::from).and_then(|()| {
            TcpListener::from_std(listener).map_err(|source| ServeError::Worker {
                worker: index,
                source,
            })
        });
        let listener = match started {
            Ok(l) => {
                let _ = ready.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                shared.log.close().await;
                return;
            }
        };
        accept_loop(listener, shared.clone(), stop, drain, tls, max_connections).await;
        // An exchange can outlive its client connection: an upstream connection still sending
        // an upload holds it, and so does an HTTP/2 stream task. Its outcome record is waited
        // for (briefly) before the chain is closed.
        let deadline = tokio::time::Instant::now() + OUTCOME_GRACE;
        while shared.exchanges.load(std::sync::atomic::Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shared.log.close().await;
    });
    // Tasks still held (an upstream connection's, a blocking filter's) are not waited for
    // past a moment: the chain is closed.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = done.send(());
}

impl Worker {
    /// Waits until the worker has drained and closed its chain (after the control side
    /// signalled `stop`), then for its thread to end.
    pub async fn finished(self) {
        let Worker {
            index,
            done,
            thread,
        } = self;
        if done.await.is_err() {
            tracing::error!(
                worker = index,
                "a worker ended without closing its decision-log chain"
            );
        }
        // It has nothing left to do but return.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}
