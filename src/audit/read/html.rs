//! The two HTML pages the readers write: `audit report --format html`, the security team's
//! report with its charts drawn as inline SVG, and `audit subject --format html`, a data
//! subject's printable disclosure report. Each is one self-contained file: no script, no
//! font, nothing fetched (a Content-Security-Policy forbids it), so that it can be mailed,
//! archived and opened offline.
//!
//! Apart from the readers that gather the figures ([`super::report`], [`super::subject`]),
//! which stay plain values for JSON, and together in one file because both pages share their
//! skeleton and, above all, their escaping: every value that comes from the log is written
//! through [`esc`], and a reviewer checks that in one place.

use super::report::{Bulk, Charts, Counts, Report};
use super::subject::{BulkShare, Disclosure, Refusal, SubjectReport, explain};
use std::collections::BTreeMap;
use std::fmt::Write as _;

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

/// The page up to and including its `<body>`: the policy that forbids anything but inline
/// style, the title (HTML, escaped by the caller) and the page's style sheet.
fn page_start(h: &mut String, title: &str, css: &str) {
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title}</title><style>{css}</style></head><body>\n"
    );
}

/// What ends every page.
const PAGE_END: &str = "</body></html>\n";

/// Lines as list items, each escaped.
fn items(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| format!("<li>{}</li>", esc(l)))
        .collect()
}

/// An optional value, or a dash.
fn opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| "—".to_string(), esc)
}

/// A byte count in words a person reads.
fn bytes(n: Option<u64>) -> String {
    match n {
        None => "not recorded".into(),
        Some(n) if n < 1024 => format!("{n} bytes"),
        Some(n) if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
    }
}

/// Colours for reasons, in a fixed order; assigned by the reasons' sorted order.
const PALETTE: [&str; 12] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a",
];
/// Bars the time chart draws at most.
const MAX_BARS: usize = 48;
/// Bucket widths to choose from, in minutes.
const WIDTHS: [u64; 9] = [1, 5, 15, 60, 180, 360, 1440, 10080, 43200];

/// Minutes since the epoch of `YYYY-MM-DDTHH:MM`.
fn minutes(key: &str) -> Option<i64> {
    let t: jiff::Timestamp = format!("{key}:00Z").parse().ok()?;
    Some(t.as_second() / 60)
}

fn label(minute: i64) -> String {
    let t = jiff::Timestamp::from_second(minute * 60).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let s = crate::audit::record::timestamp(t);
    format!("{} {}", &s[5..10], &s[11..16])
}

