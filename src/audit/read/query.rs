//! Reading a log for people: streams the records of a log (a file with its rotated siblings,
//! or a folder, whose workers' chains are merged by time) one line at a time, never holding
//! more than one per chain, reads only the fields that filters and reports use (borrowed
//! from the line where it has no escapes), and prints matches as JSON lines or a table. Every
//! reader but `audit verify` reads through it (`query`, `report`, `subject`, `export`), so
//! that they all skip and count the same lines. It stays one file, though long, for that
//! reason: the scan, the filters and the views are the one reading of a line.
//!
//! A bulk exchange (a dataset filtered record by record) writes `disclosure` records that name
//! the subjects whose records left, but not who received them, why or where: that is in the
//! exchange's decision record. The scan keeps the decisions of the bulk exchanges still open
//! (until their outcome record) and hands each disclosure over with its decision
//! ([`View::exchange`]), so that filters and tables read a disclosure as they read a decision.
//!
//! Times compare as strings: every record's `ts` has the fixed form
//! `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so string order is time order, and the bounds are brought
//! into the same form.

use crate::audit::files::{
    LineReader, LogFilesError, SegmentIter, Segments, oversized_why, unreadable,
};
use crate::audit::record::timestamp;
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A string field, borrowed from the line unless it holds escapes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

type Field<'a> = Option<Text<'a>>;

/// Where a request came from, as a decision record says.
#[derive(Debug, Default, Deserialize)]
pub struct ClientView<'a> {
    #[serde(borrow, default)]
    pub country: Field<'a>,
    #[serde(borrow, default)]
    pub ip: Field<'a>,
}

/// Who asked, as a decision record says.
#[derive(Debug, Default, Deserialize)]
pub struct RecipientView<'a> {
    #[serde(borrow, default)]
    pub id: Field<'a>,
    #[serde(borrow, default)]
    pub country: Field<'a>,
    #[serde(borrow, default)]
    pub relation: Field<'a>,
}

/// The consent a decision looked at.
#[derive(Debug, Default, Deserialize)]
pub struct ConsentView<'a> {
    #[serde(borrow, default)]
    pub id: Field<'a>,
    #[serde(borrow, default)]
    pub method: Field<'a>,
}

/// The request a decision was about.
#[derive(Debug, Default, Deserialize)]
pub struct RequestView<'a> {
    #[serde(borrow, default)]
    pub method: Field<'a>,
    #[serde(borrow, default)]
    pub path: Field<'a>,
}

/// The application's trace a decision's request belonged to (its W3C `traceparent`).
#[derive(Debug, Default, Deserialize)]
pub struct TraceView<'a> {
    #[serde(borrow, default)]
    pub trace_id: Field<'a>,
}

/// The fields of a record that filters, tables and reports read; any record kind parses
/// (absent fields are `None`).
#[derive(Debug, Default, Deserialize)]
pub struct View<'a> {
    #[serde(borrow, default)]
    pub kind: Field<'a>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(borrow, default)]
    pub id: Field<'a>,
    #[serde(borrow, default)]
    pub ts: Field<'a>,
    #[serde(borrow, default)]
    pub decision: Field<'a>,
    #[serde(default)]
    pub enforced: Option<bool>,
    #[serde(borrow, default)]
    pub reason: Field<'a>,
    #[serde(borrow, default)]
    pub dataset: Field<'a>,
    #[serde(borrow, default)]
    pub subject: Field<'a>,
    #[serde(borrow, default)]
    pub purpose: Field<'a>,
    #[serde(borrow, default)]
    pub category: Field<'a>,
    #[serde(borrow, default)]
    pub policy: Field<'a>,
    /// The signed bundle's revision the decision was made under (absent: a whole policy file).
    #[serde(default)]
    pub policy_revision: Option<u64>,
    #[serde(borrow, default)]
    pub instance: Field<'a>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub bytes_out: Option<u64>,
    #[serde(borrow, default)]
    pub recipient: Option<RecipientView<'a>>,
    #[serde(borrow, default)]
    pub client: Option<ClientView<'a>>,
    #[serde(borrow, default)]
    pub consent: Option<ConsentView<'a>>,
    #[serde(borrow, default)]
    pub request: Option<RequestView<'a>>,
    #[serde(borrow, default)]
    pub trace: Option<TraceView<'a>>,
    /// Checkpoints: whether final, and the key's fingerprint.
    #[serde(default, rename = "final")]
    pub final_: Option<bool>,
    #[serde(borrow, default)]
    pub key: Field<'a>,
    /// Recovery records: what the restart found.
    #[serde(default)]
    pub last_seq: Option<u64>,
    #[serde(default)]
    pub torn_bytes: Option<u64>,
    #[serde(borrow, default)]
    pub file: Field<'a>,
    /// Recovery records of a running writer: the head it expected its file to end with.
    #[serde(default)]
    pub expected: Option<ExpectedView>,
    /// Disclosure records: the batch's number within its exchange.
    #[serde(default)]
    pub batch: Option<u64>,
    /// Disclosure records: the subjects named, each with the consent that let its records
    /// leave (none where audit mode let them leave without one).
    #[serde(borrow, default)]
    pub subjects: Option<SubjectsView<'a>>,
    /// A disclosure's records in its batch, or a bulk exchange's counts in its outcome.
    #[serde(default)]
    pub records: Option<RecordsView>,
    /// A disclosure's exchange: the decision it was made under, when the scan read it (an
    /// earlier file or range may hold it).
    #[serde(skip)]
    pub exchange: Option<Rc<Exchange>>,
}

/// The `subjects` of a disclosure record: `[subject, consent id or null]` pairs.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SubjectsView<'a> {
    #[serde(borrow)]
    Pairs(Vec<(Text<'a>, Option<Text<'a>>)>),
    /// Another shape (a later version): read as no subject.
    Other(serde::de::IgnoredAny),
}

/// `records` is a count in a disclosure record and an object of counts in the outcome record
/// of a bulk exchange.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RecordsView {
    /// Records the disclosure's batch carried out.
    Batch(u64),
    Counts(RecordCountsView),
    /// Another shape (a later version): read as absent.
    Other(serde::de::IgnoredAny),
}

/// What a bulk object's filter let through, as its exchange's outcome record counts it.
#[derive(Debug, Default, Deserialize)]
pub struct RecordCountsView {
    #[serde(default)]
    pub kept: u64,
    /// Bytes of the records kept, before any compression.
    #[serde(default)]
    pub kept_bytes: u64,
    /// Records dropped, by reason.
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
    /// Audit mode: records that left although they would have been dropped, by reason.
    #[serde(default)]
    pub would_drop: BTreeMap<String, u64>,
}

