//! A worker's accept loop: a bounded number of connections, TLS (with client certificates when
//! `[tls].client_ca` is set) or plain, HTTP/1.1 and HTTP/2 on each (chosen by ALPN under TLS,
//! by prior knowledge in the clear), and a graceful drain on shutdown. A plain HTTP/1.1
//! connection waiting for its next request is parked: hyper's connection (its read and write
//! buffers, its dispatcher) is let go and only the socket is held until a byte arrives.

use super::Shared;
use super::exchange::Exchange;
use super::pipeline::{ConnInfo, handle};
use super::stall::{Activity, Quiet, WriteStall};
use crate::audit::id::DecisionId;
use crate::audit::record::{self, Record, RequestContext};
use crate::policy::decision::{Reason, Verdict, status_of};
use crate::tls::ServerTls;
use bytes::{Buf, Bytes, BytesMut};
use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

/// The HTTP/2 connection preface: a plain connection whose first bytes are (a start of)
/// it speaks HTTP/2 by prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a worker serves its connections, set once from `[proxy]`.
struct Builders {
    /// HTTP/1.1 or HTTP/2, told apart by the first bytes (TLS, HTTP/2 in the clear).
    auto: auto::Builder<TokioExecutor>,
    /// Plain HTTP/1.1, configured as `auto`'s HTTP/1.1 side (parked between requests).
    h1: http1::Builder,
    /// How long a parked connection may wait for its next request: what hyper allows an
    /// idle keep-alive connection (`header_read_timeout`), within `idle_timeout`.
    keep_alive: Duration,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

/// Serves `listener` until `stop` turns true, then drains open connections for at most
/// `drain` before returning. With `tls`, every connection starts with a TLS handshake,
/// run on the connection's own task (a slow client never holds up the accept loop). At most
/// `max_connections` are open at once (a worker's share of `[proxy] max_connections`).
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<Arc<ServerTls>>,
    max_connections: usize,
) {
    // Every connection holds a receiver until it ends: sending asks them to finish, and the
    // sender sees when the last one has.
    let (draining, _) = watch::channel(());
    let limits = shared.snapshot.load().policy.proxy.clone();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Above the pipeline's own limit, so that an oversized HTTP/2 head reaches the
        // pipeline, which answers 431 and logs it (h2 would answer 431 itself, unlogged).
        .max_header_list_size((limits.max_header_bytes * 4) as u32)
        .max_concurrent_streams(limits.max_concurrent_streams);
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2)
        .max_headers(limits.max_headers);
    let builders = Arc::new(Builders {
        auto: builder,
        h1,
        keep_alive: limits.header_read_timeout.min(limits.idle_timeout),
        handshake_timeout: limits.handshake_timeout,
        idle_timeout: limits.idle_timeout,
    });
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        // Wait for a free connection slot before accepting: excess clients queue in the
        // listen backlog instead of being accepted and starved.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        shared.metrics.connections_accepted.inc();
        shared.metrics.connections_open.inc();
        let draining = draining.subscribe();
        let builders = builders.clone();
        let shared = shared.clone();
        let tls = tls.clone();
        let span = tracing::debug_span!("connection", client.addr = %peer, tls = tls.is_some());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(
            async move {
                // Each kind of connection is a future of its own size, boxed: the task that
                // waits on it stays small, and a plain connection does not carry a TLS
                // handshake's or an HTTP/2 connection's state.
                let conn = Conn {
                    peer,
                    builders: &builders,
                    shared: &shared,
                    draining,
                };
                match tls {
                    None => Box::pin(conn.plain(stream)).await,
                    Some(tls) => Box::pin(conn.tls(&tls, stream)).await,
                }
                shared.metrics.connections_open.dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    let _ = draining.send(());
    if tokio::time::timeout(drain, draining.closed())
        .await
        .is_err()
    {
        // Nothing may run past the final flush of the decision log: what is still open
        // after the drain time is cut off.
        tracing::warn!(drain_timeout = ?drain, open = tasks.len(), "connections still open after the drain timeout; closing them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// One accepted connection, before its protocol is known.
struct Conn<'a> {
    peer: SocketAddr,
    builders: &'a Builders,
    shared: &'a Arc<Shared>,
    /// Changes when the worker drains.
    draining: watch::Receiver<()>,
}

impl Conn<'_> {
    /// A connection in the clear: HTTP/2 by prior knowledge, else HTTP/1.1.
    async fn plain(self, stream: TcpStream) {
        // A client that connects and says nothing is cut off after the handshake timeout, as
        // a TLS client would be; hyper's own timers only start once the protocol is known.
        // (`peek` rather than `readable`: readiness can be reported before any byte has
        // arrived.)
        let mut first = [0u8; H2_PREFACE.len()];
        let n = match tokio::time::timeout(self.builders.handshake_timeout, stream.peek(&mut first))
            .await
        {
            Ok(Ok(n)) if n > 0 => n,
            _ => {
                tracing::debug!("client sent nothing within the handshake timeout");
                return;
            }
        };
        let limit = self.builders.idle_timeout;
        let activity = Activity::new();
        let info = ConnInfo::new(self.peer, None, Some(activity.clone()));
        let io = WriteStall::new(stream, limit, activity.clone());
        if H2_PREFACE.starts_with(&first[..n]) {
            // The preface, or too little of a head to tell: hyper's own detection reads it.
            // (Boxed: an HTTP/1.1 connection does not carry this state's size.)
            Box::pin(self.serve(TokioIo::new(io), info, activity)).await;
        } else {
            self.serve_h1(io, info, activity).await;
        }
    }

    /// A TLS connection: the handshake, then HTTP/1.1 or HTTP/2 as ALPN chose.
    async fn tls(self, tls: &ServerTls, stream: TcpStream) {
        // A refused handshake is counted and logged by `accept`; no request was made, so
        // there is nothing to decide.
        let Some(ok) = tls
            .accept(stream, self.peer, self.builders.handshake_timeout)
            .await
        else {
            return;
        };
        let activity = Activity::new();
        let info = ConnInfo::new(self.peer, ok.identity, Some(activity.clone()));
        let io = WriteStall::new(ok.stream, self.builders.idle_timeout, activity.clone());
        self.serve(TokioIo::new(io), info, activity).await;
    }

    /// Serves HTTP/1.1 or HTTP/2 on one connection until it closes, the drain ends it, or it
    /// has had no request in progress and no byte moved for `idle_timeout`: hyper bounds an
    /// idle HTTP/1.1 connection, but neither an HTTP/2 connection without requests nor a
    /// client that sends part of the HTTP/2 preface and stops.
    async fn serve<I>(self, io: I, info: ConnInfo, activity: Arc<Activity>)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let Conn {
            peer,
            builders,
            shared,
            mut draining,
        } = self;
        let limit = builders.idle_timeout;
        let log_to = shared.clone();
        let shared = shared.clone();
        let svc = service_fn(move |req| handle(shared.clone(), info.clone(), req));
        let conn = builders.auto.serve_connection(io, svc);
        tokio::pin!(conn);
        let idle = activity.watch(limit, false, 0);
        tokio::pin!(idle);
        let mut drained = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                        log_refused_head(&log_to, peer, &*e);
                    }
                    return;
                }
                _ = draining.changed(), if !drained => {
                    drained = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = &mut idle => {
                    tracing::debug!(idle_timeout = ?limit, "nothing moved on the connection; closed");
                    return;
                }
            }
        }
    }

    /// Serves plain HTTP/1.1, parking the connection whenever it waits for its next request
    /// (quiet for a moment, nothing queued either way): hyper's connection ends without
    /// closing the socket (as a graceful shutdown of an idle connection does, before any
    /// byte of a next request), its buffers are freed, and a new one starts on the same
    /// socket when the next byte arrives. A loaded connection is never parked. An idle
    /// keep-alive connection is closed after `header_read_timeout` (or `idle_timeout`) as
    /// hyper would close it, and at once by the drain.
    async fn serve_h1(self, io: WriteStall<TcpStream>, info: ConnInfo, activity: Arc<Activity>) {
        let Conn {
            peer,
            builders,
            shared,
            mut draining,
        } = self;
        let log_to = shared.clone();
        let shared = shared.clone();
        // Each request's future boxed: hyper keeps the slot for one per connection, which
        // would otherwise be as large as the pipeline's state.
        let mut svc = service_fn(move |req| Box::pin(handle(shared.clone(), info.clone(), req)));
        let mut io = Rewind {
            pre: Bytes::new(),
            inner: io,
        };
        loop {
            // The connection and its watch live only while it runs (boxed, apart from the
            // parked state).
            let run = Box::pin(run_h1(builders, io, svc, &activity, &mut draining));
            let parts = match run.await {
                Ran::Parked(parts, quiet) => (parts, quiet),
                Ran::Closed => return,
                Ran::Failed(e) => {
                    tracing::debug!(error = %e, "connection ended with an error");
                    log_refused_head(&log_to, peer, &e);
                    return;
                }
            };
            let (parts, quiet) = parts;
            svc = parts.service;
            io = parts.io.into_inner();
            // Bytes hyper had read but not parsed (a request that arrived as it stopped)
            // are read again first.
            io.rewind(parts.read_buf);
            if io.pre.is_empty()
                && !next_byte(
                    &io.inner,
                    builders.keep_alive.saturating_sub(quiet),
                    &mut draining,
                )
                .await
            {
                return;
            }
        }
    }
}

