//! The per-request pipeline, as steps with named results: the limits and the decision
//! (`Steps::decide_request`, giving a `Decided`), the decision record (`Steps::log_decision`,
//! which may still refuse), then a refusal or the way upstream (`Forward`). No byte goes
//! upstream before the record is written.

use super::Shared;
use super::body::ResponseBody;
use super::exchange::Exchange;
use super::filter::{self, FilterJob};
use super::request_body::RequestBody;
use super::respond::{self, DECISION_HEADER, Local};
use super::snapshot::Snapshot;
use super::upstream::{self, AddrPool, PoolReturn, Sender, UpstreamError};
use crate::audit::id::DecisionId;
use crate::audit::record::{self, DecisionRecord, Record, RequestContext, X_FORWARDED_FOR};
use crate::audit::trace::TraceParent;
use crate::audit::write::LogFailed;
use crate::bulk::Compression;
use crate::consent::cache::Loader;
use crate::metrics::UpstreamError as UpstreamErrorKind;
use crate::policy::Policy;
use crate::policy::decide::{self, FilterTerms, upstream_allowed};
use crate::policy::decision::{Decision, Reason, UpstreamChoice, Verdict, status_of};
use crate::policy::model::{Mode, OnFailure};
use compact_str::CompactString;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::Instrument;

/// What the connection knows about its client.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The verified SAN of an mTLS client certificate.
    pub identity: Option<Arc<str>>,
    /// The connection's activity: each exchange counts as a request in progress on it.
    pub activity: Option<Arc<super::stall::Activity>>,
    /// The client's address as the `X-Forwarded-For` hop this proxy adds, rendered once for
    /// the connection's requests.
    pub forwarded_for: HeaderValue,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        identity: Option<Arc<str>>,
        activity: Option<Arc<super::stall::Activity>>,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            identity,
            activity,
            forwarded_for: HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
        }
    }
}

/// Handles one request; every path through it writes exactly one decision record.
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    // Busy from the head on, while it is decided: its exchange counts it once it exists.
    let _deciding = conn.activity.as_ref().map(|a| a.deciding());
    let ts = jiff::Timestamp::now();
    let id = DecisionId::new(ts);
    // Dataset, decision and reason are filled in once decided; never the path or subject.
    let span = tracing::debug_span!(
        "request",
        decision.id = %id,
        client.addr = %conn.peer,
        http.method = %req.method(),
        dataset = tracing::field::Empty,
        decision = tracing::field::Empty,
        reason = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    // The application's trace (W3C `traceparent`), which the decision record keeps too: from
    // either, the other is found.
    if !span.is_disabled()
        && let Some(trace) = TraceParent::from_headers(req.headers())
    {
        span.record("trace_id", trace.trace_id());
    }
    Ok(handle_inner(shared, conn, req, started, ts, id, &span)
        .instrument(span.clone())
        .await)
}

async fn handle_inner(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
    started: Instant,
    ts: jiff::Timestamp,
    id: DecisionId,
    span: &tracing::Span,
) -> Response<ResponseBody> {
    let snap = shared.snapshot.load_full();
    let (mut parts, body) = req.into_parts();
    // The decision sees exactly the headers the upstream will get.
    let host_named_hop = strip_hop_by_hop(&mut parts.headers);
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
    let cx = RequestContext {
        id,
        ts,
        method: &parts.method,
        host,
        raw_path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        peer: conn.peer.ip(),
    };
    let steps = Steps {
        shared: &shared,
        snap: &snap,
        conn: &conn,
        started,
        span,
    };
    let decided = steps.decide_request(&parts, &cx, host_named_hop).await;

    // The decision record is written before anything else happens. The exchange exists
    // first, so that a client going away while the record is written still leaves an
    // outcome record (queued after the decision).
    let exchange = Exchange::new(id, started, shared.clone());
    if let Some(a) = &conn.activity {
        exchange.in_flight_on(a);
    }
    match steps.log_decision(decided, &exchange).await {
        Plan::Refuse(refusal) => refusal.respond(id.as_str(), &snap.policy, exchange),
        Plan::Forward {
            choice,
            dataset,
            filter,
        } => {
            let forward = Forward {
                shared: &shared,
                snap: &snap,
                conn: &conn,
                choice,
                dataset,
                filter,
                exchange,
                id: id.as_str(),
            };
            forward.send(parts, body).await
        }
    }
}

