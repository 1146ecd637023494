//! Bodies for the tests: a generated body of any length, produced chunk by chunk so that a
//! 256 MiB transfer never exists in memory, and the SHA-256 that tells two bodies apart.

#![allow(dead_code)]

use aws_lc_rs::digest::{Context, SHA256};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

/// `len` bytes of a fixed pattern, yielded `chunk` bytes at a time. Every chunk is a slice of
/// one shared buffer, so producing the body allocates nothing per chunk.
pub struct Generated {
    remaining: u64,
    block: Bytes,
    /// Whether the length is announced (`Content-Length`) or not (chunked encoding).
    announced: bool,
}

impl Generated {
    pub fn new(len: u64, chunk: usize) -> Generated {
        Generated {
            remaining: len,
            block: pattern(chunk),
            announced: true,
        }
    }

    /// The same body with its length unannounced, so that HTTP/1.1 sends it chunked.
    pub fn chunked(len: u64, chunk: usize) -> Generated {
        Generated {
            announced: false,
            ..Generated::new(len, chunk)
        }
    }

    /// The SHA-256 (hex) of the body `Generated::new(len, chunk)` produces.
    pub fn sha256(len: u64, chunk: usize) -> String {
        let block = pattern(chunk);
        let mut h = Hasher::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            h.update(&block[..n]);
            left -= n as u64;
        }
        h.finish()
    }
}

fn pattern(chunk: usize) -> Bytes {
    (0..chunk.max(1)).map(|i| (i % 251) as u8).collect()
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.block.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.block.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.announced {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// A body sent slowly: `chunks` chunks of `size` bytes, one every `every`, like a client
/// uploading over a slow link.
pub struct Trickle {
    left: usize,
    block: Bytes,
    every: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Trickle {
    pub fn new(chunks: usize, size: usize, every: Duration) -> Trickle {
        Trickle {
            left: chunks,
            block: pattern(size),
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
        }
    }
}

impl Body for Trickle {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let next = tokio::time::Instant::now() + self.every;
        self.sleep.as_mut().reset(next);
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.block.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.left * self.block.len()) as u64)
    }
}

/// An incremental SHA-256 that also counts bytes.
pub struct Hasher {
    ctx: Context,
    pub len: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher {
            ctx: Context::new(&SHA256),
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
        self.len += data.len() as u64;
    }

    /// The digest as lower-case hex.
    pub fn finish(self) -> String {
        hex::encode(self.ctx.finish().as_ref())
    }
}

/// The SHA-256 (hex) of `data`.
pub fn sha256(data: &[u8]) -> String {
    let mut h = Hasher::new();
    h.update(data);
    h.finish()
}
