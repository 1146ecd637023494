//! The body of every response the proxy sends: an upstream's, streamed unbuffered and counted
//! into its exchange, or one the proxy wrote itself. It sits above the upstream client: it
//! holds the upstream connection until the response is read whole, then gives it back to the
//! pool. (The request body, which the upstream connections are typed by, is below the
//! client, in `request_body`.)

use super::exchange::Exchange;
// The error every body gives hyper; defined with the request body, the lowest of them.
pub use super::request_body::BoxError;
use super::stall::Stall;
use super::upstream::PoolReturn;
use crate::policy::decision::Reason;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

enum Kind {
    Upstream {
        inner: Incoming,
        pool: Option<PoolReturn>,
        /// An upstream that stops sending mid-body is cut off after `proxy.idle_timeout`.
        stall: Stall,
    },
    Local(Option<Bytes>),
    /// A bulk object's records as the filter lets them through (see `filter`).
    Filtered {
        pieces: mpsc::Receiver<Piece>,
        ended: bool,
    },
}

/// What the task filtering a bulk object sends its response body: bytes, then `End` once
/// the object was filtered to its end, or `Failed`. A channel that closes without either
/// means the task stopped: the body ends with an error, never as a complete object.
pub enum Piece {
    Data(Bytes),
    End,
    Failed(BoxError),
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

    /// An upstream's body read by the proxy itself (a bulk object on its way through the
    /// filter): pooled and cut off when stalled as any, but not counted as sent to the
    /// client; the filtered body that reaches the client is.
    pub fn upstream_input(
        inner: Incoming,
        pool: Option<PoolReturn>,
        idle: Duration,
    ) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream {
                inner,
                pool,
                stall: Stall::new(idle),
            },
            exchange: None,
        }
    }

    /// The body a bulk object's filter task sends through `pieces`, counted as sent.
    pub fn filtered(pieces: mpsc::Receiver<Piece>, exchange: Arc<Exchange>) -> ResponseBody {
        ResponseBody {
            kind: Kind::Filtered {
                pieces,
                ended: false,
            },
            exchange: Some(exchange),
        }
    }

    pub fn local(bytes: Bytes, exchange: Option<Arc<Exchange>>) -> ResponseBody {
        if let Some(ex) = &exchange {
            ex.answered_locally(bytes.len() as u64);
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
            Kind::Filtered { pieces, ended } => {
                if *ended {
                    return Poll::Ready(None);
                }
                match pieces.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Piece::Data(d))) => {
                        if let Some(ex) = &this.exchange {
                            ex.add_bytes_out(d.len() as u64);
                        }
                        Poll::Ready(Some(Ok(Frame::data(d))))
                    }
                    Poll::Ready(Some(Piece::End)) => {
                        *ended = true;
                        this.finish();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Piece::Failed(e))) => {
                        *ended = true;
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(None) => {
                        *ended = true;
                        Poll::Ready(Some(Err("the record filter stopped".into())))
                    }
                }
            }
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
                        ex.add_bytes_out(d.len() as u64);
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
            Kind::Filtered { ended, .. } => *ended,
            Kind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
            Kind::Filtered { .. } => SizeHint::default(),
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
