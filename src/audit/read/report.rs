//! `audit report`: counts of decisions by decision, reason, dataset, recipient and
//! destination country over a time range, and, for audit-mode records (`"enforced": false`),
//! what would have been blocked. Streams the log like `audit query`; memory grows with the
//! number of distinct values, not with the log. The report is a plain value (printed as
//! text or JSON here); [`super::html`] draws its page.
//!
//! Bulk exports (objects filtered record by record, reason `consent_filtered`) are counted
//! apart as well: the exchanges, the records kept and dropped by reason (from their outcome
//! records), the would-drops of audit mode, and the distinct subjects their disclosure
//! records named.
//!
//! Where the log's decisions name the policy bundle's revision they were made under, the
//! report also says, per instance, which revisions it ran and when each began deciding, so
//! that a rollout can be followed across a fleet.

use super::query::{Filter, QueryError, Scanned, View, scan_segments};
use crate::audit::files::Segments;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::Path;

/// Counts by value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts(pub BTreeMap<String, u64>);

impl Counts {
    fn add(&mut self, key: &str) {
        self.add_n(key, 1);
    }

    fn add_n(&mut self, key: &str, n: u64) {
        // A lookup by `&str` first: no allocation for a value already counted.
        match self.0.get_mut(key) {
            Some(c) => *c += n,
            None => {
                self.0.insert(key.to_string(), n);
            }
        }
    }

    /// Largest first, then by name.
    fn ranked(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self.0.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

/// The tables of a report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tables {
    pub total: u64,
    pub by_reason: Counts,
    pub by_dataset: Counts,
    pub by_recipient: Counts,
    /// A record counts once under each of its destination countries (the recipient's
    /// declared seat and the client's located country), so this table can sum to more than
    /// `total`.
    pub by_destination_country: Counts,
}

impl Tables {
    fn add(&mut self, v: &View<'_>) {
        self.total += 1;
        self.by_reason.add(v.reason.as_deref().unwrap_or("(none)"));
        self.by_dataset
            .add(v.dataset.as_deref().unwrap_or("(no dataset)"));
        self.by_recipient.add(v.recipient());
        let mut any = false;
        for c in v.destinations() {
            self.by_destination_country.add(c);
            any = true;
        }
        if !any {
            self.by_destination_country.add("unknown");
        }
    }
}

/// Bulk exports: objects forwarded filtered record by record, each record leaving only where
/// its subject consented (reason `consent_filtered`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bulk {
    /// Decisions that forwarded an object filtered record by record.
    pub exchanges: u64,
    /// Those decisions by dataset.
    pub by_dataset: Counts,
    /// Records that left, from the exchanges' outcome records.
    pub records_kept: u64,
    /// Bytes of the records that left, before any compression.
    pub kept_bytes: u64,
    /// Records dropped (their subject had not consented, or they named none, or did not parse).
    pub records_dropped: u64,
    pub dropped_by_reason: Counts,
    /// Audit mode: records that left although they would have been dropped.
    pub records_would_drop: u64,
    pub would_drop_by_reason: Counts,
    /// Disclosure records: batches that named the subjects whose records they carried.
    pub disclosures: u64,
    /// Distinct subjects (pseudonyms) the disclosures named.
    pub subjects_disclosed: u64,
    /// Those subjects, each as a 128-bit hash of its pseudonym, so that memory grows by 16
    /// bytes per subject.
    #[serde(skip)]
    seen: HashSet<u128>,
}

impl Bulk {
    pub fn is_empty(&self) -> bool {
        self.exchanges == 0
            && self.disclosures == 0
            && self.records_kept == 0
            && self.records_dropped == 0
            && self.records_would_drop == 0
    }

    fn decision(&mut self, v: &View<'_>) {
        self.exchanges += 1;
        self.by_dataset.add(v.dataset().unwrap_or("(no dataset)"));
    }

    fn outcome(&mut self, v: &View<'_>) {
        let Some(c) = v.record_counts() else { return };
        self.records_kept += c.kept;
        self.kept_bytes += c.kept_bytes;
        for (reason, n) in &c.dropped {
            self.records_dropped += n;
            self.dropped_by_reason.add_n(reason, *n);
        }
        for (reason, n) in &c.would_drop {
            self.records_would_drop += n;
            self.would_drop_by_reason.add_n(reason, *n);
        }
    }

