//! The records of the decision log (SPEC section 5). Struct fields are declared in
//! lexicographic order so that serde's compact output *is* the canonical form that the hash
//! chain covers; `tests::canonical_order` guards this. The decision and outcome records,
//! written for every request, are serialised by hand ([`super::json`]) to the same bytes.

use super::id::DecisionId;
use super::pseudonym::Pseudonymizer;
use super::trace::TraceParent;
use crate::policy::country::Country;
use crate::policy::decision::{Decision, Reason, Verdict, status_of};
use crate::policy::model::{Policy, Relation, SubjectSource};
use http::HeaderMap;
use serde::{Serialize, Serializer};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub const VERSION: u8 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct ClientRec {
    pub country: Option<Country>,
    pub identity: Option<String>,
    pub ip: Option<IpAddr>,
    /// How the country was found: `override`, `database` or `none`.
    pub source: &'static str,
    /// The trusted proxy that forwarded the request, if any.
    pub via: Option<IpAddr>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConsentRec {
    pub id: compact_str::CompactString,
    /// How the consent that allowed the transfer was collected (`explicit`): what a data
    /// subject's report shows. Absent when the consent failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Arc<str>>,
    /// `valid`, or the reason the nearest consent failed.
    pub result: &'static str,
    /// Why the nearest consent failed (`collected as "pre_ticked"`, `purpose "x" not
    /// granted`): what a security engineer needs to see that a consent existed but did not
    /// count. Absent when the consent was valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecipientRec {
    pub country: Option<Country>,
    pub id: Option<Arc<str>>,
    pub relation: Relation,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestRec {
    /// Only the headers the decision read, masked where the policy says so.
    pub headers: Headers,
    pub host: Option<String>,
    #[serde(serialize_with = "method_name")]
    pub method: http::Method,
    /// The normalised path (or the raw one, when it could not be normalised), with the
    /// subject pseudonymised.
    pub path: String,
    pub query: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamRec {
    pub addr: SocketAddr,
    pub country: Option<Country>,
    pub name: Arc<str>,
}

/// Written before a request is forwarded or refused.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionRecord {
    pub category: Option<Arc<str>>,
    pub client: ClientRec,
    pub consent: Option<ConsentRec>,
    pub dataset: Option<Arc<str>>,
    pub decision: &'static str,
    pub enforced: bool,
    pub geo_db: Option<Arc<str>>,
    pub id: DecisionId,
    /// The chain's name (`[log] instance`), set by the writer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Arc<str>>,
    pub kind: &'static str,
    pub policy: Arc<str>,
    /// The revision of the signed bundle the rules came from; absent for a policy read whole
    /// from its file (and in logs written before bundles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_revision: Option<u64>,
    pub prev: Link,
    pub purpose: Option<String>,
    pub reason: Reason,
    pub recipient: RecipientRec,
    pub request: RequestRec,
    pub rule: String,
    pub seq: u64,
    pub status: Option<u16>,
    pub subject: Option<String>,
    /// The application's trace the request belongs to: its W3C `traceparent`, when it
    /// carried one well-formed header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
    pub ts: Stamp,
    pub upstream: Option<UpstreamRec>,
    pub v: u8,
}

/// Written when an exchange ends: what actually flowed.
#[derive(Clone, Debug, Serialize)]
pub struct OutcomeRecord {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Whether the response reached its end (false: the client or upstream went away).
    pub complete: bool,
    /// The failure in words (e.g. an upstream certificate that is not trusted), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub duration_ms: f64,
    /// Why the exchange failed after the decision, if it did.
    pub error: Option<Reason>,
    pub id: DecisionId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Arc<str>>,
    pub kind: &'static str,
    pub prev: Link,
    /// A bulk object's records: what the filter let through. Absent for other exchanges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<Box<RecordCounts>>,
    pub seq: u64,
    /// The status the client received; 0 if the client went away before any.
    pub status: u16,
    pub ts: Stamp,
    /// The upstream address actually used, if any.
    pub upstream: Option<SocketAddr>,
    pub v: u8,
}

/// Written before a batch of a bulk object's records leaves (a dataset filtered record by
/// record): names each subject whose records the batch carries, with the consent that let
/// them leave, so that the log never shows less than what left. A subject already named
/// under the same consent by an earlier disclosure of the same exchange is not named again.
#[derive(Clone, Debug, Serialize)]
pub struct DisclosureRecord {
    /// The batch's number within the exchange, from 1.
    pub batch: u64,
    /// The decision the exchange was forwarded under.
    pub id: DecisionId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Arc<str>>,
    pub kind: &'static str,
    pub prev: Link,
    /// Records of the batch that leave.
    pub records: u64,
    pub seq: u64,
    /// `[subject, consent id]` per newly named subject: the subject pseudonymised as in
    /// decision records; the consent `null` where audit mode let records leave without one.
    pub subjects: Vec<(String, Option<compact_str::CompactString>)>,
    pub ts: Stamp,
    pub v: u8,
}

/// What a bulk object's filter let through, in its exchange's outcome record: records kept
/// (and their bytes, before compression), records dropped by reason, and in audit mode the
/// records that left although they would have been dropped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecordCounts {
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
    pub kept: u64,
    pub kept_bytes: u64,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub would_drop: std::collections::BTreeMap<&'static str, u64>,
}

/// A signed checkpoint (see [`super::checkpoint`] for what the signature covers). Written
/// every `checkpoint_every` records, every `checkpoint_interval` while records arrive, at
/// the end of every rotated file, after a recovery record, and on close (`final`).
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointRecord {
    /// Written when the log was closed cleanly: nothing follows until the next start.
    #[serde(rename = "final")]
    pub final_: bool,
    /// The chain's name: the signature covers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Arc<str>>,
    /// `sha256:` fingerprint of the signing key's raw public key; null when unsigned.
    pub key: Option<String>,
    pub kind: &'static str,
    /// The chain head the signature covers: the hash of the record before.
    pub prev: Link,
    /// The raw Ed25519 public key, hex; null when unsigned.
    pub public_key: Option<String>,
    pub seq: u64,
    /// Ed25519 signature, hex; absent when the log has no signing key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    pub ts: String,
    pub v: u8,
}

/// Written first after a start that found the log not closed cleanly (a crash, kill -9, a
/// power cut), or by a running writer that, reopening its file after a failed write, found
/// it does not end where the writer left it: says what was found, then the chain continues.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryRecord {
    /// The head the running writer held when it found its file changed: what the file should
    /// have ended with. Absent after a start, which has no such memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<ExpectedHead>,
    /// Name of the file the previous run's last record is in.
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Arc<str>>,
    pub kind: &'static str,
    /// Kind of the last complete record found (null: the log held none).
    pub last_kind: Option<String>,
    /// `seq` of the last complete record found (0: none).
    pub last_seq: u64,
    pub prev: Link,
    pub seq: u64,
    /// Bytes of a torn (half-written) record cut off the end of `file`.
    pub torn_bytes: u64,
    pub ts: String,
    pub v: u8,
}

