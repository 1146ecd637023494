//! The decision as a value: what `decide` returns and what the proxy, `explain`, `test` and
//! the decision log all print. Reason codes are a small closed set.

use super::country::Country;
use super::forwarded::ClientAddr;
use super::model::{Policy, Relation};
use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// The outcome class of a decision.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// The request could not be decided or served (malformed, unreachable, log down).
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Error => "error",
        }
    }
}

macro_rules! reasons {
    ($($variant:ident => $code:literal),* $(,)?) => {
        /// Every reason code the proxy can give (SPEC section 3).
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
        pub enum Reason { $($variant),* }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $code),* }
            }

            pub fn parse(s: &str) -> Option<Reason> {
                match s { $($code => Some(Reason::$variant),)* _ => None }
            }
        }
    };
}

reasons! {
    AmbiguousPath => "ambiguous_path",
    BadRequest => "bad_request",
    NoRoute => "no_route",
    UnmatchedAllowed => "unmatched_allowed",
    UpstreamOutsideJurisdiction => "upstream_outside_jurisdiction",
    LocationUnknown => "location_unknown",
    CrossBorderDenied => "cross_border_denied",
    ThirdPartyDenied => "third_party_denied",
    SubjectUnidentified => "subject_unidentified",
    PurposeMissing => "purpose_missing",
    ConsentMissing => "consent_missing",
    ConsentExpired => "consent_expired",
    ConsentRevoked => "consent_revoked",
    ConsentMethodInvalid => "consent_method_invalid",
    ConsentScopeMismatch => "consent_scope_mismatch",
    ConsentStoreUnavailable => "consent_store_unavailable",
    RangeOnFilteredDataset => "range_on_filtered_dataset",
    Domestic => "domestic",
    Consented => "consented",
    ConsentFiltered => "consent_filtered",
    CrossBorderAllowed => "cross_border_allowed",
    NotEgress => "not_egress",
    UpstreamUnreachable => "upstream_unreachable",
    UpstreamTimeout => "upstream_timeout",
    LogUnavailable => "log_unavailable",
    PayloadTooLarge => "payload_too_large",
    HeadersTooLarge => "headers_too_large",
}

impl Reason {
    /// The record filter's code for a record dropped for this reason (a consent failure, or
    /// the store being unavailable): the filter counts by code, not by name.
    pub fn bulk_code(self) -> crate::bulk::Reason {
        crate::bulk::Reason(crate::bulk::Reason::FIRST_CALLER + self as u8)
    }

    /// The name of a record filter's drop code: the filter's own (`no_subject`,
    /// `unparsable`) or a reason's.
    pub fn of_bulk_code(code: crate::bulk::Reason) -> &'static str {
        code.builtin_name().unwrap_or_else(|| {
            Reason::ALL
                .get(usize::from(
                    code.0.wrapping_sub(crate::bulk::Reason::FIRST_CALLER),
                ))
                .map_or("unknown", |r| r.as_str())
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where an address was located, and by what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// An operator override: index into `Policy::networks`.
    Override {
        country: Country,
        network: usize,
    },
    /// The MaxMind/DB-IP database.
    Database {
        country: Country,
    },
    Unknown,
}

impl Location {
    pub fn country(&self) -> Option<Country> {
        match self {
            Location::Override { country, .. } | Location::Database { country } => Some(*country),
            Location::Unknown => None,
        }
    }

    pub fn source(&self) -> &'static str {
        match self {
            Location::Override { .. } => "override",
            Location::Database { .. } => "database",
            Location::Unknown => "none",
        }
    }
}

/// The client as found in step 2.
#[derive(Clone, Debug)]
pub struct ClientFacts<'a> {
    pub addr: ClientAddr,
    pub location: Location,
    pub identity: Option<&'a str>,
}

/// The recipient as found in step 2: a declared one, or an anonymous third party.
#[derive(Clone, Debug)]
pub struct RecipientFacts<'a> {
    pub id: Option<&'a Arc<str>>,
    pub relation: Relation,
    pub country: Option<Country>,
}

/// The upstream address chosen in step 4.
#[derive(Clone, Debug)]
pub struct UpstreamChoice {
    pub index: usize,
    pub addr: SocketAddr,
    pub location: Location,
}

/// The consent that allowed a transfer, or the nearest one that failed and why.
#[derive(Clone, Debug)]
pub struct ConsentUse {
    pub id: compact_str::CompactString,
    /// `None`: valid, it allowed the transfer.
    pub failure: Option<Reason>,
    /// How the consent that allowed the transfer was collected (`explicit`); `None` for one
    /// that failed.
    pub method: Option<std::sync::Arc<str>>,
}

