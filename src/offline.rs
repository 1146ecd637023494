//! The decision environment for offline tools (`explain`, `test`, benchmarks): the same
//! locator and consent index as the proxy, upstreams resolved once, a clock that can be set,
//! and hypothetical requests built from what a user typed.

use crate::consent::ConsentIndex;
use crate::consent::record::Consent;
use crate::geo::Locator;
use crate::policy::Policy;
use crate::policy::decide::Copied;
use crate::policy::decide::{ConsentLookup, Env, Request};
use crate::policy::decision::Location;
use crate::policy::model::Upstream;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// A fixed environment for deciding requests outside the proxy.
pub struct OfflineEnv {
    pub locator: Locator,
    pub upstreams: Vec<Result<Arc<[SocketAddr]>, String>>,
    pub consents: Arc<ConsentIndex>,
    /// Unix microseconds.
    pub now: i64,
}

impl OfflineEnv {
    /// Resolves every upstream of `policy` now, with the system resolver.
    pub fn new(
        policy: &Policy,
        locator: Locator,
        consents: Arc<ConsentIndex>,
        now: i64,
    ) -> OfflineEnv {
        let upstreams = policy.upstreams.iter().map(resolve).collect();
        OfflineEnv {
            locator,
            upstreams,
            consents,
            now,
        }
    }
}

/// The addresses `up`'s host resolves to now, with the system resolver (an IP literal
/// resolves to itself without a query).
pub fn resolve(up: &Upstream) -> Result<Arc<[SocketAddr]>, String> {
    (up.host.as_str(), up.port)
        .to_socket_addrs()
        .map(|a| {
            a.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect::<Vec<_>>()
                .into()
        })
        .map_err(|e| format!("does not resolve: {e}"))
}

/// A request described on the command line or in a test case that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum HypotheticalError {
    #[error("\"{0}\" is not an HTTP method")]
    Method(String),
    #[error("header \"{0}\" is not `Name: value`")]
    HeaderLine(String),
    #[error("\"{0}\" is not a header name")]
    HeaderName(String),
    #[error("\"{0}\" is not a header value")]
    HeaderValue(String),
}

/// A request that `explain` and `test` decide: what the proxy would have received.
#[derive(Clone, Debug)]
pub struct Hypothetical {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The socket peer.
    pub client_ip: IpAddr,
    /// A verified mTLS identity (certificate SAN).
    pub identity: Option<String>,
    /// What a copy request copies, from its headers.
    pub copy_source: Copied<String>,
}

impl Hypothetical {
    /// `target` is a path, optionally with `?query`; `purpose` goes in the policy's purpose
    /// header and `host` in `Host`, after `headers`.
    #[allow(clippy::too_many_arguments)]
    pub fn new<'h>(
        policy: &Policy,
        method: &str,
        target: &str,
        client_ip: IpAddr,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        purpose: Option<&str>,
        host: Option<&str>,
        identity: Option<&str>,
    ) -> Result<Hypothetical, HypotheticalError> {
        // As received: `serve` refuses a standard method spelled in lower case, and so must a
        // rehearsal of it.
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| HypotheticalError::Method(method.into()))?;
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target.to_string(), None),
        };
        let value = |v: &str| {
            HeaderValue::from_str(v.trim()).map_err(|_| HypotheticalError::HeaderValue(v.into()))
        };
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|_| HypotheticalError::HeaderName(k.into()))?;
            map.append(name, value(v)?);
        }
        if let Some(p) = purpose {
            map.insert(policy.consent.purpose_header.clone(), value(p)?);
        }
        if let Some(h) = host {
            map.insert(http::header::HOST, value(h)?);
        }
        let copy_source = match crate::policy::decide::copy_source(&map) {
            Copied::Nothing => Copied::Nothing,
            Copied::From(p) => Copied::From(p.into_owned()),
            Copied::Unreadable => Copied::Unreadable,
        };
        Ok(Hypothetical {
            method,
            path,
            query,
            headers: map,
            client_ip,
            identity: identity.map(str::to_string),
            copy_source,
        })
    }

    /// Splits `Name: value` command-line header arguments.
    pub fn header_line(line: &str) -> Result<(&str, &str), HypotheticalError> {
        line.split_once(':')
            .ok_or_else(|| HypotheticalError::HeaderLine(line.into()))
    }

    /// The `Host` header, if any.
    pub fn host(&self) -> Option<&str> {
        self.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    }

    /// The request as `decide` takes it.
    pub fn request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            host: self.host(),
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
            peer: self.client_ip,
            identity: self.identity.as_deref(),
            pick: 0,
            copy_source: self.copy_source.as_deref(),
        }
    }
}

