//! Bounds on how long nothing may move (`proxy.idle_timeout`): an upstream that sends a
//! response head and then nothing more, a client that stops reading what it asked for, or a
//! client connection on which no byte moves at all (an HTTP/2 connection left open without
//! requests, a preface sent in part) would otherwise hold exchanges, connection slots and
//! memory forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Times one direction of a stream: the clock starts when the other side first makes us
/// wait, restarts after any progress, and never runs while nobody is waiting (a response
/// body is not blamed for the time a slow client left it unpolled).
pub struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    moved: bool,
}

impl Stall {
    pub fn new(limit: Duration) -> Stall {
        Stall {
            limit,
            timer: None,
            moved: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Something moved: the next wait starts a fresh clock.
    pub fn progressed(&mut self) {
        self.moved = true;
    }

    /// Called when the stream has made us wait; true once `limit` has passed since the wait
    /// began without progress. Registers `cx` to be woken at the deadline.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timer = match &mut self.timer {
            Some(t) => {
                if self.moved {
                    t.as_mut().reset(Instant::now() + self.limit);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(self.limit))),
        };
        self.moved = false;
        timer.as_mut().poll(cx).is_ready()
    }
}

/// Whether bytes move on a connection, either way, and how many of its requests are in
/// progress. Moving bytes only bumps a counter (no clock is read per read or write): the idle
/// watch looks at it a few times per `idle_timeout`.
#[derive(Debug)]
pub struct Activity {
    /// Reads, writes and request ends so far.
    moves: AtomicU64,
    in_flight: AtomicUsize,
    /// Requests ended so far.
    ends: AtomicU64,
    /// A byte arrived since the last request ended: the start of the next head, which
    /// `header_read_timeout` bounds from its first byte (parking would restart that clock).
    heard: AtomicBool,
    /// The client left a write waiting (its receive window full): bytes are still queued.
    write_blocked: AtomicBool,
}

/// What [`Activity::watch`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Nothing moved and no request was in progress for the whole limit.
    Idle,
    /// The connection waits for its next request, with nothing queued either way, and has
    /// been quiet for this long: it can be parked.
    Parkable(Duration),
}

/// How often a served connection is looked at, and so how long it has been quiet (between
/// one and two of these) before it is parked.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            moves: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            ends: AtomicU64::new(0),
            heard: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        })
    }

    fn touch(&self) {
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests ended on the connection so far.
    pub fn ends(&self) -> u64 {
        self.ends.load(Ordering::Acquire)
    }

    /// Resolves with [`Quiet::Idle`] once no request has been in progress and no byte has
    /// moved for `limit` (noticed within a quarter of `limit` more; a request in progress has
    /// its own bounds: `upstream_timeout`, a stalled body, a stalled reader), or, when `park` is set,
    /// with [`Quiet::Parkable`] once the connection has been quiet for one to two
    /// [`PARK_AFTER`] between requests: a request ended after `ends_before` (so HTTP/1.1
    /// is between messages), none is in progress, no byte of the next one has arrived and
    /// no response byte waits for the client.
    pub async fn watch(&self, limit: Duration, park: bool, ends_before: u64) -> Quiet {
        let every = if park {
            PARK_AFTER.min(limit / 4)
        } else {
            limit / 4
        };
        let mut seen = self.moves.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            let moves = self.moves.load(Ordering::Relaxed);
            if moves != seen || self.in_flight.load(Ordering::Acquire) > 0 {
                seen = moves;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= limit {
                return Quiet::Idle;
            } else if park
                && self.ends() > ends_before
                && !self.heard.load(Ordering::Acquire)
                && !self.write_blocked.load(Ordering::Acquire)
            {
                return Quiet::Parkable(quiet_since.elapsed());
            }
        }
    }

    /// Counts a request in progress until the returned guard (held by its exchange) is
    /// dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

impl Activity {
    /// Counts a request whose head has been read as in progress while it is decided,
    /// before its exchange exists: a slow decision is not a quiet connection.
    pub fn deciding(self: &Arc<Self>) -> Deciding {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Deciding(self.clone())
    }
}

/// A request being decided (see [`Activity::deciding`]).
pub struct Deciding(Arc<Activity>);

impl Drop for Deciding {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in progress on a connection (see [`Activity::begin`]).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle clock starts when the last request ends.
        self.0.touch();
        self.0.heard.store(false, Ordering::Release);
        self.0.ends.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client connection whose writes fail with `TimedOut` once the client has accepted no
/// byte for the stall limit: a reader that stops reading is cut off, its exchange ends
/// incomplete and its connection slot is freed. Every byte moved either way is noted in its
/// [`Activity`], which bounds connections on which nothing moves at all.
pub struct WriteStall<S> {
    inner: S,
    stall: Stall,
    activity: Arc<Activity>,
}

impl<S> WriteStall<S> {
    pub fn new(inner: S, limit: Duration, activity: Arc<Activity>) -> WriteStall<S> {
        WriteStall {
            inner,
            stall: Stall::new(limit),
            activity,
        }
    }

    /// The stream itself (to wait for a parked connection's next byte).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes written count as activity; a flush does not (HTTP/2 flushes whenever its task
    /// wakes, bytes or not). A write left waiting is noted until one goes through.
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.touch();
                self.activity.write_blocked.store(false, Ordering::Release);
            }
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Release),
            _ => {}
        }
    }

    fn check<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending if self.stall.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client accepted no response bytes for {:?} (proxy.idle_timeout)",
                    self.stall.limit()
                ),
            ))),
            Poll::Pending => Poll::Pending,
            r => {
                self.stall.progressed();
                r
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
            self.activity.heard.store(true, Ordering::Release);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        self.check(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        self.check(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test(start_paused = true)]
    async fn the_clock_runs_only_while_waiting_and_restarts_after_progress() {
        let mut s = Stall::new(Duration::from_secs(10));
        assert!(!poll_fn(|cx| Poll::Ready(s.expired(cx))).await);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!poll_fn(|cx| Poll::Ready(s.expired(cx))).await);
        // Progress just before the limit: a fresh ten seconds.
        s.progressed();
        assert!(!poll_fn(|cx| Poll::Ready(s.expired(cx))).await);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!poll_fn(|cx| Poll::Ready(s.expired(cx))).await);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(poll_fn(|cx| Poll::Ready(s.expired(cx))).await);
    }
}