/// Decisions by reason in at most [`MAX_BARS`] buckets: their start labels, and each
/// reason's count per bucket.
#[allow(clippy::type_complexity)]
fn buckets(per_minute: &BTreeMap<String, Counts>) -> (Vec<String>, Vec<(String, Vec<u64>)>) {
    let points: Vec<(i64, &BTreeMap<String, u64>)> = per_minute
        .iter()
        .filter_map(|(k, v)| Some((minutes(k)?, &v.0)))
        .collect();
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return (Vec::new(), Vec::new());
    };
    let span = (last.0 - first.0 + 1) as u64;
    let width = WIDTHS
        .iter()
        .copied()
        .find(|w| span.div_ceil(*w) as usize <= MAX_BARS)
        .unwrap_or(*WIDTHS.last().expect("not empty"));
    let start = first.0 - first.0.rem_euclid(width as i64);
    let n = ((last.0 - start) as u64 / width + 1) as usize;
    let labels = (0..n)
        .map(|i| label(start + (i as u64 * width) as i64))
        .collect();
    let mut series: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (m, by_reason) in points {
        let i = ((m - start) as u64 / width) as usize;
        for (reason, count) in by_reason {
            series.entry(reason.clone()).or_insert_with(|| vec![0; n])[i] += count;
        }
    }
    (labels, series.into_iter().collect())
}

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// A stacked bar chart of decisions over time, by reason.
fn time_chart(out: &mut String, charts: &Charts) {
    let (labels, series) = buckets(&charts.per_minute);
    if labels.is_empty() {
        out.push_str("<p>No decisions in this range.</p>");
        return;
    }
    let (w, h, left, bottom) = (900.0, 280.0, 50.0, 40.0);
    let totals: Vec<u64> = (0..labels.len())
        .map(|i| series.iter().map(|(_, v)| v[i]).sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(1).max(1) as f64;
    let slot = (w - left) / labels.len() as f64;
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"Decisions over time by reason\">"
    );
    let plot = h - bottom;
    for tick in 0..=4 {
        let y = plot - plot * f64::from(tick) / 4.0 + 4.0;
        let value = max * f64::from(tick) / 4.0;
        let _ = write!(
            out,
            "<line x1=\"{left}\" x2=\"{w}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"grid\"/><text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\" text-anchor=\"end\">{value:.0}</text>",
            left - 4.0,
            y + 3.0
        );
    }
    for (i, l) in labels.iter().enumerate() {
        let x = left + slot * i as f64;
        let mut y = plot + 4.0;
        for (j, (reason, counts)) in series.iter().enumerate() {
            let c = counts[i];
            if c == 0 {
                continue;
            }
            let bh = (plot - 4.0) * c as f64 / max;
            y -= bh;
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {}: {c}</title></rect>",
                x + 1.0,
                (slot - 2.0).max(1.0),
                colour(j),
                esc(l),
                esc(reason)
            );
        }
        // A label every few bars.
        if i % labels.len().div_ceil(8).max(1) == 0 {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\">{}</text>",
                x + 1.0,
                h - bottom + 20.0,
                esc(l)
            );
        }
    }
    out.push_str("</svg><ul class=\"legend\">");
    for (j, (reason, counts)) in series.iter().enumerate() {
        let _ = write!(
            out,
            "<li><span class=\"swatch\" style=\"background:{}\"></span>{} ({})</li>",
            colour(j),
            esc(reason),
            counts.iter().sum::<u64>()
        );
    }
    out.push_str("</ul>");
}

/// A horizontal bar chart of `counts`, largest first, at most `top` rows.
fn bars(out: &mut String, counts: &Counts, top: usize, fill: &str, empty: &str, aria: &str) {
    let mut rows: Vec<(&String, &u64)> = counts.0.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    rows.truncate(top);
    if rows.is_empty() {
        let _ = write!(out, "<p>{}</p>", esc(empty));
        return;
    }
    let max = *rows[0].1 as f64;
    let (w, row, label_w) = (900.0, 24.0, 240.0);
    let h = row * rows.len() as f64 + 4.0;
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\">",
        esc(aria)
    );
    for (i, (name, n)) in rows.iter().enumerate() {
        let y = row * i as f64 + 2.0;
        let bw = (w - label_w - 80.0) * **n as f64 / max;
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"label\" text-anchor=\"end\">{}</text><rect x=\"{label_w}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{fill}\"/><text x=\"{:.1}\" y=\"{:.1}\" class=\"label\">{n}</text>",
            label_w - 6.0,
            y + 16.0,
            esc(name),
            row - 6.0,
            label_w + bw + 6.0,
            y + 16.0
        );
    }
    out.push_str("</svg>");
}