/// `seq` and `hash` of the last record a writer wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExpectedHead {
    pub hash: String,
    pub seq: u64,
}

/// A record on its way to the log; the writer fills `seq` and `prev`.
#[derive(Clone, Debug)]
pub enum Record {
    Decision(Box<DecisionRecord>),
    Outcome(OutcomeRecord),
    Checkpoint(CheckpointRecord),
    Recovery(RecoveryRecord),
    Disclosure(Box<DisclosureRecord>),
}

impl Record {
    /// Places the record in a chain: its `seq`, its `prev`, and the chain's name.
    pub fn set_chain(&mut self, seq: u64, prev: &str, instance: Option<&Arc<str>>) {
        let (s, p, i) = match self {
            Record::Decision(d) => (&mut d.seq, &mut d.prev, &mut d.instance),
            Record::Outcome(o) => (&mut o.seq, &mut o.prev, &mut o.instance),
            Record::Checkpoint(c) => (&mut c.seq, &mut c.prev, &mut c.instance),
            Record::Recovery(r) => (&mut r.seq, &mut r.prev, &mut r.instance),
            Record::Disclosure(r) => (&mut r.seq, &mut r.prev, &mut r.instance),
        };
        *s = seq;
        p.set(prev);
        *i = instance.cloned();
    }