/// The decision a bulk exchange was forwarded under (reason `consent_filtered`), as its
/// disclosure records are read with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    pub ts: Option<String>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub enforced: Option<bool>,
    pub dataset: Option<String>,
    pub category: Option<String>,
    pub purpose: Option<String>,
    /// The recipient's id; `None` for a caller no recipient matched.
    pub recipient: Option<String>,
    pub relation: Option<String>,
    /// As [`View::destinations`] of the decision.
    pub destinations: Vec<String>,
    pub method: Option<String>,
    /// The object asked for: the export, feed or partition.
    pub path: Option<String>,
    pub policy: Option<String>,
    pub instance: Option<String>,
}

impl Exchange {
    fn of(v: &View<'_>) -> Exchange {
        let owned = |f: &Field<'_>| text(f).map(str::to_string);
        let request = v.request.as_ref();
        let recipient = v.recipient.as_ref();
        Exchange {
            ts: owned(&v.ts),
            decision: owned(&v.decision),
            reason: owned(&v.reason),
            enforced: v.enforced,
            dataset: owned(&v.dataset),
            category: owned(&v.category),
            purpose: owned(&v.purpose),
            recipient: recipient.and_then(|r| owned(&r.id)),
            relation: recipient.and_then(|r| owned(&r.relation)),
            destinations: v.destinations().map(str::to_string).collect(),
            method: request.and_then(|r| owned(&r.method)),
            path: request.and_then(|r| owned(&r.path)),
            policy: owned(&v.policy),
            instance: owned(&v.instance),
        }
    }
}

/// The `expected` head of a recovery record.
#[derive(Debug, Default, Deserialize)]
pub struct ExpectedView {
    #[serde(default)]
    pub seq: Option<u64>,
}

fn text<'v>(f: &'v Field<'_>) -> Option<&'v str> {
    f.as_ref().map(|t| &*t.0)
}

impl View<'_> {
    pub fn kind(&self) -> Option<&str> {
        text(&self.kind)
    }

    pub fn id(&self) -> Option<&str> {
        text(&self.id)
    }

    pub fn ts(&self) -> Option<&str> {
        text(&self.ts)
    }

    pub fn subject(&self) -> Option<&str> {
        text(&self.subject)
    }

    /// The subjects the record is about: a decision's subject, or those a disclosure names.
    pub fn subjects(&self) -> impl Iterator<Item = &str> {
        let named = match &self.subjects {
            Some(SubjectsView::Pairs(p)) => p.as_slice(),
            _ => &[],
        };
        self.subject()
            .into_iter()
            .chain(named.iter().map(|(s, _)| &*s.0))
    }

    /// A disclosure's `[subject, consent]` pairs (empty for other records).
    pub fn named(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        let named = match &self.subjects {
            Some(SubjectsView::Pairs(p)) => p.as_slice(),
            _ => &[],
        };
        named.iter().map(|(s, c)| (&*s.0, c.as_deref()))
    }

    /// The counts of a bulk exchange's outcome record.
    pub fn record_counts(&self) -> Option<&RecordCountsView> {
        match &self.records {
            Some(RecordsView::Counts(c)) => Some(c),
            _ => None,
        }
    }

    /// The records a disclosure's batch carried out.
    pub fn batch_records(&self) -> Option<u64> {
        match &self.records {
            Some(RecordsView::Batch(n)) => Some(*n),
            _ => None,
        }
    }

    /// The record's own `decision`, or for a disclosure its exchange's.
    pub fn decision(&self) -> Option<&str> {
        text(&self.decision).or_else(|| self.exchange.as_ref()?.decision.as_deref())
    }

    /// The record's own `reason`, or for a disclosure its exchange's.
    pub fn reason(&self) -> Option<&str> {
        text(&self.reason).or_else(|| self.exchange.as_ref()?.reason.as_deref())
    }

    /// The record's own `dataset`, or for a disclosure its exchange's.
    pub fn dataset(&self) -> Option<&str> {
        text(&self.dataset).or_else(|| self.exchange.as_ref()?.dataset.as_deref())
    }

    /// The record's own `enforced`, or for a disclosure its exchange's.
    pub fn enforced(&self) -> Option<bool> {
        self.enforced
            .or_else(|| self.exchange.as_ref().and_then(|e| e.enforced))
    }

    /// Who received what the record is about: a decision's recipient (`anonymous` for a
    /// caller no recipient matched), a disclosure's exchange's; `None` for other records, and
    /// for a disclosure whose decision the scan did not read.
    pub fn receiver(&self) -> Option<&str> {
        match (self.kind(), &self.exchange) {
            (Some("decision"), _) => Some(self.recipient()),
            (Some("disclosure"), Some(e)) => Some(e.recipient.as_deref().unwrap_or("anonymous")),
            _ => None,
        }
    }

    /// The recipient's id, or `anonymous` for a caller no recipient matched.
    pub fn recipient(&self) -> &str {
        self.recipient
            .as_ref()
            .and_then(|r| text(&r.id))
            .unwrap_or("anonymous")
    }

    /// The countries the response goes to (SPEC section 3, step 5): the recipient's declared
    /// seat and the client's located country, without repeats.
    pub fn destinations(&self) -> impl Iterator<Item = &str> {
        let declared = self.recipient.as_ref().and_then(|r| text(&r.country));
        let located = self.client.as_ref().and_then(|c| text(&c.country));
        let second = located.filter(|l| Some(*l) != declared);
        // A disclosure has neither: it goes where its exchange went.
        let inherited = self
            .exchange
            .as_deref()
            .into_iter()
            .flat_map(|e| e.destinations.iter().map(String::as_str));
        declared.into_iter().chain(second).chain(inherited)
    }

    /// A denial that audit mode only logged: the request was forwarded.
    pub fn would_have_been_blocked(&self) -> bool {
        text(&self.decision) == Some("deny") && self.enforced == Some(false)
    }
}

