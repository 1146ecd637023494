//! A data subject's disclosure report (`audit subject`, SPEC section 8.1; PIPL art. 45, GDPR
//! art. 15(1)(c)): every recipient that received the person's data through the proxy, with
//! purpose, destination, dataset, the consent that allowed it and the bytes delivered, and
//! every refused attempt with its reason.
//!
//! The log holds the subject pseudonymised; the report is built from the decision records
//! whose `subject` is the person's pseudonym, and the outcome records of the same exchanges.
//! Nothing else is read into it: another subject's records never match, and the request's
//! path, query and headers are left out (they may name more than this person).

use super::files::Segments;
use super::query::{Filter, QueryError, scan_segments};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;

/// One exchange in which the subject's data reached a recipient.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Disclosure {
    pub id: String,
    pub time: String,
    pub recipient: String,
    pub relation: String,
    /// Where the data went: the recipient's declared country and where the client was.
    pub destinations: Vec<String>,
    pub purpose: Option<String>,
    pub dataset: Option<String>,
    pub category: Option<String>,
    pub method: String,
    /// `consented`, `domestic`, `first_party`, …: why it was allowed.
    pub reason: String,
    pub consent_id: Option<String>,
    pub consent_method: Option<String>,
    /// Forwarded although the policy would have refused it (audit mode).
    pub audit_mode: bool,
    /// From the outcome record: what the client received.
    pub status: Option<u64>,
    pub bytes_delivered: Option<u64>,
    pub complete: Option<bool>,
    pub instance: Option<String>,
}

/// One attempt that was refused (or failed): nothing reached the recipient.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Refusal {
    pub id: String,
    pub time: String,
    pub recipient: String,
    pub relation: String,
    pub destinations: Vec<String>,
    pub purpose: Option<String>,
    pub dataset: Option<String>,
    pub method: String,
    pub decision: String,
    pub reason: String,
    pub status: Option<u64>,
    pub consent_id: Option<String>,
    pub instance: Option<String>,
}

/// The report, before it is printed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SubjectReport {
    /// The pseudonym the log holds for the subject (never the raw identifier).
    pub subject: String,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Times of the first and last record read (the log range covered).
    pub log_from: Option<String>,
    pub log_to: Option<String>,
    pub records_read: u64,
    /// Hashes of the policies in force over the subject's records.
    pub policies: BTreeSet<String>,
    /// By recipient.
    pub disclosures: BTreeMap<String, Vec<Disclosure>>,
    pub refusals: Vec<Refusal>,
}

fn text(v: &Value, path: &[&str]) -> Option<String> {
    let mut at = v;
    for k in path {
        at = at.get(k)?;
    }
    at.as_str().map(str::to_string)
}

fn destinations(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = [
        text(v, &["recipient", "country"]),
        text(v, &["client", "country"]),
    ]
    .into_iter()
    .flatten()
    .collect();
    out.dedup();
    out
}

fn recipient(v: &Value) -> (String, String) {
    (
        text(v, &["recipient", "id"]).unwrap_or_else(|| "an unidentified client".into()),
        text(v, &["recipient", "relation"]).unwrap_or_else(|| "anonymous".into()),
    )
}