    fn disclosure(&mut self, v: &View<'_>) {
        self.disclosures += 1;
        for (subject, _) in v.named() {
            if self.seen.insert(hash128(subject)) {
                self.subjects_disclosed += 1;
            }
        }
    }
}

/// Two 64-bit hashes of `s` under different fixed keys, as one 128-bit value: no two
/// pseudonyms of any log collide in practice.
fn hash128(s: &str) -> u128 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let h = BuildHasherDefault::<DefaultHasher>::default();
    let a = h.hash_one((0u8, s));
    let b = h.hash_one((1u8, s));
    (u128::from(a) << 64) | u128::from(b)
}

/// A report over the decision records of a log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The range asked for (`--since`, `--until`), in the log's time form.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Times of the first and last decision counted.
    pub first: Option<String>,
    pub last: Option<String>,
    /// By the record's `decision`, with audit-mode denials (logged, forwarded anyway) apart
    /// as `deny_not_enforced`.
    pub by_decision: Counts,
    #[serde(flatten)]
    pub all: Tables,
    /// Audit mode: the denials that were only logged, and the request forwarded.
    pub would_have_been_blocked: Tables,
    /// Bulk exports filtered record by record; absent from the JSON when the log holds none.
    #[serde(skip_serializing_if = "Bulk::is_empty")]
    pub bulk: Bulk,
    /// Per instance, the policy revisions its decisions were made under, in the order they
    /// began; absent from the JSON when no decision names a revision (whole policy files).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub revisions: BTreeMap<String, Vec<RevisionRun>>,
    /// What the page's charts draw, gathered only for `--format html`; not in the JSON report.
    #[serde(skip)]
    pub charts: Option<Charts>,
}

/// A run of one instance's decisions under one policy revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RevisionRun {
    /// The bundle's revision; `None`: a policy read whole from its file.
    pub revision: Option<u64>,
    /// The first decision under it: when it began deciding there.
    pub began: String,
    /// The last decision under it.
    pub last: String,
    pub decisions: u64,
}

/// What the report's revision section gathers while the log is read.
#[derive(Clone, Debug, Default)]
struct Runs {
    by_instance: BTreeMap<String, Vec<RevisionRun>>,
    /// Some decision named a revision: without one, the section is left out.
    any_revision: bool,
}

impl Runs {
    /// Each instance's decisions arrive in chain order: a revision other than the last one
    /// seen there begins a new run.
    fn add(&mut self, v: &View<'_>) {
        let Some(ts) = v.ts.as_deref() else {
            return;
        };
        self.any_revision |= v.policy_revision.is_some();
        let instance = v.instance.as_deref().unwrap_or("(unnamed)");
        let runs = match self.by_instance.get_mut(instance) {
            Some(r) => r,
            None => self.by_instance.entry(instance.to_string()).or_default(),
        };
        match runs.last_mut() {
            Some(run) if run.revision == v.policy_revision => {
                run.decisions += 1;
                if ts > run.last.as_str() {
                    run.last = ts.to_string();
                }
            }
            _ => runs.push(RevisionRun {
                revision: v.policy_revision,
                began: ts.to_string(),
                last: ts.to_string(),
                decisions: 1,
            }),
        }
    }

    fn finish(self) -> BTreeMap<String, Vec<RevisionRun>> {
        if self.any_revision {
            self.by_instance
        } else {
            BTreeMap::new()
        }
    }
}

/// Figures only the charts use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Charts {
    /// Decisions by minute (`YYYY-MM-DDTHH:MM`) and reason.
    pub per_minute: BTreeMap<String, Counts>,
    /// Allowed decisions by destination country (the recipient's seat and where the client
    /// was), the flows out.
    pub flows: Counts,
    /// Refused (and failed) requests by recipient.
    pub refusals_by_recipient: Counts,
    /// Consents that did not count, by why.
    pub consent_failures: Counts,
}

impl Charts {
    fn add(&mut self, v: &View<'_>, blocked: bool) {
        let reason = v.reason.as_deref().unwrap_or("(none)");
        if let Some(minute) = v.ts.as_deref().and_then(|t| t.get(..16)) {
            match self.per_minute.get_mut(minute) {
                Some(m) => m.add(reason),
                None => self
                    .per_minute
                    .entry(minute.to_string())
                    .or_default()
                    .add(reason),
            }
        }
        // Audit mode's would-be refusals were forwarded: they flowed too.
        if v.decision.as_deref() == Some("allow") || blocked {
            for c in v.destinations() {
                self.flows.add(c);
            }
        } else if v.decision.is_some() {
            self.refusals_by_recipient.add(v.recipient());
        }
        if reason.starts_with("consent_") {
            self.consent_failures.add(reason);
        }
    }
}