/// A plain client stream as hyper's HTTP/1.1 connection holds it.
type H1Io = TokioIo<Rewind<WriteStall<TcpStream>>>;

/// How one hyper connection on a plain HTTP/1.1 stream ended.
enum Ran<S> {
    /// Parked between requests, after this long without a byte moving: the stream, the
    /// service and the bytes read but not parsed.
    Parked(http1::Parts<H1Io, S>, Duration),
    /// Closed: by the client, by `idle_timeout`, or by the drain.
    Closed,
    Failed(hyper::Error),
}

/// Runs hyper's HTTP/1.1 connection on `io` until it ends, or until it waits for a next
/// request with nothing queued either way, when it is asked to stop before reading one (as a
/// graceful shutdown stops an idle connection) and handed back whole.
async fn run_h1<S>(
    builders: &Builders,
    io: Rewind<WriteStall<TcpStream>>,
    svc: S,
    activity: &Activity,
    draining: &mut watch::Receiver<()>,
) -> Ran<S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = super::body::ResponseBody>
        + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = builders.idle_timeout;
    let mut conn = builders.h1.serve_connection(TokioIo::new(io), svc);
    let watch = activity.watch(limit, true, activity.ends());
    tokio::pin!(watch);
    let mut parked_after = None;
    let mut drained = false;
    let ended = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
            q = &mut watch, if parked_after.is_none() => match q {
                Quiet::Idle => {
                    tracing::debug!(idle_timeout = ?limit, "nothing moved on the connection; closed");
                    return Ran::Closed;
                }
                Quiet::Parkable(quiet) => {
                    parked_after = Some(quiet);
                    Pin::new(&mut conn).graceful_shutdown();
                }
            },
            _ = draining.changed(), if !drained => {
                drained = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    match (ended, parked_after) {
        (Err(e), _) => Ran::Failed(e),
        (Ok(()), Some(quiet)) if !drained => Ran::Parked(conn.into_parts(), quiet),
        // Ended by itself (the client closed, or asked to), or by the drain. Polled without
        // shutdown, hyper may still hold the end of a response a slow client has not taken:
        // polled as a future it flushes and shuts the stream down (bounded, as any stall).
        (Ok(()), _) => {
            let _ = tokio::time::timeout(limit, &mut conn).await;
            Ran::Closed
        }
    }
}

