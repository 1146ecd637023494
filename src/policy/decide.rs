//! `decide`: the algorithm of SPEC section 3, and the only place a request is decided.
//! Pure: the environment (locations, resolved upstream addresses, consents, the clock) comes
//! in through `Env`, so `serve`, `explain` and `test` run exactly this code.
//!
//! One piece on purpose, though long: the steps are read top to bottom in the order they
//! decide, and each one's trace lines and reasons sit beside its check, so a reviewer checks
//! the algorithm against the documentation in one file.

use super::consent::Consent;
use super::country::Country;
use super::decision::*;
use super::forwarded;
use super::model::*;
use super::path;
use http::{HeaderMap, Method};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;

/// Records a trace step only when the tracer wants it: with `()` neither the note nor its
/// arguments are computed.
macro_rules! step {
    ($trace:ident, $rule:expr, $($arg:tt)*) => {
        if $trace.enabled() {
            $trace.step($rule, format_args!($($arg)*));
        }
    };
}

/// The request as the proxy received it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// Host header (or :authority), possibly with a port.
    pub host: Option<&'a str>,
    /// The path of the request target, as received (no query).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The socket peer.
    pub peer: IpAddr,
    /// The verified identity of an mTLS client certificate (SAN).
    pub identity: Option<&'a str>,
    /// Rotates the choice among equally valid upstream addresses.
    pub pick: usize,
    /// The object a server-side copy reads (`x-amz-copy-source` and its kin), as a path:
    /// see [`copy_source`].
    pub copy_source: Copied<&'a str>,
}

/// Headers with which a request asks an object store to copy another object into the target:
/// S3's, and the same operation on Alibaba OSS and Google Cloud Storage's XML API.
pub static COPY_SOURCE_HEADERS: [http::HeaderName; 3] = [
    http::HeaderName::from_static("x-amz-copy-source"),
    http::HeaderName::from_static("x-oss-copy-source"),
    http::HeaderName::from_static("x-goog-copy-source"),
];

/// What a request copies, as [`copy_source`] reads it from the headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copied<T> {
    /// Not a copy.
    Nothing,
    /// A copy of the object at this path.
    From(T),
    /// A copy header that is not text, or more than one: which object the store would read
    /// is anybody's guess. `decide` refuses it.
    Unreadable,
}

impl<T: Deref<Target = str>> Copied<T> {
    pub fn as_deref(&self) -> Copied<&str> {
        match self {
            Copied::Nothing => Copied::Nothing,
            Copied::From(p) => Copied::From(p),
            Copied::Unreadable => Copied::Unreadable,
        }
    }
}

/// The object a copy request reads, as a request path: `bucket/key` and `/bucket/key` both
/// become `/bucket/key`, and a `?versionId=…` is dropped (the version does not change which
/// dataset the object belongs to).
pub fn copy_source(headers: &HeaderMap) -> Copied<Cow<'_, str>> {
    let mut named = 0;
    let mut first = None;
    for name in &COPY_SOURCE_HEADERS {
        for v in headers.get_all(name) {
            named += 1;
            first.get_or_insert(v);
        }
    }
    let v = match (named, first.map(|v| v.to_str())) {
        (0, _) => return Copied::Nothing,
        (1, Some(Ok(v))) => v.trim(),
        _ => return Copied::Unreadable,
    };
    let v = v.split_once('?').map_or(v, |(p, _)| p);
    Copied::From(if v.starts_with('/') {
        Cow::Borrowed(v)
    } else {
        Cow::Owned(format!("/{v}"))
    })
}

/// A consent lookup: the registry may be out of reach.
pub enum ConsentLookup<C> {
    Found(C),
    NotFound,
    Unavailable,
}

/// What `decide` needs from the world.
pub trait Env {
    type Addrs: Deref<Target = [SocketAddr]>;
    fn locate(&self, ip: IpAddr) -> Location;
    /// The addresses an upstream's host resolves to, or why it does not resolve.
    fn upstream_addrs(&self, upstream: usize) -> Result<Self::Addrs, String>;
    /// Calls `f` with the consents of `subject`, read in place.
    fn with_consents<R>(&self, subject: &str, f: impl FnOnce(ConsentLookup<&[Consent]>) -> R) -> R;
    /// Unix microseconds.
    fn now(&self) -> i64;
}

/// Whether `addr`, located at `loc`, may receive traffic of `dataset` (step 4).
pub fn upstream_allowed(dataset: &Dataset, loc: &Location) -> bool {
    !dataset.resident
        || loc
            .country()
            .is_some_and(|c| dataset.home.countries.contains(c))
}

/// Finds the dataset a normalised request matches: longest path prefix, then a host
/// constraint, then a method constraint, then file order.
pub fn match_dataset(
    policy: &Policy,
    host: Option<&str>,
    method: &Method,
    path: &str,
) -> Option<usize> {
    let host = host.map(strip_port);
    let idx = &policy.dataset_index;
    let fits = |i: usize| {
        let d = &policy.datasets[i];
        d.host
            .as_ref()
            .is_none_or(|want| host.is_some_and(|h| host_matches(want, h)))
            && d.methods.as_ref().is_none_or(|ms| ms.contains(method))
    };
    // `/payments` (a bucket listing) belongs to the dataset of `/payments/`: the longest
    // candidate prefix, one byte longer than the path itself.
    if !path.ends_with('/')
        && idx.lengths.contains(&(path.len() + 1))
        && let Some(list) = idx.by_prefix.get(&format!("{path}/")[..])
        && let Some(&i) = list.iter().find(|&&i| fits(i))
    {
        return Some(i);
    }
    for (k, &len) in idx.lengths.iter().enumerate() {
        if len > path.len() || !path.is_char_boundary(len) {
            continue;
        }
        // An empty prefix has no last byte; the others need the path's byte to fit.
        if len > 0 && !idx.may_end_with(k, path.as_bytes()[len - 1]) {
            continue;
        }
        let Some(list) = idx.by_prefix.get(&path[..len]) else {
            continue;
        };
        for &i in list {
            let d = &policy.datasets[i];
            if let Some(want) = &d.host
                && !host.is_some_and(|h| host_matches(want, h))
            {
                continue;
            }
            if let Some(ms) = &d.methods
                && !ms.contains(method)
            {
                continue;
            }
            return Some(i);
        }
    }
    None
}

fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

fn host_matches(want: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    match want.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        None => host.eq_ignore_ascii_case(want),
    }
}

static STANDARD_METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// Whether the method is one of RFC 9110's. Extension methods are treated as carrying data
/// out, whatever `egress_methods` says: the proxy cannot know what an upstream does with them.
fn is_standard(m: &Method) -> bool {
    STANDARD_METHODS.contains(m)
}

/// Request shapes that two HTTP implementations may read differently.
fn request_ambiguity(req: &Request<'_>) -> Option<&'static str> {
    let m = req.method;
    if !is_standard(m)
        && STANDARD_METHODS
            .iter()
            .any(|s| s.as_str().eq_ignore_ascii_case(m.as_str()))
    {
        return Some(
            "the method is a standard one spelled in another case; methods are case-sensitive",
        );
    }
    if m == Method::CONNECT {
        return Some("CONNECT is not supported: the proxy forwards requests, not tunnels");
    }
    // One lookup serves both questions: how many Host headers, and the first one.
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let host_header = hosts.next().map(|h| h.as_bytes());
    if hosts.next().is_some() {
        return Some("the request has more than one Host header");
    }
    // `req.host` is usually the Host header itself: checked once then.
    let other = req
        .host
        .map(str::as_bytes)
        .filter(|h| host_header.is_none_or(|hh| !std::ptr::eq(*h, hh)));
    if host_header.is_some_and(|h| !plain_host(h)) || other.is_some_and(|h| !plain_host(h)) {
        return Some(
            "the host is not a plain host[:port] (user information, a port that is not a number, characters outside a host name)",
        );
    }
    None
}

/// `name`, `a.b.c`, `10.0.0.1` or `[::1]`, with an optional numeric port: the only forms that
/// every upstream splits into the same host. (`payments.s3.local:x` is not matched to
/// `payments.s3.local` by the proxy, but nginx or Go would route it there.)
fn plain_host(h: &[u8]) -> bool {
    let (name, port) = match h.strip_prefix(b"[") {
        Some(rest) => match rest.iter().position(|&b| b == b']') {
            Some(end) => {
                let inside = &rest[..end];
                if inside.is_empty()
                    || !inside
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                {
                    return false;
                }
                match &rest[end + 1..] {
                    [] => return true,
                    [b':', port @ ..] => (&b""[..], Some(port)),
                    _ => return false,
                }
            }
            None => return false,
        },
        None => match h.iter().rposition(|&b| b == b':') {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        },
    };
    let name_ok = (name.is_empty() && h.starts_with(b"["))
        || (!name.is_empty()
            && name
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p).is_ok_and(|p| p.parse::<u16>().is_ok())
    });
    name_ok && port_ok
}

/// The value of a header that must appear at most once: `Err` when it appears twice.
fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &http::HeaderName,
) -> Result<Option<&'a str>, ()> {
    let mut all = headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(());
    }
    Ok(first
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty()))
}

/// The value of query parameter `name`, keys compared after percent-decoding; `Err` when
/// the parameter appears more than once (an upstream might read the other one).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Result<Option<&'a str>, ()> {
    let Some(q) = query else { return Ok(None) };
    let mut found = None;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if path::percent_decode(k).as_deref() == Some(name) {
            if found.is_some() {
                return Err(());
            }
            found = Some(v);
        }
    }
    Ok(found.filter(|v| !v.is_empty()))
}

/// Decides one request. Never fails: every outcome is a `Decision`.
pub fn decide<'a, E: Env, T: Tracer>(
    policy: &'a Policy,
    env: &E,
    req: &Request<'a>,
    trace: &mut T,
) -> Decision<'a> {
    let d = decide_target(policy, env, req, trace);
    if d.verdict != Verdict::Allow || req.copy_source == Copied::Nothing {
        return d;
    }
    copied_from(policy, env, req, d, trace)
}

/// A server-side copy reads one object and writes another inside the store: the write was
/// allowed, and the read is decided as a `GET` of the source by the same client, so that
/// nothing the client may not read can be copied where it may. Either refusal refuses the
/// copy; the decision then carries the source's reason and rule.
fn copied_from<'a, E: Env, T: Tracer>(
    policy: &'a Policy,
    env: &E,
    req: &Request<'a>,
    mut d: Decision<'a>,
    trace: &mut T,
) -> Decision<'a> {
    let Copied::From(source) = req.copy_source else {
        let why = "the copy-source header appears more than once, or is not a path";
        step!(trace, "request.copy_source", "{why}");
        let path = d.path.take().unwrap_or(Cow::Borrowed(req.path));
        return bad_request(d, "request.copy_source", why, path);
    };
    step!(
        trace,
        "request.copy_source",
        "copies {source}: decided as a GET of it"
    );
    let read = Request {
        method: &Method::GET,
        path: source,
        query: None,
        copy_source: Copied::Nothing,
        ..*req
    };
    let mut s = decide_target(policy, env, &read, trace);
    if s.reason == Reason::ConsentFiltered {
        // The store copies the object whole: its records cannot be filtered on the way, and
        // no one subject's consent can stand for all of them.
        step!(
            trace,
            s.rule,
            "a server-side copy moves every record unfiltered: refused"
        );
        s.verdict = Verdict::Deny;
        s.reason = Reason::SubjectUnidentified;
        s.detail = Some(Cow::Borrowed(
            "a server-side copy cannot filter a bulk object record by record",
        ));
    }
    if s.verdict == Verdict::Allow {
        return d;
    }
    if s.verdict == Verdict::Deny && !s.enforced {
        // An audit-mode source: the copy is logged as one that would have been refused.
        d.enforced = false;
    }
    d.verdict = s.verdict;
    d.reason = s.reason;
    d.rule = s.rule;
    d.detail = s.detail;
    d.destinations = s.destinations;
    d.outside_home = s.outside_home;
    d.consent = s.consent;
    d.copied_from = Some(s.dataset);
    d
}