impl Report {
    fn add(&mut self, v: &View<'_>) {
        match v.kind() {
            Some("disclosure") => return self.bulk.disclosure(v),
            Some("outcome") => return self.bulk.outcome(v),
            _ => {}
        }
        if v.reason() == Some("consent_filtered") {
            self.bulk.decision(v);
        }
        let blocked = v.would_have_been_blocked();
        let decision = if blocked {
            "deny_not_enforced"
        } else {
            v.decision.as_deref().unwrap_or("(none)")
        };
        self.by_decision.add(decision);
        self.all.add(v);
        if let Some(charts) = &mut self.charts {
            charts.add(v, blocked);
        }
        if blocked {
            self.would_have_been_blocked.add(v);
        }
        if let Some(ts) = v.ts.as_deref() {
            if self.first.as_deref().is_none_or(|f| ts < f) {
                self.first = Some(ts.to_string());
            }
            if self.last.as_deref().is_none_or(|l| ts > l) {
                self.last = Some(ts.to_string());
            }
        }
    }

    /// Plain text, each table largest first, at most `top` rows each.
    pub fn text(&self, top: usize) -> String {
        let mut s = String::new();
        let range = match (&self.first, &self.last) {
            (Some(f), Some(l)) => format!(", {f} .. {l}"),
            _ => String::new(),
        };
        let _ = writeln!(s, "{} decisions{range}", self.all.total);
        if self.since.is_some() || self.until.is_some() {
            let _ = writeln!(
                s,
                "range asked: {} .. {}",
                self.since.as_deref().unwrap_or("start"),
                self.until.as_deref().unwrap_or("end")
            );
        }
        // One width for every table, so that the numbers line up down the page.
        let mut tables = vec![
            &self.by_decision,
            &self.all.by_reason,
            &self.all.by_dataset,
            &self.all.by_recipient,
            &self.all.by_destination_country,
        ];
        let bulk = !self.bulk.is_empty();
        if bulk {
            let b = &self.bulk;
            tables.extend([&b.dropped_by_reason, &b.would_drop_by_reason, &b.by_dataset]);
        }
        let names = if bulk { BULK_LINES } else { &[] };
        let width = tables
            .iter()
            .flat_map(|c| c.ranked().into_iter().take(top))
            .map(|(k, _)| k.chars().count())
            // The bulk section's tables are indented by two.
            .chain(names.iter().map(|n| n.len()))
            .max()
            .unwrap_or(0)
            .max(12);
        let layout = Layout { top, width };
        layout.table(&mut s, "by decision", &self.by_decision, self.all.total, "");
        layout.tables(&mut s, &self.all, "");
        let b = &self.would_have_been_blocked;
        if b.total == 0 {
            let _ = writeln!(s, "\nwould have been blocked (audit mode): none");
        } else {
            let _ = writeln!(
                s,
                "\nwould have been blocked (audit mode: denied in the log, forwarded anyway): {}",
                b.total
            );
            layout.tables(&mut s, b, "  ");
        }
        if !self.bulk.is_empty() {
            layout.bulk(&mut s, &self.bulk);
        }
        if !self.revisions.is_empty() {
            revisions_text(&mut s, &self.revisions);
        }
        s
    }
}

/// The revision section: per instance, each revision it ran, from when, and how many
/// decisions it made.
fn revisions_text(s: &mut String, revisions: &BTreeMap<String, Vec<RevisionRun>>) {
    let _ = writeln!(
        s,
        "\npolicy revisions, by instance (when each began deciding)"
    );
    let width = revisions
        .keys()
        .map(|k| k.chars().count())
        .max()
        .unwrap_or(0);
    for (instance, runs) in revisions {
        for (i, run) in runs.iter().enumerate() {
            let name = if i == 0 { instance.as_str() } else { "" };
            let revision = match run.revision {
                Some(r) => format!("revision {r}"),
                None => "policy file".to_string(),
            };
            let plural = if run.decisions == 1 { "" } else { "s" };
            let _ = writeln!(
                s,
                "  {name:<width$}  {revision:<12}  from {}  ({} decision{plural})",
                run.began, run.decisions
            );
        }
    }
}