impl Env for OfflineEnv {
    type Addrs = Arc<[SocketAddr]>;

    fn locate(&self, ip: IpAddr) -> Location {
        self.locator.locate(ip)
    }

    fn upstream_addrs(&self, upstream: usize) -> Result<Arc<[SocketAddr]>, String> {
        self.upstreams[upstream].clone()
    }

    fn with_consents<R>(&self, subject: &str, f: impl FnOnce(ConsentLookup<&[Consent]>) -> R) -> R {
        self.consents.with(subject, |found| match found {
            Some(c) => f(ConsentLookup::Found(c)),
            None => f(ConsentLookup::NotFound),
        })
    }

    fn now(&self) -> i64 {
        self.now
    }
}

/// An environment that notes every subject a decision asks about, over another one: the
/// offline tools read those subjects' consents from a registry and decide again.
pub struct Asking<'e, E> {
    inner: &'e E,
    asked: std::cell::RefCell<Vec<String>>,
}

impl<'e, E: Env> Asking<'e, E> {
    pub fn new(inner: &'e E) -> Self {
        Asking {
            inner,
            asked: Default::default(),
        }
    }

    /// The subjects asked about, in order, each once.
    pub fn asked(self) -> Vec<String> {
        self.asked.into_inner()
    }
}

impl<E: Env> Env for Asking<'_, E> {
    type Addrs = E::Addrs;

    fn locate(&self, ip: IpAddr) -> Location {
        self.inner.locate(ip)
    }

    fn upstream_addrs(&self, upstream: usize) -> Result<E::Addrs, String> {
        self.inner.upstream_addrs(upstream)
    }

    fn with_consents<R>(&self, subject: &str, f: impl FnOnce(ConsentLookup<&[Consent]>) -> R) -> R {
        let mut asked = self.asked.borrow_mut();
        if !asked.iter().any(|s| s == subject) {
            asked.push(subject.to_string());
        }
        drop(asked);
        self.inner.with_consents(subject, f)
    }

    fn now(&self) -> i64 {
        self.inner.now()
    }
}