/// Waits, holding nothing but the socket, for the next byte of a parked connection: true
/// once one has arrived; false when the client closed, nothing came within `wait`, or the
/// worker drains.
async fn next_byte(
    io: &WriteStall<TcpStream>,
    wait: Duration,
    draining: &mut watch::Receiver<()>,
) -> bool {
    let mut byte = [0u8; 1];
    tokio::select! {
        r = io.get_ref().peek(&mut byte) => matches!(r, Ok(1)),
        () = tokio::time::sleep(wait) => {
            tracing::debug!("no request on the idle keep-alive connection; closed");
            false
        }
        _ = draining.changed() => false,
    }
}

/// A stream some of whose bytes were read already, by a connection that stopped before it
/// parsed them: they are read again first.
struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    fn rewind(&mut self, read: Bytes) {
        if read.is_empty() {
            return;
        }
        if self.pre.is_empty() {
            self.pre = read;
        } else {
            let mut both = BytesMut::with_capacity(read.len() + self.pre.len());
            both.extend_from_slice(&read);
            both.extend_from_slice(&self.pre);
            self.pre = both.freeze();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request head that hyper refused before the pipeline saw it (larger than its buffer, more
/// headers than `max_headers`, not HTTP at all) has already been answered by hyper (431 or
/// 400); it still gets its decision and outcome records, as every refusal does.
fn log_refused_head(shared: &Arc<Shared>, peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    let Some(h) = e.downcast_ref::<hyper::Error>() else {
        return;
    };
    let (reason, rule) = if h.is_parse_too_large() {
        (Reason::HeadersTooLarge, "proxy.max_header_bytes")
    } else if h.is_parse() {
        (Reason::BadRequest, "request.head")
    } else {
        return;
    };
    let snap = shared.snapshot.load();
    let ts = jiff::Timestamp::now();
    let id = DecisionId::new(ts);
    let headers = http::HeaderMap::new();
    let cx = RequestContext {
        id,
        ts,
        method: &http::Method::GET,
        host: None,
        raw_path: "",
        query: None,
        headers: &headers,
        peer: peer.ip(),
    };
    snap.metrics
        .dataset(None)
        .record(reason, Verdict::Error, true);
    let mut rec = record::failure_record(&snap.policy, &cx, reason, rule);
    rec.request.path = snap.pseudo.opaque_path(&rec.request.path);
    shared.log.append_later(Record::Decision(Box::new(rec)));
    let exchange = Exchange::new(id, Instant::now(), shared.clone());
    exchange.set_status(status_of(reason));
    exchange.finished();
}