/// Which records to print; every list is "any of", and all given lists must match. A
/// disclosure record matches on its exchange's decision, recipient, dataset and
/// destinations, and on the subjects it names.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Record kinds (`decision`, `outcome`, `disclosure`, `checkpoint`, `recovery`); empty:
    /// decision records (and, with `subjects`, the disclosures naming them), or every kind
    /// when `ids` is given.
    pub kinds: Vec<String>,
    pub decisions: Vec<String>,
    pub reasons: Vec<String>,
    pub datasets: Vec<String>,
    /// Recipient ids; `anonymous` matches callers no recipient matched.
    pub recipients: Vec<String>,
    /// Destination countries (see [`View::destinations`]).
    pub countries: Vec<String>,
    /// Subjects as the log holds them (pseudonyms).
    pub subjects: Vec<String>,
    pub ids: Vec<String>,
    /// W3C trace ids (32 lowercase hex digits): the decisions of requests that carried them.
    pub traces: Vec<String>,
    pub enforced: Option<bool>,
    /// Inclusive, in the log's `ts` form ([`parse_time`]).
    pub since: Option<String>,
    /// Exclusive, in the log's `ts` form.
    pub until: Option<String>,
    /// Also the outcome records of bulk exchanges (those that count records), whatever
    /// `kinds` says: what `audit report` counts besides decisions.
    pub bulk_outcomes: bool,
    /// Read each disclosure with its export's decision ([`View::exchange`]), for a table or a
    /// subject's report. A filter on the decision's fields reads them anyway; without either,
    /// the scan does not look for the decisions of bulk exports among the lines it skips.
    pub with_exchanges: bool,
}

fn any_of(list: &[String], value: Option<&str>) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|x| x == v))
}

impl Filter {
    pub fn matches(&self, v: &View<'_>) -> bool {
        let kind = v.kind();
        let kind_ok = if self.kinds.is_empty() {
            !self.ids.is_empty()
                || kind == Some("decision")
                || (kind == Some("disclosure") && !self.subjects.is_empty())
        } else {
            self.kinds
                .iter()
                .any(|k| k == "any" || Some(k.as_str()) == kind)
        };
        let bulk_outcome =
            self.bulk_outcomes && kind == Some("outcome") && v.record_counts().is_some();
        let ts = text(&v.ts);
        (kind_ok || bulk_outcome)
            && any_of(&self.ids, text(&v.id))
            && any_of(
                &self.traces,
                v.trace.as_ref().and_then(|t| text(&t.trace_id)),
            )
            && any_of(&self.decisions, v.decision())
            && any_of(&self.reasons, v.reason())
            && any_of(&self.datasets, v.dataset())
            && (self.subjects.is_empty()
                || v.subjects().any(|s| self.subjects.iter().any(|x| x == s)))
            && (self.recipients.is_empty() || any_of(&self.recipients, v.receiver()))
            && (self.countries.is_empty()
                || v.destinations()
                    .any(|c| self.countries.iter().any(|x| x == c)))
            && self.enforced.is_none_or(|e| v.enforced() == Some(e))
            && self
                .since
                .as_deref()
                .is_none_or(|s| ts.is_some_and(|t| t >= s))
            && self
                .until
                .as_deref()
                .is_none_or(|u| ts.is_some_and(|t| t < u))
    }

    /// Whether the scan must read disclosures with their exchange's decision.
    fn needs_exchanges(&self) -> bool {
        let inherited = !(self.decisions.is_empty()
            && self.reasons.is_empty()
            && self.datasets.is_empty()
            && self.recipients.is_empty()
            && self.countries.is_empty()
            && self.enforced.is_none());
        self.admits_disclosures() && (self.with_exchanges || inherited)
    }

    /// Whether a disclosure record can match.
    fn admits_disclosures(&self) -> bool {
        if self.kinds.is_empty() {
            !self.ids.is_empty() || !self.subjects.is_empty()
        } else {
            self.kinds.iter().any(|k| k == "any" || k == "disclosure")
        }
    }
}

/// Reads a time bound: RFC 3339 (`2026-11-28T04:00:00Z`, any offset), a date-time without
/// offset or a date (`2026-11-28`, midnight), both UTC, or a duration back from `now` (`90s`, `30m`, `24h`, `7d`). Returns it in
/// the log's `ts` form.
pub fn parse_time(s: &str, now: jiff::Timestamp) -> Result<String, String> {
    let s = s.trim();
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(timestamp(t));
    }
    // A date-time without an offset, or a date (midnight), is read as UTC.
    let civil = s.parse::<jiff::civil::DateTime>().ok().or_else(|| {
        s.parse::<jiff::civil::Date>()
            .ok()
            .map(|d| d.at(0, 0, 0, 0))
    });
    if let Some(t) = civil.and_then(|dt| format!("{dt}Z").parse::<jiff::Timestamp>().ok()) {
        return Ok(timestamp(t));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let secs = match (n.parse::<i64>(), unit) {
        (Ok(n), "s") => Some(n),
        (Ok(n), "m") => n.checked_mul(60),
        (Ok(n), "h") => n.checked_mul(3600),
        (Ok(n), "d") => n.checked_mul(86_400),
        _ => None,
    };
    secs.and_then(|secs| now.checked_sub(jiff::SignedDuration::from_secs(secs)).ok())
        .map(timestamp)
        .ok_or_else(|| {
            format!(
                "\"{s}\" is not a time: write 2026-11-28T04:00:00Z, 2026-11-28, or a duration back from now such as 24h or 7d"
            )
        })
}

/// A necessary condition checked on the raw line before it is parsed: for each filter
/// with values, the line holds one of them as a JSON string. Whatever the white space or
/// field order, a record that matches the filter passes; most records that do not never
/// reach the JSON parser, which is what makes a selective query cheap.
struct Prefilter {
    /// All groups must match; within a group, any needle.
    groups: Vec<Vec<memchr::memmem::Finder<'static>>>,
}

impl Prefilter {
    fn new(f: &Filter) -> Prefilter {
        let mut kinds: Vec<String> = match (f.kinds.is_empty(), f.ids.is_empty()) {
            (true, true) if f.subjects.is_empty() => vec!["decision".into()],
            (true, true) => vec!["decision".into(), "disclosure".into()],
            (true, false) => Vec::new(),
            (false, _) if f.kinds.iter().any(|k| k == "any") => Vec::new(),
            (false, _) => f.kinds.clone(),
        };
        if f.bulk_outcomes && !kinds.is_empty() {
            // Only the outcome of a bulk exchange counts records.
            kinds.push("kept_bytes".into());
        }
        // `anonymous` matches a null recipient id, which no needle can find.
        let recipients: &[String] = if f.recipients.iter().any(|r| r == "anonymous") {
            &[]
        } else {
            &f.recipients
        };
        // A disclosure holds none of these: its exchange's decision does, read apart.
        let inherited = |l: &[String]| {
            let mut l = l.to_vec();
            if !l.is_empty() && f.admits_disclosures() {
                l.push("disclosure".into());
            }
            l
        };
        let lists: [Vec<String>; 9] = [
            kinds,
            f.ids.clone(),
            f.traces.clone(),
            inherited(&f.decisions),
            inherited(&f.reasons),
            inherited(&f.datasets),
            f.subjects.clone(),
            inherited(recipients),
            inherited(&f.countries),
        ];
        let groups = lists
            .into_iter()
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.iter()
                    .map(|v| {
                        let needle = serde_json::to_vec(v).expect("strings serialise");
                        memchr::memmem::Finder::new(&needle).into_owned()
                    })
                    .collect()
            })
            .collect();
        Prefilter { groups }
    }

    fn admits(&self, line: &[u8]) -> bool {
        self.groups
            .iter()
            .all(|g| g.iter().any(|f| f.find(line).is_some()))
    }
}

