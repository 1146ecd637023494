//! `audit report --format html`: the report as one self-contained page, its charts drawn as
//! inline SVG (no script, no font, nothing fetched: a Content-Security-Policy forbids it).

use super::report::{Charts, Counts, Report};
use super::subject::esc;
use std::collections::BTreeMap;
use std::fmt::Write as _;

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
    let s = super::record::timestamp(t);
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

/// The page. `integrity` is how `audit verify` judged the same log: its lines, or why it
/// failed.
pub fn html(
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
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>Decision log report: {}</title><style>{CSS}</style></head><body>\n<h1>Decision log report</h1>\n\
<p class=\"sub\">{} · {} decisions, {} to {} · made {}</p>\n",
        esc(source),
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
                lines
                    .iter()
                    .map(|l| format!("<li>{}</li>", esc(l)))
                    .collect::<String>()
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
            &mut h,
            &blocked.by_reason,
            top,
            "#9467bd",
            "",
            "Would have been blocked, by reason",
        );
        h.push_str("<p>By dataset:</p>");
        bars(
            &mut h,
            &blocked.by_dataset,
            top,
            "#9467bd",
            "",
            "Would have been blocked, by dataset",
        );
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
    h.push_str("</section>\n</body></html>\n");
    h
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:62rem;\
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
