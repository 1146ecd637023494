//! The bookkeeping of one request/response exchange: bytes each way, the status sent, the
//! failure, the upstream address. The request body, the response body and the pipeline all
//! hold it, so it sits below them (and below the upstream client, whose connections are
//! typed by the request body); when the last holder lets go, the outcome record is built
//! from it and queued.

use super::Shared;
use super::stall::{Activity, InFlight};
use crate::audit::id::DecisionId;
use crate::audit::record::{Link, OutcomeRecord, Record, RecordCounts, Stamp, VERSION};
use crate::policy::decision::Reason;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

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
    /// A bulk object's filter counts, set once it ends.
    records: OnceLock<Box<RecordCounts>>,
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
            records: OnceLock::new(),
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

    /// Counts `n` more request body bytes read from the client.
    pub(super) fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` more response body bytes passed on to the client.
    pub(super) fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// A response the proxy wrote itself: `n` bytes, sent whole.
    pub(super) fn answered_locally(&self, n: u64) {
        self.bytes_out.store(n, Ordering::Relaxed);
        self.finished();
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

    /// What a bulk object's filter let through, for the outcome record.
    pub fn set_records(&self, counts: RecordCounts) {
        let _ = self.records.set(Box::new(counts));
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
            records: self.records.take(),
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