/// What to do once the decision record is written.
enum Plan {
    Refuse(Refusal),
    Forward {
        choice: UpstreamChoice,
        dataset: Option<usize>,
        /// A bulk object's records leave filtered, by these terms (`consent_filtered`).
        filter: Option<Box<FilterTerms>>,
    },
}

/// A request the proxy answers itself, with what the answer says.
struct Refusal {
    status: u16,
    reason: Reason,
    dataset: Option<Arc<str>>,
    message: String,
}

impl Refusal {
    fn respond(self, id: &str, policy: &Policy, exchange: Arc<Exchange>) -> Response<ResponseBody> {
        respond::local(
            Local {
                status: self.status,
                reason: self.reason,
                decision_id: id,
                dataset: self.dataset.as_deref(),
                message: &self.message,
                policy_name: &policy.name,
            },
            Some(exchange),
        )
    }
}

/// What `residency_decisions_total` counts for a request, once the log has had its say.
struct Counted {
    dataset: Option<usize>,
    reason: Reason,
    verdict: Verdict,
    enforced: bool,
}

/// A request decided, or refused by a limit before any decision: its decision record, what
/// to do once the record is written, and what it counts as.
struct Decided {
    /// Boxed as the log takes it: the steps hand the decision on without copying the record.
    record: Box<DecisionRecord>,
    plan: Plan,
    counted: Counted,
}

/// What every step of one request reads: the state all requests share, the snapshot the
/// request is decided under, its client, when it started, and its span.
struct Steps<'r> {
    shared: &'r Arc<Shared>,
    snap: &'r Snapshot,
    conn: &'r ConnInfo,
    started: Instant,
    span: &'r tracing::Span,
}