/// The decisions of the bulk exchanges still open at the point of the scan, by id, so that
/// their disclosure records are read with them. A decision enters when read, and leaves
/// with its exchange's outcome record; memory holds the exchanges in flight, not the log's.
struct Exchanges {
    open: HashMap<String, Rc<Exchange>>,
    /// A line that may be a bulk exchange's decision.
    filtered: memchr::memmem::Finder<'static>,
    /// A line that may be a bulk exchange's outcome.
    counted: memchr::memmem::Finder<'static>,
}

impl Exchanges {
    fn new() -> Exchanges {
        Exchanges {
            open: HashMap::new(),
            filtered: memchr::memmem::Finder::new(br#""consent_filtered""#).into_owned(),
            counted: memchr::memmem::Finder::new(br#""kept_bytes""#).into_owned(),
        }
    }

    /// Takes note of a record that was read.
    fn learn(&mut self, v: &View<'_>) {
        let Some(id) = v.id() else { return };
        match v.kind() {
            Some("decision") if text(&v.reason) == Some("consent_filtered") => {
                self.open.insert(id.to_string(), Rc::new(Exchange::of(v)));
            }
            Some("outcome") if !self.open.is_empty() => {
                self.open.remove(id);
            }
            _ => {}
        }
    }

    /// Takes note of a line the filter passed over, if it opens or closes a bulk exchange.
    fn glimpse(&mut self, line: &[u8]) {
        let opens = self.filtered.find(line).is_some();
        let closes = !opens && !self.open.is_empty() && self.counted.find(line).is_some();
        if (opens || closes)
            && let Ok(v) = serde_json::from_slice::<View<'_>>(line)
        {
            self.learn(&v);
        }
    }

    /// A disclosure's exchange, if its decision was read.
    fn of(&self, v: &View<'_>) -> Option<Rc<Exchange>> {
        match v.kind() {
            Some("disclosure") => self.open.get(v.id()?).cloned(),
            _ => None,
        }
    }
}

/// Why a log could not be read through.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Files(#[from] LogFilesError),
    #[error("cannot write the output: {0}")]
    Output(io::Error),
}

/// What a scan read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scanned {
    pub files: usize,
    /// Complete lines read.
    pub records: u64,
    pub matched: u64,
    /// Lines read in full that are not records (not JSON, or fields of the wrong type); the
    /// first is in `first_bad`. `audit verify` says more.
    pub bad: u64,
    pub first_bad: Option<(PathBuf, usize, String)>,
    /// A last line without its `\n` (the log is being written): skipped.
    pub incomplete: u64,
}