/// Reads `segments` and gathers the records of the subject whose pseudonym is `subject`,
/// decided between `since` (inclusive) and `until` (exclusive).
pub fn build(
    segments: Segments,
    subject: &str,
    since: Option<String>,
    until: Option<String>,
) -> Result<SubjectReport, QueryError> {
    let mut report = SubjectReport {
        subject: subject.to_string(),
        since: since.clone(),
        until: until.clone(),
        ..SubjectReport::default()
    };
    // Disclosures waiting for their outcome record: id -> (recipient, index).
    let mut open: HashMap<String, (String, usize)> = HashMap::new();
    let filter = Filter {
        kinds: vec!["any".into()],
        ..Filter::default()
    };
    // The scan has read each line's common fields already: only the subject's decisions,
    // and the outcomes of their exchanges, are read whole.
    scan_segments(segments, &filter, |line, view| {
        report.records_read += 1;
        if let Some(ts) = view.ts() {
            report.log_from.get_or_insert_with(|| ts.to_string());
            match &mut report.log_to {
                Some(to) => {
                    to.clear();
                    to.push_str(ts);
                }
                None => report.log_to = Some(ts.to_string()),
            }
        }
        match view.kind() {
            Some("decision") if view.subject() == Some(subject) => {}
            Some("outcome") => {
                if let Some((who, i)) = view.id().and_then(|id| open.remove(id))
                    && let Some(d) = report.disclosures.get_mut(&who).and_then(|l| l.get_mut(i))
                    && let Ok(v) = serde_json::from_slice::<Value>(line)
                {
                    d.status = v.get("status").and_then(Value::as_u64);
                    d.bytes_delivered = v.get("bytes_out").and_then(Value::as_u64);
                    d.complete = v.get("complete").and_then(Value::as_bool);
                }
                return Ok(ControlFlow::Continue(()));
            }
            _ => return Ok(ControlFlow::Continue(())),
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return Ok(ControlFlow::Continue(()));
        };
        let ts = text(&v, &["ts"]);
        let ts = ts.unwrap_or_default();
        let in_range = since.as_deref().is_none_or(|s| ts.as_str() >= s)
            && until.as_deref().is_none_or(|u| ts.as_str() < u);
        if !in_range {
            return Ok(ControlFlow::Continue(()));
        }
        if let Some(hash) = text(&v, &["policy"]) {
            report.policies.insert(hash);
        }
        let (who, relation) = recipient(&v);
        let decision = text(&v, &["decision"]).unwrap_or_default();
        let enforced = v.get("enforced").and_then(Value::as_bool).unwrap_or(true);
        let id = text(&v, &["id"]).unwrap_or_default();
        let method = text(&v, &["request", "method"]).unwrap_or_default();
        let reason = text(&v, &["reason"]).unwrap_or_default();
        if decision == "allow" || (decision == "deny" && !enforced) {
            let list = report.disclosures.entry(who.clone()).or_default();
            open.insert(id.clone(), (who.clone(), list.len()));
            list.push(Disclosure {
                id,
                time: ts,
                recipient: who,
                relation,
                destinations: destinations(&v),
                purpose: text(&v, &["purpose"]),
                dataset: text(&v, &["dataset"]),
                category: text(&v, &["category"]),
                method,
                reason,
                consent_id: text(&v, &["consent", "id"]),
                consent_method: text(&v, &["consent", "method"]),
                audit_mode: decision == "deny",
                instance: text(&v, &["instance"]),
                ..Disclosure::default()
            });
        } else {
            report.refusals.push(Refusal {
                id,
                time: ts,
                recipient: who,
                relation,
                destinations: destinations(&v),
                purpose: text(&v, &["purpose"]),
                dataset: text(&v, &["dataset"]),
                method,
                decision,
                reason,
                status: v.get("status").and_then(Value::as_u64),
                consent_id: text(&v, &["consent", "id"]),
                instance: text(&v, &["instance"]),
            });
        }
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(report)
}

/// What a reason means, in words for the person reading the report.
pub fn explain(reason: &str) -> &'static str {
    match reason {
        "consented" => "allowed by your consent",
        "domestic" => "your data stayed inside the home jurisdiction",
        "cross_border_allowed" => "allowed abroad by the operator's policy, without consent",
        "not_egress" => "the request carried no data out",
        "unmatched_allowed" => "not a dataset the policy protects",
        "consent_missing" => "refused: you had not consented",
        "consent_expired" => "refused: your consent had expired",
        "consent_revoked" => "refused: you had withdrawn your consent",
        "consent_method_invalid" => {
            "refused: the consent was not given explicitly (for example a pre-ticked box)"
        }
        "consent_scope_mismatch" => {
            "refused: your consent did not cover this recipient, purpose, data or country"
        }
        "consent_store_unavailable" => "refused: consents could not be checked",
        "purpose_missing" => "refused: the request did not say what it was for",
        "cross_border_denied" => "refused: this data may not leave the home jurisdiction",
        "third_party_denied" => "refused: this data may not go to another company",
        "upstream_outside_jurisdiction" => {
            "refused: the storage was not inside the home jurisdiction"
        }
        "location_unknown" => "refused: where the request came from could not be told",
        "log_unavailable" => "refused: the decision could not be recorded",
        "upstream_unreachable" | "upstream_timeout" => "failed: the storage did not answer",
        _ => "refused before any data was read",
    }
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| "—".to_string(), esc)
}

