//! A data subject's disclosure report (`audit subject`, SPEC section 8.1; PIPL art. 45, GDPR
//! art. 15(1)(c)): every recipient that received the person's data through the proxy, with
//! purpose, destination, dataset, the consent that allowed it and the bytes delivered, and
//! every refused attempt with its reason.
//!
//! The log holds the subject pseudonymised; the report is built from the decision records
//! whose `subject` is the person's pseudonym, the disclosure records of bulk exports that
//! name it (read with their export's decision), and the outcome records of the same
//! exchanges.
//! Nothing else is read into it: another subject's records never match, and the request's
//! path, query and headers are left out (they may name more than this person); of a bulk
//! export, the path is kept: it names the export, which the person may ask about.
//!
//! The report is a plain value (printed as JSON as it is); [`super::html`] draws its page.

use super::query::{Filter, QueryError, View, scan_segments};
use crate::audit::files::Segments;
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
    /// A bulk export (an object holding many people's records, filtered record by record):
    /// the subject's part in it. Absent for a request about the subject alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkShare>,
}

/// A subject's part in a bulk export, as its disclosure records say. The log names the
/// subject in the disclosure of each batch that carried records of theirs; it does not count
/// how many of the batch's records were theirs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BulkShare {
    /// The object asked for: the export, feed or partition.
    pub path: Option<String>,
    /// The batches (numbered from 1 within the exchange) whose disclosures named the subject.
    pub batches: Vec<u64>,
    /// Records those batches carried out, all subjects' together.
    pub batch_records: u64,
    /// Records the whole export carried out, all subjects' together (from its outcome
    /// record).
    pub export_records: Option<u64>,
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
    let mut b = Builder {
        report: SubjectReport {
            subject: subject.to_string(),
            since,
            until,
            ..SubjectReport::default()
        },
        subject,
        open: HashMap::new(),
        shares: HashMap::new(),
        methods: HashMap::new(),
    };
    let filter = Filter {
        kinds: vec!["any".into()],
        with_exchanges: true,
        ..Filter::default()
    };
    // The scan has read each line's common fields already: only the subject's decisions,
    // and the outcomes of their exchanges, are read whole.
    scan_segments(segments, &filter, |line, view| {
        b.line(line, view);
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(b.finish())
}

/// The report as the log is read.
struct Builder<'s> {
    report: SubjectReport,
    /// The pseudonym.
    subject: &'s str,
    /// Disclosures waiting for their exchange's outcome record: id -> (recipient, index) of
    /// each.
    open: HashMap<String, Vec<(String, usize)>>,
    /// Bulk disclosures by exchange id and consent: (recipient, index), so that later
    /// batches naming the subject again join the same entry.
    shares: HashMap<(String, Option<String>), (String, usize)>,
    /// How each of the subject's consents was collected, as their decision records say: a
    /// bulk disclosure names the consent only.
    methods: HashMap<String, String>,
}

