//! A worker's accept loop: a bounded number of connections, TLS (with client certificates when
//! `[tls].client_ca` is set) or plain, HTTP/1.1 and HTTP/2 on each (chosen by ALPN under TLS,
//! by prior knowledge in the clear), and a graceful drain on shutdown.

use super::Shared;
use super::exchange::Exchange;
use super::pipeline::{ConnInfo, handle};
use super::stall::{Activity, WriteStall};
use crate::audit::id::DecisionId;
use crate::audit::record::{self, Record, RequestContext};
use crate::policy::decision::{Reason, Verdict, status_of};
use crate::tls::ServerTls;
use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

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
    let graceful = GracefulShutdown::new();
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
    let builder = Arc::new(builder);
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
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let shared = shared.clone();
        let tls = tls.clone();
        let handshake_timeout = limits.handshake_timeout;
        let write_stall = limits.idle_timeout;
        let span = tracing::debug_span!("connection", client.addr = %peer, tls = tls.is_some());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(
            async move {
                match tls {
                    None => {
                        // A client that connects and says nothing is cut off after the
                        // handshake timeout, as a TLS client would be; hyper's own timers only
                        // start once the protocol is known.
                        // (`peek` rather than `readable`: readiness can be reported before
                        // any byte has arrived.)
                        let mut first = [0u8; 1];
                        if !matches!(
                            tokio::time::timeout(handshake_timeout, stream.peek(&mut first)).await,
                            Ok(Ok(1))
                        ) {
                            tracing::debug!("client sent nothing within the handshake timeout");
                            shared.metrics.connections_open.dec();
                            drop(permit);
                            return;
                        }
                        let activity = Activity::new();
                        let info = ConnInfo::new(peer, None, Some(activity.clone()));
                        let io = WriteStall::new(stream, write_stall, activity.clone());
                        let idle = (activity, write_stall);
                        serve(
                            &builder,
                            TokioIo::new(io),
                            info,
                            shared.clone(),
                            watcher,
                            idle,
                        )
                        .await;
                    }
                    Some(tls) => {
                        // A refused handshake is counted and logged by `accept`; no request
                        // was made, so there is nothing to decide.
                        if let Some(ok) = tls.accept(stream, peer, handshake_timeout).await {
                            let activity = Activity::new();
                            let info = ConnInfo::new(peer, ok.identity, Some(activity.clone()));
                            let io = WriteStall::new(ok.stream, write_stall, activity.clone());
                            let idle = (activity, write_stall);
                            serve(
                                &builder,
                                TokioIo::new(io),
                                info,
                                shared.clone(),
                                watcher,
                                idle,
                            )
                            .await;
                        }
                    }
                }
                shared.metrics.connections_open.dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
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

/// Serves HTTP/1.1 or HTTP/2 on one connection until it closes, the drain ends it, or it has
/// had no request in progress and no byte moved for `idle.1` (`proxy.idle_timeout`): hyper
/// bounds an idle HTTP/1.1
/// connection, but neither an HTTP/2 connection without requests nor a client that sends
/// part of the HTTP/2 preface and stops.
async fn serve<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    info: ConnInfo,
    shared: Arc<Shared>,
    watcher: Watcher,
    idle: (Arc<Activity>, Duration),
) where
    I: Read + Write + Unpin + Send + 'static,
{
    let peer = info.peer;
    let log_to = shared.clone();
    let (activity, limit) = idle;
    let svc = service_fn(move |req| handle(shared.clone(), info.clone(), req));
    let conn = builder.serve_connection(io, svc);
    tokio::select! {
        r = watcher.watch(conn) => if let Err(e) = r {
            tracing::debug!(error = %e, "connection ended with an error");
            log_refused_head(&log_to, peer, &*e);
        },
        () = activity.idle(limit) => {
            tracing::debug!(idle_timeout = ?limit, "nothing moved on the connection; closed");
        }
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
