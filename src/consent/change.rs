//! The bottom of the registry: what a change to it is ([`Change`], [`Revocation`]), what a
//! change did ([`Outcome`], [`Written`]) or why it was refused ([`Refusal`]), and the plan
//! both backends write through ([`plan`]); also the history and listing vocabulary
//! ([`Event`], [`Filter`]) and an import's counts. Separate from the façade
//! ([`super::registry`]) because the backends need these and the façade needs the backends:
//! kept together, the two would import each other.
//!
//! History, not overwrites: a grant is a fact recorded once and never changed; a revocation
//! is a later fact about it. A consent's current state is its grant plus the earliest of its
//! revocations. Both kinds of fact carry who recorded them, when, and their evidence.
//!
//! Both backends write through the same plan: for each change, what the registry already
//! holds for that id decides whether it is a new grant, a revocation, a repetition (nothing
//! to do: imports are idempotent by id) or a conflict (an id reused for different content is
//! refused, never overwritten). A refusal is the registry's answer about one change, not a
//! failure of the store: the store's own errors are the backends' ([`super::sqlite`],
//! [`super::postgres`]).

use super::record::{ConsentRecord, FieldError};
use foldhash::fast::RandomState;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::HashMap;

/// Why the registry refused a change (the store answered; the change is at fault).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("consent \"{id}\" is invalid: {source}")]
    Invalid { id: String, source: FieldError },
    #[error("no consent \"{id}\" in the registry")]
    NotFound { id: String },
    #[error(
        "consent \"{id}\" is already recorded with a different {field}; a grant is never changed: revoke it and grant a new consent"
    )]
    Conflict { id: String, field: &'static str },
}

/// A revocation of a recorded consent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub consent_id: String,
    pub revoked_at: Timestamp,
    pub evidence: Option<String>,
}

/// One change to write.
#[derive(Clone, Debug)]
pub enum Change {
    /// A record as the file store writes it: a grant, with `revoked_at` when it was revoked.
    Record(ConsentRecord),
    /// A grant whose sender left `granted_at` out (the record holds the time it arrived).
    /// For an id already recorded it means the recorded time, so that a request retried
    /// after a timeout finds its first attempt instead of a conflict.
    Undated(ConsentRecord),
    Revoke(Revocation),
}

impl Change {
    pub fn id(&self) -> &str {
        match self {
            Change::Record(r) | Change::Undated(r) => &r.id,
            Change::Revoke(r) => &r.consent_id,
        }
    }
}

/// What a change did.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Granted,
    Revoked,
    /// Granted and revoked at once (an imported record that was already revoked).
    GrantedRevoked,
    /// The registry already held exactly this.
    Unchanged,
}

/// A change written (or found already written), with the consent's state after it.
#[derive(Clone, Debug)]
pub struct Written {
    pub record: ConsentRecord,
    pub outcome: Outcome,
}

/// What the backends write for a batch of changes: grants first, then revocations.
#[derive(Debug, Default)]
pub struct Batch {
    pub grants: Vec<ConsentRecord>,
    pub revocations: Vec<Revocation>,
}

/// The effect of each change given what the registry holds (`existing`, current states by
/// id), in order: a later change of the same id sees the earlier one's result.
pub fn plan(
    mut existing: HashMap<String, ConsentRecord, RandomState>,
    changes: &[Change],
) -> (Batch, Vec<Result<Written, Refusal>>) {
    let mut batch = Batch::default();
    let mut results = Vec::with_capacity(changes.len());
    for change in changes {
        let held = existing.get(change.id());
        let result = step(held, change);
        if let Ok(w) = &result {
            add_facts(&mut batch, change, w);
            existing.insert(w.record.id.clone(), w.record.clone());
        }
        results.push(result);
    }
    (batch, results)
}

/// The facts a change's result adds to the batch.
fn add_facts(batch: &mut Batch, change: &Change, w: &Written) {
    if matches!(w.outcome, Outcome::Granted | Outcome::GrantedRevoked) {
        batch.grants.push(ConsentRecord {
            revoked_at: None,
            ..w.record.clone()
        });
    }
    if matches!(w.outcome, Outcome::Revoked | Outcome::GrantedRevoked) {
        let evidence = match change {
            Change::Revoke(r) => r.evidence.clone(),
            Change::Record(_) | Change::Undated(_) => None,
        };
        batch.revocations.push(Revocation {
            consent_id: w.record.id.clone(),
            revoked_at: w.record.revoked_at.expect("a revoked state"),
            evidence,
        });
    }
}

