//! A client that calls the proxy from a chosen source address (the policy places loopback
//! addresses in countries), over one connection it can reuse: HTTP/1.1, HTTP/2 in the clear
//! (prior knowledge), or TLS with the protocol ALPN picks.

#![allow(dead_code)]

use super::body::Hasher;
use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

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
    pub version: http::Version,
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

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

/// One client connection from a chosen source address.
pub struct Conn {
    sender: Sender,
    /// The server's certificate, under TLS.
    pub peer_cert: Option<rustls_pki_types::CertificateDer<'static>>,
}

async fn tcp(from: &str, to: SocketAddr) -> TcpStream {
    let from: IpAddr = from.parse().expect("a source address");
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind the source");
    socket.connect(to).await.expect("connect to the proxy")
}

async fn h1<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
) -> Result<Sender, hyper::Error> {
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(Sender::H1(sender))
}

async fn h2<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
) -> Result<Sender, hyper::Error> {
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(Sender::H2(sender))
}

impl Conn {
    /// Connects to `to` from `from` (e.g. `"127.0.0.20"`), any port, HTTP/1.1.
    pub async fn open(from: &str, to: SocketAddr) -> Conn {
        let sender = h1(tcp(from, to).await).await.expect("HTTP/1 handshake");
        Conn {
            sender,
            peer_cert: None,
        }
    }

    /// Connects in the clear and speaks HTTP/2 at once (prior knowledge, "h2c").
    pub async fn open_h2c(from: &str, to: SocketAddr) -> Conn {
        let sender = h2(tcp(from, to).await).await.expect("HTTP/2 handshake");
        Conn {
            sender,
            peer_cert: None,
        }
    }

    /// Connects with TLS (`config` names the trust anchors, client certificate and ALPN
    /// offer) and speaks what ALPN agreed. An error is the handshake's or the first
    /// exchange's: under TLS 1.3 a server refuses a client certificate after the client
    /// has finished its side of the handshake.
    pub async fn open_tls(
        from: &str,
        to: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> Result<Conn, String> {
        let stream = tcp(from, to).await;
        let name = ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let sender = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            h2(tls).await
        } else {
            h1(tls).await
        }
        .map_err(|e| format!("HTTP handshake: {e}"))?;
        Ok(Conn { sender, peer_cert })
    }

    /// Whether the connection has closed (the server hung up, or it failed).
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `req`; an error is the connection's.
    pub async fn try_response(
        &mut self,
        mut req: Request<ReqBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                // HTTP/2 carries the host in `:authority`.
                let host = req
                    .headers_mut()
                    .remove("host")
                    .map(|h| h.to_str().unwrap().to_string())
                    .unwrap_or_else(|| HOST.into());
                let pq = req.uri().path_and_query().unwrap().as_str().to_string();
                *req.uri_mut() = format!("https://{host}{pq}").parse().unwrap();
                *req.version_mut() = http::Version::HTTP_2;
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// Sends `req` and returns the response with its body unread.
    pub async fn response(
        &mut self,
        req: Request<ReqBody>,
    ) -> http::Response<hyper::body::Incoming> {
        self.try_response(req).await.expect("a response")
    }

    /// Sends `req` and reads the response whole; an error is the connection's.
    pub async fn try_send(&mut self, req: Request<ReqBody>) -> Result<Reply, hyper::Error> {
        let (parts, body) = self.try_response(req).await?.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    /// Sends `req` and reads the response whole.
    pub async fn send(&mut self, req: Request<ReqBody>) -> Reply {
        self.try_send(req).await.expect("a response")
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