    /// The decision id; empty for checkpoints and recovery records.
    pub fn id(&self) -> &str {
        match self {
            Record::Decision(d) => d.id.as_str(),
            Record::Outcome(o) => o.id.as_str(),
            Record::Disclosure(r) => r.id.as_str(),
            Record::Checkpoint(_) | Record::Recovery(_) => "",
        }
    }

    /// Serialises the record, without `hash`, in canonical form. The two records of every
    /// request are written by hand ([`super::json`]), the rare ones through serde.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        let r = match self {
            Record::Decision(d) => {
                d.write_json(out);
                Ok(())
            }
            Record::Outcome(o) => {
                o.write_json(out);
                Ok(())
            }
            Record::Checkpoint(c) => serde_json::to_writer(&mut *out, c),
            Record::Recovery(r) => serde_json::to_writer(&mut *out, r),
            Record::Disclosure(r) => serde_json::to_writer(&mut *out, r),
        };
        r.expect("records serialise to JSON without error");
    }
}

/// RFC 3339 UTC with microseconds, as every record writes it.
pub fn timestamp(t: jiff::Timestamp) -> String {
    let mut buf = [0u8; STAMP_LEN];
    match rfc3339_micros(t, &mut buf) {
        Some(s) => s.to_string(),
        None => format!("{t:.6}"),
    }
}

pub(super) const STAMP_LEN: usize = "2026-11-28T04:31:53.123456Z".len();

/// [`timestamp`] without jiff's general printer: the log writes two per request. `None`
/// outside the years 0000 to 9999, which the general printer writes.
pub(super) fn rfc3339_micros(t: jiff::Timestamp, buf: &mut [u8; STAMP_LEN]) -> Option<&str> {
    let micros = t.as_microsecond();
    let (secs, us) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return None;
    }
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, sod / 3600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    put(20, 6, us);
    for (at, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        buf[at] = c;
    }
    std::str::from_utf8(buf).ok()
}

/// A record's `ts`, written as [`timestamp`] writes it, without a string of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(pub jiff::Timestamp);

impl Serialize for Stamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; STAMP_LEN];
        match rfc3339_micros(self.0, &mut buf) {
            Some(text) => s.serialize_str(text),
            None => s.serialize_str(&timestamp(self.0)),
        }
    }
}

/// A record's `prev`: a SHA-256 hex digest, held inline (the writer sets it on every record
/// it chains).
#[derive(Clone, Copy)]
pub struct Link {
    len: u8,
    hex: [u8; 64],
}

impl Link {
    pub fn set(&mut self, prev: &str) {
        assert!(
            prev.len() <= self.hex.len(),
            "a chain link is a SHA-256 hex digest"
        );
        self.hex[..prev.len()].copy_from_slice(prev.as_bytes());
        self.len = prev.len() as u8;
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.hex[..usize::from(self.len)]).expect("set from a str")
    }
}

impl From<&str> for Link {
    fn from(prev: &str) -> Link {
        let mut link = Link::default();
        link.set(prev);
        link
    }
}

impl Default for Link {
    fn default() -> Link {
        Link {
            len: 0,
            hex: [0; 64],
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Link {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

fn method_name<S: Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

/// The request headers a decision read, by name, in name order (as a JSON object).
#[derive(Clone, Debug, Default)]
pub struct Headers(Vec<(http::HeaderName, String)>);

impl Headers {
    pub fn insert(&mut self, name: &http::HeaderName, value: String) {
        match self
            .0
            .binary_search_by(|(n, _)| n.as_str().cmp(name.as_str()))
        {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name.clone(), value)),
        }
    }
}

impl Headers {
    pub fn iter(&self) -> impl Iterator<Item = &(http::HeaderName, String)> {
        self.0.iter()
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(n, v)| (n.as_str(), v)))
    }
}

