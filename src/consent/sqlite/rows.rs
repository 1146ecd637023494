//! A consent as SQLite holds it: the SQL of a consent's current state (its grant and
//! earliest revocation), of its history, and of the states of a list of ids or of subjects,
//! and the decoding of their rows. Separate because the registry, the cache's reader and the feed all read
//! consents this one way.

use crate::consent::change::{Event, Filter};
use crate::consent::record::ConsentRecord;
use foldhash::fast::RandomState;
use jiff::Timestamp;
use rusqlite::{Connection, Row};
use std::collections::HashMap;

/// The columns of a grant, in the order [`grant_from_row`] reads them.
const GRANT_COLUMNS: &str = "c.id, c.subject, c.recipient, c.purposes, c.categories, c.destinations, c.method, c.granted_at, c.expires_at, c.evidence";

/// A grant as stored, or why its row is unreadable (written by hand, say).
fn grant_from_row(row: &Row<'_>) -> rusqlite::Result<Result<ConsentRecord, String>> {
    let id: String = row.get(0)?;
    let lists: [String; 3] = [row.get(3)?, row.get(4)?, row.get(5)?];
    let times: [String; 2] = [row.get(7)?, row.get(8)?];
    let list = |i: usize, name: &str| {
        serde_json::from_str::<Vec<String>>(&lists[i])
            .map_err(|e| format!("{name} is not a JSON array of strings: {e}"))
    };
    let time = |i: usize, name: &str| {
        times[i]
            .parse::<Timestamp>()
            .map_err(|e| format!("{name} is not an RFC 3339 time: {e}"))
    };
    let parsed = (|| {
        Ok::<_, String>((
            list(0, "purposes")?,
            list(1, "categories")?,
            list(2, "destinations")?,
            time(0, "granted_at")?,
            time(1, "expires_at")?,
        ))
    })();
    let (purposes, categories, destinations, granted_at, expires_at) = match parsed {
        Ok(p) => p,
        Err(why) => return Ok(Err(format!("consent \"{id}\": {why}"))),
    };
    Ok(Ok(ConsentRecord {
        id,
        subject: row.get(1)?,
        recipient: row.get(2)?,
        purposes,
        categories,
        destinations,
        method: row.get(6)?,
        granted_at,
        expires_at,
        revoked_at: None,
        evidence: row.get(9)?,
    }))
}

/// Which consents a query covers, as SQL over `consents c` and its one parameter.
pub(super) enum Selection<'a> {
    Filter(Filter<'a>),
    /// A JSON array of ids.
    Ids(String),
}

impl Selection<'_> {
    fn condition(&self) -> (&'static str, Option<&str>) {
        match self {
            Selection::Filter(Filter::All) => ("1 = 1", None),
            Selection::Filter(Filter::Subject(s)) => ("c.subject = ?1", Some(s)),
            Selection::Filter(Filter::Id(id)) => ("c.id = ?1", Some(id)),
            Selection::Ids(json) => ("c.id IN (SELECT value FROM json_each(?1))", Some(json)),
        }
    }
}

/// Current states (grant plus earliest revocation) of the selected consents, in the order
/// they were granted. Unreadable rows are logged and left out: they grant nothing.
pub(super) fn states(
    conn: &Connection,
    sel: &Selection<'_>,
) -> rusqlite::Result<Vec<ConsentRecord>> {
    let (cond, param) = sel.condition();
    let mut revoked: HashMap<String, Timestamp, RandomState> = HashMap::default();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT r.consent_id, r.revoked_at FROM consent_revocations r JOIN consents c ON c.id = r.consent_id WHERE {cond}"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let at: String = row.get(1)?;
        // A revocation whose time cannot be read still revokes (from the start): the row
        // says the person withdrew, and only its date is in doubt.
        let t = revocation_time(&at).unwrap_or_else(|| {
            tracing::warn!(consent.id = %id, revoked_at = %at, "revocation with an unreadable revoked_at: revoked from the grant on");
            Timestamp::MIN
        });
        let e = revoked.entry(id).or_insert(t);
        *e = (*e).min(t);
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GRANT_COLUMNS} FROM consents c WHERE {cond} ORDER BY c.rowid"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        match grant_from_row(row)? {
            Ok(mut r) => {
                r.revoked_at = revoked.get(&r.id).map(|t| (*t).max(r.granted_at));
                out.push(r);
            }
            Err(why) => tracing::warn!(reason = %why, "unreadable consent row ignored"),
        }
    }
    Ok(out)
}

/// A revocation time as the proxy writes it (RFC 3339), or as SQLite's own `datetime('now')`
/// and `CURRENT_TIMESTAMP` write it (`2026-11-28 09:30:00`, UTC): an operator revoking from
/// the `sqlite3` shell is taken at their word.
fn revocation_time(text: &str) -> Option<Timestamp> {
    text.parse::<Timestamp>().ok().or_else(|| {
        let civil: jiff::civil::DateTime = text.parse().ok()?;
        jiff::tz::TimeZone::UTC.to_timestamp(civil).ok()
    })
}