/// [`plan`] for changes of distinct ids (an import's latest words), taken by value: a record
/// of an id the registry does not hold (the bulk of a first import) moves into the batch
/// instead of being copied. Returns each change's outcome.
pub fn plan_distinct(
    mut existing: HashMap<String, ConsentRecord, RandomState>,
    changes: Vec<Change>,
) -> (Batch, Vec<Result<Outcome, Refusal>>) {
    let mut batch = Batch::default();
    let mut results = Vec::with_capacity(changes.len());
    for change in changes {
        let held = existing.remove(change.id());
        let result = match (change, held) {
            (Change::Record(r), None) => match r.validate() {
                Err(source) => Err(Refusal::Invalid { id: r.id, source }),
                Ok(()) => {
                    let outcome = match r.revoked_at {
                        Some(at) => {
                            batch.revocations.push(Revocation {
                                consent_id: r.id.clone(),
                                revoked_at: at,
                                evidence: None,
                            });
                            Outcome::GrantedRevoked
                        }
                        None => Outcome::Granted,
                    };
                    batch.grants.push(ConsentRecord {
                        revoked_at: None,
                        ..r
                    });
                    Ok(outcome)
                }
            },
            (change, held) => {
                let result = step(held.as_ref(), &change);
                if let Ok(w) = &result {
                    add_facts(&mut batch, &change, w);
                }
                result.map(|w| w.outcome)
            }
        };
        results.push(result);
    }
    (batch, results)
}

fn step(held: Option<&ConsentRecord>, change: &Change) -> Result<Written, Refusal> {
    match (change, held) {
        (Change::Record(r), _) | (Change::Undated(r), None) => grant(held, r),
        // The time left out is the recorded one.
        (Change::Undated(r), Some(h)) => grant(
            held,
            &ConsentRecord {
                granted_at: h.granted_at,
                ..r.clone()
            },
        ),
        (Change::Revoke(r), _) => revoke(held, r),
    }
}

fn grant(held: Option<&ConsentRecord>, r: &ConsentRecord) -> Result<Written, Refusal> {
    let written = |record: ConsentRecord, outcome| Ok(Written { record, outcome });
    if let Err(source) = r.validate() {
        return Err(Refusal::Invalid {
            id: r.id.clone(),
            source,
        });
    }
    let Some(h) = held else {
        let outcome = match r.revoked_at {
            Some(_) => Outcome::GrantedRevoked,
            None => Outcome::Granted,
        };
        return written(r.clone(), outcome);
    };
    if let Some(field) = first_difference(h, r) {
        return Err(Refusal::Conflict {
            id: r.id.clone(),
            field,
        });
    }
    match (h.revoked_at, r.revoked_at) {
        (None, Some(at)) => written(
            ConsentRecord {
                revoked_at: Some(at),
                ..h.clone()
            },
            Outcome::Revoked,
        ),
        // A revoked consent stays revoked: a record without `revoked_at` is an earlier
        // state of it (a file lists the grant, then its revocation).
        _ => written(h.clone(), Outcome::Unchanged),
    }
}

fn revoke(held: Option<&ConsentRecord>, r: &Revocation) -> Result<Written, Refusal> {
    let Some(h) = held else {
        return Err(Refusal::NotFound {
            id: r.consent_id.clone(),
        });
    };
    if h.revoked_at.is_some() {
        return Ok(Written {
            record: h.clone(),
            outcome: Outcome::Unchanged,
        });
    }
    let after = ConsentRecord {
        revoked_at: Some(r.revoked_at),
        ..h.clone()
    };
    match after.validate() {
        Ok(()) => Ok(Written {
            record: after,
            outcome: Outcome::Revoked,
        }),
        Err(source) => Err(Refusal::Invalid {
            id: h.id.clone(),
            source,
        }),
    }
}

/// The first field of the grant (everything but `revoked_at`) where `a` and `b` differ.
fn first_difference(a: &ConsentRecord, b: &ConsentRecord) -> Option<&'static str> {
    let fields: [(&str, bool); 9] = [
        ("subject", a.subject == b.subject),
        ("recipient", a.recipient == b.recipient),
        ("purposes", a.purposes == b.purposes),
        ("categories", a.categories == b.categories),
        ("destinations", a.destinations == b.destinations),
        ("method", a.method == b.method),
        ("granted_at", a.granted_at == b.granted_at),
        ("expires_at", a.expires_at == b.expires_at),
        ("evidence", a.evidence == b.evidence),
    ];
    fields.iter().find(|(_, same)| !same).map(|(f, _)| *f)
}