impl Steps<'_> {
    /// Limits first (an oversized request is refused, and logged, undecided), then the
    /// decision, with the consent cache filled where it missed.
    async fn decide_request(
        &self,
        parts: &Parts,
        cx: &RequestContext<'_>,
        host_named_hop: bool,
    ) -> Decided {
        if let Some((reason, rule)) = exceeded_limit(&self.snap.policy, parts, host_named_hop) {
            return refused_by_limit(self.snap, cx, reason, rule);
        }
        let copy_source = decide::copy_source(&parts.headers);
        let request = decide::Request {
            method: &parts.method,
            host: cx.host,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            peer: self.conn.peer.ip(),
            identity: self.conn.identity.as_deref(),
            pick: fastrand::usize(..),
            copy_source: copy_source.as_deref(),
        };
        self.decide_filled(&request, cx).await
    }

    /// Decides `request`, and what the decision comes to. A subject the consent cache does
    /// not hold: one query fills it, then the request is decided again. A store that does not
    /// answer in time leaves it a miss: consent_store_unavailable. A copy may need a second
    /// subject (its source's) once the first is known: each round fills what the last one
    /// missed, and a subject is filled at most once.
    async fn decide_filled(
        &self,
        request: &decide::Request<'_>,
        cx: &RequestContext<'_>,
    ) -> Decided {
        let (shared, snap) = (self.shared, self.snap);
        let mut filled: Vec<CompactString> = Vec::new();
        let d = loop {
            let (d, missed) = {
                let env = snap.env(
                    cx.ts.as_microsecond(),
                    shared.consent_loader.is_some(),
                    &filled,
                );
                let d = decide::decide(&snap.policy, &env, request, &mut ());
                (d, env.take_missed())
            };
            let Some(loader) = shared
                .consent_loader
                .as_ref()
                .filter(|_| !missed.is_empty())
            else {
                break d;
            };
            self.fill(loader, &missed, cx, &d).await;
            filled.extend(missed);
        };
        shared.metrics.decision_time.observe(self.started.elapsed());
        self.decided(cx, &d)
    }

    /// Fills the consent cache with the subjects a decision (`d`) missed, sharing each query
    /// with other requests missing the same subject. Should the client go away meanwhile,
    /// the decision as it stands is still logged (see [`Abandoned`]).
    async fn fill(
        &self,
        loader: &Loader,
        missed: &[CompactString],
        cx: &RequestContext<'_>,
        d: &Decision<'_>,
    ) {
        let snap = self.snap;
        let provisional =
            record::decision_record(&snap.policy, snap.geo_label.clone(), &snap.pseudo, cx, d);
        let abandoned = Abandoned {
            shared: self.shared,
            id: cx.id,
            started: self.started,
            record: Some(provisional),
        };
        // Boxed, as the upstream connection is: only a cache miss waits here.
        let fills = futures_util::future::join_all(missed.iter().map(|s| loader.fill(s)));
        for r in Box::pin(fills).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "consent lookup failed");
            }
        }
        abandoned.disarm();
    }

    /// What the decision `d` comes to: its record, its plan and what it counts as. The span
    /// and the upstream's counters learn of it here.
    fn decided(&self, cx: &RequestContext<'_>, d: &Decision<'_>) -> Decided {
        let (snap, policy) = (self.snap, &*self.snap.policy);
        if d.reason == Reason::UpstreamUnreachable && d.upstream.is_none() {
            // Decided unreachable: the upstream's host resolved to no address.
            let up = d
                .dataset
                .map(|i| policy.datasets[i].upstream)
                .or(policy.unmatched_upstream);
            if let Some(c) = up.and_then(|u| snap.metrics.upstream(u)) {
                c.error(UpstreamErrorKind::Resolve);
            }
        }
        let span = self.span;
        if !span.is_disabled() {
            if let Some(i) = d.dataset {
                span.record("dataset", &*policy.datasets[i].name);
            }
            span.record("decision", d.verdict.as_str());
            span.record("reason", d.reason.as_str());
        }
        let record = Box::new(record::decision_record(
            policy,
            snap.geo_label.clone(),
            &snap.pseudo,
            cx,
            d,
        ));
        let plan = match (d.forwards(), &d.upstream) {
            (true, Some(choice)) => Plan::Forward {
                choice: choice.clone(),
                dataset: d.dataset,
                filter: FilterTerms::of(d).map(Box::new),
            },
            _ => Plan::Refuse(Refusal {
                status: d.status().unwrap_or(500),
                reason: d.reason,
                dataset: d.dataset.map(|i| policy.datasets[i].name.clone()),
                message: d.message(policy),
            }),
        };
        Decided {
            record,
            plan,
            counted: Counted {
                dataset: d.dataset,
                reason: d.reason,
                verdict: d.verdict,
                enforced: d.enforced,
            },
        }
    }

    /// Writes the decision record and counts the decision; returns what to carry out: the
    /// plan, unless the log failed. A failing log refuses the request, 503 log_unavailable,
    /// unless `log.on_failure = "allow"` lets a forward go ahead (never past a closed log).
    async fn log_decision(&self, decided: Decided, exchange: &Exchange) -> Plan {
        let Decided {
            record,
            plan,
            counted,
        } = decided;
        let (shared, policy) = (self.shared, &*self.snap.policy);
        let appending = Instant::now();
        let queued = shared.log.append_queued(Record::Decision(record));
        // A log that hangs instead of failing (a stuck disk, a pipe nobody reads) must not
        // hang every request with it: past the deadline it counts as failing, and
        // `on_failure` decides.
        let logged = match tokio::time::timeout(LOG_DEADLINE, queued).await {
            Ok(r) => r,
            Err(_) => Err(LogFailed(format!(
                "the decision record was not written within {LOG_DEADLINE:?}"
            ))),
        };
        shared.metrics.log_append_time.observe(appending.elapsed());
        let counters = self.snap.metrics.dataset(counted.dataset);
        if let Err(e) = logged {
            let forwarding = matches!(plan, Plan::Forward { .. });
            // "allow" forwards past a failing log, never past a closed one (shutdown).
            if policy.log.on_failure == OnFailure::Deny || !forwarding || shared.log.is_closed() {
                tracing::error!(error = %e, "decision log unavailable: refusing the request");
                let reason = Reason::LogUnavailable;
                // Counted as answered: the decision was not logged, and not carried out.
                counters.record(reason, Verdict::Error, true);
                let message = Decision::new_failure(reason, "log.on_failure").message(policy);
                exchange.set_error(reason);
                return Plan::Refuse(Refusal {
                    status: 503,
                    reason,
                    dataset: None,
                    message,
                });
            }
            tracing::error!(error = %e, "decision log unavailable: forwarding anyway (log.on_failure = \"allow\")");
        }
        counters.record(counted.reason, counted.verdict, counted.enforced);
        plan
    }
}