/// The request facts that a decision record needs besides the decision itself.
pub struct RequestContext<'a> {
    pub id: DecisionId,
    pub ts: jiff::Timestamp,
    pub method: &'a http::Method,
    pub host: Option<&'a str>,
    pub raw_path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub peer: IpAddr,
}

/// Builds the decision record for `decision`; raw subjects never leave this function.
pub fn decision_record(
    policy: &Policy,
    geo_db: Option<Arc<str>>,
    pseudo: &Pseudonymizer,
    cx: &RequestContext<'_>,
    decision: &Decision<'_>,
) -> DecisionRecord {
    let dataset = decision.dataset.map(|i| &policy.datasets[i]);
    let subject = decision.subject.as_deref();
    let pseudonym = subject.map(|s| pseudo.pseudonym(s));
    // Without a dataset there is no knowing which part of the target names a person.
    let opaque = dataset.is_none() || decision.path.is_none();
    let path = match &decision.path {
        Some(p) if !opaque => {
            pseudo.path(p, subject, decision.subject_segment, pseudonym.as_deref())
        }
        Some(p) => pseudo.opaque_path(p),
        None => pseudo.opaque_path(cx.raw_path),
    };
    // Where the dataset says the subject is, when no subject was read from there (named
    // twice, not UTF-8): what is there may still be the raw subject.
    let unread = dataset
        .and_then(|d| d.subject.as_ref())
        .filter(|_| subject.is_none());
    let query = cx.query.map(|q| {
        let masked = &policy.log.mask_headers;
        if opaque {
            pseudo.opaque_query(q, masked)
        } else if let Some(SubjectSource::Query(name)) = unread {
            pseudo.query_hiding(q, name, masked)
        } else {
            pseudo.query(q, subject, pseudonym.as_deref(), masked)
        }
    });
    let unread_header = match unread {
        Some(SubjectSource::Header(h)) => Some(h),
        _ => None,
    };
    let mut headers = Headers::default();
    let mut note = |name: &http::HeaderName| {
        if let Some(v) = cx.headers.get(name) {
            let v = String::from_utf8_lossy(v.as_bytes());
            let shown = if policy.log.mask_headers.contains(name) {
                "[masked]".to_string()
            } else if unread_header == Some(name) && !v.trim().is_empty() {
                pseudo.pseudonym(v.trim())
            } else {
                match (subject, pseudonym.as_deref()) {
                    (Some(s), Some(p)) if v.contains(s) => v.replace(s, p),
                    _ => v.into_owned(),
                }
            };
            headers.insert(name, shown);
        }
    };
    note(&policy.consent.purpose_header);
    if let Some(SubjectSource::Header(h)) = dataset.and_then(|d| d.subject.as_ref()) {
        note(h);
    }
    if decision
        .client
        .as_ref()
        .is_some_and(|c| c.addr.via.is_some())
    {
        note(&http::header::FORWARDED);
        note(&X_FORWARDED_FOR);
    }
    let client = match &decision.client {
        Some(c) => ClientRec {
            country: c.location.country(),
            identity: c.identity.map(str::to_string),
            ip: Some(c.addr.ip),
            source: c.location.source(),
            via: c.addr.via,
        },
        None => ClientRec {
            country: None,
            identity: None,
            ip: Some(cx.peer),
            source: "none",
            via: None,
        },
    };
    let recipient = match &decision.recipient {
        Some(r) => RecipientRec {
            country: r.country,
            id: r.id.cloned(),
            relation: r.relation,
        },
        None => RecipientRec {
            country: None,
            id: None,
            relation: Relation::ThirdParty,
        },
    };
    let upstream = decision.upstream.as_ref().map(|u| UpstreamRec {
        addr: u.addr,
        country: u.location.country(),
        name: policy.upstreams[u.index].name.clone(),
    });
    let consent = decision.consent.as_ref().map(|c| ConsentRec {
        id: c.id.clone(),
        method: c.method.clone(),
        result: c.failure.map(Reason::as_str).unwrap_or("valid"),
        why: c.failure.and(decision.detail.as_deref()).map(str::to_owned),
    });
    DecisionRecord {
        instance: None,
        category: dataset.map(|d| d.category.clone()),
        client,
        consent,
        dataset: dataset.map(|d| d.name.clone()),
        decision: decision.verdict.as_str(),
        enforced: decision.enforced,
        geo_db,
        id: cx.id,
        kind: "decision",
        policy: policy_hash(policy),
        policy_revision: policy.revision,
        prev: Link::default(),
        purpose: decision.purpose.map(str::to_string),
        reason: decision.reason,
        recipient,
        request: RequestRec {
            headers,
            host: cx.host.map(str::to_string),
            method: cx.method.clone(),
            path,
            query,
        },
        rule: decision.rule.to_string(),
        seq: 0,
        status: decision.status(),
        subject: pseudonym,
        trace: TraceParent::from_headers(cx.headers),
        ts: Stamp(cx.ts),
        upstream,
        v: VERSION,
    }
}

