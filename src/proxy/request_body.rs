//! The client's request body on its way upstream: streamed unbuffered, counted into its
//! exchange, and cut off once it exceeds `proxy.max_body_bytes`. A module of its own, below
//! the upstream client: upstream connections are typed by it (`SendRequest<RequestBody>`),
//! while the response body sits above the client, as it holds a connection until the pool
//! gets it back.

use super::exchange::Exchange;
use crate::policy::decision::Reason;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// The error both bodies give hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
            self.exchange.add_bytes_in(n);
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