/// Decisions that need the consent index and the locator as the offline tools build them:
/// where a consent's destinations are checked (SPEC section 4).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::{ConsentIndex, ConsentRecord};
    use crate::policy::country::Country;
    use crate::policy::decide::{Copied, Request};
    use crate::policy::{Decision, Policy, Reason, decide};
    use http::{HeaderMap, Method};
    use std::borrow::Cow;

    /// A policy at home in CN: `payments` needs consent abroad and for third parties; the
    /// recipients are a US bureau with an office address at home (127.0.0.21, CN) and one
    /// abroad (127.0.0.20, US), and a CN partner (127.0.0.30). 127.0.0.40 is located nowhere.
    fn world(consent: ConsentRecord) -> (Policy, OfflineEnv) {
        let text = "[policy]\nname = \"unit\"\nhome = \"CN\"\nunknown_location = \"foreign\"\n\
            [log]\npseudonymize = false\n\
            [consent]\npurpose_header = \"x-purpose\"\n\
            [[networks]]\ncidr = \"127.0.0.2/32\"\ncountry = \"CN\"\n\
            [[networks]]\ncidr = \"127.0.0.21/32\"\ncountry = \"CN\"\n\
            [[networks]]\ncidr = \"127.0.0.20/32\"\ncountry = \"US\"\n\
            [[networks]]\ncidr = \"127.0.0.30/32\"\ncountry = \"CN\"\n\
            [[upstreams]]\nname = \"store\"\nurl = \"http://127.0.0.2:9000\"\n\
            [[recipients]]\nid = \"bureau\"\nrelation = \"third_party\"\ncountry = \"US\"\n\
            networks = [\"127.0.0.20/32\", \"127.0.0.21/32\"]\n\
            [[recipients]]\nid = \"partner\"\nrelation = \"third_party\"\ncountry = \"CN\"\n\
            networks = [\"127.0.0.30/32\", \"127.0.0.40/32\"]\n\
            [[datasets]]\nname = \"payments\"\nmatch = { path_prefix = \"/payments/\" }\n\
            upstream = \"store\"\ncategory = \"user.financial\"\nsubject = { path_segment = 2 }\n\
            cross_border = \"consent\"\nthird_party = \"consent\"\n";
        let policy = crate::policy::compile::from_str("unit.toml", text).expect("compiles");
        let index = std::sync::Arc::new(ConsentIndex::new());
        index.upsert(&consent).expect("a valid consent");
        let locator = Locator::new(&policy, None);
        let now = "2026-06-01T00:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_microsecond();
        let env = OfflineEnv::new(&policy, locator, index, now);
        (policy, env)
    }

    fn granted(recipient: &str, destinations: &[&str]) -> ConsentRecord {
        ConsentRecord {
            recipient: recipient.into(),
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
            ..crate::consent::record::sample("c1", "u1")
        }
    }

    fn decide_from(policy: &Policy, env: &OfflineEnv, peer: &str) -> Decision<'static> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-purpose",
            http::HeaderValue::from_static("credit_scoring"),
        );
        let req = Request {
            method: &Method::GET,
            host: Some("storage.internal"),
            path: "/payments/u1/2026-01.json",
            query: None,
            headers: &headers,
            peer: peer.parse().unwrap(),
            identity: None,
            pick: 0,
            copy_source: Copied::Nothing,
        };
        let d = decide(policy, env, &req, &mut ());
        // Only what the assertions read outlives the request.
        let mut out = Decision::new(d.reason, "-");
        out.verdict = d.verdict;
        out.detail = d.detail.map(|s| Cow::Owned(s.into_owned()));
        out.destinations = d.destinations;
        out.outside_home = d.outside_home;
        out.consent = d.consent;
        out
    }

    #[test]
    fn a_foreign_recipient_at_a_home_address_needs_only_its_foreign_destinations() {
        let (policy, env) = world(granted("bureau", &["US"]));
        let d = decide_from(&policy, &env, "127.0.0.21");
        assert_eq!(d.reason, Reason::Consented, "{:?}", d.detail);
        let us = Country::parse("US").unwrap();
        let cn = Country::parse("CN").unwrap();
        // The decision still records both; only the foreign one had to be granted.
        assert_eq!(d.destinations, [Some(us), Some(cn)]);
        assert!(d.outside_home);

        let (policy, env) = world(granted("bureau", &["DE"]));
        let d = decide_from(&policy, &env, "127.0.0.21");
        assert_eq!(d.reason, Reason::ConsentScopeMismatch);
        assert_eq!(d.detail.as_deref(), Some("destination US not granted"));
        assert_eq!(
            d.consent.unwrap().failure,
            Some(Reason::ConsentScopeMismatch)
        );

        // Abroad, the consent naming the US is enough as before.
        let (policy, env) = world(granted("bureau", &["US"]));
        assert_eq!(
            decide_from(&policy, &env, "127.0.0.20").reason,
            Reason::Consented
        );
    }

    #[test]
    fn a_home_seated_third_party_at_home_passes_the_destination_check() {
        // The third-party rule needs consent; every destination is at home, so the consent's
        // destinations are not consulted (it names only DE).
        let (policy, env) = world(granted("partner", &["DE"]));
        let d = decide_from(&policy, &env, "127.0.0.30");
        assert!(!d.outside_home);
        assert_eq!(d.reason, Reason::Consented, "{:?}", d.detail);
    }

    #[test]
    fn an_unlocated_destination_outside_home_is_unknown_to_a_consent() {
        // 127.0.0.40 is located nowhere and treated as foreign: the home seat of the
        // recipient does not make the destination known.
        let (policy, env) = world(granted("partner", &["US", "CN"]));
        let d = decide_from(&policy, &env, "127.0.0.40");
        assert!(d.outside_home);
        assert_eq!(d.reason, Reason::ConsentScopeMismatch);
        assert_eq!(
            d.detail.as_deref(),
            Some("the destination country is unknown")
        );
    }
}