fn decide_target<'a, E: Env, T: Tracer>(
    policy: &'a Policy,
    env: &E,
    req: &Request<'a>,
    trace: &mut T,
) -> Decision<'a> {
    // 0. Refuse what the upstream could read differently from the proxy: method spellings,
    // duplicated Host headers.
    if let Some(why) = request_ambiguity(req) {
        step!(trace, "request", "{why}");
        let mut d = Decision::new(Reason::BadRequest, "request");
        d.verdict = Verdict::Error;
        d.detail = Some(Cow::Borrowed(why));
        return d;
    }

    // 1. Normalise the target.
    let path = match path::normalize(req.path) {
        Ok(p) => p,
        Err(why) => {
            step!(trace, "request.path", "{why}: ambiguous");
            let mut d = Decision::new(Reason::AmbiguousPath, "request.path");
            d.verdict = Verdict::Deny;
            d.detail = Some(Cow::Owned(why.to_string()));
            return d;
        }
    };
    step!(trace, "request.path", "normalised to {path}");

    // 2. Find the client and the recipient.
    let addr = match forwarded::client_addr(req.peer, req.headers, &policy.trusted_proxies) {
        Ok(a) => a,
        Err(e) => {
            step!(trace, "proxy.trusted_proxies", "{e}");
            let mut d = Decision::new(Reason::BadRequest, "proxy.trusted_proxies");
            d.verdict = Verdict::Error;
            d.detail = Some(Cow::Owned(e.to_string()));
            d.path = Some(path);
            return d;
        }
    };
    let location = env.locate(addr.ip);
    // The step is named after what found the client: the trusted proxy that forwarded it,
    // else the request's own peer address.
    step!(
        trace,
        if addr.via.is_some() {
            "proxy.trusted_proxies"
        } else {
            "request.client"
        },
        "client {}{} {}",
        addr.ip,
        addr.via
            .map(|v| format!(" (forwarded by trusted proxy {v})"))
            .unwrap_or_default(),
        match &location {
            Location::Override { country, network } => format!(
                "located {country} by override networks.{}",
                policy.networks.get(*network).map_or("?", |n| &*n.name)
            ),
            Location::Database { country } => {
                format!("located {country} by the geolocation database")
            }
            Location::Unknown => "not located (no override or database entry)".to_string(),
        }
    );
    let declared = req
        .identity
        .and_then(|id| policy.recipients_by_identity.get(id).copied())
        .or_else(|| policy.recipients_by_network.lookup(addr.ip).copied());
    let recipient = match declared {
        Some(i) => {
            let r = &policy.recipients[i];
            step!(
                trace,
                &format!("recipients.{}", r.id),
                "{} recipient, seat {}",
                r.relation.as_str(),
                r.country
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "undeclared".into())
            );
            RecipientFacts {
                id: Some(&r.id),
                relation: r.relation,
                country: r.country,
            }
        }
        None => {
            step!(
                trace,
                "recipients",
                "no declared recipient matches: an anonymous third party"
            );
            RecipientFacts {
                id: None,
                relation: Relation::ThirdParty,
                country: None,
            }
        }
    };
    let client = ClientFacts {
        addr,
        location,
        identity: req.identity,
    };

    // 3. Match a dataset.
    let matched = match_dataset(policy, req.host, req.method, &path);
    if matched.is_none()
        && let Cow::Owned(_) = &path
        && let Ok(lit) = path::literal(req.path)
        && match_dataset(policy, req.host, req.method, &lit).is_some()
    {
        step!(
            trace,
            "request.path",
            "read literally, {lit} names a dataset: ambiguous"
        );
        let mut d = Decision::new(Reason::AmbiguousPath, "request.path");
        d.verdict = Verdict::Deny;
        d.detail = Some(Cow::Borrowed(
            "resolving its dot segments or empty segments changes which dataset it names",
        ));
        d.path = Some(path);
        d.client = Some(client);
        d.recipient = Some(recipient);
        return d;
    }
    let Some(di) = matched else {
        let mut d = Decision::new(Reason::NoRoute, "policy.unmatched");
        d.path = Some(path);
        d.client = Some(client);
        d.recipient = Some(recipient);
        match (policy.unmatched, policy.unmatched_upstream) {
            (Unmatched::Allow, Some(u)) => {
                step!(
                    trace,
                    "policy.unmatched",
                    "no dataset matches; unmatched requests are allowed"
                );
                d.reason = Reason::UnmatchedAllowed;
                match pick_any(env, u, req.pick) {
                    Ok(choice) => d.upstream = Some(choice),
                    Err(e) => return unreachable_upstream(d, policy, u, e, trace),
                }
            }
            _ => {
                step!(trace, "policy.unmatched", "no dataset matches: no route");
                d.verdict = Verdict::Deny;
            }
        }
        return d;
    };
    let ds = &policy.datasets[di];
    step!(
        trace,
        &ds.rules.matcher,
        "dataset \"{}\" (prefix {})",
        ds.name,
        ds.path_prefix
    );
    let mut d = Decision::new(Reason::Domestic, &ds.rules.matcher);
    d.dataset = Some(di);
    d.client = Some(client);
    d.recipient = Some(recipient);
    // The subject and purpose are noted for the log even where no consent is needed.
    let (subject, segment) = match find_subject(ds, &path, req) {
        Ok(s) => s,
        Err(why) => {
            step!(trace, &ds.rules.subject, "{why}");
            return bad_request(d, &ds.rules.subject, why, path);
        }
    };
    d.subject = subject;
    d.subject_segment = segment;
    d.purpose = match single_header(req.headers, &policy.consent.purpose_header) {
        Ok(p) => p,
        Err(()) => {
            let why = "the purpose header appears more than once";
            step!(trace, "consent.purpose_header", "{why}");
            return bad_request(d, "consent.purpose_header", why, path);
        }
    };
    // A path that only resolving `.`, `..` or `//` sends to this dataset or subject could be
    // read otherwise by the upstream, which receives the original bytes: refuse it.
    if let Cow::Owned(_) = &path
        && let Ok(lit) = path::literal(req.path)
    {
        let same_dataset = match_dataset(policy, req.host, req.method, &lit) == Some(di);
        let same_subject = match ds.subject {
            Some(SubjectSource::PathSegment(n)) => {
                path::segment(&lit, n)
                    .and_then(path::percent_decode)
                    .as_deref()
                    == d.subject.as_deref()
            }
            _ => true,
        };
        if !(same_dataset && same_subject) {
            step!(
                trace,
                "request.path",
                "read literally, {lit} names another dataset or subject: ambiguous"
            );
            d.verdict = Verdict::Deny;
            d.reason = Reason::AmbiguousPath;
            d.rule = "request.path";
            d.detail = Some(Cow::Borrowed(
                "resolving its dot segments or empty segments changes which dataset or data subject it names",
            ));
            d.path = Some(path);
            return d;
        }
    }
    d.path = Some(path);
    let audit = ds.mode == Mode::Audit;

    // 4. Locate the upstream.
    let addrs = match env.upstream_addrs(ds.upstream) {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => {
            return unreachable_upstream(
                d,
                policy,
                ds.upstream,
                "resolves to no address".into(),
                trace,
            );
        }
        Err(e) => return unreachable_upstream(d, policy, ds.upstream, e, trace),
    };
    let (allowed, first) = count_allowed(env, ds, &addrs);
    let up = &policy.upstreams[ds.upstream];
    if allowed == 0 {
        step!(
            trace,
            &ds.rules.upstream,
            "no address of upstream \"{}\" is inside {}",
            up.name,
            ds.home.name
        );
        let (addr, location) = first;
        d.upstream = Some(UpstreamChoice {
            index: ds.upstream,
            addr,
            location,
        });
        // Data never leaves through the proxy, in either direction: audit mode does not relax
        // this step.
        return deny(d, Reason::UpstreamOutsideJurisdiction, &ds.rules.upstream);
    }
    let choice = if allowed == addrs.len() {
        // Every address is allowed (the usual case): the pick is direct, and the first
        // address is already located.
        let i = req.pick % allowed;
        let (addr, location) = if i == 0 {
            first
        } else {
            (addrs[i], env.locate(addrs[i].ip()))
        };
        UpstreamChoice {
            index: ds.upstream,
            addr,
            location,
        }
    } else {
        nth_allowed(env, ds, &addrs, req.pick % allowed)
    };
    step!(
        trace,
        &ds.rules.upstream,
        "upstream \"{}\" at {} located {} ({}){}",
        up.name,
        choice.addr,
        choice
            .location
            .country()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "nowhere".into()),
        choice.location.source(),
        if ds.resident {
            format!(", inside {}", ds.home.name)
        } else {
            ", dataset not residency-bound".to_string()
        }
    );
    d.upstream = Some(choice);

    // 5-8. Transfer rules, for egress methods only.
    if !ds.is_egress(req.method) && is_standard(req.method) {
        step!(
            trace,
            &ds.rules.egress,
            "{} does not carry data out",
            req.method
        );
        d.reason = Reason::NotEgress;
        d.rule = &ds.rules.egress;
        return d;
    }
    let d = transfer(policy, env, ds, req, d, trace);
    if audit && d.verdict == Verdict::Deny {
        return Decision {
            enforced: false,
            ..d
        };
    }
    d
}