/// The report page (`audit report --format html`): its charts drawn as inline SVG.
/// `integrity` is how `audit verify` judged the same log: its lines, or why it failed.
pub fn report_page(
    report: &Report,
    source: &str,
    integrity: &Result<Vec<String>, String>,
    top: usize,
    now: &str,
) -> String {
    // Gathered when the report was made for this page; without them the charts are empty.
    let none = Charts::default();
    let charts = report.charts.as_ref().unwrap_or(&none);
    let mut h = String::new();
    page_start(
        &mut h,
        &format!("Decision log report: {}", esc(source)),
        REPORT_CSS,
    );
    let _ = write!(
        h,
        "<h1>Decision log report</h1>\n<p class=\"sub\">{} · {} decisions, {} to {} · made {}</p>\n",
        esc(source),
        report.all.total,
        report.first.as_deref().map_or("—".into(), esc),
        report.last.as_deref().map_or("—".into(), esc),
        esc(now)
    );
    match integrity {
        Ok(lines) => {
            let _ = writeln!(
                h,
                "<section class=\"ok\"><h2>Integrity: verified</h2><ul>{}</ul></section>",
                items(lines)
            );
        }
        Err(why) => {
            let _ = writeln!(
                h,
                "<section class=\"bad\"><h2>Integrity: NOT VERIFIED</h2><p>The figures below come from a log that failed verification, so they may not be what happened:</p><pre>{}</pre></section>",
                esc(why)
            );
        }
    }
    h.push_str("<section class=\"tiles\">");
    for (name, n) in &report.by_decision.0 {
        let _ = write!(
            h,
            "<div class=\"tile\"><div class=\"n\">{n}</div><div>{}</div></div>",
            esc(name)
        );
    }
    h.push_str("</section>\n<section><h2>Decisions over time, by reason</h2>");
    time_chart(&mut h, charts);
    h.push_str(
        "</section>\n<section><h2>Where data went: allowed flows by destination country</h2>",
    );
    bars(
        &mut h,
        &charts.flows,
        top,
        "#1f77b4",
        "No data was forwarded.",
        "Allowed flows by destination country",
    );
    h.push_str("</section>\n<section><h2>Refusals by recipient</h2>");
    bars(
        &mut h,
        &charts.refusals_by_recipient,
        top,
        "#d62728",
        "Nothing was refused.",
        "Refusals by recipient",
    );
    h.push_str("</section>\n<section><h2>Consent failures, by kind</h2>");
    bars(
        &mut h,
        &charts.consent_failures,
        top,
        "#ff7f0e",
        "No consent failed.",
        "Consent failures by kind",
    );
    h.push_str("</section>\n<section><h2>What audit mode would have blocked</h2>");
    blocked_section(&mut h, report, top);
    if !report.bulk.is_empty() {
        h.push_str("</section>\n<section><h2>Bulk exports, filtered record by record</h2>");
        bulk_section(&mut h, &report.bulk, top);
    }
    if !report.revisions.is_empty() {
        h.push_str("</section>\n<section><h2>Policy revisions, by instance</h2>");
        revisions_section(&mut h, report);
    }
    h.push_str("</section>\n<section><h2>By dataset</h2>");
    bars(
        &mut h,
        &report.all.by_dataset,
        top,
        "#7f7f7f",
        "No decisions.",
        "Decisions by dataset",
    );
    h.push_str("</section>\n");
    h.push_str(PAGE_END);
    h
}

/// Which signed policy revision each instance decided under, and from when.
fn revisions_section(h: &mut String, report: &Report) {
    h.push_str(
        "<p>The revision of the signed policy bundle each instance's decisions were made under, \
from the first decision under it.</p><table><thead><tr><th>Instance</th><th>Revision</th>\
<th>From (UTC)</th><th>Until (UTC)</th><th>Decisions</th></tr></thead><tbody>",
    );
    for (instance, runs) in &report.revisions {
        for run in runs {
            let revision = run
                .revision
                .map_or_else(|| "policy file".to_string(), |r| r.to_string());
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(instance),
                esc(&revision),
                esc(&run.began),
                esc(&run.last),
                run.decisions
            );
        }
    }
    h.push_str("</tbody></table>");
}

/// What audit mode only logged: the requests forwarded although the policy would have
/// refused them.
fn blocked_section(h: &mut String, report: &Report, top: usize) {
    let blocked = &report.would_have_been_blocked;
    if blocked.total == 0 {
        h.push_str("<p>Nothing: no denial was only logged.</p>");
    } else {
        let _ = write!(
            h,
            "<p>{} requests were forwarded although the policy would have refused them (audit mode). By reason:</p>",
            blocked.total
        );
        bars(
            h,
            &blocked.by_reason,
            top,
            "#9467bd",
            "",
            "Would have been blocked, by reason",
        );
        h.push_str("<p>By dataset:</p>");
        bars(
            h,
            &blocked.by_dataset,
            top,
            "#9467bd",
            "",
            "Would have been blocked, by dataset",
        );
    }
}