/// The limit a request exceeds, if any, and the rule that sets it: a `Connection` header
/// naming `Host`, a head above `proxy.max_header_bytes`, a declared body above
/// `proxy.max_body_bytes`.
fn exceeded_limit(
    policy: &Policy,
    parts: &Parts,
    host_named_hop: bool,
) -> Option<(Reason, &'static str)> {
    if host_named_hop {
        Some((Reason::BadRequest, "request.connection"))
    } else if header_bytes(parts.method.as_str(), &parts.uri, &parts.headers)
        > policy.proxy.max_header_bytes
    {
        Some((Reason::HeadersTooLarge, "proxy.max_header_bytes"))
    } else if policy
        .proxy
        .max_body_bytes
        .is_some_and(|max| content_length(&parts.headers).is_some_and(|n| n > max))
    {
        Some((Reason::PayloadTooLarge, "proxy.max_body_bytes"))
    } else {
        None
    }
}

fn header_bytes(method: &str, uri: &Uri, headers: &HeaderMap) -> usize {
    let line = method.len() + uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    line + headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A request refused by a limit, undecided: its failure record (the path opaque), and a
/// refusal counted as an error.
fn refused_by_limit(
    snap: &Snapshot,
    cx: &RequestContext<'_>,
    reason: Reason,
    rule: &'static str,
) -> Decided {
    let policy = &snap.policy;
    let mut record = Box::new(record::failure_record(policy, cx, reason, rule));
    record.request.path = snap.pseudo.opaque_path(&record.request.path);
    let mut failure = Decision::new_failure(reason, rule);
    if reason == Reason::BadRequest {
        failure.detail = Some("the Connection header names Host".into());
    }
    let message = failure.message(policy);
    Decided {
        record,
        plan: Plan::Refuse(Refusal {
            status: status_of(reason),
            reason,
            dataset: None,
            message,
        }),
        counted: Counted {
            dataset: None,
            reason,
            verdict: Verdict::Error,
            enforced: true,
        },
    }
}

/// How long a request waits for its decision record to be written before the log counts as
/// failing for it (`log.on_failure` then decides). Far above any healthy write, fsync
/// included.
const LOG_DEADLINE: Duration = Duration::from_secs(5);

/// A request waiting for a consent lookup: if its client goes away meanwhile (the handler is
/// dropped), its records are still written: the decision as it stood (the store had not
/// answered: `consent_store_unavailable`) and an outcome saying why nothing was answered.
struct Abandoned<'a> {
    shared: &'a Arc<Shared>,
    id: DecisionId,
    started: Instant,
    record: Option<DecisionRecord>,
}

impl Abandoned<'_> {
    /// The lookup ended: the request goes on to its decision record as usual.
    fn disarm(mut self) {
        self.record = None;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        let Some(rec) = self.record.take() else {
            return;
        };
        // Queued at once: the returned wait is not needed.
        drop(
            self.shared
                .log
                .append_queued(Record::Decision(Box::new(rec))),
        );
        let exchange = Exchange::new(self.id, self.started, self.shared.clone());
        exchange.set_error(Reason::ConsentStoreUnavailable);
        exchange.set_detail("the client went away while the consent lookup ran".into());
    }
}

/// A decided request's way upstream: the address it was decided for, under which snapshot,
/// and the exchange that records how it went.
struct Forward<'r> {
    shared: &'r Arc<Shared>,
    snap: &'r Arc<Snapshot>,
    conn: &'r ConnInfo,
    choice: UpstreamChoice,
    dataset: Option<usize>,
    filter: Option<Box<FilterTerms>>,
    exchange: Arc<Exchange>,
    id: &'r str,
}