impl Builder<'_> {
    fn line(&mut self, line: &[u8], view: &View<'_>) {
        let report = &mut self.report;
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
            Some("decision") if view.subject() == Some(self.subject) => {
                if let Ok(v) = serde_json::from_slice::<Value>(line) {
                    self.decision(&v);
                }
            }
            Some("outcome") => {
                if let Some(waiting) = view.id().and_then(|id| self.open.remove(id))
                    && let Ok(v) = serde_json::from_slice::<Value>(line)
                {
                    self.outcome(&v, waiting);
                }
            }
            Some("disclosure") if view.named().any(|(s, _)| s == self.subject) => {
                self.disclosure(view);
            }
            _ => {}
        }
    }

    fn in_range(&self, ts: &str) -> bool {
        self.report.since.as_deref().is_none_or(|s| ts >= s)
            && self.report.until.as_deref().is_none_or(|u| ts < u)
    }

    /// One of the subject's decision records.
    fn decision(&mut self, v: &Value) {
        if let (Some(id), Some(method)) =
            (text(v, &["consent", "id"]), text(v, &["consent", "method"]))
        {
            self.methods.insert(id, method);
        }
        let ts = text(v, &["ts"]).unwrap_or_default();
        if !self.in_range(&ts) {
            return;
        }
        let report = &mut self.report;
        if let Some(hash) = text(v, &["policy"]) {
            report.policies.insert(hash);
        }
        let (who, relation) = recipient(v);
        let decision = text(v, &["decision"]).unwrap_or_default();
        let enforced = v.get("enforced").and_then(Value::as_bool).unwrap_or(true);
        let id = text(v, &["id"]).unwrap_or_default();
        let method = text(v, &["request", "method"]).unwrap_or_default();
        let reason = text(v, &["reason"]).unwrap_or_default();
        if decision == "allow" || (decision == "deny" && !enforced) {
            let list = report.disclosures.entry(who.clone()).or_default();
            self.open
                .entry(id.clone())
                .or_default()
                .push((who.clone(), list.len()));
            list.push(Disclosure {
                id,
                time: ts,
                recipient: who,
                relation,
                destinations: destinations(v),
                purpose: text(v, &["purpose"]),
                dataset: text(v, &["dataset"]),
                category: text(v, &["category"]),
                method,
                reason,
                consent_id: text(v, &["consent", "id"]),
                consent_method: text(v, &["consent", "method"]),
                audit_mode: decision == "deny",
                instance: text(v, &["instance"]),
                ..Disclosure::default()
            });
        } else {
            report.refusals.push(Refusal {
                id,
                time: ts,
                recipient: who,
                relation,
                destinations: destinations(v),
                purpose: text(v, &["purpose"]),
                dataset: text(v, &["dataset"]),
                method,
                decision,
                reason,
                status: v.get("status").and_then(Value::as_u64),
                consent_id: text(v, &["consent", "id"]),
                instance: text(v, &["instance"]),
            });
        }
    }

    /// The outcome record of an exchange with disclosures of the subject: what was delivered.
    fn outcome(&mut self, v: &Value, waiting: Vec<(String, usize)>) {
        for (who, i) in waiting {
            let Some(d) = self
                .report
                .disclosures
                .get_mut(&who)
                .and_then(|l| l.get_mut(i))
            else {
                continue;
            };
            d.status = v.get("status").and_then(Value::as_u64);
            d.complete = v.get("complete").and_then(Value::as_bool);
            match &mut d.bulk {
                // The bytes of a bulk export are everyone's: what it says of this person is
                // that their records were among those that left.
                Some(share) => {
                    share.export_records = v
                        .get("records")
                        .and_then(|r| r.get("kept"))
                        .and_then(Value::as_u64);
                }
                None => d.bytes_delivered = v.get("bytes_out").and_then(Value::as_u64),
            }
        }
    }

    /// A disclosure record of a bulk export that names the subject: records of theirs left in
    /// its batch.
    fn disclosure(&mut self, view: &View<'_>) {
        let ts = view.ts().unwrap_or_default();
        if !self.in_range(ts) {
            return;
        }
        let id = view.id().unwrap_or_default();
        let batch = view.batch.unwrap_or(0);
        let records = view.batch_records().unwrap_or(0);
        let e = view.exchange.as_deref();
        let consents: Vec<Option<String>> = view
            .named()
            .filter(|(s, _)| *s == self.subject)
            .map(|(_, c)| c.map(str::to_string))
            .collect();
        for consent in consents {
            let key = (id.to_string(), consent.clone());
            if let Some((who, i)) = self.shares.get(&key)
                && let Some(share) = self
                    .report
                    .disclosures
                    .get_mut(who)
                    .and_then(|l| l.get_mut(*i))
                    .and_then(|d| d.bulk.as_mut())
            {
                share.batches.push(batch);
                share.batch_records += records;
                continue;
            }
            if let Some(hash) = e.and_then(|e| e.policy.clone()) {
                self.report.policies.insert(hash);
            }
            let who = e
                .and_then(|e| e.recipient.clone())
                .unwrap_or_else(|| "an unidentified client".into());
            let list = self.report.disclosures.entry(who.clone()).or_default();
            let at = (who.clone(), list.len());
            self.open
                .entry(id.to_string())
                .or_default()
                .push(at.clone());
            self.shares.insert(key, at);
            list.push(Disclosure {
                id: id.to_string(),
                time: ts.to_string(),
                recipient: who,
                relation: e
                    .and_then(|e| e.relation.clone())
                    .unwrap_or_else(|| "anonymous".into()),
                destinations: e.map(|e| e.destinations.clone()).unwrap_or_default(),
                purpose: e.and_then(|e| e.purpose.clone()),
                dataset: e.and_then(|e| e.dataset.clone()),
                category: e.and_then(|e| e.category.clone()),
                method: e.and_then(|e| e.method.clone()).unwrap_or_default(),
                reason: e
                    .and_then(|e| e.reason.clone())
                    .unwrap_or_else(|| "consent_filtered".into()),
                // Audit mode let the records of subjects without a consent leave.
                audit_mode: consent.is_none(),
                consent_id: consent,
                instance: e
                    .and_then(|e| e.instance.clone())
                    .or_else(|| view.instance.as_deref().map(str::to_string)),
                bulk: Some(BulkShare {
                    path: e.and_then(|e| e.path.clone()),
                    batches: vec![batch],
                    batch_records: records,
                    export_records: None,
                }),
                ..Disclosure::default()
            });
        }
    }

    /// Names how each bulk disclosure's consent was collected, where the subject's decision
    /// records say.
    fn finish(mut self) -> SubjectReport {
        for d in self.report.disclosures.values_mut().flatten() {
            if d.consent_method.is_none()
                && let Some(id) = &d.consent_id
            {
                d.consent_method = self.methods.get(id).cloned();
            }
        }
        self.report
    }
}