/// Bulk exports: how many, what left and what was dropped by reason, the subjects named, and
/// in audit mode what would have been dropped.
fn bulk_section(h: &mut String, b: &Bulk, top: usize) {
    let _ = write!(
        h,
        "<p>Objects holding many people's records, forwarded with each record leaving only \
where its data subject consented. Before each batch left, a disclosure record named the \
people whose records it carried.</p><div class=\"tiles\">\
<div class=\"tile\"><div class=\"n\">{}</div><div>exchanges</div></div>\
<div class=\"tile\"><div class=\"n\">{}</div><div>records kept</div></div>\
<div class=\"tile\"><div class=\"n\">{}</div><div>records dropped</div></div>\
<div class=\"tile\"><div class=\"n\">{}</div><div>people disclosed</div></div></div>",
        b.exchanges, b.records_kept, b.records_dropped, b.subjects_disclosed
    );
    h.push_str("<p>Records dropped, by reason:</p>");
    bars(
        h,
        &b.dropped_by_reason,
        top,
        "#d62728",
        "No record was dropped.",
        "Records dropped, by reason",
    );
    if b.records_would_drop > 0 {
        let _ = write!(
            h,
            "<p>{} records left although they would have been dropped (audit mode). By reason:</p>",
            b.records_would_drop
        );
        bars(
            h,
            &b.would_drop_by_reason,
            top,
            "#9467bd",
            "",
            "Would have been dropped, by reason",
        );
    }
    h.push_str("<p>Exchanges by dataset:</p>");
    bars(
        h,
        &b.by_dataset,
        top,
        "#7f7f7f",
        "",
        "Bulk exchanges by dataset",
    );
}