/// A request the upstream could read otherwise than the proxy: refused, undecided.
fn bad_request<'a>(
    mut d: Decision<'a>,
    rule: &'a str,
    why: &'static str,
    path: Cow<'a, str>,
) -> Decision<'a> {
    d.verdict = Verdict::Error;
    d.reason = Reason::BadRequest;
    d.rule = rule;
    d.detail = Some(Cow::Borrowed(why));
    d.path = Some(path);
    d
}

fn deny<'a>(mut d: Decision<'a>, reason: Reason, rule: &'a str) -> Decision<'a> {
    d.verdict = Verdict::Deny;
    d.reason = reason;
    d.rule = rule;
    d
}

fn unreachable_upstream<'a, T: Tracer>(
    mut d: Decision<'a>,
    policy: &'a Policy,
    u: usize,
    why: String,
    trace: &mut T,
) -> Decision<'a> {
    let up = &policy.upstreams[u];
    step!(
        trace,
        &up.rule,
        "upstream \"{}\" ({}): {why}",
        up.name,
        up.host
    );
    d.verdict = Verdict::Error;
    d.reason = Reason::UpstreamUnreachable;
    d.rule = &up.rule;
    d.detail = Some(Cow::Owned(format!("{} {why}", up.host)));
    d
}

fn pick_any<E: Env>(env: &E, u: usize, pick: usize) -> Result<UpstreamChoice, String> {
    let addrs = env.upstream_addrs(u)?;
    if addrs.is_empty() {
        return Err("resolves to no address".into());
    }
    let addr = addrs[pick % addrs.len()];
    Ok(UpstreamChoice {
        index: u,
        addr,
        location: env.locate(addr.ip()),
    })
}