fn policy_hash(policy: &Policy) -> Arc<str> {
    policy.hash.clone()
}

/// `X-Forwarded-For`, named once.
pub static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// A decision record for a request refused before it could be decided (oversized headers,
/// a body too large, a log that cannot be written…).
pub fn failure_record(
    policy: &Policy,
    cx: &RequestContext<'_>,
    reason: Reason,
    rule: &str,
) -> DecisionRecord {
    DecisionRecord {
        instance: None,
        category: None,
        client: ClientRec {
            country: None,
            identity: None,
            ip: Some(cx.peer),
            source: "none",
            via: None,
        },
        consent: None,
        dataset: None,
        decision: Verdict::Error.as_str(),
        enforced: true,
        geo_db: None,
        id: cx.id,
        kind: "decision",
        policy: policy_hash(policy),
        policy_revision: policy.revision,
        prev: Link::default(),
        purpose: None,
        reason,
        recipient: RecipientRec {
            country: None,
            id: None,
            relation: Relation::ThirdParty,
        },
        request: RequestRec {
            headers: Headers::default(),
            host: cx.host.map(str::to_string),
            method: cx.method.clone(),
            path: crate::policy::path::normalize(cx.raw_path)
                .map(|p| p.into_owned())
                .unwrap_or_else(|_| cx.raw_path.to_string()),
            query: None,
        },
        rule: rule.to_string(),
        seq: 0,
        status: Some(status_of(reason)),
        subject: None,
        trace: TraceParent::from_headers(cx.headers),
        ts: Stamp(cx.ts),
        upstream: None,
        v: VERSION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises a JSON value with object keys sorted, independently of struct order.
    fn sorted(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                let inner: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{}:{}", serde_json::to_string(k).unwrap(), sorted(&m[*k])))
                    .collect();
                format!("{{{}}}", inner.join(","))
            }
            serde_json::Value::Array(a) => {
                format!("[{}]", a.iter().map(sorted).collect::<Vec<_>>().join(","))
            }
            other => other.to_string(),
        }
    }

    fn sample() -> DecisionRecord {
        let p = crate::policy::compile::from_str(
            "t.toml",
            "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n[[upstreams]]\nname='u'\nurl='http://127.0.0.1:1'\n",
        )
        .unwrap();
        let headers = HeaderMap::new();
        let cx = RequestContext {
            id: "01TEST".into(),
            ts: jiff::Timestamp::UNIX_EPOCH,
            method: &http::Method::GET,
            host: Some("h"),
            raw_path: "/x",
            query: None,
            headers: &headers,
            peer: "127.0.0.1".parse().unwrap(),
        };
        let mut r = failure_record(&p, &cx, Reason::HeadersTooLarge, "proxy.max_header_bytes");
        r.consent = Some(ConsentRec {
            id: "c".into(),
            method: None,
            result: "consent_method_invalid",
            why: Some("collected as \"pre_ticked\"".into()),
        });
        r.upstream = Some(UpstreamRec {
            addr: "127.0.0.1:1".parse().unwrap(),
            country: Country::parse("CN"),
            name: "u".into(),
        });
        r.request
            .headers
            .insert(&http::HeaderName::from_static("x-purpose"), "p".into());
        r.trace = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        r.policy_revision = Some(3);
        r
    }

    #[test]
    fn canonical_order() {
        let rec = Record::Decision(Box::new(sample()));
        let mut out = Vec::new();
        rec.write_canonical(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), sorted(&v));
        let o = Record::Outcome(OutcomeRecord {
            instance: None,
            bytes_in: 1,
            bytes_out: 2,
            complete: true,
            detail: Some("no response within 60s".into()),
            duration_ms: 0.125,
            error: Some(Reason::UpstreamTimeout),
            id: "x".into(),
            kind: "outcome",
            prev: "p".into(),
            records: None,
            seq: 3,
            status: 504,
            ts: Stamp(jiff::Timestamp::UNIX_EPOCH),
            upstream: None,
            v: 1,
        });
        let mut out = Vec::new();
        o.write_canonical(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), sorted(&v));
        let mut cp = CheckpointRecord {
            instance: None,
            final_: true,
            key: Some("sha256:00".into()),
            kind: "checkpoint",
            prev: "p".into(),
            public_key: Some("00".into()),
            seq: 4,
            sig: Some("ff".into()),
            ts: timestamp(jiff::Timestamp::UNIX_EPOCH),
            v: 1,
        };
        let recovery = RecoveryRecord {
            instance: None,
            expected: Some(ExpectedHead {
                hash: "h".into(),
                seq: 9,
            }),
            file: "decisions.jsonl".into(),
            kind: "recovery",
            last_kind: Some("decision".into()),
            last_seq: 4,
            prev: "p".into(),
            seq: 5,
            torn_bytes: 17,
            ts: timestamp(jiff::Timestamp::UNIX_EPOCH),
            v: 1,
        };
        for rec in [
            Record::Checkpoint(cp.clone()),
            Record::Recovery(recovery),
            Record::Checkpoint({
                cp.sig = None;
                cp
            }),
        ] {
            let mut out = Vec::new();
            rec.write_canonical(&mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), sorted(&v));
        }
    }

    #[test]
    fn timestamps_have_microseconds() {
        let t: jiff::Timestamp = "2026-11-28T04:31:53.1234567Z".parse().unwrap();
        assert_eq!(timestamp(t), "2026-11-28T04:31:53.123456Z");
        assert_eq!(
            timestamp(jiff::Timestamp::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn timestamps_are_written_as_jiff_writes_them() {
        // Leap days, century years, the ends of the four-digit years, before 1970, and
        // random instants across the whole range.
        let fixed = [
            "2000-02-29T23:59:59.999999Z",
            "1900-03-01T00:00:00Z",
            "2100-02-28T12:00:00.5Z",
            "0000-01-01T00:00:00Z",
            "9999-12-30T21:59:59.999999Z",
            "1969-12-31T23:59:59.000001Z",
            "2024-12-31T00:00:00Z",
        ];
        let mut all: Vec<jiff::Timestamp> = fixed.iter().map(|t| t.parse().unwrap()).collect();
        let (min, max) = (-62_167_219_200_000_000i64, 253_402_207_199_999_999i64);
        all.extend(
            (0..100_000)
                .map(|_| jiff::Timestamp::from_microsecond(fastrand::i64(min..=max)).unwrap()),
        );
        for t in all {
            let mut buf = [0u8; STAMP_LEN];
            assert_eq!(
                rfc3339_micros(t, &mut buf),
                Some(format!("{t:.6}").as_str()),
                "{t}"
            );
            assert_eq!(
                serde_json::to_string(&Stamp(t)).unwrap(),
                format!("\"{t:.6}\"")
            );
        }
        // Outside four-digit years, jiff's own printer writes it.
        let far: jiff::Timestamp = "-000100-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(timestamp(far), format!("{far:.6}"));
    }
}
