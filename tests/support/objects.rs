//! A storage server holding named objects, as an object store serves them: `GET` and `HEAD`
//! of a key give its bytes with `Content-Length`, an `ETag`, a checksum header and the
//! object's own headers (`Content-Encoding`, say); an unknown key is `404`. An object can
//! be served slowly, a chunk at a time, for tests that act in the middle of a download, or
//! held at an offset until the test lets the rest go; the server notes when it handed each
//! chunk over, so a test can tell the earliest moment the proxy could have read a byte.

#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One object: its bytes, its own response headers, and how it is sent.
#[derive(Clone, Debug, Default)]
pub struct Object {
    pub bytes: Bytes,
    pub headers: Vec<(String, String)>,
    /// Sent `chunk` bytes at a time with `every` between chunks; whole at once when `None`.
    pub trickle: Option<(usize, Duration)>,
    /// The first `.0` bytes are sent, then nothing until `.1` is notified.
    pub hold: Option<(usize, Arc<tokio::sync::Notify>)>,
}

impl Object {
    pub fn new(bytes: impl Into<Bytes>) -> Object {
        Object {
            bytes: bytes.into(),
            ..Object::default()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Object {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn trickle(mut self, chunk: usize, every: Duration) -> Object {
        self.trickle = Some((chunk, every));
        self
    }

    /// Sends the first `at` bytes (`at` less than the object's length), then waits for
    /// `gate.notify_one()` before sending the rest.
    pub fn hold_at(mut self, at: usize, gate: Arc<tokio::sync::Notify>) -> Object {
        self.hold = Some((at, gate));
        self
    }
}

/// When each chunk of a trickled or held object was handed to the connection, by path (the
/// latest `GET` of each): `(end offset of the chunk, instant)`, in order.
type Sent = Arc<Mutex<BTreeMap<String, Vec<(usize, Instant)>>>>;

/// A running object server; stops accepting when dropped.
pub struct Objects {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    sent: Sent,
    accept: JoinHandle<()>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl Objects {
    /// Serves `objects` (path -> object) over HTTP/1.1 on `ip`, port 0.
    pub async fn start(ip: &str, objects: BTreeMap<String, Object>) -> Objects {
        let listener = TcpListener::bind((ip.parse::<std::net::IpAddr>().unwrap(), 0))
            .await
            .expect("bind an object server");
        let addr = listener.local_addr().unwrap();
        let objects = Arc::new(objects);
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let sent = Sent::default();
        let sent_by_conn = sent.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (objects, counter) = (objects.clone(), counter.clone());
                let sent = sent_by_conn.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let (objects, sent) = (objects.clone(), sent.clone());
                        async move { Ok::<_, Infallible>(serve(&objects, &sent, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Objects {
            addr,
            requests,
            sent,
            accept,
        }
    }

    /// `http://ADDR`, for the policy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// When the chunk holding byte `offset` of the object at `path` (trickled or held, its
    /// latest `GET`) was handed to the connection: no reader can have had that byte earlier.
    /// `None` while it was not.
    pub fn sent_at(&self, path: &str, offset: usize) -> Option<Instant> {
        let sent = self.sent.lock().unwrap();
        sent.get(path)?
            .iter()
            .find(|(end, _)| *end > offset)
            .map(|(_, at)| *at)
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn serve(
    objects: &BTreeMap<String, Object>,
    sent: &Sent,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some(o) = objects.get(&path) else {
        return Response::builder()
            .status(404)
            .header("content-type", "application/xml")
            .body(
                http_body_util::Full::new(Bytes::from_static(
                    b"<Error><Code>NoSuchKey</Code></Error>",
                ))
                .boxed(),
            )
            .unwrap();
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &o.bytes);
    let mut resp = Response::builder()
        .status(200)
        .header("content-length", o.bytes.len())
        .header(
            "etag",
            format!("\"{}\"", hex::encode(&digest.as_ref()[..16])),
        )
        .header("accept-ranges", "bytes")
        .header("x-amz-checksum-sha256", hex::encode(digest.as_ref()))
        .header("last-modified", "Tue, 01 Dec 2026 00:00:00 GMT");
    for (k, v) in &o.headers {
        resp = resp.header(k, v);
    }
    let body: Body = if req.method() == http::Method::HEAD {
        http_body_util::Empty::new().boxed()
    } else {
        match (o.trickle, &o.hold) {
            (None, None) => http_body_util::Full::new(o.bytes.clone()).boxed(),
            (trickle, hold) => {
                let (bytes, hold) = (o.bytes.clone(), hold.clone());
                let (chunk, every) = trickle.unwrap_or((bytes.len(), Duration::ZERO));
                let (sent, path) = (sent.clone(), path.clone());
                sent.lock().unwrap().insert(path.clone(), Vec::new());
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
                tokio::spawn(async move {
                    let mut offset = 0;
                    while offset < bytes.len() {
                        let mut end = (offset + chunk.max(1)).min(bytes.len());
                        if let Some((at, gate)) = &hold {
                            if offset == *at {
                                gate.notified().await;
                            } else if offset < *at {
                                end = end.min(*at);
                            }
                        }
                        // Noted before the chunk is handed over: the earliest it can be read.
                        if let Some(log) = sent.lock().unwrap().get_mut(&path) {
                            log.push((end, Instant::now()));
                        }
                        if tx
                            .send(Ok(Frame::data(bytes.slice(offset..end))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        offset = end;
                        if !every.is_zero() {
                            tokio::time::sleep(every).await;
                        }
                    }
                });
                StreamBody::new(tokio_stream_from(rx)).boxed()
            }
        }
    };
    resp.body(body).unwrap()
}

/// The receiver as a stream of frames.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