fn count_allowed<E: Env>(
    env: &E,
    ds: &Dataset,
    addrs: &[SocketAddr],
) -> (usize, (SocketAddr, Location)) {
    let mut n = 0;
    let mut first = None;
    for a in addrs {
        let loc = env.locate(a.ip());
        if upstream_allowed(ds, &loc) {
            n += 1;
        }
        if first.is_none() {
            first = Some((*a, loc));
        }
    }
    (n, first.expect("addrs is not empty"))
}

fn nth_allowed<E: Env>(env: &E, ds: &Dataset, addrs: &[SocketAddr], n: usize) -> UpstreamChoice {
    addrs
        .iter()
        .map(|a| (*a, env.locate(a.ip())))
        .filter(|(_, loc)| upstream_allowed(ds, loc))
        .nth(n)
        .map(|(addr, location)| UpstreamChoice {
            index: ds.upstream,
            addr,
            location,
        })
        .expect("n < number of allowed addresses")
}

type Subject<'a> = (Option<Cow<'a, str>>, Option<usize>);

/// The data subject named by the request, and the path segment holding it; `Err` when the
/// request names it twice.
fn find_subject<'a>(
    ds: &Dataset,
    path: &Cow<'a, str>,
    req: &Request<'a>,
) -> Result<Subject<'a>, &'static str> {
    Ok(match &ds.subject {
        None => (None, None),
        Some(SubjectSource::PathSegment(n)) => {
            // Borrowed from the request when normalising did not copy the path (and the
            // segment has no escape): no allocation on the usual request.
            let seg = match *path {
                Cow::Borrowed(p) => path::segment(p, *n).and_then(path::percent_decode),
                Cow::Owned(ref p) => path::segment(p, *n)
                    .and_then(path::percent_decode)
                    .map(|s| Cow::Owned(s.into_owned())),
            };
            (seg, Some(*n))
        }
        Some(SubjectSource::Header(h)) => {
            let v = single_header(req.headers, h)
                .map_err(|()| "the subject header appears more than once")?;
            (v.map(Cow::Borrowed), None)
        }
        Some(SubjectSource::Query(q)) => {
            let v = query_param(req.query, q)
                .map_err(|()| "the subject query parameter appears more than once")?;
            (v.and_then(path::percent_decode), None)
        }
    })
}

/// Steps 5, 6 and 8 for an egress request.
fn transfer<'a, E: Env, T: Tracer>(
    policy: &'a Policy,
    env: &E,
    ds: &'a Dataset,
    req: &Request<'a>,
    mut d: Decision<'a>,
    trace: &mut T,
) -> Decision<'a> {
    let recipient = d.recipient.clone().expect("recipient is set in step 2");
    let client_country = d.client.as_ref().and_then(|c| c.location.country());
    let home = &ds.home.countries;

    // 5. Classify the transfer.
    let declared_out = recipient.country.is_some_and(|c| !home.contains(c));
    let located_out = match client_country {
        Some(c) => !home.contains(c),
        None => match policy.unknown_location {
            UnknownLocation::Deny => {
                step!(
                    trace,
                    "policy.unknown_location",
                    "the client address is not located: deny"
                );
                return deny(d, Reason::LocationUnknown, "policy.unknown_location");
            }
            UnknownLocation::Foreign => {
                step!(
                    trace,
                    "policy.unknown_location",
                    "the client address is not located: treated as foreign"
                );
                true
            }
        },
    };
    d.outside_home = declared_out || located_out;
    d.destinations = [
        recipient.country,
        client_country.filter(|c| Some(*c) != recipient.country),
    ];
    let third = recipient.relation == Relation::ThirdParty;

    // 6. Cross-border and third-party rules.
    let cb = d.outside_home.then_some(ds.cross_border);
    let tp = third.then_some(ds.third_party);
    if let Some(r) = cb {
        step!(
            trace,
            &ds.rules.cross_border,
            "destination outside {}: {}",
            ds.home.name,
            r.as_str()
        );
    }
    if let Some(r) = tp {
        step!(
            trace,
            &ds.rules.third_party,
            "recipient is a third party: {}",
            r.as_str()
        );
    }
    if cb == Some(Rule::Deny) {
        return deny(d, Reason::CrossBorderDenied, &ds.rules.cross_border);
    }
    if tp == Some(Rule::Deny) {
        return deny(d, Reason::ThirdPartyDenied, &ds.rules.third_party);
    }
    let consent_rule: &'a str = match (cb, tp) {
        (Some(Rule::Consent), _) => &ds.rules.cross_border,
        (_, Some(Rule::Consent)) => &ds.rules.third_party,
        (Some(Rule::Allow), _) => {
            d.reason = Reason::CrossBorderAllowed;
            d.rule = &ds.rules.cross_border;
            return d;
        }
        (None, Some(Rule::Allow)) => {
            d.reason = Reason::Domestic;
            d.rule = &ds.rules.third_party;
            return d;
        }
        _ => {
            step!(trace, &ds.rules.matcher, "first party at home: domestic");
            d.reason = Reason::Domestic;
            return d;
        }
    };
    d.rule = consent_rule;
    consent(policy, env, ds, req, d, trace)
}