/// The result of `decide`: the verdict and every fact it used.
#[derive(Clone, Debug)]
pub struct Decision<'a> {
    pub verdict: Verdict,
    /// `false` when a denial was only logged (audit mode) and the request forwarded.
    pub enforced: bool,
    pub reason: Reason,
    /// The path of the rule that decided, e.g. `datasets.payments.cross_border`.
    pub rule: &'a str,
    /// A detail for the human message (which header was malformed, and so on).
    pub detail: Option<Cow<'a, str>>,
    /// The normalised path, when normalisation succeeded.
    pub path: Option<Cow<'a, str>>,
    pub client: Option<ClientFacts<'a>>,
    pub recipient: Option<RecipientFacts<'a>>,
    pub dataset: Option<usize>,
    /// The raw subject identifier (pseudonymised before it is logged).
    pub subject: Option<Cow<'a, str>>,
    /// Which path segment held the subject, for pseudonymising the logged path.
    pub subject_segment: Option<usize>,
    pub purpose: Option<&'a str>,
    pub upstream: Option<UpstreamChoice>,
    /// Destination countries a consent had to cover.
    pub destinations: [Option<Country>; 2],
    pub outside_home: bool,
    pub consent: Option<ConsentUse>,
    /// Set when a server-side copy was refused because of what it copies: the dataset of the
    /// source object (`None` when it matches none).
    pub copied_from: Option<Option<usize>>,
}

