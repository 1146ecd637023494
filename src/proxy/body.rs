//! Bodies that stream through the proxy unbuffered, counting bytes, and the `Exchange` they
//! share: when both halves of an exchange are gone, its outcome record is written.

use super::Shared;
use super::stall::{Activity, InFlight, Stall};
use super::upstream::PoolReturn;
use crate::audit::id::DecisionId;
use crate::audit::record::{Link, OutcomeRecord, Record, Stamp, VERSION};
use crate::policy::decision::Reason;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const NO_ERROR: u8 = u8::MAX;

/// One request/response exchange. Held by the request body sent upstream and by the
/// response body sent to the client; dropping the last holder writes the outcome record
/// and counts the exchange in the metrics.
pub struct Exchange {
    id: DecisionId,
    started: Instant,
    shared: Arc<Shared>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    status: AtomicU16,
    error: AtomicU8,
    complete: AtomicBool,
    upstream: OnceLock<SocketAddr>,
    detail: OnceLock<String>,
    /// Keeps the client connection from being closed as idle while the exchange lasts.
    in_flight: OnceLock<InFlight>,
}

impl Exchange {
    pub fn new(id: DecisionId, started: Instant, shared: Arc<Shared>) -> Arc<Exchange> {
        shared.exchanges.fetch_add(1, Ordering::AcqRel);
        Arc::new(Exchange {
            id,
            started,
            shared,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            status: AtomicU16::new(0),
            error: AtomicU8::new(NO_ERROR),
            complete: AtomicBool::new(false),
            upstream: OnceLock::new(),
            detail: OnceLock::new(),
            in_flight: OnceLock::new(),
        })
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    pub fn set_error(&self, reason: Reason) {
        let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0) as u8;
        self.error.store(i, Ordering::Relaxed);
    }

    /// Request body bytes read from the client so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// The failure recorded for this exchange, if any.
    pub fn error(&self) -> Option<Reason> {
        let i = self.error.load(Ordering::Relaxed);
        (i != NO_ERROR).then(|| Reason::ALL[i as usize])
    }

    /// What exactly went wrong (an upstream's TLS refusal, a refused connect), for the
    /// outcome record; the first one set stays.
    pub fn set_detail(&self, detail: String) {
        let _ = self.detail.set(detail);
    }

    /// Counts the exchange as a request in progress on the client connection `activity`.
    pub fn in_flight_on(&self, activity: &Arc<Activity>) {
        let _ = self.in_flight.set(activity.begin());
    }

    pub fn set_upstream(&self, addr: SocketAddr) {
        let _ = self.upstream.set(addr);
    }

    /// Marks the response as sent whole.
    pub(crate) fn finished(&self) {
        self.complete.store(true, Ordering::Relaxed);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let error = self.error();
        let elapsed = self.started.elapsed();
        let status = self.status.load(Ordering::Relaxed);
        self.shared.metrics.exchange_ended(status, elapsed);
        let record = OutcomeRecord {
            instance: None,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            complete: self.complete.load(Ordering::Relaxed),
            detail: self.detail.take(),
            duration_ms: (elapsed.as_micros() as f64) / 1000.0,
            error,
            id: self.id,
            kind: "outcome",
            prev: Link::default(),
            seq: 0,
            status,
            ts: Stamp(jiff::Timestamp::now()),
            upstream: self.upstream.get().copied(),
            v: VERSION,
        };
        self.shared.log.append_later(Record::Outcome(record));
        self.shared.exchanges.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request body grew past `proxy.max_body_bytes` while streaming (a body without
/// `Content-Length` is only measured as it flows).
#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The client's request body on its way upstream, counted, and cut off with an error (which
/// aborts the upstream request) once it exceeds `limit`.
pub struct RequestBody {
    inner: Incoming,
    exchange: Arc<Exchange>,
    limit: Option<u64>,
    seen: u64,
    /// Dropped with the body, which the HTTP client does once it has sent it whole (or
    /// given up): the receiver learns that the upstream has the entire request. `None` for a
    /// request that has no body, which nobody waits for.
    _sent: Option<oneshot::Sender<()>>,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        exchange: Arc<Exchange>,
        limit: Option<u64>,
        sent: Option<oneshot::Sender<()>>,
    ) -> RequestBody {
        RequestBody {
            inner,
            exchange,
            limit,
            seen: 0,
            _sent: sent,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            let n = d.len() as u64;
            self.exchange.bytes_in.fetch_add(n, Ordering::Relaxed);
            self.seen += n;
            if let Some(limit) = self.limit
                && self.seen > limit
            {
                self.exchange.set_error(Reason::PayloadTooLarge);
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
            }
        }
        r.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum Kind {
    Upstream {
        inner: Incoming,
        pool: Option<PoolReturn>,
        /// An upstream that stops sending mid-body is cut off after `proxy.idle_timeout`.
        stall: Stall,
    },
    Local(Option<Bytes>),
}

/// The body of every response the proxy sends: an upstream's, streamed and counted, or
/// one the proxy wrote itself.
pub struct ResponseBody {
    kind: Kind,
    exchange: Option<Arc<Exchange>>,
}

impl ResponseBody {
    pub fn upstream(
        inner: Incoming,
        pool: Option<PoolReturn>,
        exchange: Arc<Exchange>,
        idle: Duration,
    ) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream {
                inner,
                pool,
                stall: Stall::new(idle),
            },
            exchange: Some(exchange),
        }
    }

    pub fn local(bytes: Bytes, exchange: Option<Arc<Exchange>>) -> ResponseBody {
        if let Some(ex) = &exchange {
            ex.bytes_out.store(bytes.len() as u64, Ordering::Relaxed);
            ex.finished();
        }
        ResponseBody {
            kind: Kind::Local(Some(bytes)),
            exchange,
        }
    }

    fn finish(&mut self) {
        if let Some(ex) = &self.exchange {
            ex.finished();
        }
        if let Kind::Upstream { pool, .. } = &mut self.kind
            && let Some(p) = pool.take()
        {
            p.give_back();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream {
                inner, stall, pool, ..
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Pending if stall.expired(cx) => {
                    let detail = format!(
                        "the upstream sent no body bytes for {:?} (proxy.idle_timeout)",
                        stall.limit()
                    );
                    tracing::warn!(error = %detail, "upstream response stalled");
                    if let Some(ex) = &this.exchange {
                        ex.set_error(Reason::UpstreamTimeout);
                        ex.set_detail(detail.clone());
                    }
                    // Half a response is still owed on that connection: it is never pooled.
                    pool.take();
                    Poll::Ready(Some(Err(detail.into())))
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    this.finish();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(f))) => {
                    stall.progressed();
                    if let (Some(d), Some(ex)) = (f.data_ref(), &this.exchange) {
                        ex.bytes_out.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Poll::Ready(Some(Ok(f)))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(ex) = &this.exchange {
                        ex.set_error(Reason::UpstreamUnreachable);
                    }
                    // A broken upstream connection is never pooled again.
                    if let Kind::Upstream { pool, .. } = &mut this.kind {
                        pool.take();
                    }
                    Poll::Ready(Some(Err(e.into())))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Local(b) => b.is_none(),
            Kind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
            Kind::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may be dropped without being polled to its end.
        if let Kind::Upstream { inner, pool, .. } = &mut self.kind
            && pool.is_some()
            && inner.is_end_stream()
        {
            self.finish();
        }
    }
}