/// How far a consent got before failing; the nearest one names the refusal.
fn rank(r: Reason) -> u8 {
    match r {
        Reason::ConsentScopeMismatch => 0,
        Reason::ConsentMethodInvalid => 1,
        Reason::ConsentRevoked => 2,
        Reason::ConsentExpired => 3,
        _ => 0,
    }
}

/// Step 8: a valid consent of the subject for this recipient, purpose, category and
/// destinations, in force, not revoked, collected by an accepted method.
fn consent<'a, E: Env, T: Tracer>(
    policy: &'a Policy,
    env: &E,
    ds: &'a Dataset,
    req: &Request<'a>,
    mut d: Decision<'a>,
    trace: &mut T,
) -> Decision<'a> {
    if d.subject.is_none() && ds.records.is_none() {
        step!(trace, &ds.rules.subject, "no data subject in the request");
        return deny(d, Reason::SubjectUnidentified, &ds.rules.subject);
    }
    let Some(purpose) = d.purpose else {
        step!(
            trace,
            "consent.purpose_header",
            "no purpose declared in {}",
            policy.consent.purpose_header
        );
        return deny(d, Reason::PurposeMissing, "consent.purpose_header");
    };
    let rule = d.rule;
    let Some(recipient) = d.recipient.as_ref().and_then(|r| r.id) else {
        step!(
            trace,
            rule,
            "an anonymous caller cannot hold consent: consent names its recipient"
        );
        d.detail = Some(Cow::Borrowed("the caller is not a declared recipient"));
        return deny(d, Reason::ConsentMissing, rule);
    };
    let terms = RecordTerms {
        ds,
        recipient,
        purpose,
        dests: foreign_destinations(ds, &d.destinations),
        outside_home: d.outside_home,
        now: env.now(),
    };
    if ds.records.is_some() {
        // A bulk object: no one subject names the request, so each record is judged by its
        // own subject's consents on the way out (`RecordTerms::judge`), with these terms.
        if req.headers.contains_key(http::header::RANGE) {
            step!(
                trace,
                rule,
                "a byte range of an object filtered record by record cannot be served"
            );
            return deny(d, Reason::RangeOnFilteredDataset, rule);
        }
        step!(
            trace,
            rule,
            "records of dataset \"{}\" leave only where their subject consented{}",
            ds.name,
            if ds.mode == Mode::Audit {
                " (audit mode: none is dropped, would-drops are counted)"
            } else {
                ""
            }
        );
        d.reason = Reason::ConsentFiltered;
        d.enforced = ds.mode != Mode::Audit;
        return d;
    }
    // The consents are read in place (no copy, no reference count touched): the closure
    // returns what the decision needs from them.
    let found = env.with_consents(d.subject.as_deref().unwrap_or_default(), |lookup| {
        terms.evaluate(policy, lookup, rule, trace)
    });
    match found {
        Found::Valid(id, method) => {
            d.reason = Reason::Consented;
            d.consent = Some(ConsentUse {
                id,
                failure: None,
                method: Some(method),
            });
            d
        }
        Found::Failed(id, reason, why) => {
            d.consent = Some(ConsentUse {
                id,
                failure: Some(reason),
                method: None,
            });
            d.detail = Some(Cow::Owned(why));
            deny(d, reason, rule)
        }
        Found::Nothing => deny(d, Reason::ConsentMissing, rule),
        Found::Unavailable => deny(d, Reason::ConsentStoreUnavailable, "consent.store"),
    }
}

/// What step 8 asks of a consent for one request: the recipient, purpose, category (the
/// dataset's) and destinations, at an instant. A request names one subject, judged once; a
/// bulk object's records are judged one subject at a time with the same terms.
#[derive(Clone, Debug)]
pub struct RecordTerms<'a> {
    ds: &'a Dataset,
    recipient: &'a str,
    purpose: &'a str,
    /// The destinations outside home, with their number.
    dests: ([Country; 2], usize),
    outside_home: bool,
    now: i64,
}

/// How one record of a bulk object fares under [`RecordTerms::judge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordVerdict<'c> {
    /// It leaves, under this consent (id, and how it was collected).
    Keep(&'c compact_str::CompactString, &'c std::sync::Arc<str>),
    /// It is dropped, for this reason (a consent failure, or the store being unavailable).
    Drop(Reason),
}

/// [`RecordTerms`] held apart from the request they were decided for: what a bulk object's
/// stream keeps while it outlives the request's borrowed parts.
#[derive(Clone, Debug)]
pub struct FilterTerms {
    pub dataset: usize,
    pub recipient: std::sync::Arc<str>,
    pub purpose: Box<str>,
    pub destinations: [Option<Country>; 2],
    pub outside_home: bool,
}

impl FilterTerms {
    /// The terms of a request `decide` answered with `consent_filtered`; `None` for any
    /// other decision.
    pub fn of(d: &Decision<'_>) -> Option<FilterTerms> {
        if d.reason != Reason::ConsentFiltered {
            return None;
        }
        Some(FilterTerms {
            dataset: d.dataset?,
            recipient: d.recipient.as_ref()?.id?.clone(),
            purpose: d.purpose?.into(),
            destinations: d.destinations,
            outside_home: d.outside_home,
        })
    }