/// The names of the bulk section's lines (indented by two, as its tables).
const BULK_LINES: &[&str] = &[
    "  exchanges",
    "  records kept",
    "  records dropped",
    "  subjects disclosed",
    "  would drop (audit)",
];

/// How text tables are laid out: rows per table, and the width of the name column.
struct Layout {
    top: usize,
    width: usize,
}

impl Layout {
    fn bulk(&self, s: &mut String, b: &Bulk) {
        let _ = writeln!(s, "\nbulk exports, filtered record by record");
        let width = self.width.saturating_sub(2).max(1);
        let mut line = |name: &str, n: u64, more: String| {
            let _ = writeln!(s, "  {name:<width$}  {n:>9}{more}");
        };
        line("exchanges", b.exchanges, String::new());
        line(
            "records kept",
            b.records_kept,
            format!("  ({} bytes)", b.kept_bytes),
        );
        line("records dropped", b.records_dropped, String::new());
        line(
            "subjects disclosed",
            b.subjects_disclosed,
            format!("  (named in {} disclosure records)", b.disclosures),
        );
        if b.records_would_drop > 0 {
            line(
                "would drop (audit)",
                b.records_would_drop,
                "  (left although they would have been dropped)".into(),
            );
        }
        self.table(
            s,
            "records dropped, by reason",
            &b.dropped_by_reason,
            b.records_dropped,
            "  ",
        );
        if b.records_would_drop > 0 {
            self.table(
                s,
                "would have been dropped (audit mode), by reason",
                &b.would_drop_by_reason,
                b.records_would_drop,
                "  ",
            );
        }
        self.table(s, "exchanges by dataset", &b.by_dataset, b.exchanges, "  ");
    }

    fn tables(&self, s: &mut String, t: &Tables, indent: &str) {
        self.table(s, "by reason", &t.by_reason, t.total, indent);
        self.table(s, "by dataset", &t.by_dataset, t.total, indent);
        self.table(s, "by recipient", &t.by_recipient, t.total, indent);
        self.table(
            s,
            "by destination country",
            &t.by_destination_country,
            t.total,
            indent,
        );
    }

    fn table(&self, s: &mut String, title: &str, counts: &Counts, total: u64, indent: &str) {
        let _ = writeln!(s, "\n{indent}{title}");
        let ranked = counts.ranked();
        // An indented table gives its indent back from the name column.
        let width = self.width.saturating_sub(indent.len()).max(1);
        for (k, n) in ranked.iter().take(self.top) {
            let pct = if total == 0 {
                0.0
            } else {
                *n as f64 * 100.0 / total as f64
            };
            let _ = writeln!(s, "{indent}  {k:<width$}  {n:>9}  {pct:5.1}%");
        }
        if ranked.len() > self.top {
            let _ = writeln!(
                s,
                "{indent}  … {} more (--format json lists all)",
                ranked.len() - self.top
            );
        }
    }
}

/// Counts the decision records of the log at `path` between `since` (inclusive) and `until`
/// (exclusive), both in the log's time form.
pub fn report(
    path: &Path,
    since: Option<String>,
    until: Option<String>,
) -> Result<(Report, Scanned), QueryError> {
    report_segments(Segments::local(path)?, since, until, false)
}

