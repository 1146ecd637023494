//! The per-request pipeline: limits, decide, write the decision record, then refuse or
//! forward. No byte goes upstream before the record is written.

use super::Shared;
use super::body::{Exchange, RequestBody, ResponseBody};
use super::respond::{self, DECISION_HEADER, Local};
use super::snapshot::Snapshot;
use super::upstream::{self, AddrPool, PoolReturn, UpstreamError};
use crate::audit::id::DecisionId;
use crate::audit::record::{self, Record, RequestContext, X_FORWARDED_FOR};
use crate::audit::writer::LogFailed;
use crate::metrics::UpstreamError as UpstreamErrorKind;
use crate::policy::decide::{self, upstream_allowed};
use crate::policy::decision::{Decision, Reason, UpstreamChoice, Verdict, status_of};
use crate::policy::model::{Mode, OnFailure};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
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

/// What to do once the decision record is written.
enum Plan {
    Refuse {
        status: u16,
        reason: Reason,
        dataset: Option<Arc<str>>,
        message: String,
    },
    Forward {
        choice: UpstreamChoice,
        dataset: Option<usize>,
    },
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

/// Handles one request; every path through it writes exactly one decision record.
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
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
    );
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
    let policy = &snap.policy;
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

    // Limits come first: an oversized request is refused, and logged, undecided.
    let limit = if host_named_hop {
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
    };
    // What `residency_decisions_total` counts, once the log has had its say.
    let (record, plan, counted) = match limit {
        Some((reason, rule)) => {
            let counted = (None, reason, Verdict::Error, true);
            let mut rec = record::failure_record(policy, &cx, reason, rule);
            rec.request.path = snap.pseudo.opaque_path(&rec.request.path);
            let mut failure = Decision::new_failure(reason, rule);
            if reason == Reason::BadRequest {
                failure.detail = Some("the Connection header names Host".into());
            }
            let message = failure.message(policy);
            (
                rec,
                Plan::Refuse {
                    status: status_of(reason),
                    reason,
                    dataset: None,
                    message,
                },
                counted,
            )
        }
        None => {
            let copy_source = decide::copy_source(&parts.headers);
            let request = decide::Request {
                method: &parts.method,
                host,
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &parts.headers,
                peer: conn.peer.ip(),
                identity: conn.identity.as_deref(),
                pick: fastrand::usize(..),
                copy_source: copy_source.as_deref(),
            };
            // A subject the consent cache does not hold: one query fills it (shared with
            // other requests missing it), then the request is decided again. A store that
            // does not answer in time leaves it a miss: consent_store_unavailable. A copy may
            // need a second subject (its source's) once the first is known: each round fills
            // what the last one missed, and a subject is filled at most once.
            let mut filled: Vec<compact_str::CompactString> = Vec::new();
            let d = loop {
                let (d, missed) = {
                    let env = snap.env(
                        ts.as_microsecond(),
                        shared.consent_loader.is_some(),
                        &filled,
                    );
                    let d = decide::decide(policy, &env, &request, &mut ());
                    (d, env.take_missed())
                };
                let Some(loader) = shared
                    .consent_loader
                    .as_ref()
                    .filter(|_| !missed.is_empty())
                else {
                    break d;
                };
                let provisional =
                    record::decision_record(policy, snap.geo_label.clone(), &snap.pseudo, &cx, &d);
                let abandoned = Abandoned {
                    shared: &shared,
                    id,
                    started,
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
                filled.extend(missed);
            };
            shared.metrics.decision_time.observe(started.elapsed());
            let counted = (d.dataset, d.reason, d.verdict, d.enforced);
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
            if !span.is_disabled() {
                if let Some(i) = d.dataset {
                    span.record("dataset", &*policy.datasets[i].name);
                }
                span.record("decision", d.verdict.as_str());
                span.record("reason", d.reason.as_str());
            }
            let rec =
                record::decision_record(policy, snap.geo_label.clone(), &snap.pseudo, &cx, &d);
            let plan = match (d.forwards(), &d.upstream) {
                (true, Some(choice)) => Plan::Forward {
                    choice: choice.clone(),
                    dataset: d.dataset,
                },
                _ => Plan::Refuse {
                    status: d.status().unwrap_or(500),
                    reason: d.reason,
                    dataset: d.dataset.map(|i| policy.datasets[i].name.clone()),
                    message: d.message(policy),
                },
            };
            (rec, plan, counted)
        }
    };

    // The decision record is written before anything else happens. The exchange exists
    // first, so that a client going away while the record is written still leaves an
    // outcome record (queued after the decision).
    let exchange = Exchange::new(id, started, shared.clone());
    if let Some(a) = &conn.activity {
        exchange.in_flight_on(a);
    }
    let appending = Instant::now();
    let queued = shared.log.append_queued(Record::Decision(Box::new(record)));
    // A log that hangs instead of failing (a stuck disk, a pipe nobody reads) must not hang
    // every request with it: past the deadline it counts as failing, and `on_failure` decides.
    let logged = match tokio::time::timeout(LOG_DEADLINE, queued).await {
        Ok(r) => r,
        Err(_) => Err(LogFailed(format!(
            "the decision record was not written within {LOG_DEADLINE:?}"
        ))),
    };
    shared.metrics.log_append_time.observe(appending.elapsed());
    let (dataset, reason, verdict, enforced) = counted;
    if let Err(e) = logged {
        let forwarding = matches!(plan, Plan::Forward { .. });
        // "allow" forwards past a failing log, never past a closed one (shutdown).
        if policy.log.on_failure == OnFailure::Deny || !forwarding || shared.log.is_closed() {
            tracing::error!(error = %e, "decision log unavailable: refusing the request");
            let reason = Reason::LogUnavailable;
            // Counted as answered: the decision was not logged, and not carried out.
            snap.metrics
                .dataset(dataset)
                .record(reason, Verdict::Error, true);
            let message = Decision::new_failure(reason, "log.on_failure").message(policy);
            exchange.set_error(reason);
            return respond::local(
                Local {
                    status: 503,
                    reason,
                    decision_id: id.as_str(),
                    dataset: None,
                    message: &message,
                    policy_name: &policy.name,
                },
                Some(exchange),
            );
        }
        tracing::error!(error = %e, "decision log unavailable: forwarding anyway (log.on_failure = \"allow\")");
    }
    snap.metrics
        .dataset(dataset)
        .record(reason, verdict, enforced);

    match plan {
        Plan::Refuse {
            status,
            reason,
            dataset,
            message,
        } => respond::local(
            Local {
                status,
                reason,
                decision_id: id.as_str(),
                dataset: dataset.as_deref(),
                message: &message,
                policy_name: &policy.name,
            },
            Some(exchange),
        ),
        Plan::Forward { choice, dataset } => {
            forward(
                &snap,
                &conn,
                parts,
                body,
                choice,
                dataset,
                exchange,
                id.as_str(),
            )
            .await
        }
    }
}