impl<'a> Decision<'a> {
    pub(crate) fn new(reason: Reason, rule: &'a str) -> Decision<'a> {
        Decision {
            verdict: Verdict::Allow,
            enforced: true,
            reason,
            rule,
            detail: None,
            path: None,
            client: None,
            recipient: None,
            dataset: None,
            subject: None,
            subject_segment: None,
            purpose: None,
            upstream: None,
            destinations: [None, None],
            outside_home: false,
            consent: None,
            copied_from: None,
        }
    }

    /// A decision for a request that could not be decided (limits, log failures...).
    pub fn new_failure(reason: Reason, rule: &'a str) -> Decision<'a> {
        Decision {
            verdict: Verdict::Error,
            ..Decision::new(reason, rule)
        }
    }

    /// Whether the proxy forwards the request (allowed, or denied only in audit mode).
    pub fn forwards(&self) -> bool {
        match self.verdict {
            Verdict::Allow => true,
            Verdict::Deny => !self.enforced && self.upstream.is_some(),
            Verdict::Error => false,
        }
    }

    /// The HTTP status the proxy answers with itself; `None` when the request is forwarded.
    pub fn status(&self) -> Option<u16> {
        if self.forwards() {
            return None;
        }
        Some(status_of(self.reason))
    }

    /// One human sentence explaining the decision.
    pub fn message(&self, policy: &Policy) -> String {
        let name = |i: Option<usize>| i.map(|i| &*policy.datasets[i].name).unwrap_or("-");
        match self.copied_from {
            None => self.reason_message(policy, self.dataset),
            Some(source) => format!(
                "{} The request copies an object of dataset \"{}\" into dataset \"{}\".",
                self.reason_message(policy, source),
                name(source),
                name(self.dataset)
            ),
        }
    }

    /// The sentence for the reason, about `dataset`.
    fn reason_message(&self, policy: &Policy, dataset: Option<usize>) -> String {
        let ds = dataset.map(|i| &*policy.datasets[i].name).unwrap_or("-");
        let who = match &self.recipient {
            Some(RecipientFacts { id: Some(id), .. }) => format!("recipient \"{id}\""),
            _ => "an anonymous caller".to_string(),
        };
        let dest = self
            .destinations
            .iter()
            .flatten()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let detail = self.detail.as_deref().unwrap_or("");
        match self.reason {
            Reason::AmbiguousPath => format!("The request path is ambiguous: {detail}."),
            Reason::BadRequest => format!("The request is malformed: {detail}."),
            Reason::NoRoute => "No dataset of this policy matches the request.".into(),
            Reason::UnmatchedAllowed => "No dataset matches; the policy lets unmatched requests through.".into(),
            Reason::UpstreamOutsideJurisdiction => format!(
                "Dataset \"{ds}\" must stay in {}, and no address of its upstream is located there.",
                policy.datasets.get(dataset.unwrap_or(usize::MAX)).map(|d| &*d.home.name).unwrap_or("its home")
            ),
            Reason::LocationUnknown => "The client's location cannot be determined, and the policy refuses unknown locations.".into(),
            Reason::CrossBorderDenied => format!("Dataset \"{ds}\" may not leave its home jurisdiction (destination {dest})."),
            Reason::ThirdPartyDenied => format!("Dataset \"{ds}\" may not be shared with third parties ({who})."),
            Reason::SubjectUnidentified => format!("Sharing dataset \"{ds}\" needs consent, but the request does not identify its data subject{}.", if detail.is_empty() { String::new() } else { format!(" ({detail})") }),
            Reason::PurposeMissing => format!(
                "Sharing dataset \"{ds}\" needs consent for a purpose, and the request declares none (header {}).",
                policy.consent.purpose_header
            ),
            Reason::ConsentMissing => format!("No consent of the data subject allows {who} to receive dataset \"{ds}\"{}.", if detail.is_empty() { String::new() } else { format!(" ({detail})") }),
            Reason::ConsentExpired => format!("The data subject's consent for {who} is not in force{}.", if detail.is_empty() { String::new() } else { format!(" ({detail})") }),
            Reason::ConsentRevoked => format!("The data subject revoked the consent for {who}."),
            Reason::ConsentMethodInvalid => format!("The consent for {who} was not collected explicitly ({detail}); that is not consent."),
            Reason::ConsentScopeMismatch => format!("The data subject's consent for {who} does not cover this purpose, category or destination ({detail})."),
            Reason::ConsentStoreUnavailable => "The consent registry is unavailable, so no consent can be confirmed.".into(),
            Reason::Domestic => "The data stays in its home jurisdiction.".into(),
            Reason::Consented => format!("The data subject consented to this transfer to {who}."),
            Reason::ConsentFiltered => format!("Records of dataset \"{ds}\" leave for {who} only where their data subject consented; the others are dropped."),
            Reason::RangeOnFilteredDataset => format!("Dataset \"{ds}\" is filtered record by record for {who}, so a byte range of its objects cannot be served; ask for the whole object."),
            Reason::CrossBorderAllowed => format!("Dataset \"{ds}\" may leave its home jurisdiction."),
            Reason::NotEgress => "The method does not carry data out; only the upstream location applies.".into(),
            Reason::UpstreamUnreachable => format!("The upstream could not be reached{}.", if detail.is_empty() { String::new() } else { format!(": {detail}") }),
            Reason::UpstreamTimeout => "The upstream did not answer in time.".into(),
            Reason::LogUnavailable => "The decision log cannot be written, so nothing is forwarded.".into(),
            Reason::PayloadTooLarge => "The request body is larger than the proxy accepts.".into(),
            Reason::HeadersTooLarge => "The request headers are larger than the proxy accepts.".into(),
        }
    }
}

/// The status the proxy answers with for a reason when it does not forward.
pub fn status_of(reason: Reason) -> u16 {
    match reason {
        Reason::AmbiguousPath | Reason::BadRequest => 400,
        Reason::NoRoute => 404,
        Reason::UpstreamUnreachable => 502,
        Reason::UpstreamTimeout => 504,
        Reason::LogUnavailable => 503,
        Reason::PayloadTooLarge => 413,
        Reason::RangeOnFilteredDataset => 416,
        Reason::HeadersTooLarge => 431,
        Reason::Domestic
        | Reason::Consented
        | Reason::ConsentFiltered
        | Reason::CrossBorderAllowed
        | Reason::NotEgress
        | Reason::UnmatchedAllowed => 200,
        _ => 451,
    }
}

/// One step of the trace that `explain` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceStep {
    pub rule: String,
    pub note: String,
}

/// Receives the trace of a decision; `()` discards it at no cost (callers check `enabled`
/// first, so that not even the arguments of a step are computed).
pub trait Tracer {
    fn enabled(&self) -> bool {
        true
    }
    fn step(&mut self, rule: &str, note: fmt::Arguments<'_>);
}

impl Tracer for () {
    #[inline(always)]
    fn enabled(&self) -> bool {
        false
    }
    #[inline(always)]
    fn step(&mut self, _: &str, _: fmt::Arguments<'_>) {}
}

impl Tracer for Vec<TraceStep> {
    fn step(&mut self, rule: &str, note: fmt::Arguments<'_>) {
        self.push(TraceStep {
            rule: rule.to_string(),
            note: note.to_string(),
        });
    }
}