/// [`report`] over the files of `segments` (a local log, or a fleet's shipped files); with
/// `charts`, also what the page's charts draw.
pub fn report_segments(
    segments: Segments,
    since: Option<String>,
    until: Option<String>,
    charts: bool,
) -> Result<(Report, Scanned), QueryError> {
    // Decisions, and what bulk exports add: their disclosures and counting outcomes.
    let filter = Filter {
        kinds: vec!["decision".into(), "disclosure".into()],
        bulk_outcomes: true,
        since: since.clone(),
        until: until.clone(),
        ..Filter::default()
    };
    let mut report = Report {
        since,
        until,
        charts: charts.then(Charts::default),
        ..Report::default()
    };
    let mut runs = Runs::default();
    let scanned = scan_segments(segments, &filter, |_, v| {
        if v.kind() == Some("decision") {
            runs.add(v);
        }
        report.add(v);
        Ok(ControlFlow::Continue(()))
    })?;
    report.revisions = runs.finish();
    Ok((report, scanned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(
        decision: &str,
        enforced: bool,
        reason: &str,
        recipient: &str,
        client: &str,
    ) -> String {
        let rid = if recipient.is_empty() {
            "null".to_string()
        } else {
            format!("\"{recipient}\"")
        };
        format!(
            r#"{{"client":{{"country":"{client}"}},"dataset":"payments","decision":"{decision}","enforced":{enforced},"kind":"decision","reason":"{reason}","recipient":{{"country":"US","id":{rid}}},"seq":1,"ts":"2026-11-28T05:00:00.000000Z"}}"#
        )
    }

    #[test]
    fn counts_and_the_would_have_been_blocked_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let lines = [
            decision("allow", true, "consented", "credit-bureau-us", "US"),
            decision("deny", true, "consent_missing", "credit-bureau-us", "US"),
            decision("deny", false, "consent_missing", "", "DE"),
            r#"{"kind":"outcome","id":"x","status":200,"seq":2}"#.to_string(),
        ];
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let (r, scanned) = report(&path, None, None).unwrap();
        assert_eq!((scanned.records, scanned.matched), (4, 3));
        assert_eq!(r.all.total, 3);
        let c = |t: &Counts, k: &str| t.0.get(k).copied().unwrap_or(0);
        assert_eq!(c(&r.by_decision, "allow"), 1);
        assert_eq!(c(&r.by_decision, "deny"), 1);
        assert_eq!(c(&r.by_decision, "deny_not_enforced"), 1);
        assert_eq!(c(&r.all.by_recipient, "anonymous"), 1);
        // The audit-mode denial went to a DE client of a recipient seated in the US.
        assert_eq!(c(&r.all.by_destination_country, "US"), 3);
        assert_eq!(c(&r.all.by_destination_country, "DE"), 1);
        let b = &r.would_have_been_blocked;
        assert_eq!((b.total, c(&b.by_reason, "consent_missing")), (1, 1));
        let text = r.text(20);
        assert!(
            text.contains(
                "would have been blocked (audit mode: denied in the log, forwarded anyway): 1"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["by_reason"]["consent_missing"], 2);
        assert_eq!(json["would_have_been_blocked"]["total"], 1);
    }

    #[test]
    fn bulk_exports_are_counted_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crate::audit::testing::write_bulk_log(&path));
        let (r, _) = report(&path, None, None).unwrap();
        // The decisions are counted as ever: the two exports were allowed.
        assert_eq!(r.all.total, 4);
        let c = |t: &Counts, k: &str| t.0.get(k).copied().unwrap_or(0);
        assert_eq!(c(&r.all.by_reason, "consent_filtered"), 2);
        let b = &r.bulk;
        assert_eq!((b.exchanges, c(&b.by_dataset, "exports")), (2, 2));
        assert_eq!((b.records_kept, b.kept_bytes), (7, 560));
        assert_eq!(b.records_dropped, 4);
        assert_eq!(c(&b.dropped_by_reason, "consent_missing"), 3);
        assert_eq!(c(&b.dropped_by_reason, "no_subject"), 1);
        assert_eq!(b.records_would_drop, 1);
        assert_eq!(c(&b.would_drop_by_reason, "consent_missing"), 1);
        // u1 is named by both exports, and counted once.
        assert_eq!((b.disclosures, b.subjects_disclosed), (3, 4));

        let text = r.text(20);
        for part in [
            "bulk exports, filtered record by record",
            "records kept",
            "subjects disclosed",
            "(named in 3 disclosure records)",
            "records dropped, by reason",
            "would have been dropped (audit mode), by reason",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["bulk"]["records_kept"], 7);
        assert_eq!(json["bulk"]["dropped_by_reason"]["no_subject"], 1);
        assert_eq!(json["bulk"]["subjects_disclosed"], 4);

        // A range counts the records in it: the second export's disclosure and counts only.
        let since = "2026-11-28T04:00:20.500000Z".to_string();
        let until = "2026-11-28T04:00:24.500000Z".to_string();
        let (r, _) = report(&path, Some(since), Some(until)).unwrap();
        assert_eq!((r.bulk.exchanges, r.bulk.disclosures), (0, 2));
        assert_eq!((r.bulk.records_kept, r.bulk.subjects_disclosed), (7, 3));
    }

    #[test]
    fn a_log_without_bulk_exports_reports_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            decision("allow", true, "consented", "credit-bureau-us", "US") + "\n",
        )
        .unwrap();
        let (r, _) = report(&path, None, None).unwrap();
        assert!(r.bulk.is_empty());
        assert!(!r.text(20).contains("bulk"));
        assert!(serde_json::to_value(&r).unwrap().get("bulk").is_none());
    }

    /// A folder of several workers' chains is counted whole, from the first decision of any
    /// chain to the last.
    #[test]
    fn a_folder_of_worker_chains_is_counted_over_every_chain() {
        use crate::audit::testing::{policy, subject_decision, write_worker_chains};
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let chains = [vec![3, 4], vec![1, 2, 9], vec![5]]
            .iter()
            .enumerate()
            .map(|(k, times)| {
                times
                    .iter()
                    .map(|&ts| subject_decision(&p, &format!("w{k}-{ts}"), ts, "u1"))
                    .collect()
            })
            .collect();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(write_worker_chains(dir.path(), None, chains));
        let (r, scanned) = report(dir.path(), None, None).unwrap();
        assert_eq!(scanned.files, 3);
        assert_eq!(r.all.total, 6);
        assert_eq!(r.by_decision.0.get("allow"), Some(&6));
        assert_eq!(r.first.as_deref(), Some("2026-11-28T04:00:01.000000Z"));
        assert_eq!(r.last.as_deref(), Some("2026-11-28T04:00:09.000000Z"));
    }
    /// Decisions made under bundle revisions: each instance's revisions in the order they
    /// began, in the text and the JSON; the chains still verify with the revision in them.
    #[test]
    fn each_instance_shows_the_revisions_it_ran_and_when_each_began() {
        use crate::audit::read::fleet::verify_local;
        use crate::audit::record::Record;
        use crate::audit::testing::{policy, subject_decision, test_key, trusting};
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let under = |k: usize, ts: i64, revision: Option<u64>| {
            let mut r = subject_decision(&p, &format!("w{k}-{ts}"), ts, "u1");
            if let Record::Decision(d) = &mut r {
                d.policy_revision = revision;
            }
            r
        };
        // Worker 0 ran revision 4, then 5; worker 1 took 5 a little later.
        let chains = vec![
            vec![
                under(0, 1, Some(4)),
                under(0, 2, Some(4)),
                under(0, 6, Some(5)),
            ],
            vec![
                under(1, 3, Some(4)),
                under(1, 8, Some(5)),
                under(1, 9, Some(5)),
            ],
        ];
        let key = test_key();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crate::audit::testing::write_worker_chains(
                dir.path(),
                Some(key.clone()),
                chains,
            ));
        let chains = crate::audit::files::log_chains(dir.path()).unwrap();
        for i in verify_local(dir.path(), chains, &trusting(&key))
            .unwrap()
            .instances
        {
            assert!(i.result.is_ok(), "{}: {:?}", i.instance, i.result);
        }
        let (r, _) = report(dir.path(), None, None).unwrap();
        let runs = |instance: &str| -> Vec<(Option<u64>, String, u64)> {
            r.revisions[instance]
                .iter()
                .map(|run| (run.revision, run.began.clone(), run.decisions))
                .collect()
        };
        let at = |s: i64| format!("2026-11-28T04:00:0{s}.000000Z");
        assert_eq!(runs("side"), [(Some(4), at(1), 2), (Some(5), at(6), 1)]);
        assert_eq!(runs("side-w1"), [(Some(4), at(3), 1), (Some(5), at(8), 2)]);
        let text = r.text(20);
        assert!(
            text.contains("policy revisions, by instance (when each began deciding)"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "  side-w1  revision 4    from {}  (1 decision)\n           revision 5    from {}  (2 decisions)\n",
                at(3),
                at(8)
            )),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["revisions"]["side"][1]["revision"], 5);
        assert_eq!(json["revisions"]["side"][1]["began"], at(6));
        let page = crate::audit::read::html::report_page(&r, "logs", &Ok(vec![]), 10, "now");
        assert!(
            page.contains("<h2>Policy revisions, by instance</h2>"),
            "{page}"
        );
        assert!(
            page.contains(&format!("<tr><td>side-w1</td><td>5</td><td>{}</td>", at(8))),
            "{page}"
        );

        // A log of a whole policy file has no revision section.
        let plain = tempfile::tempdir().unwrap();
        let path = plain.path().join("d.jsonl");
        std::fs::write(
            &path,
            decision("allow", true, "consented", "b", "US") + "\n",
        )
        .unwrap();
        let (r, _) = report(&path, None, None).unwrap();
        assert!(r.revisions.is_empty());
        assert!(!r.text(20).contains("policy revisions"));
        assert!(serde_json::to_value(&r).unwrap().get("revisions").is_none());
    }
}