/// A request waiting for a consent lookup: if its client goes away meanwhile (the handler is
/// dropped), its records are still written: the decision as it stood (the store had not
/// answered: `consent_store_unavailable`) and an outcome saying why nothing was answered.
struct Abandoned<'a> {
    shared: &'a Arc<Shared>,
    id: DecisionId,
    started: Instant,
    record: Option<record::DecisionRecord>,
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

/// How long a request waits for its decision record to be written before the log counts as
/// failing for it (`log.on_failure` then decides). Far above any healthy write, fsync
/// included.
const LOG_DEADLINE: Duration = Duration::from_secs(5);

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

#[allow(clippy::too_many_arguments)]
async fn forward(
    snap: &Snapshot,
    conn: &ConnInfo,
    mut parts: http::request::Parts,
    body: Incoming,
    choice: UpstreamChoice,
    dataset: Option<usize>,
    exchange: Arc<Exchange>,
    id: &str,
) -> Response<ResponseBody> {
    let policy = &snap.policy;
    let up = &snap.upstreams[choice.index];
    exchange.set_upstream(choice.addr);

    // The upstream receives the original target bytes, the original Host, and one more
    // X-Forwarded-For hop. (Hop-by-hop headers were removed before deciding.)
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
    // A request without a body (most reads) has nothing to wait for before the upstream's
    // answer clock starts.
    let (body_sent, mut body_done) = if http_body::Body::is_end_stream(&body) {
        (None, None)
    } else {
        let (sent, done) = oneshot::channel();
        (Some(sent), Some(done))
    };
    let req = Request::from_parts(
        parts,
        RequestBody::new(
            body,
            exchange.clone(),
            policy.proxy.max_body_bytes,
            body_sent,
        ),
    );

    let resolved = up.resolved();
    let pool = resolved
        .pool(choice.addr)
        .cloned()
        .unwrap_or_else(|| AddrPool::new(choice.addr, 0, policy.proxy.idle_timeout));
    // The connect-time check repeats step 4 on the socket's own peer address. A dataset in
    // audit mode only logs step 4 (its decision record already says "would deny"), so the
    // connection it was allowed to make is not refused here either.
    let ds = dataset.map(|i| &policy.datasets[i]);
    let allowed = |ip: IpAddr| {
        ds.is_none_or(|d| d.mode == Mode::Audit || upstream_allowed(d, &snap.locator.locate(ip)))
    };
    let counters = snap.metrics.upstream(choice.index);
    // `kind`: what the upstream did wrong, if it was the upstream.
    let fail = |reason: Reason, kind: Option<UpstreamErrorKind>, detail: String| {
        tracing::warn!(upstream = %up.name, upstream.addr = %choice.addr, error = %detail, "upstream request failed");
        if let (Some(c), Some(kind)) = (counters, kind) {
            c.error(kind);
        }
        exchange.set_error(reason);
        exchange.set_detail(detail.clone());
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
                decision_id: id,
                dataset: ds.map(|d| &*d.name),
                message: &message,
                policy_name: &policy.name,
            },
            Some(exchange.clone()),
        )
    };

    let mut req = Some(req);
    let mut attempt = 0;
    let response = loop {
        attempt += 1;
        // The retry after a stale pooled connection goes to a fresh one: the next pooled one
        // may be just as stale.
        let pooled = if attempt == 1 { pool.take() } else { None };
        let (mut sender, reused) = match pooled {
            Some(s) => (s, true),
            None => {
                let tls = up.tls();
                // Boxed: a connection is made once for many requests, and its future (TCP,
                // TLS, the HTTP handshake) would otherwise make every request's state, which
                // is moved about per request, several kilobytes larger.
                match Box::pin(upstream::connect(
                    choice.addr,
                    policy.proxy.connect_timeout,
                    allowed,
                    tls.as_deref(),
                ))
                .await
                {
                    Ok(s) => {
                        pool.adopt(&s);
                        (s, false)
                    }
                    Err(e @ UpstreamError::OutsideHome { .. }) => {
                        return fail(
                            Reason::UpstreamUnreachable,
                            Some(UpstreamErrorKind::OutsideHome),
                            e.to_string(),
                        );
                    }
                    Err(e) => {
                        return fail(
                            Reason::UpstreamUnreachable,
                            Some(UpstreamErrorKind::Connect),
                            e.to_string(),
                        );
                    }
                }
            }
        };
        let sent = tokio::select! {
            r = sender.try_send_request(req.take().expect("request present")) => Ok(r),
            () = answer_deadline(&exchange, &mut body_done, policy.proxy.upstream_timeout) => Err(()),
        };
        match sent {
            Err(_) => {
                return fail(
                    Reason::UpstreamTimeout,
                    Some(UpstreamErrorKind::Timeout),
                    format!("no response within {:?}", policy.proxy.upstream_timeout),
                );
            }
            Ok(Ok(resp)) => break (resp, sender),
            Ok(Err(_)) if exchange.error() == Some(Reason::PayloadTooLarge) => {
                return fail(
                    Reason::PayloadTooLarge,
                    None,
                    format!(
                        "more than {} bytes",
                        policy.proxy.max_body_bytes.unwrap_or_default()
                    ),
                );
            }
            Ok(Err(mut e)) => {
                // A pooled connection closed under us before the request left: try once more
                // on a fresh connection (the request was never sent).
                match e.take_message() {
                    Some(back) if reused && attempt == 1 => req = Some(back),
                    _ => {
                        return fail(
                            Reason::UpstreamUnreachable,
                            Some(UpstreamErrorKind::Request),
                            e.into_error().to_string(),
                        );
                    }
                }
            }
        }
    };
    let (resp, sender) = response;
    let (mut rparts, rbody) = resp.into_parts();
    exchange.set_status(rparts.status.as_u16());
    strip_hop_by_hop(&mut rparts.headers);
    if let Ok(v) = HeaderValue::from_str(id) {
        rparts.headers.insert(DECISION_HEADER.clone(), v);
    }
    let back = PoolReturn { sender, pool };
    Response::from_parts(
        rparts,
        ResponseBody::upstream(rbody, Some(back), exchange, policy.proxy.idle_timeout),
    )
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