/// Why the upstream gave no response: the reason the outcome records, what the upstream did
/// wrong (if it was the upstream), and what exactly happened.
struct Failure {
    reason: Reason,
    kind: Option<UpstreamErrorKind>,
    detail: String,
}

impl Forward<'_> {
    /// Sends the request (`parts` and `body`) to the decided address and turns the
    /// upstream's answer, or its failure to give one, into the client's response.
    async fn send(self, mut parts: Parts, body: Incoming) -> Response<ResponseBody> {
        let policy = &self.snap.policy;
        self.exchange.set_upstream(self.choice.addr);
        // A filtered object's key tells its compression when no Content-Encoding does.
        let key = self.filter.as_ref().map(|_| parts.uri.path().to_owned());
        upstream_head(&mut parts, self.conn);
        // A request without a body (most reads) has nothing to wait for before the upstream's
        // answer clock starts.
        let (body_sent, body_done) = if http_body::Body::is_end_stream(&body) {
            (None, None)
        } else {
            let (sent, done) = oneshot::channel();
            (Some(sent), Some(done))
        };
        let limit = policy.proxy.max_body_bytes;
        let body = RequestBody::new(body, self.exchange.clone(), limit, body_sent);
        let req = Request::from_parts(parts, body);
        let pool = self.snap.upstreams[self.choice.index]
            .resolved()
            .pool(self.choice.addr)
            .cloned()
            .unwrap_or_else(|| AddrPool::new(self.choice.addr, 0, policy.proxy.idle_timeout));
        match self.upstream_response(&pool, req, body_done).await {
            Ok((resp, sender)) => {
                let back = PoolReturn { sender, pool };
                match key {
                    Some(key) => self.filtered_response(resp, back, &key),
                    None => self.client_response(resp, back),
                }
            }
            Err(failure) => self.fail(failure),
        }
    }

    /// Sends `req` on a pooled connection to the decided address, else on a new one; returns
    /// the upstream's response and the connection it came on.
    async fn upstream_response(
        &self,
        pool: &AddrPool,
        req: Request<RequestBody>,
        mut body_done: Option<oneshot::Receiver<()>>,
    ) -> Result<(Response<Incoming>, Sender), Failure> {
        let proxy = &self.snap.policy.proxy;
        let mut req = Some(req);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The retry after a stale pooled connection goes to a fresh one: the next pooled
            // one may be just as stale.
            let pooled = if attempt == 1 { pool.take() } else { None };
            let (mut sender, reused) = match pooled {
                Some(s) => (s, true),
                None => (self.connect(pool).await?, false),
            };
            let sent = tokio::select! {
                r = sender.try_send_request(req.take().expect("request present")) => Ok(r),
                () = answer_deadline(&self.exchange, &mut body_done, proxy.upstream_timeout) => Err(()),
            };
            match sent {
                Err(()) => {
                    return Err(Failure {
                        reason: Reason::UpstreamTimeout,
                        kind: Some(UpstreamErrorKind::Timeout),
                        detail: format!("no response within {:?}", proxy.upstream_timeout),
                    });
                }
                Ok(Ok(resp)) => return Ok((resp, sender)),
                Ok(Err(_)) if self.exchange.error() == Some(Reason::PayloadTooLarge) => {
                    return Err(Failure {
                        reason: Reason::PayloadTooLarge,
                        kind: None,
                        detail: format!(
                            "more than {} bytes",
                            proxy.max_body_bytes.unwrap_or_default()
                        ),
                    });
                }
                Ok(Err(mut e)) => {
                    // A pooled connection closed under us before the request left: try once
                    // more on a fresh connection (the request was never sent).
                    match e.take_message() {
                        Some(back) if reused && attempt == 1 => req = Some(back),
                        _ => {
                            return Err(Failure {
                                reason: Reason::UpstreamUnreachable,
                                kind: Some(UpstreamErrorKind::Request),
                                detail: e.into_error().to_string(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// A new connection to the decided address, made available to later requests.
    async fn connect(&self, pool: &AddrPool) -> Result<Sender, Failure> {
        let (snap, policy) = (self.snap, &*self.snap.policy);
        // The connect-time check repeats step 4 on the socket's own peer address. A dataset in
        // audit mode only logs step 4 (its decision record already says "would deny"), so the
        // connection it was allowed to make is not refused here either.
        let ds = self.dataset.map(|i| &policy.datasets[i]);
        let allowed = |ip: IpAddr| {
            ds.is_none_or(|d| {
                d.mode == Mode::Audit || upstream_allowed(d, &snap.locator.locate(ip))
            })
        };
        let tls = snap.upstreams[self.choice.index].tls();
        // Boxed: a connection is made once for many requests, and its future (TCP, TLS, the
        // HTTP handshake) would otherwise make every request's state, which is moved about
        // per request, several kilobytes larger.
        match Box::pin(upstream::connect(
            self.choice.addr,
            policy.proxy.connect_timeout,
            allowed,
            tls.as_deref(),
        ))
        .await
        {
            Ok(s) => {
                pool.adopt(&s);
                Ok(s)
            }
            Err(e @ UpstreamError::OutsideHome { .. }) => Err(Failure {
                reason: Reason::UpstreamUnreachable,
                kind: Some(UpstreamErrorKind::OutsideHome),
                detail: e.to_string(),
            }),
            Err(e) => Err(Failure {
                reason: Reason::UpstreamUnreachable,
                kind: Some(UpstreamErrorKind::Connect),
                detail: e.to_string(),
            }),
        }
    }

    /// The client's response from the upstream's: its head less the hop-by-hop headers and
    /// with the decision id, its body streamed and counted; the connection goes back to the
    /// pool once the body has been read whole.
    fn client_response(self, resp: Response<Incoming>, back: PoolReturn) -> Response<ResponseBody> {
        let (mut parts, body) = resp.into_parts();
        self.exchange.set_status(parts.status.as_u16());
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(v) = HeaderValue::from_str(self.id) {
            parts.headers.insert(DECISION_HEADER.clone(), v);
        }
        let idle = self.snap.policy.proxy.idle_timeout;
        Response::from_parts(
            parts,
            ResponseBody::upstream(body, Some(back), self.exchange, idle),
        )
    }

    /// The client's response for a bulk object filtered record by record: what described
    /// the unfiltered object is dropped, and the body is what the filter task lets through.
    /// Only a successful answer with a body is filtered (an upstream's error is not the
    /// object); an object whose encoding the filter cannot undo is not sent at all.
    fn filtered_response(
        self,
        resp: Response<Incoming>,
        back: PoolReturn,
        key: &str,
    ) -> Response<ResponseBody> {
        let status = resp.status();
        if !status.is_success() {
            return self.client_response(resp, back);
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        filter::strip_object_headers(&mut parts.headers);
        let idle = self.snap.policy.proxy.idle_timeout;
        let has_body =
            status != http::StatusCode::NO_CONTENT && !http_body::Body::is_end_stream(&body);
        let encoding = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("(not text)"));
        let compression = match Compression::detect(encoding, key) {
            Ok(c) => c,
            Err(e) if has_body => {
                return self.fail(Failure {
                    reason: Reason::UpstreamUnreachable,
                    kind: None,
                    detail: e.to_string(),
                });
            }
            Err(_) => Compression::Identity,
        };
        self.exchange.set_status(status.as_u16());
        if let Ok(v) = HeaderValue::from_str(self.id) {
            parts.headers.insert(DECISION_HEADER.clone(), v);
        }
        if !has_body {
            // HEAD, 204: nothing to filter, and the length is gone.
            let body = ResponseBody::upstream(body, Some(back), self.exchange, idle);
            return Response::from_parts(parts, body);
        }
        let input = ResponseBody::upstream_input(body, Some(back), idle);
        let terms = *self.filter.expect("a filtered response has terms");
        let audit = self.snap.policy.datasets[terms.dataset].mode == Mode::Audit;
        let pieces = FilterJob {
            snap: self.snap.clone(),
            shared: self.shared.clone(),
            terms,
            id: DecisionId::from(self.id),
            exchange: self.exchange.clone(),
            compression,
            audit,
        }
        .spawn(input);
        Response::from_parts(parts, ResponseBody::filtered(pieces, self.exchange))
    }

    /// The client's answer when the upstream gave none: the failure is logged, counted
    /// against the upstream when it was at fault, and kept for the outcome record.
    fn fail(self, failure: Failure) -> Response<ResponseBody> {
        let Failure {
            reason,
            kind,
            detail,
        } = failure;
        let (snap, policy) = (self.snap, &*self.snap.policy);
        let up = &snap.upstreams[self.choice.index];
        tracing::warn!(upstream = %up.name, upstream.addr = %self.choice.addr, error = %detail, "upstream request failed");
        if let (Some(c), Some(kind)) = (snap.metrics.upstream(self.choice.index), kind) {
            c.error(kind);
        }
        self.exchange.set_error(reason);
        self.exchange.set_detail(detail.clone());
        let message = format!(
            "{} ({detail}).",
            Decision::new_failure(reason, "")
                .message(policy)
                .trim_end_matches('.')
        );
        respond::local(
            Local {
                status: status_of(reason),
                reason,
                decision_id: self.id,
                dataset: self.dataset.map(|i| &*policy.datasets[i].name),
                message: &message,
                policy_name: &policy.name,
            },
            Some(self.exchange),
        )
    }
}

/// Resolves once the upstream has had `timeout` to answer, counted from when it has the
/// whole request: a long upload is not a slow upstream. While the request body still flows,
/// only a whole `timeout` without a byte of progress (a stalled client or an upstream that
/// stopped reading) ends the wait early.
async fn answer_deadline(
    exchange: &Exchange,
    body_done: &mut Option<oneshot::Receiver<()>>,
    timeout: Duration,
) {
    if let Some(done) = body_done {
        let mut seen = exchange.bytes_in();
        loop {
            tokio::select! {
                _ = &mut *done => break,
                () = tokio::time::sleep(timeout) => {
                    let now = exchange.bytes_in();
                    if now == seen {
                        return;
                    }
                    seen = now;
                }
            }
        }
        // A completed receiver must not be polled again (a retry reuses this slot).
        *body_done = None;
    }
    tokio::time::sleep(timeout).await;
}

/// The head as the upstream gets it: the original target bytes, the original Host, and one
/// more X-Forwarded-For hop (hop-by-hop headers were removed before deciding), in origin form
/// over HTTP/1.1.
fn upstream_head(parts: &mut Parts, conn: &ConnInfo) {
    if !parts.headers.contains_key(header::HOST)
        && let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, v);
    }
    append_forwarded_for(&mut parts.headers, conn);
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
}

fn append_forwarded_for(headers: &mut HeaderMap, conn: &ConnInfo) {
    let peer = conn.peer.ip();
    if !headers.contains_key(&X_FORWARDED_FOR) {
        // The common case: this proxy is the first hop, named as rendered for the connection.
        headers.insert(X_FORWARDED_FOR.clone(), conn.forwarded_for.clone());
        return;
    }
    let prior: Vec<String> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let value = if prior.is_empty() {
        peer.to_string()
    } else {
        format!("{}, {peer}", prior.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// HTTP/2 clients may send one `cookie` field per cookie; HTTP/1.1 servers expect them in
/// one field, joined with "; " (RFC 9113 section 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    if all.nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// (`Trailer` is not among them: it declares the trailer fields, and without it hyper drops
/// them.)
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "expect",
];

/// Whether `name` is one of [`HOP_BY_HOP`]: the standard names compare as constants, without
/// comparing strings.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::EXPECT
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Removes hop-by-hop headers, including those the `Connection` header names; returns true
/// when `Connection` names `Host`, which would leave the upstream another Host than the one
/// decided on.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // Most messages carry none of them: one pass over the names finds that out.
    if !headers.keys().any(is_hop_by_hop) {
        return false;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let names_host = named.contains(&header::HOST);
    for n in named {
        if n != header::HOST {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    names_host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_are_recognised_by_constant_and_by_name() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "host",
            "trailer",
            "x-forwarded-for",
            "x-purpose",
            "keep-alive-x",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        assert!(!strip_hop_by_hop(&mut headers));
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