pub(super) fn history(conn: &Connection, filter: Filter<'_>) -> rusqlite::Result<Vec<Event>> {
    let sel = Selection::Filter(filter);
    let (cond, param) = sel.condition();
    let recorded = |s: String| s.parse::<Timestamp>().unwrap_or(Timestamp::UNIX_EPOCH);
    let mut events = Vec::new();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GRANT_COLUMNS}, c.recorded_at, c.recorded_by FROM consents c WHERE {cond}"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    while let Some(row) = rows.next()? {
        let Ok(r) = grant_from_row(row)? else {
            continue;
        };
        events.push(Event {
            event: "grant",
            consent: r.id.clone(),
            subject: r.subject.clone(),
            at: r.granted_at,
            recorded_at: recorded(row.get(10)?),
            recorded_by: row.get(11)?,
            evidence: r.evidence.clone(),
            record: Some(r),
        });
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT r.consent_id, c.subject, r.revoked_at, r.recorded_at, r.recorded_by, r.evidence \
         FROM consent_revocations r JOIN consents c ON c.id = r.consent_id WHERE {cond}"
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(param))?;
    while let Some(row) = rows.next()? {
        let at = revocation_time(&row.get::<_, String>(2)?).unwrap_or(Timestamp::UNIX_EPOCH);
        events.push(Event {
            event: "revoke",
            consent: row.get(0)?,
            subject: row.get(1)?,
            at,
            recorded_at: recorded(row.get(3)?),
            recorded_by: row.get(4)?,
            evidence: row.get(5)?,
            record: None,
        });
    }
    Ok(events)
}

pub(super) fn json_list<S: serde::Serialize>(v: &[S]) -> String {
    serde_json::to_string(v).expect("strings serialise")
}

/// The current states of consents `ids` (a JSON array) that the registry holds, as [`states`]
/// reads them, in one query driven by the ids (an index lookup each, where an `IN` would
/// first build a temporary index of them).
pub(super) fn held(
    conn: &Connection,
    ids: &str,
) -> rusqlite::Result<HashMap<String, ConsentRecord, RandomState>> {
    // CROSS JOIN keeps the ids as the outer loop.
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GRANT_COLUMNS}, r.revoked_at FROM json_each(?1) AS j CROSS JOIN consents c ON c.id = j.value \
         LEFT JOIN consent_revocations r ON r.consent_id = c.id"
    ))?;
    let mut rows = stmt.query([ids])?;
    let mut out: HashMap<String, ConsentRecord, RandomState> = HashMap::default();
    while let Some(row) = rows.next()? {
        let revoked = row.get::<_, Option<String>>(10)?.map(|at| {
            revocation_time(&at).unwrap_or_else(|| {
                tracing::warn!(revoked_at = %at, "revocation with an unreadable revoked_at: revoked from the grant on");
                Timestamp::MIN
            })
        });
        let id: String = row.get(0)?;
        if let Some(r) = out.get_mut(&id) {
            // Another revocation of the same consent: the earliest counts.
            if let Some(at) = revoked {
                let at = at.max(r.granted_at);
                r.revoked_at = Some(r.revoked_at.map_or(at, |t| t.min(at)));
            }
            continue;
        }
        match grant_from_row(row)? {
            Ok(mut r) => {
                r.revoked_at = revoked.map(|t| t.max(r.granted_at));
                out.insert(id, r);
            }
            Err(why) => tracing::warn!(reason = %why, "unreadable consent row ignored"),
        }
    }
    Ok(out)
}

/// The current states of the consents of `subjects` (a JSON array of distinct subjects), as
/// [`states`] reads them, grouped by subject (a subject without consent is absent), in one
/// statement driven by the subjects (an index lookup each, as in [`held`]).
pub(super) fn states_by_subject(
    conn: &Connection,
    subjects: &str,
) -> rusqlite::Result<HashMap<String, Vec<ConsentRecord>, RandomState>> {
    // CROSS JOIN keeps the subjects as the outer loop; rows of one consent (one per
    // revocation) come together, in the order the consents were granted.
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GRANT_COLUMNS}, r.revoked_at FROM json_each(?1) AS j CROSS JOIN consents c ON c.subject = j.value \
         LEFT JOIN consent_revocations r ON r.consent_id = c.id ORDER BY c.rowid"
    ))?;
    let mut rows = stmt.query([subjects])?;
    let mut out: HashMap<String, Vec<ConsentRecord>, RandomState> = HashMap::default();
    // The consent of the previous row: read (its subject) or unreadable (None).
    let mut last: Option<(String, Option<String>)> = None;
    while let Some(row) = rows.next()? {
        let revoked = row.get::<_, Option<String>>(10)?.map(|at| {
            revocation_time(&at).unwrap_or_else(|| {
                tracing::warn!(revoked_at = %at, "revocation with an unreadable revoked_at: revoked from the grant on");
                Timestamp::MIN
            })
        });
        let id: String = row.get(0)?;
        if let Some((last_id, subject)) = &last
            && *last_id == id
        {
            // Another revocation of the same consent: the earliest counts.
            if let (Some(subject), Some(at)) = (subject, revoked)
                && let Some(r) = out.get_mut(subject).and_then(|rs| rs.last_mut())
            {
                let at = at.max(r.granted_at);
                r.revoked_at = Some(r.revoked_at.map_or(at, |t| t.min(at)));
            }
            continue;
        }
        match grant_from_row(row)? {
            Ok(mut r) => {
                r.revoked_at = revoked.map(|t| t.max(r.granted_at));
                last = Some((id, Some(r.subject.clone())));
                out.entry(r.subject.clone()).or_default().push(r);
            }
            Err(why) => {
                tracing::warn!(reason = %why, "unreadable consent row ignored");
                last = Some((id, None));
            }
        }
    }
    Ok(out)
}