/// Calls `each` with every record of the log at `path` that `filter` matches, with its raw
/// line (without `\n`), in chain order (several workers' chains merged by time); stops early
/// when `each` says so.
pub fn scan(
    path: &Path,
    filter: &Filter,
    each: impl FnMut(&[u8], &View<'_>) -> io::Result<ControlFlow<()>>,
) -> Result<Scanned, QueryError> {
    scan_segments(Segments::local(path)?, filter, each)
}

/// [`scan`] over the files of `segments` (a local log, or shipped files in object storage).
///
/// Several chains (a sidecar's workers) are read side by side and merged by time: each
/// chain in its own order, and of the chains' next matching records the one with the
/// earliest `ts` first (equal times: the first chain, worker 0 before worker 1). Memory holds
/// one pending record per chain, so it stays flat as for one chain. Within a chain, records
/// are in chain order, which is nearly but not strictly time order (a decision is stamped
/// when its request arrived, and written once decided).
pub fn scan_segments(
    segments: Segments,
    filter: &Filter,
    mut each: impl FnMut(&[u8], &View<'_>) -> io::Result<ControlFlow<()>>,
) -> Result<Scanned, QueryError> {
    let mut out = Scanned {
        files: segments.count,
        ..Scanned::default()
    };
    let pre = Prefilter::new(filter);
    let merge = segments.chains.len() > 1;
    let mut chains: Vec<ChainScan> = segments
        .chains
        .into_iter()
        .map(|files| ChainScan {
            files,
            reader: None,
            exchanges: filter.needs_exchanges().then(Exchanges::new),
            last_ts: merge.then(String::new),
        })
        .collect();
    if chains.len() <= 1 {
        let Some(chain) = chains.first_mut() else {
            return Ok(out);
        };
        // One chain: each record is handed over straight from the line it was read from.
        while let Some(r) = chain.next_match(&pre, filter, &mut out, |l, v, _| each(l, v))? {
            if r.map_err(QueryError::Output)?.is_break() {
                break;
            }
        }
        return Ok(out);
    }
    // Several chains: each chain's next match waits, copied, until it is the earliest.
    let mut next: Vec<Option<Pending>> = Vec::with_capacity(chains.len());
    for chain in &mut chains {
        next.push(chain.next_match(&pre, filter, &mut out, Pending::of)?);
    }
    loop {
        let earliest = next
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
            .min_by(|(i, a), (j, b)| a.ts.cmp(&b.ts).then(i.cmp(j)));
        let Some((i, _)) = earliest else { break };
        let p = next[i].take().expect("the earliest is pending");
        let mut view: View<'_> =
            serde_json::from_slice(&p.line).expect("a pending record parsed when it was read");
        view.exchange = p.exchange;
        if each(&p.line, &view).map_err(QueryError::Output)?.is_break() {
            break;
        }
        next[i] = chains[i].next_match(&pre, filter, &mut out, Pending::of)?;
    }
    Ok(out)
}

/// One chain's files as a scan reads them.
struct ChainScan {
    files: SegmentIter,
    reader: Option<(PathBuf, LineReader)>,
    /// The chain's bulk exchanges in flight (a disclosure's decision is in its own chain).
    exchanges: Option<Exchanges>,
    /// `ts` of the last matching record, when chains are merged: the time of one that has
    /// none.
    last_ts: Option<String>,
}

/// A chain's next match, waiting for its turn in the merge.
struct Pending {
    line: Vec<u8>,
    ts: String,
    exchange: Option<Rc<Exchange>>,
}

impl Pending {
    fn of(line: &[u8], view: &View<'_>, last_ts: &str) -> Pending {
        Pending {
            line: line.to_vec(),
            ts: view.ts().unwrap_or(last_ts).to_string(),
            exchange: view.exchange.clone(),
        }
    }
}

impl ChainScan {
    /// Reads on to the chain's next record that `filter` matches and hands it to `found`, with
    /// the time of the chain's last match (for a record without one); `None` at the chain's
    /// end. Every line read is counted in `out`.
    fn next_match<R>(
        &mut self,
        pre: &Prefilter,
        filter: &Filter,
        out: &mut Scanned,
        found: impl FnOnce(&[u8], &View<'_>, &str) -> R,
    ) -> Result<Option<R>, QueryError> {
        loop {
            let (file, reader) = match &mut self.reader {
                Some((file, reader)) => (file, reader),
                None => match self.files.next() {
                    None => return Ok(None),
                    Some(opened) => {
                        let (file, reader) = self.reader.insert(opened?);
                        (file, reader)
                    }
                },
            };
            let Some(line) = reader.next_line().map_err(unreadable(file))? else {
                self.reader = None;
                continue;
            };
            if line.oversized {
                out.bad += 1;
                if out.first_bad.is_none() {
                    out.first_bad = Some((file.clone(), line.number, oversized_why()));
                }
                continue;
            }
            if !line.complete {
                out.incomplete += 1;
                continue;
            }
            out.records += 1;
            if !pre.admits(line.bytes) {
                if let Some(x) = &mut self.exchanges {
                    x.glimpse(line.bytes);
                }
                continue;
            }
            let mut view: View<'_> = match serde_json::from_slice(line.bytes) {
                Ok(v) => v,
                Err(e) => {
                    out.bad += 1;
                    if out.first_bad.is_none() {
                        out.first_bad = Some((file.clone(), line.number, e.to_string()));
                    }
                    continue;
                }
            };
            if let Some(x) = &mut self.exchanges {
                view.exchange = x.of(&view);
                x.learn(&view);
            }
            if filter.matches(&view) {
                out.matched += 1;
                let last_ts = self.last_ts.as_deref().unwrap_or_default();
                let got = found(line.bytes, &view, last_ts);
                if let (Some(last), Some(ts)) = (&mut self.last_ts, view.ts()) {
                    last.clear();
                    last.push_str(ts);
                }
                return Ok(Some(got));
            }
        }
    }
}

/// How `audit query` prints records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The records as the log holds them, one per line.
    Json,
    /// One aligned line per record, for reading.
    Table,
}

/// Prints the records `filter` matches to `out`, at most `limit`. For a table, whose summary
/// line says how many matched, the scan goes on past `limit` to count them all; JSON output
/// stops there, and the counts are those of the records read up to it.
pub fn query(
    path: &Path,
    filter: &Filter,
    format: Format,
    limit: Option<u64>,
    out: &mut impl Write,
) -> Result<Scanned, QueryError> {
    query_segments(Segments::local(path)?, filter, format, limit, out)
}

/// [`query`] over the files of `segments`.
pub fn query_segments(
    segments: Segments,
    filter: &Filter,
    format: Format,
    limit: Option<u64>,
    out: &mut impl Write,
) -> Result<Scanned, QueryError> {
    // Each chain numbers its own records: merged, a row says whose its `seq` is.
    let chains = segments.chains.len() > 1;
    if format == Format::Table {
        writeln!(out, "{}", table_header(chains)).map_err(QueryError::Output)?;
    }
    let mut printed = 0u64;
    let mut row = String::new();
    let count_all = format == Format::Table;
    scan_segments(segments, filter, |line, view| {
        if limit.is_some_and(|l| printed >= l) {
            return Ok(if count_all {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            });
        }
        printed += 1;
        match format {
            Format::Json => {
                out.write_all(line)?;
                out.write_all(b"\n")?;
            }
            Format::Table => {
                row.clear();
                table_row(view, chains, &mut row);
                writeln!(out, "{row}")?;
            }
        }
        Ok(ControlFlow::Continue(()))
    })
}

const COLUMNS: [(&str, usize); 9] = [
    ("TIME (UTC)", 27),
    ("SEQ", 8),
    ("DECISION", 14),
    ("STATUS", 6),
    ("REASON", 24),
    ("DATASET", 14),
    ("RECIPIENT", 20),
    ("DEST", 5),
    ("SUBJECT", 14),
];

/// After `SEQ` when several chains are merged: the record's chain (`instance`).
const INSTANCE_COLUMN: (&str, usize) = ("INSTANCE", 16);

fn table_header(chains: bool) -> String {
    let mut s = String::new();
    for (i, (name, width)) in COLUMNS.into_iter().enumerate() {
        push_cell(&mut s, name, width);
        if chains && i == 1 {
            push_cell(&mut s, INSTANCE_COLUMN.0, INSTANCE_COLUMN.1);
        }
    }
    s.push_str("REQUEST");
    s
}

/// Left-aligned in `width` columns, cut with `…` when longer, then a space.
fn push_cell(s: &mut String, value: &str, width: usize) {
    let n = value.chars().count();
    if n > width {
        s.extend(value.chars().take(width - 1));
        s.push('…');
    } else {
        s.push_str(value);
        s.extend(std::iter::repeat_n(' ', width - n));
    }
    s.push(' ');
}

/// One record's row; `chains`: with its instance after its `seq`.
fn table_row(v: &View<'_>, chains: bool, s: &mut String) {
    let seq = v.seq.map(|n| n.to_string()).unwrap_or_default();
    let kind = v.kind().unwrap_or("?");
    let decision = match (kind, text(&v.decision)) {
        ("decision", Some(d)) if v.enforced == Some(false) => format!("{d} (audit)"),
        ("decision", Some(d)) => d.to_string(),
        (k, _) => k.to_string(),
    };
    let status = v
        .status
        .map(|n| n.to_string())
        .unwrap_or_else(|| "-".into());
    let dest: Vec<&str> = v.destinations().collect();
    let named: Vec<&str> = v.named().map(|(s, _)| s).collect();
    let subject = match (text(&v.subject), named.as_slice()) {
        (Some(s), _) => s.to_string(),
        (None, []) => "-".into(),
        (None, [one]) => one.to_string(),
        (None, many) => format!("{} subjects", many.len()),
    };
    let cells = [
        text(&v.ts).unwrap_or(""),
        &seq,
        &decision,
        &status,
        v.reason().unwrap_or("-"),
        v.dataset().unwrap_or("-"),
        v.receiver().unwrap_or("-"),
        &if dest.is_empty() {
            "-".into()
        } else {
            dest.join(",")
        },
        &subject,
    ];
    for (i, ((_, width), value)) in COLUMNS.iter().zip(cells).enumerate() {
        push_cell(s, value, *width);
        if chains && i == 1 {
            push_cell(s, text(&v.instance).unwrap_or("-"), INSTANCE_COLUMN.1);
        }
    }
    request_cell(v, named.len(), s);
    // Cells are padded; the row is not.
    s.truncate(s.trim_end().len());
}

/// The last column: the request, or what a record of another kind says.
fn request_cell(v: &View<'_>, named: usize, s: &mut String) {
    let kind = v.kind().unwrap_or("?");
    match &v.request {
        Some(r) => {
            s.push_str(text(&r.method).unwrap_or(""));
            s.push(' ');
            s.push_str(text(&r.path).unwrap_or(""));
        }
        None if kind == "outcome" => {
            s.push_str(&format!(
                "{} bytes out (id {})",
                v.bytes_out.unwrap_or(0),
                text(&v.id).unwrap_or("")
            ));
            if let Some(c) = v.record_counts() {
                s.push_str(&format!(
                    ", records: {} kept, {} dropped",
                    c.kept,
                    c.dropped.values().sum::<u64>()
                ));
                let would: u64 = c.would_drop.values().sum();
                if would > 0 {
                    s.push_str(&format!(", {would} would have been (audit mode)"));
                }
            }
        }
        None if kind == "disclosure" => {
            s.push_str(&format!(
                "batch {} of {}{}: {} records left, {} subjects named",
                v.batch.unwrap_or(0),
                text(&v.id).unwrap_or(""),
                if v.enforced() == Some(false) {
                    " (audit mode)"
                } else {
                    ""
                },
                v.batch_records().unwrap_or(0),
                named
            ));
            if let Some(e) = &v.exchange
                && let Some(path) = &e.path
            {
                let method = e.method.as_deref().unwrap_or("");
                s.push_str(&format!(" ({method} {path})"));
            }
        }
        None if kind == "checkpoint" => {
            s.push_str(if v.final_ == Some(true) {
                "final, "
            } else {
                ""
            });
            match text(&v.key) {
                Some(k) => s.push_str(&format!("signed by {k}")),
                None => s.push_str("unsigned"),
            }
        }
        None if kind == "recovery" => {
            let (file, last) = (text(&v.file).unwrap_or("?"), v.last_seq.unwrap_or(0));
            let torn = v.torn_bytes.unwrap_or(0);
            s.push_str(&match v.expected.as_ref().and_then(|e| e.seq) {
                None => {
                    format!("restart after a crash: {file} ended at seq {last}, {torn} torn bytes cut")
                }
                Some(e) => format!(
                    "file changed while running: {file} ended at seq {last}, the writer expected {e}, {torn} torn bytes cut"
                ),
            });
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECISION: &str = r#"{"category":"user.financial","client":{"country":"US","identity":null,"ip":"127.0.0.20","source":"override","via":null},"consent":{"id":"c-1","result":"consent_method_invalid"},"dataset":"payments","decision":"deny","enforced":true,"geo_db":null,"id":"01A","kind":"decision","policy":"sha256:00","prev":"00","purpose":"credit_scoring","reason":"consent_method_invalid","recipient":{"country":"US","id":"credit-bureau-us","relation":"third_party"},"request":{"headers":{},"host":"h","method":"GET","path":"/payments/hmac:ab/x \"q\".json","query":null},"rule":"datasets.payments.cross_border","seq":5,"status":451,"subject":"hmac:ab","ts":"2026-11-28T05:59:42.981302Z","upstream":null,"v":1,"hash":"11"}"#;

    fn view(line: &str) -> View<'_> {
        serde_json::from_str(line).unwrap()
    }

    /// Found by review: a line without a newline was read whole, however long; it is now
    /// skipped as not a record, and the records after it are still found.
    #[test]
    fn regression_an_endless_line_is_skipped_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let mut bytes = format!("{DECISION}\n").into_bytes();
        bytes.resize(bytes.len() + crate::audit::files::MAX_LINE + 1, 0);
        bytes.push(b'\n');
        bytes.extend_from_slice(format!("{DECISION}\n").as_bytes());
        std::fs::write(&path, bytes).unwrap();
        let mut found = 0;
        let scanned = scan(&path, &Filter::default(), |_, _| {
            found += 1;
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!((found, scanned.bad, scanned.incomplete), (2, 1, 0));
        let (file, line, why) = scanned.first_bad.unwrap();
        assert_eq!((file, line), (path, 2));
        assert!(why.contains("longer than 16 MiB"), "{why}");
    }

    #[test]
    fn fields_borrow_from_the_line_unless_escaped() {
        let v = view(DECISION);
        assert!(matches!(v.reason.as_ref().unwrap().0, Cow::Borrowed(_)));
        let path = &v.request.as_ref().unwrap().path.as_ref().unwrap().0;
        assert!(matches!(path, Cow::Owned(_)));
        assert_eq!(&**path, "/payments/hmac:ab/x \"q\".json");
    }

    #[test]
    fn filters_are_all_of_their_any_of_lists() {
        let v = view(DECISION);
        let f = |tweak: fn(&mut Filter)| {
            let mut f = Filter::default();
            tweak(&mut f);
            f.matches(&v)
        };
        assert!(f(|_| {}));
        assert!(f(|f| f.decisions = vec!["allow".into(), "deny".into()]));
        assert!(!f(|f| f.decisions = vec!["allow".into()]));
        assert!(f(|f| f.countries = vec!["US".into()]));
        assert!(!f(|f| f.countries = vec!["CN".into()]));
        assert!(f(|f| f.recipients = vec!["credit-bureau-us".into()]));
        assert!(!f(|f| f.recipients = vec!["anonymous".into()]));
        assert!(f(|f| f.subjects = vec!["hmac:ab".into()]));
        assert!(f(|f| f.since = Some("2026-11-28T05:59:42.981302Z".into())));
        assert!(!f(|f| f.until = Some("2026-11-28T05:59:42.981302Z".into())));
        assert!(!f(|f| f.enforced = Some(false)));
        assert!(!f(|f| f.kinds = vec!["outcome".into()]));
        assert!(f(|f| f.kinds = vec!["any".into()]));
        assert!(!f(|f| {
            f.decisions = vec!["deny".into()];
            f.datasets = vec!["other".into()];
        }));
    }

    #[test]
    fn a_trace_finds_the_decisions_that_carried_it() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let traced = DECISION.replace(
            r#""subject":"hmac:ab","#,
            &format!(r#""subject":"hmac:ab","trace":{{"span_id":"00f067aa0ba902b7","trace_id":"{trace}"}},"#),
        );
        let of = |t: &str| Filter {
            traces: vec![t.to_string()],
            ..Filter::default()
        };
        assert!(of(trace).matches(&view(&traced)));
        assert!(Prefilter::new(&of(trace)).admits(traced.as_bytes()));
        // Another trace, the caller's span id, or a record without a trace: no match.
        for (filter, line) in [
            (of("0af7651916cd43dd8448eb211c80319c"), traced.as_str()),
            (of("00f067aa0ba902b7"), traced.as_str()),
            (of(trace), DECISION),
        ] {
            assert!(!filter.matches(&view(line)), "{filter:?}");
        }
        assert!(!Prefilter::new(&of(trace)).admits(DECISION.as_bytes()));
    }

    #[test]
    fn the_prefilter_never_drops_a_match() {
        let filters = [
            Filter::default(),
            Filter {
                reasons: vec!["consent_method_invalid".into()],
                countries: vec!["US".into(), "DE".into()],
                ..Filter::default()
            },
            Filter {
                recipients: vec!["anonymous".into(), "credit-bureau-us".into()],
                ids: vec!["01A".into()],
                ..Filter::default()
            },
            Filter {
                kinds: vec!["any".into()],
                subjects: vec!["hmac:ab".into()],
                ..Filter::default()
            },
        ];
        // The same record with white space between its tokens still passes.
        let spaced = DECISION.replace("\":", "\" : ").replace(",\"", ", \"");
        for f in &filters {
            for line in [DECISION, spaced.as_str()] {
                assert!(f.matches(&view(line)));
                assert!(Prefilter::new(f).admits(line.as_bytes()), "{f:?}");
            }
        }
        let other = Filter {
            reasons: vec!["domestic".into()],
            ..Filter::default()
        };
        assert!(!Prefilter::new(&other).admits(DECISION.as_bytes()));
        let outcome = br#"{"kind":"outcome","id":"01A","status":200}"#;
        assert!(!Prefilter::new(&Filter::default()).admits(outcome));
    }

    #[test]
    fn times_are_brought_into_the_log_form() {
        let now: jiff::Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        assert_eq!(
            parse_time("2026-11-28T06:00:00+01:00", now).unwrap(),
            "2026-11-28T05:00:00.000000Z"
        );
        assert_eq!(
            parse_time("2026-11-27", now).unwrap(),
            "2026-11-27T00:00:00.000000Z"
        );
        assert_eq!(
            parse_time("2026-11-27T08:30", now).unwrap(),
            "2026-11-27T08:30:00.000000Z"
        );
        assert_eq!(
            parse_time("36h", now).unwrap(),
            "2026-11-27T00:00:00.000000Z"
        );
        assert_eq!(
            parse_time("7d", now).unwrap(),
            "2026-11-21T12:00:00.000000Z"
        );
        let e = parse_time("yesterday", now).unwrap_err();
        assert!(e.contains("\"yesterday\" is not a time"), "{e}");
    }

    #[test]
    fn a_table_row_says_what_was_decided_for_whom() {
        let mut row = String::new();
        table_row(&view(DECISION), false, &mut row);
        assert!(
            row.starts_with("2026-11-28T05:59:42.981302Z 5        deny"),
            "{row}"
        );
        for part in [
            "451",
            "consent_method_invalid",
            "payments",
            "credit-bureau-us",
            "US",
            "hmac:ab",
        ] {
            assert!(row.contains(part), "{part} in {row}");
        }
        assert!(row.ends_with("GET /payments/hmac:ab/x \"q\".json"), "{row}");
    }

    /// The ids of the records of the bulk log (`testing::write_bulk_log`) that `filter`
    /// matches, as `kind:id`, with each table row.
    fn bulk_matches(filter: Filter) -> (Vec<String>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        block_on(crate::audit::testing::write_bulk_log(&path));
        let (mut found, mut rows) = (Vec::new(), Vec::new());
        scan(&path, &filter, |_, v| {
            found.push(format!(
                "{}:{}{}",
                v.kind().unwrap_or("?"),
                v.id().unwrap_or("?"),
                v.batch.map(|b| format!("#{b}")).unwrap_or_default()
            ));
            let mut row = String::new();
            table_row(v, false, &mut row);
            rows.push(row);
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        (found, rows)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_subject_is_found_in_the_disclosures_of_bulk_exports() {
        let subjects = |s: &[&str]| Filter {
            subjects: s.iter().map(|s| s.to_string()).collect(),
            ..Filter::default()
        };
        // u1: read on its own, and named by a batch of each export.
        assert_eq!(
            bulk_matches(subjects(&["u1"])).0,
            ["decision:p1", "disclosure:b1#1", "disclosure:a1#1"]
        );
        assert_eq!(bulk_matches(subjects(&["u3"])).0, ["disclosure:b1#2"]);
        assert_eq!(
            bulk_matches(subjects(&["u2", "u4"])).0,
            ["disclosure:b1#1", "disclosure:a1#1"]
        );
        assert!(bulk_matches(subjects(&["u9"])).0.is_empty());
        // A kind given is the kinds shown.
        let only = Filter {
            kinds: vec!["decision".into()],
            ..subjects(&["u1"])
        };
        assert_eq!(bulk_matches(only).0, ["decision:p1"]);
    }

    /// A disclosure matches on its export's decision: who received, why, what, where.
    #[test]
    fn a_disclosure_is_filtered_by_its_exports_decision() {
        let disclosures = |tweak: fn(&mut Filter)| {
            let mut f = Filter {
                kinds: vec!["disclosure".into()],
                ..Filter::default()
            };
            tweak(&mut f);
            bulk_matches(f).0
        };
        let all = ["disclosure:b1#1", "disclosure:a1#1", "disclosure:b1#2"];
        assert_eq!(disclosures(|_| {}), all);
        assert_eq!(
            disclosures(|f| f.recipients = vec!["credit-bureau-us".into()]),
            all
        );
        assert!(disclosures(|f| f.recipients = vec!["anonymous".into()]).is_empty());
        assert_eq!(disclosures(|f| f.decisions = vec!["allow".into()]), all);
        assert!(disclosures(|f| f.decisions = vec!["deny".into()]).is_empty());
        assert_eq!(
            disclosures(|f| f.reasons = vec!["consent_filtered".into()]),
            all
        );
        assert_eq!(disclosures(|f| f.datasets = vec!["exports".into()]), all);
        assert!(disclosures(|f| f.datasets = vec!["payments".into()]).is_empty());
        assert_eq!(disclosures(|f| f.countries = vec!["US".into()]), all);
        assert!(disclosures(|f| f.countries = vec!["DE".into()]).is_empty());
        // The export in audit mode.
        assert_eq!(
            disclosures(|f| f.enforced = Some(false)),
            ["disclosure:a1#1"]
        );
        assert_eq!(
            disclosures(|f| f.ids = vec!["b1".into()]),
            ["disclosure:b1#1", "disclosure:b1#2"]
        );
    }

    #[test]
    fn a_table_row_says_what_a_disclosure_named_and_what_an_export_kept() {
        let f = Filter {
            kinds: vec!["disclosure".into(), "outcome".into()],
            ids: vec!["b1".into(), "a1".into()],
            with_exchanges: true,
            ..Filter::default()
        };
        let (found, rows) = bulk_matches(f);
        assert_eq!(
            found,
            [
                "disclosure:b1#1",
                "disclosure:a1#1",
                "disclosure:b1#2",
                "outcome:b1",
                "outcome:a1"
            ]
        );
        let first = &rows[0];
        for part in [
            "disclosure ",
            "consent_filtered",
            "exports",
            "credit-bureau-us",
            " US ",
            "2 subjects",
            "batch 1 of b1: 3 records left, 2 subjects named (GET /exports/spending/2026-11.jsonl)",
        ] {
            assert!(first.contains(part), "{part:?} in {first}");
        }
        assert!(
            rows[1].contains("batch 1 of a1 (audit mode): 2 records left, 2 subjects named (GET"),
            "{}",
            rows[1]
        );
        // One subject named: the pseudonym itself.
        assert!(rows[2].contains(" u3 "), "{}", rows[2]);
        assert!(
            rows[3].ends_with("512 bytes out (id b1), records: 5 kept, 4 dropped"),
            "{}",
            rows[3]
        );
        assert!(
            rows[4].ends_with(
                "256 bytes out (id a1), records: 2 kept, 0 dropped, 1 would have been (audit mode)"
            ),
            "{}",
            rows[4]
        );
    }

    #[test]
    fn the_prefilter_never_drops_a_disclosure_that_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        block_on(crate::audit::testing::write_bulk_log(&path));
        let text = std::fs::read_to_string(&path).unwrap();
        let filters = [
            Filter {
                subjects: vec!["u2".into()],
                ..Filter::default()
            },
            Filter {
                kinds: vec!["disclosure".into()],
                decisions: vec!["allow".into()],
                reasons: vec!["consent_filtered".into()],
                datasets: vec!["exports".into()],
                recipients: vec!["credit-bureau-us".into()],
                countries: vec!["US".into()],
                ..Filter::default()
            },
            Filter {
                bulk_outcomes: true,
                ..Filter::default()
            },
        ];
        for f in &filters {
            let pre = Prefilter::new(f);
            let mut exchanges = Exchanges::new();
            for line in text.lines() {
                let mut v: View<'_> = serde_json::from_str(line).unwrap();
                v.exchange = exchanges.of(&v);
                exchanges.learn(&v);
                if f.matches(&v) {
                    assert!(pre.admits(line.as_bytes()), "{f:?} {line}");
                }
            }
        }
    }

    /// A folder of several workers' chains reads as one log, merged by time: by `ts`, then
    /// worker, then `seq`; a disclosure is still read with its export's decision, which is in
    /// its own chain; the counts are over every chain.
    #[test]
    fn a_folder_of_worker_chains_is_read_merged_by_time() {
        use crate::audit::testing::{policy, subject_decision, write_worker_chains};
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let at = |k: usize, times: &[i64]| -> Vec<crate::audit::Record> {
            times
                .iter()
                .enumerate()
                .map(|(n, &ts)| subject_decision(&p, &format!("w{k}-{n}"), ts, "u1"))
                .collect()
        };
        // Worker 1 is busier, worker 2 has its records late; ts 3 is in two chains.
        let chains = vec![at(0, &[0, 3, 6]), at(1, &[1, 3, 4, 40])];
        block_on(write_worker_chains(dir.path(), None, chains));
        // Worker 2 wrote the bulk exports (ts 0 to 31).
        let w2 = crate::audit::files::worker_path(&dir.path().join("decisions.jsonl"), 2);
        block_on(crate::audit::testing::write_bulk_log(&w2));

        let mut seen = Vec::new();
        let scanned = scan(dir.path(), &Filter::default(), |_, v| {
            seen.push(format!("{}@{}", v.id().unwrap(), &v.ts().unwrap()[17..19]));
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                "w0-0@00", "p1@00", "w1-0@01", "w0-1@03", "w1-1@03", "w1-2@04", "w0-2@06", "b1@10",
                "a1@20", "d1@30", "w1-3@40"
            ]
        );
        // 3 + 4 decisions and a final checkpoint each, 11 bulk records and theirs.
        assert_eq!(
            (scanned.files, scanned.records, scanned.matched),
            (3, 21, 11)
        );

        // A disclosure matches on its decision's dataset, read in its own chain.
        let exports = Filter {
            kinds: vec!["decision".into(), "disclosure".into()],
            datasets: vec!["exports".into()],
            ..Filter::default()
        };
        let mut found = Vec::new();
        scan(dir.path(), &exports, |_, v| {
            found.push(format!("{}:{}", v.kind().unwrap(), v.id().unwrap()));
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(
            found,
            [
                "decision:b1",
                "disclosure:b1",
                "decision:a1",
                "disclosure:a1",
                "disclosure:b1"
            ]
        );

        // JSON lines as the log holds them, with --limit, across chains.
        let mut out = Vec::new();
        query(
            dir.path(),
            &Filter::default(),
            Format::Json,
            Some(3),
            &mut out,
        )
        .unwrap();
        let ids: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
            .collect();
        assert_eq!(ids, [r#""w0-0""#, r#""p1""#, r#""w1-0""#]);

        // A table says whose `seq` each row's is.
        let mut out = Vec::new();
        query(
            dir.path(),
            &Filter::default(),
            Format::Table,
            Some(3),
            &mut out,
        )
        .unwrap();
        let table = String::from_utf8(out).unwrap();
        let rows: Vec<&str> = table.lines().collect();
        assert!(
            rows[0].starts_with("TIME (UTC)                  SEQ      INSTANCE         DECISION"),
            "{table}"
        );
        assert!(
            rows[3].contains(" 1        side-w1          allow "),
            "{table}"
        );
        assert_eq!(rows.len(), 4, "{table}");
    }
}