fn bytes(n: Option<u64>) -> String {
    match n {
        None => "not recorded".into(),
        Some(n) if n < 1024 => format!("{n} bytes"),
        Some(n) if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
    }
}

/// The report as one printable, self-contained HTML page: no script, no external asset.
/// `verified` holds the lines saying how the log was checked; `policy` the policy's name,
/// when known.
pub fn html(r: &SubjectReport, verified: &[String], policy: Option<&str>, now: &str) -> String {
    use std::fmt::Write as _;
    let mut h = String::new();
    let disclosed: usize = r.disclosures.values().map(Vec::len).sum();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>Where your personal data went</title><style>{CSS}</style></head><body>\n\
<h1>Where your personal data went</h1>\n<p class=\"lead\">This report lists every time your \
personal data passed through the data-residency gateway (residency-proxy) to a recipient, and \
every attempt that was refused. It answers your right to know who received your data \
(PIPL article 45, GDPR article 15(1)(c)).</p>\n<table class=\"facts\">\
<tr><th>You are identified in the log as</th><td><code>{}</code></td></tr>\
<tr><th>Period covered</th><td>{} to {}</td></tr>\
<tr><th>Records of the log read</th><td>{} ({} to {})</td></tr>\
<tr><th>Policy</th><td>{}{}</td></tr>\
<tr><th>Report made</th><td>{}</td></tr></table>\n",
        esc(&r.subject),
        r.since
            .as_deref()
            .map_or("the start of the log".into(), esc),
        r.until.as_deref().map_or("the end of the log".into(), esc),
        r.records_read,
        opt(&r.log_from),
        opt(&r.log_to),
        policy.map_or(String::new(), |p| format!("{} ", esc(p))),
        if r.policies.is_empty() {
            "—".to_string()
        } else {
            r.policies
                .iter()
                .map(|p| format!("<code>{}</code>", esc(p)))
                .collect::<Vec<_>>()
                .join(", ")
        },
        esc(now),
    );
    let _ = writeln!(
        h,
        "<section class=\"verified\"><h2>The log was checked first</h2><p>Before this report \
was made, the whole decision log was verified: every record is linked to the one before it \
by a cryptographic hash, and signed checkpoints seal the chain, so a record removed, added or \
changed would have stopped this report.</p><ul>{}</ul></section>",
        verified
            .iter()
            .map(|l| format!("<li>{}</li>", esc(l)))
            .collect::<String>()
    );
    let _ = writeln!(
        h,
        "<h2>In short</h2><p class=\"summary\"><strong>{}</strong> recipient(s) received your data, \
in <strong>{disclosed}</strong> exchange(s). <strong>{}</strong> attempt(s) were refused or \
failed, and nothing reached the recipient in those.</p>",
        r.disclosures.len(),
        r.refusals.len()
    );
    for (who, list) in &r.disclosures {
        let first = &list[0];
        let _ = write!(
            h,
            "<section class=\"recipient\"><h2>{} <span class=\"rel\">({})</span></h2>\
<table><thead><tr><th>When (UTC)</th><th>For what purpose</th><th>Which data</th>\
<th>Where it went</th><th>Why it was allowed</th><th>Consent</th><th>Delivered</th></tr></thead><tbody>",
            esc(who),
            esc(&relation_words(&first.relation))
        );
        for d in list {
            let consent = match (&d.consent_id, &d.consent_method) {
                (Some(id), Some(m)) => format!("{} (given: {})", esc(id), esc(m)),
                (Some(id), None) => esc(id),
                _ => "—".into(),
            };
            let why = if d.audit_mode {
                format!(
                    "<strong>forwarded in audit mode</strong>, although the policy would have refused it: {}",
                    esc(explain(&d.reason).trim_start_matches("refused: "))
                )
            } else {
                esc(explain(&d.reason))
            };
            let delivered = match (d.status, d.bytes_delivered) {
                (Some(s), b) if s >= 400 => format!("nothing (status {s}, {})", bytes(b)),
                (_, b) => bytes(b),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}<br><small>{}</small></td><td>{}</td><td>{why}</td><td>{consent}</td><td>{delivered}</td></tr>",
                esc(&d.time),
                opt(&d.purpose),
                opt(&d.dataset),
                opt(&d.category),
                esc(&d.destinations.join(", ")),
            );
        }
        h.push_str("</tbody></table></section>\n");
    }
    h.push_str("<section><h2>Refused attempts</h2>");
    if r.refusals.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str(
            "<table><thead><tr><th>When (UTC)</th><th>Who asked</th><th>For what purpose</th>\
<th>Which data</th><th>Where it would have gone</th><th>Why it was refused</th></tr></thead><tbody>",
        );
        for f in &r.refusals {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{} <small>({})</small></td><td>{}</td><td>{}</td><td>{}</td><td>{} <small><code>{}</code></small></td></tr>",
                esc(&f.time),
                esc(&f.recipient),
                esc(&relation_words(&f.relation)),
                opt(&f.purpose),
                opt(&f.dataset),
                esc(&f.destinations.join(", ")),
                esc(explain(&f.reason)),
                esc(&f.reason)
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>\n");
    h.push_str(
        "<section class=\"note\"><h2>What this report can and cannot show</h2><ul>\
<li>The log never holds your identifier itself, only a keyed pseudonym of it (shown above); \
the operator made it from your identifier with the log's key to find your records. Records \
about you under another identifier (another account, an e-mail address instead of a customer \
number) are not in this report.</li>\
<li>It covers requests that passed through the gateway. Data that reached a recipient by \
another way, and what a recipient did with your data afterwards, are outside what it can see.</li>\
<li>\"Delivered\" is the number of bytes sent to the recipient in that exchange; a request \
that asked for your data but got an error delivered nothing.</li>\
<li>Countries are where the recipient is declared to be and where its request came from, \
as located by the operator's network list or a geolocation database.</li></ul></section>\n\
</body></html>\n",
    );
    h
}

fn relation_words(relation: &str) -> String {
    match relation {
        "first_party" => "the service itself".into(),
        "third_party" => "another company".into(),
        "anonymous" => "not identified".into(),
        other => other.into(),
    }
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:60rem;\
margin:2rem auto;padding:0 1rem;color:#1a1a1a;line-height:1.45}h1{font-size:1.7rem;margin-bottom:.3rem}\
h2{font-size:1.2rem;margin-top:1.8rem;border-bottom:1px solid #ccc;padding-bottom:.2rem}\
.rel{font-weight:normal;color:#555;font-size:1rem}.lead{color:#333}\
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.5rem 0}\
th,td{border:1px solid #d0d0d0;padding:.35rem .5rem;text-align:left;vertical-align:top}\
thead th{background:#f2f2f2}.facts th{width:16rem;background:#f7f7f7;font-weight:600}\
code{font-size:.85em;word-break:break-all}.verified{background:#eef7ee;border:1px solid #9c9;\
padding:.2rem 1rem;border-radius:4px}.summary{font-size:1.05rem}.note{color:#333;font-size:.9rem}\
@media print{body{margin:0;max-width:none}section{break-inside:avoid}}";