    /// The terms to judge records by at `now` under `policy` (the policy decided with).
    pub fn at<'a>(&'a self, policy: &'a Policy, now: i64) -> RecordTerms<'a> {
        let ds = &policy.datasets[self.dataset];
        RecordTerms {
            ds,
            recipient: &self.recipient,
            purpose: &self.purpose,
            dests: foreign_destinations(ds, &self.destinations),
            outside_home: self.outside_home,
            now,
        }
    }
}

impl<'a> RecordTerms<'a> {
    /// The terms a bulk object's records are judged by, for a request `decide` answered with
    /// `consent_filtered`; `None` for any other decision.
    pub fn of(policy: &'a Policy, d: &Decision<'a>, now: i64) -> Option<RecordTerms<'a>> {
        if d.reason != Reason::ConsentFiltered {
            return None;
        }
        let ds = &policy.datasets[d.dataset?];
        Some(RecordTerms {
            ds,
            recipient: d.recipient.as_ref()?.id?,
            purpose: d.purpose?,
            dests: foreign_destinations(ds, &d.destinations),
            outside_home: d.outside_home,
            now,
        })
    }

    /// The same terms at another instant: a long stream judges each batch at its own time.
    pub fn at(&self, now: i64) -> RecordTerms<'a> {
        RecordTerms {
            now,
            ..self.clone()
        }
    }

    /// The destinations a consent must name; `None` when the request goes outside home to a
    /// country nothing located (an unlocated client treated as foreign): no consent can name
    /// it.
    fn destinations(&self) -> Option<&[Country]> {
        let (buf, n) = &self.dests;
        (*n > 0 || !self.outside_home).then_some(&buf[..*n])
    }

    /// Whether a record of a subject whose consents are `lookup` may leave: the same checks,
    /// in the same order, as step 8 makes for a request naming that subject.
    pub fn judge<'c>(
        &self,
        policy: &Policy,
        lookup: ConsentLookup<&'c [Consent]>,
    ) -> RecordVerdict<'c> {
        let consents = match lookup {
            ConsentLookup::Found(c) => c,
            ConsentLookup::NotFound => return RecordVerdict::Drop(Reason::ConsentMissing),
            ConsentLookup::Unavailable => {
                return RecordVerdict::Drop(Reason::ConsentStoreUnavailable);
            }
        };
        let mut nearest: Option<Reason> = None;
        for c in consents
            .iter()
            .filter(|c| *c.scope.recipient == *self.recipient)
        {
            match check(
                policy,
                self.ds,
                c,
                self.purpose,
                self.destinations(),
                self.now,
            ) {
                None => return RecordVerdict::Keep(&c.id, &c.scope.method),
                Some(miss) => {
                    if nearest.is_none_or(|m| rank(miss.reason()) > rank(m)) {
                        nearest = Some(miss.reason());
                    }
                }
            }
        }
        RecordVerdict::Drop(nearest.unwrap_or(Reason::ConsentMissing))
    }

    /// Step 8 for the request's one subject, with the trace and the words of a refusal.
    fn evaluate<T: Tracer>(
        &self,
        policy: &Policy,
        lookup: ConsentLookup<&[Consent]>,
        rule: &str,
        trace: &mut T,
    ) -> Found {
        let consents = match lookup {
            ConsentLookup::Found(c) => c,
            ConsentLookup::NotFound => {
                step!(trace, rule, "the registry holds no consent of this subject");
                return Found::Nothing;
            }
            ConsentLookup::Unavailable => {
                step!(
                    trace,
                    "consent.store",
                    "the consent registry is unavailable"
                );
                return Found::Unavailable;
            }
        };
        // Why a consent fails is put in words only for a tracer or for the refusal.
        let mut nearest: Option<(&Consent, Miss<'_>)> = None;
        for c in consents
            .iter()
            .filter(|c| *c.scope.recipient == *self.recipient)
        {
            match check(
                policy,
                self.ds,
                c,
                self.purpose,
                self.destinations(),
                self.now,
            ) {
                None => {
                    step!(trace, rule, "consent {} is valid", c.id);
                    return Found::Valid(c.id.clone(), c.scope.method.clone());
                }
                Some(miss) => {
                    step!(
                        trace,
                        rule,
                        "consent {}: {} ({miss})",
                        c.id,
                        miss.reason().as_str()
                    );
                    if nearest
                        .as_ref()
                        .is_none_or(|(_, m)| rank(miss.reason()) > rank(m.reason()))
                    {
                        nearest = Some((c, miss));
                    }
                }
            }
        }
        match nearest {
            None => {
                step!(
                    trace,
                    rule,
                    "no consent of this subject names recipient \"{}\"",
                    self.recipient
                );
                Found::Nothing
            }
            Some((c, miss)) => Found::Failed(c.id.clone(), miss.reason(), miss.to_string()),
        }
    }
}

/// The destinations a consent must name: those outside the dataset's home (SPEC section 4:
/// the home jurisdiction never needs a grant), with their number.
fn foreign_destinations(ds: &Dataset, all: &[Option<Country>; 2]) -> ([Country; 2], usize) {
    let mut buf = [Country::parse_shape("ZZ").expect("two letters"); 2];
    let mut n = 0;
    for c in all.iter().flatten() {
        if !ds.home.countries.contains(*c) {
            buf[n] = *c;
            n += 1;
        }
    }
    (buf, n)
}

/// What the consents of a subject say about one transfer.
enum Found {
    /// The consent that allowed it, and how it was collected.
    Valid(compact_str::CompactString, std::sync::Arc<str>),
    /// The nearest consent, why it failed, in words.
    Failed(compact_str::CompactString, Reason, String),
    Nothing,
    Unavailable,
}