/// One fact of a consent's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// `grant` or `revoke`.
    pub event: &'static str,
    pub consent: String,
    pub subject: String,
    /// When the fact took effect: `granted_at` or `revoked_at`.
    pub at: Timestamp,
    /// When, and by whom, it was written into the registry.
    pub recorded_at: Timestamp,
    pub recorded_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// The grant itself (grants only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<ConsentRecord>,
}

/// Orders events as they were recorded; a grant comes before a revocation recorded in the
/// same instant (it must have been, for the revocation to refer to it).
pub fn sort_events(events: &mut [Event]) {
    events.sort_by(|a, b| {
        (a.recorded_at, a.event != "grant", &a.consent).cmp(&(
            b.recorded_at,
            b.event != "grant",
            &b.consent,
        ))
    });
}

/// Which consents a listing covers.
#[derive(Copy, Clone, Debug)]
pub enum Filter<'a> {
    All,
    Subject(&'a str),
    Id(&'a str),
}

/// What an import did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    pub granted: usize,
    pub revoked: usize,
    pub unchanged: usize,
    /// Lines of valid records that a later line of the same id replaced or withdrew.
    pub superseded: usize,
    /// Lines refused (1-based line number, why); the rest of the import went ahead.
    pub refused: Vec<(usize, String)>,
}

impl ImportReport {
    /// Adds the counts of a later part of the same import.
    pub fn absorb(&mut self, other: ImportReport) {
        self.granted += other.granted;
        self.revoked += other.revoked;
        self.unchanged += other.unchanged;
        self.superseded += other.superseded;
        self.refused.extend(other.refused);
    }

    pub(super) fn count(&mut self, line: usize, change: &Change, result: Result<Written, Refusal>) {
        let withdrawal = matches!(change, Change::Revoke(_));
        self.count_outcome(line, withdrawal, result.map(|w| w.outcome))
    }