const REPORT_CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:62rem;\
margin:1.5rem auto;padding:0 1rem;color:#1a1a1a}h1{margin-bottom:.2rem}.sub{color:#555;margin-top:0}\
h2{font-size:1.1rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:1.6rem}\
svg{width:100%;height:auto}.grid{stroke:#e4e4e4}.axis{font-size:11px;fill:#555}.label{font-size:13px;fill:#222}\
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.4rem 1.2rem;font-size:.85rem}\
.swatch{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}\
.ok{background:#eef7ee;border:1px solid #9c9;padding:.1rem 1rem;border-radius:4px}\
.bad{background:#fbeaea;border:1px solid #d99;padding:.1rem 1rem;border-radius:4px}\
.tiles{display:flex;gap:1rem;flex-wrap:wrap;margin-top:1rem}.tile{border:1px solid #ddd;border-radius:4px;\
padding:.5rem 1rem;min-width:8rem}.tile .n{font-size:1.6rem;font-weight:600}\
@media print{body{max-width:none;margin:0}section{break-inside:avoid}}";

/// The subject page (`audit subject --format html`): one printable page for the person the
/// report is about. `verified` holds the lines saying how the log was checked; `policy` the
/// policy's name, when known.
pub fn subject_page(
    r: &SubjectReport,
    verified: &[String],
    policy: Option<&str>,
    now: &str,
) -> String {
    let mut h = String::new();
    page_start(&mut h, "Where your personal data went", SUBJECT_CSS);
    subject_facts(&mut h, r, policy, now);
    let _ = writeln!(
        h,
        "<section class=\"verified\"><h2>The log was checked first</h2><p>Before this report \
was made, the whole decision log was verified: every record is linked to the one before it \
by a cryptographic hash, and signed checkpoints seal the chain, so a record removed, added or \
changed would have stopped this report.</p><ul>{}</ul></section>",
        items(verified)
    );
    let disclosed: usize = r.disclosures.values().map(Vec::len).sum();
    let _ = writeln!(
        h,
        "<h2>In short</h2><p class=\"summary\"><strong>{}</strong> recipient(s) received your data, \
in <strong>{disclosed}</strong> exchange(s). <strong>{}</strong> attempt(s) were refused or \
failed, and nothing reached the recipient in those.</p>",
        r.disclosures.len(),
        r.refusals.len()
    );
    for (who, list) in &r.disclosures {
        recipient_section(&mut h, who, list);
    }
    refusals_section(&mut h, &r.refusals);
    h.push_str(SUBJECT_NOTE);
    if r.disclosures.values().flatten().any(|d| d.bulk.is_some()) {
        h.push_str(SUBJECT_NOTE_BULK);
    }
    h.push_str(SUBJECT_NOTE_END);
    h.push_str(PAGE_END);
    h
}

/// The page's heading, what it answers, and the facts of the report (who, which period,
/// which log, which policy, when).
fn subject_facts(h: &mut String, r: &SubjectReport, policy: Option<&str>, now: &str) {
    let _ = write!(
        h,
        "<h1>Where your personal data went</h1>\n<p class=\"lead\">This report lists every time your \
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
}

/// One recipient's exchanges: when, what for, which data, where, why, under which consent,
/// and what was delivered.
fn recipient_section(h: &mut String, who: &str, list: &[Disclosure]) {
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
        let why = if d.audit_mode && d.bulk.is_some() {
            "<strong>sent in audit mode</strong>: the export was not filtered, and your records \
left although you had not consented"
                .to_string()
        } else if d.audit_mode {
            format!(
                "<strong>forwarded in audit mode</strong>, although the policy would have refused it: {}",
                esc(explain(&d.reason).trim_start_matches("refused: "))
            )
        } else {
            esc(explain(&d.reason))
        };
        let delivered = match (&d.bulk, d.status, d.bytes_delivered) {
            (Some(share), ..) => bulk_share(share, d.complete),
            (None, Some(s), b) if s >= 400 => format!("nothing (status {s}, {})", bytes(b)),
            (None, _, b) => bytes(b),
        };
        let export = match d.bulk.as_ref().and_then(|s| s.path.as_deref()) {
            Some(path) => format!(
                "<br><small>in the export <code>{}</code></small>",
                esc(path)
            ),
            None => String::new(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}<br><small>{}</small>{export}</td><td>{}</td><td>{why}</td><td>{consent}</td><td>{delivered}</td></tr>",
            esc(&d.time),
            opt(&d.purpose),
            opt(&d.dataset),
            opt(&d.category),
            esc(&d.destinations.join(", ")),
        );
    }
    h.push_str("</tbody></table></section>\n");
}

/// What a bulk export says of the person's records: that some were in it, in which batches,
/// and how many records (everyone's) left in all. How many were the person's is not in the
/// log.
fn bulk_share(share: &BulkShare, complete: Option<bool>) -> String {
    let batches: Vec<String> = share.batches.iter().map(u64::to_string).collect();
    let mut s = format!(
        "records of yours were in it (batch {} of the export",
        batches.join(", ")
    );
    if complete == Some(false) {
        s.push_str(", which may have been cut short");
    }
    s.push(')');
    if let Some(n) = share.export_records {
        let _ = write!(s, "; {n} records of several people left in all");
    }
    s
}

/// The attempts that were refused or failed: nothing reached the recipient.
fn refusals_section(h: &mut String, refusals: &[Refusal]) {
    h.push_str("<section><h2>Refused attempts</h2>");
    if refusals.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str(
            "<table><thead><tr><th>When (UTC)</th><th>Who asked</th><th>For what purpose</th>\
<th>Which data</th><th>Where it would have gone</th><th>Why it was refused</th></tr></thead><tbody>",
        );
        for f in refusals {
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
}

/// What the subject page can and cannot show, in words for the person reading it: up to the
/// bullet on bulk exports ([`SUBJECT_NOTE_BULK`], for a report that lists one), then the end.
const SUBJECT_NOTE: &str = "<section class=\"note\"><h2>What this report can and cannot show</h2><ul>\
<li>The log never holds your identifier itself, only a keyed pseudonym of it (shown above); \
the operator made it from your identifier with the log's key to find your records. Records \
about you under another identifier (another account, an e-mail address instead of a customer \
number) are not in this report.</li>\
<li>It covers requests that passed through the gateway. Data that reached a recipient by \
another way, and what a recipient did with your data afterwards, are outside what it can see.</li>\
<li>\"Delivered\" is the number of bytes sent to the recipient in that exchange; a request \
that asked for your data but got an error delivered nothing.</li>";

const SUBJECT_NOTE_BULK: &str = "<li>An export holds the records of many people. It was \
filtered record by record: only the records of people who had consented left, and before each \
part (batch) of it left, the log named the people whose records that part carried. The log \
names you; it does not count how many of your records were in the export.</li>";

const SUBJECT_NOTE_END: &str = "<li>Countries are where the recipient is declared to be and \
where its request came from, as located by the operator's network list or a geolocation \
database.</li></ul></section>\n";

fn relation_words(relation: &str) -> String {
    match relation {
        "first_party" => "the service itself".into(),
        "third_party" => "another company".into(),
        "anonymous" => "not identified".into(),
        other => other.into(),
    }
}

const SUBJECT_CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:60rem;\
margin:2rem auto;padding:0 1rem;color:#1a1a1a;line-height:1.45}h1{font-size:1.7rem;margin-bottom:.3rem}\
h2{font-size:1.2rem;margin-top:1.8rem;border-bottom:1px solid #ccc;padding-bottom:.2rem}\
.rel{font-weight:normal;color:#555;font-size:1rem}.lead{color:#333}\
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.5rem 0}\
th,td{border:1px solid #d0d0d0;padding:.35rem .5rem;text-align:left;vertical-align:top}\
thead th{background:#f2f2f2}.facts th{width:16rem;background:#f7f7f7;font-weight:600}\
code{font-size:.85em;word-break:break-all}.verified{background:#eef7ee;border:1px solid #9c9;\
padding:.2rem 1rem;border-radius:4px}.summary{font-size:1.05rem}.note{color:#333;font-size:.9rem}\
@media print{body{margin:0;max-width:none}section{break-inside:avoid}}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::files::Segments;

    fn bulk_log(dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("d.jsonl");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crate::audit::testing::write_bulk_log(&path));
        path
    }

    #[test]
    fn the_report_page_counts_bulk_exports() {
        let dir = tempfile::tempdir().unwrap();
        let path = bulk_log(dir.path());
        let segments = Segments::local(&path).unwrap();
        let (r, _) = super::super::report::report_segments(segments, None, None, true).unwrap();
        let page = report_page(&r, "d.jsonl", &Ok(vec!["ok".into()]), 20, "now");
        for part in [
            "<h2>Bulk exports, filtered record by record</h2>",
            "<div class=\"n\">2</div><div>exchanges</div>",
            "<div class=\"n\">7</div><div>records kept</div>",
            "<div class=\"n\">4</div><div>records dropped</div>",
            "<div class=\"n\">4</div><div>people disclosed</div>",
            "1 records left although they would have been dropped (audit mode)",
            "aria-label=\"Records dropped, by reason\"",
        ] {
            assert!(page.contains(part), "{part:?} not in the page");
        }
        // Before the closing table of every page.
        assert!(page.find("Bulk exports").unwrap() < page.find("<h2>By dataset</h2>").unwrap());
    }

    #[test]
    fn the_subject_page_names_the_export_and_what_it_says_of_the_person() {
        let dir = tempfile::tempdir().unwrap();
        let path = bulk_log(dir.path());
        let r = super::super::subject::build(Segments::local(&path).unwrap(), "u1", None, None)
            .unwrap();
        let page = subject_page(&r, &["ok".into()], None, "now");
        for part in [
            "in the export <code>/exports/spending/2026-11.jsonl</code>",
            "allowed by your consent: the export was filtered person by person",
            "c-1 (given: explicit)",
            "records of yours were in it (batch 1 of the export); 5 records of several people left in all",
            "The log names you; it does not count how many of your records were in the export.",
        ] {
            assert!(page.contains(part), "{part:?} not in the page");
        }
        // u4 had no consent: audit mode let their records leave.
        let r = super::super::subject::build(Segments::local(&path).unwrap(), "u4", None, None)
            .unwrap();
        assert!(
            subject_page(&r, &[], None, "now").contains(
                "<strong>sent in audit mode</strong>: the export was not filtered, and your records left although you had not consented"
            )
        );
        // A person with no bulk export is not told about them.
        let r = super::super::subject::build(Segments::local(&path).unwrap(), "u5", None, None)
            .unwrap();
        assert!(!subject_page(&r, &[], None, "now").contains("An export holds"));
    }
}