/// Why one consent does not allow a transfer: a value, put in words (`Display`) only when
/// someone reads it, so that checking consents builds no string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Miss<'a> {
    Purpose(&'a str),
    Category(&'a str),
    DestinationUnknown,
    Destination(Country),
    Method(&'a str),
    Revoked,
    NotYetInForce,
    Expired,
}

impl Miss<'_> {
    fn reason(self) -> Reason {
        match self {
            Miss::Purpose(_)
            | Miss::Category(_)
            | Miss::DestinationUnknown
            | Miss::Destination(_) => Reason::ConsentScopeMismatch,
            Miss::Method(_) => Reason::ConsentMethodInvalid,
            Miss::Revoked => Reason::ConsentRevoked,
            Miss::NotYetInForce | Miss::Expired => Reason::ConsentExpired,
        }
    }
}

impl std::fmt::Display for Miss<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::Purpose(p) => write!(f, "purpose \"{p}\" not granted"),
            Miss::Category(c) => write!(f, "category \"{c}\" not granted"),
            Miss::DestinationUnknown => f.write_str("the destination country is unknown"),
            Miss::Destination(c) => write!(f, "destination {c} not granted"),
            Miss::Method(m) => write!(f, "collected as \"{m}\""),
            Miss::Revoked => f.write_str("revoked"),
            Miss::NotYetInForce => f.write_str("not yet in force"),
            Miss::Expired => f.write_str("expired"),
        }
    }
}

fn covers_category(granted: &str, wanted: &str) -> bool {
    wanted == granted
        || (wanted.len() > granted.len()
            && wanted.starts_with(granted)
            && wanted.as_bytes()[granted.len()] == b'.')
}

/// Whether consent `c` allows the transfer; `dests` are the destinations outside home that
/// it must name (`None`: outside home, to a country unknown).
fn check<'c>(
    policy: &Policy,
    ds: &'c Dataset,
    c: &'c Consent,
    purpose: &'c str,
    dests: Option<&[Country]>,
    now: i64,
) -> Option<Miss<'c>> {
    let terms = &c.scope;
    if !terms.purposes.iter().any(|p| &**p == purpose) {
        return Some(Miss::Purpose(purpose));
    }
    if !terms
        .categories
        .iter()
        .any(|g| covers_category(g, &ds.category))
    {
        return Some(Miss::Category(&ds.category));
    }
    let Some(dests) = dests else {
        return Some(Miss::DestinationUnknown);
    };
    if let Some(miss) = dests.iter().find(|country| {
        !terms
            .destinations
            .iter()
            .any(|g| policy.jurisdictions.covers(g, **country))
    }) {
        return Some(Miss::Destination(*miss));
    }
    if !policy
        .consent
        .accept_methods
        .iter()
        .any(|m| **m == *terms.method)
        || super::compile::NEVER_CONSENT.contains(&&*terms.method)
    {
        return Some(Miss::Method(&terms.method));
    }
    // A revocation counts from the moment it is known, even if its writer's clock is ahead.
    if c.revoked_at.is_some() {
        return Some(Miss::Revoked);
    }
    if now < c.granted_at {
        return Some(Miss::NotYetInForce);
    }
    if now >= c.expires_at {
        return Some(Miss::Expired);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_put_in_the_words_the_log_carries() {
        let us = Country::parse("US").unwrap();
        let words = [
            (Miss::Purpose("ads"), "purpose \"ads\" not granted"),
            (Miss::Category("user.x"), "category \"user.x\" not granted"),
            (
                Miss::DestinationUnknown,
                "the destination country is unknown",
            ),
            (Miss::Destination(us), "destination US not granted"),
            (Miss::Method("pre_ticked"), "collected as \"pre_ticked\""),
            (Miss::Revoked, "revoked"),
            (Miss::NotYetInForce, "not yet in force"),
            (Miss::Expired, "expired"),
        ];
        for (miss, said) in words {
            assert_eq!(miss.to_string(), said);
        }
    }

    #[test]
    fn only_plain_hosts_pass() {
        for ok in [
            "storage.test",
            "storage.test:9000",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "my_bucket.s3.local",
        ] {
            assert!(plain_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "storage.test:",
            "storage.test:x",
            "storage.test:65536",
            "u@storage.test",
            "a:1:2",
            "[::1",
            "[::1]x",
            "[]",
            "st\u{f6}rage.test",
            "storage test",
        ] {
            assert!(!plain_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_copy_source_reads_as_a_path() {
        let mut h = HeaderMap::new();
        assert_eq!(copy_source(&h), Copied::Nothing);
        h.insert(
            "x-amz-copy-source",
            "bucket/a%20b.json?versionId=3".parse().unwrap(),
        );
        assert_eq!(
            copy_source(&h).as_deref(),
            Copied::From("/bucket/a%20b.json")
        );
        h.insert("x-amz-copy-source", "/bucket/k".parse().unwrap());
        assert!(matches!(
            copy_source(&h),
            Copied::From(Cow::Borrowed("/bucket/k"))
        ));
        h.append("x-oss-copy-source", "/bucket/other".parse().unwrap());
        assert_eq!(copy_source(&h), Copied::Unreadable);
        let mut h = HeaderMap::new();
        h.insert("x-goog-copy-source", "b/k".parse().unwrap());
        assert_eq!(copy_source(&h).as_deref(), Copied::From("/b/k"));
        h.insert(
            "x-goog-copy-source",
            http::HeaderValue::from_bytes(b"b/\xff").unwrap(),
        );
        assert_eq!(copy_source(&h), Copied::Unreadable);
    }
}