    /// Counts the outcome of a change (a withdrawal: a [`Change::Revoke`]); a refusal with its
    /// line.
    pub(crate) fn count_outcome(
        &mut self,
        line: usize,
        withdrawal: bool,
        result: Result<Outcome, Refusal>,
    ) {
        match result {
            Ok(Outcome::Granted) => self.granted += 1,
            Ok(Outcome::Revoked) => self.revoked += 1,
            Ok(Outcome::GrantedRevoked) => {
                self.granted += 1;
                self.revoked += 1;
            }
            Ok(Outcome::Unchanged) => self.unchanged += 1,
            // The withdrawal of a consent the registry does not hold: nothing to withdraw
            // (the line that withdraws it is refused already).
            Err(Refusal::NotFound { .. }) if withdrawal => {}
            Err(e) => self.refused.push((line, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> ConsentRecord {
        crate::consent::record::sample(id, "u1")
    }

    fn outcomes_of(results: &[Result<Written, Refusal>]) -> Vec<String> {
        outcomes(results)
    }

    fn outcomes(results: &[Result<Written, Refusal>]) -> Vec<String> {
        results
            .iter()
            .map(|r| match r {
                Ok(w) => format!("{:?}", w.outcome),
                Err(e) => format!("error: {e}"),
            })
            .collect()
    }

    #[test]
    fn a_file_with_a_grant_then_its_revocation_becomes_two_facts() {
        let revoked = ConsentRecord {
            revoked_at: Some("2026-06-01T00:00:00Z".parse().unwrap()),
            ..record("c1")
        };
        let (batch, results) = plan(
            HashMap::default(),
            &[
                Change::Record(record("c1")),
                Change::Record(revoked.clone()),
            ],
        );
        assert_eq!(outcomes(&results), ["Granted", "Revoked"]);
        assert_eq!(batch.grants, [record("c1")]);
        assert_eq!(batch.revocations.len(), 1);
        assert_eq!(batch.revocations[0].revoked_at, revoked.revoked_at.unwrap());
    }

    #[test]
    fn repeating_an_import_changes_nothing_and_a_reused_id_is_refused() {
        let held: HashMap<_, _, RandomState> =
            [("c1".to_string(), record("c1"))].into_iter().collect();
        let other = ConsentRecord {
            purposes: vec!["marketing".into()],
            ..record("c1")
        };
        let (batch, results) = plan(held, &[Change::Record(record("c1")), Change::Record(other)]);
        let out = outcomes(&results);
        assert_eq!(out[0], "Unchanged");
        assert!(out[1].contains("different purposes"), "{}", out[1]);
        assert!(batch.grants.is_empty() && batch.revocations.is_empty());
    }

    #[test]
    fn a_revocation_needs_a_grant_is_kept_once_and_is_never_undone() {
        let at: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let revoke = |id: &str, at: Timestamp| {
            Change::Revoke(Revocation {
                consent_id: id.into(),
                revoked_at: at,
                evidence: None,
            })
        };
        let held: HashMap<_, _, RandomState> =
            [("c1".to_string(), record("c1"))].into_iter().collect();
        let (batch, results) = plan(
            held,
            &[
                revoke("nope", at),
                revoke("c1", at),
                revoke("c1", at),
                Change::Record(record("c1")),
            ],
        );
        let out = outcomes(&results);
        assert!(out[0].contains("no consent \"nope\""), "{}", out[0]);
        // Revoking twice, or importing the unrevoked grant again, leaves it revoked.
        assert_eq!(out[1..], ["Revoked", "Unchanged", "Unchanged"]);
        assert_eq!(batch.revocations.len(), 1);

        // A consent granted for a later start can be withdrawn before it starts.
        let held: HashMap<_, _, RandomState> =
            [("c1".to_string(), record("c1"))].into_iter().collect();
        let too_early: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let (batch, results) = plan(held, &[revoke("c1", too_early)]);
        assert_eq!(outcomes(&results), ["Revoked"]);
        assert_eq!(batch.revocations.len(), 1);
    }

    #[test]
    fn a_grant_without_its_time_repeated_is_the_recorded_one() {
        let held: HashMap<_, _, RandomState> =
            [("c1".to_string(), record("c1"))].into_iter().collect();
        let retried = ConsentRecord {
            granted_at: "2026-05-01T00:00:00Z".parse().unwrap(),
            ..record("c1")
        };
        let other = ConsentRecord {
            purposes: vec!["marketing".into()],
            ..retried.clone()
        };
        let (batch, results) = plan(
            held,
            &[
                Change::Undated(retried.clone()),
                Change::Undated(other),
                Change::Record(retried),
                Change::Undated(record("c2")),
            ],
        );
        let out = outcomes(&results);
        assert_eq!(out[0], "Unchanged");
        assert_eq!(results[0].as_ref().unwrap().record, record("c1"));
        // Other terms are still another consent, and a time given is the caller's word.
        assert!(out[1].contains("different purposes"), "{}", out[1]);
        assert!(out[2].contains("different granted_at"), "{}", out[2]);
        assert_eq!(out[3], "Granted");
        assert_eq!(batch.grants, [record("c2")]);
    }

    #[test]
    fn planning_distinct_ids_by_value_plans_what_plan_does() {
        let at: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let revoked = |id: &str| ConsentRecord {
            revoked_at: Some(at),
            ..record(id)
        };
        let held: HashMap<_, _, RandomState> = ["held", "held-revoked", "conflict", "withdrawn"]
            .into_iter()
            .map(|id| {
                let r = if id == "held-revoked" {
                    revoked(id)
                } else {
                    record(id)
                };
                (id.to_string(), r)
            })
            .collect();
        let changes = vec![
            Change::Record(record("new")),
            Change::Record(revoked("new-revoked")),
            Change::Record(ConsentRecord {
                recipient: "*".into(),
                ..record("invalid")
            }),
            Change::Record(record("held")),
            Change::Record(revoked("held-revoked")),
            Change::Record(ConsentRecord {
                purposes: vec!["marketing".into()],
                ..record("conflict")
            }),
            Change::Revoke(Revocation {
                consent_id: "withdrawn".into(),
                revoked_at: at,
                evidence: Some("unreadable".into()),
            }),
            Change::Revoke(Revocation {
                consent_id: "never-held".into(),
                revoked_at: at,
                evidence: None,
            }),
        ];
        let (expected, results) = plan(held.clone(), &changes);
        let (batch, outcomes) = plan_distinct(held, changes);
        assert_eq!(batch.grants, expected.grants);
        assert_eq!(batch.revocations, expected.revocations);
        let expected: Vec<String> = outcomes_of(&results);
        let got: Vec<String> = outcomes
            .iter()
            .map(|r| match r {
                Ok(o) => format!("{o:?}"),
                Err(e) => format!("error: {e}"),
            })
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn an_invalid_record_is_refused_naming_its_field() {
        let bad = ConsentRecord {
            recipient: "*".into(),
            ..record("c1")
        };
        let (_, results) = plan(HashMap::default(), &[Change::Record(bad)]);
        match &results[0] {
            Err(Refusal::Invalid { source, .. }) => assert_eq!(source.field, "recipient"),
            other => panic!("{other:?}"),
        }
    }
}