/// What a reason means, in words for the person reading the report.
pub fn explain(reason: &str) -> &'static str {
    match reason {
        "consented" => "allowed by your consent",
        "consent_filtered" => {
            "allowed by your consent: the export was filtered person by person, and the records of people who had not consented were removed"
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::files::Segments;

    fn bulk_report(subject: &str) -> SubjectReport {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crate::audit::testing::write_bulk_log(&path));
        build(Segments::local(&path).unwrap(), subject, None, None).unwrap()
    }

    #[test]
    fn a_bulk_export_is_listed_with_the_subjects_other_disclosures() {
        let r = bulk_report("u1");
        let to_bureau = &r.disclosures["credit-bureau-us"];
        let ids: Vec<&str> = to_bureau.iter().map(|d| d.id.as_str()).collect();
        // Read on its own, then named by a batch of each export.
        assert_eq!(ids, ["p1", "b1", "a1"]);
        let (single, export, audit) = (&to_bureau[0], &to_bureau[1], &to_bureau[2]);
        assert!(single.bulk.is_none());
        assert_eq!(single.bytes_delivered, Some(100));
        assert_eq!(export.reason, "consent_filtered");
        assert_eq!(export.time, "2026-11-28T04:00:11.000000Z");
        assert_eq!(
            (export.purpose.as_deref(), export.dataset.as_deref()),
            (Some("credit_scoring"), Some("exports"))
        );
        assert_eq!(export.destinations, ["US"]);
        assert_eq!(export.relation, "third_party");
        // The consent the disclosure names, and how it was collected, which the subject's
        // own decision record says.
        assert_eq!(
            (
                export.consent_id.as_deref(),
                export.consent_method.as_deref()
            ),
            (Some("c-1"), Some("explicit"))
        );
        assert!(!export.audit_mode);
        // The export's bytes are everyone's: not reported as the subject's.
        assert_eq!((export.status, export.bytes_delivered), (Some(200), None));
        let share = export.bulk.as_ref().unwrap();
        assert_eq!(
            share.path.as_deref(),
            Some("/exports/spending/2026-11.jsonl")
        );
        assert_eq!(
            (
                share.batches.as_slice(),
                share.batch_records,
                share.export_records
            ),
            (&[1][..], 3, Some(5))
        );
        assert_eq!(audit.bulk.as_ref().unwrap().export_records, Some(2));
        assert_eq!(r.refusals.len(), 0);
        let json = serde_json::to_value(&r).unwrap();
        assert!(
            json["disclosures"]["credit-bureau-us"][0]
                .get("bulk")
                .is_none()
        );
        assert_eq!(
            json["disclosures"]["credit-bureau-us"][1]["bulk"]["batches"][0],
            1
        );
    }

    #[test]
    fn a_subject_named_without_a_consent_left_in_audit_mode() {
        let r = bulk_report("u4");
        let d = &r.disclosures["credit-bureau-us"];
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].id.as_str(), d[0].audit_mode), ("a1", true));
        assert_eq!(d[0].consent_id, None);
        // A consent the log names without saying how it was collected stays unknown.
        let r = bulk_report("u3");
        let d = &r.disclosures["credit-bureau-us"][0];
        assert_eq!(
            (d.consent_id.as_deref(), d.consent_method.as_deref()),
            (Some("c-3"), None)
        );
        assert_eq!(d.bulk.as_ref().unwrap().batches, [2]);
        // Nobody else's disclosure reads as theirs.
        let r = bulk_report("u9");
        assert!(r.disclosures.is_empty() && r.refusals.is_empty());
    }

    /// A subject's report reads every worker's chain of a folder: their disclosures in time
    /// order whichever chain logged them, each with its chain's instance.
    #[test]
    fn a_folder_of_worker_chains_is_read_whole() {
        use crate::audit::testing::{decision_at, outcome, policy, subject_decision};
        use crate::policy::Reason;
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let mut refused = decision_at(&p, "r2", 1, Reason::ConsentMissing, "/payments/u1/x.json");
        refused.subject = Some("u1".into());
        let chains = vec![
            vec![
                subject_decision(&p, "s0", 5, "u1"),
                outcome("s0", 6, 100),
                subject_decision(&p, "x0", 7, "u2"),
            ],
            vec![subject_decision(&p, "s1", 2, "u1"), outcome("s1", 3, 50)],
            vec![crate::audit::Record::Decision(Box::new(refused))],
        ];
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crate::audit::testing::write_worker_chains(
                dir.path(),
                None,
                chains,
            ));
        let r = build(Segments::local(dir.path()).unwrap(), "u1", None, None).unwrap();
        let got: Vec<(&str, Option<u64>, Option<&str>)> = r.disclosures["credit-bureau-us"]
            .iter()
            .map(|d| (d.id.as_str(), d.bytes_delivered, d.instance.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("s1", Some(50), Some("side-w1")),
                ("s0", Some(100), Some("side"))
            ]
        );
        assert_eq!(r.refusals.len(), 1);
        assert_eq!(
            (r.refusals[0].id.as_str(), r.refusals[0].instance.as_deref()),
            ("r2", Some("side-w2"))
        );
        // Six records and a final checkpoint per chain.
        assert_eq!(r.records_read, 9);
        assert_eq!(r.log_from.as_deref(), Some("2026-11-28T04:00:01.000000Z"));
    }
}
