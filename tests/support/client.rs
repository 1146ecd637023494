//! A client that calls the proxy from a chosen source address (the policy places loopback
//! addresses in countries), over one HTTP/1.1 connection it can reuse.

#![allow(dead_code)]

use super::body::Hasher;
use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpSocket;

/// The body type of every test request.
pub type ReqBody = BoxBody<Bytes, Infallible>;

/// The Host every test request names unless it sets its own.
pub const HOST: &str = "storage.test";

/// A request builder for `method target`, with `Host: storage.test`.
pub fn request(method: &str, target: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(target)
        .header("host", HOST)
}

/// A body held in memory.
pub fn full(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into()).boxed()
}

/// An empty body.
pub fn empty() -> ReqBody {
    full(Bytes::new())
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (the proxy's own answers are JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `X-Residency-Decision` header, which every answer carries.
    pub fn decision_id(&self) -> String {
        self.header("x-residency-decision")
            .unwrap_or_else(|| panic!("no X-Residency-Decision header: {self:?}"))
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response whose body was only counted and hashed, never held.
#[derive(Debug)]
pub struct Counted {
    pub status: u16,
    pub headers: HeaderMap,
    pub len: u64,
    pub sha256: String,
}

/// One client connection from a chosen source address.
pub struct Conn {
    sender: SendRequest<ReqBody>,
}

impl Conn {
    /// Connects to `to` from `from` (e.g. `"127.0.0.20"`), any port.
    pub async fn open(from: &str, to: SocketAddr) -> Conn {
        let from: IpAddr = from.parse().expect("a source address");
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(from, 0))
            .expect("bind the source");
        let stream = socket.connect(to).await.expect("connect to the proxy");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1 handshake");
        tokio::spawn(conn);
        Conn { sender }
    }

    /// Sends `req` and returns the response with its body unread.
    pub async fn response(
        &mut self,
        req: Request<ReqBody>,
    ) -> http::Response<hyper::body::Incoming> {
        self.sender.ready().await.expect("connection ready");
        self.sender.send_request(req).await.expect("a response")
    }

    /// Sends `req` and reads the response whole; a connection error is returned, not a panic.
    pub async fn try_send(&mut self, req: Request<ReqBody>) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        let (parts, body) = self.sender.send_request(req).await?.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// Sends `req` and reads the response whole.
    pub async fn send(&mut self, req: Request<ReqBody>) -> Reply {
        let (parts, body) = self.response(req).await.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// Sends `req` and counts and hashes the response body as it streams by.
    pub async fn send_counted(&mut self, req: Request<ReqBody>) -> Counted {
        let (parts, mut body) = self.response(req).await.into_parts();
        let mut h = Hasher::new();
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.expect("response body").data_ref() {
                h.update(d);
            }
        }
        Counted {
            status: parts.status.as_u16(),
            headers: parts.headers,
            len: h.len,
            sha256: h.finish(),
        }
    }
}

/// Sends one request on a new connection from `from`.
pub async fn send(from: &str, to: SocketAddr, req: Request<ReqBody>) -> Reply {
    Conn::open(from, to).await.send(req).await
}

/// `GET target` from `from` with extra headers.
pub async fn get(from: &str, to: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = request("GET", target);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(from, to, b.body(empty()).unwrap()).await
}
