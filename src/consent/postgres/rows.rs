//! A consent as PostgreSQL holds it: the SQL of a consent's current state (its grant and
//! earliest revocation), its history, and the decoding of their rows, where a row the proxy
//! cannot read (an infinite time, a NULL in a list) grants nothing and the rows around it
//! still load. Separate because the registry, the reader and the feed all read consents this
//! one way.

use super::connect::{PgError, bounded};
use crate::consent::change::{Event, Filter};
use crate::consent::record::ConsentRecord;
use jiff::Timestamp;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, GenericClient, Row};

/// Rows per page of a full load.
pub(super) const PAGE: i64 = 20_000;

/// The columns of a current state, in the order [`state_from_row`] reads them. Times are read
/// as `timestamptz` and converted here ([`Time`]), not in SQL: an `::int8` cast of
/// `'infinity'` fails the whole query, and with it every full load.
pub(super) const STATE_COLUMNS: &str = "c.id, c.subject, c.recipient, c.purposes, c.categories, c.destinations, c.method, \
     c.granted_at, c.expires_at, c.evidence, \
     (SELECT min(r.revoked_at) FROM consent_revocations r WHERE r.consent_id = c.id)";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
pub(super) const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// A `timestamptz` as PostgreSQL sends it: `None` for `'infinity'` and `'-infinity'`, and
/// for times outside what a consent record holds (years -9999 to 9999).
struct Time(Option<Timestamp>);

impl<'a> FromSql<'a> for Time {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Time, Box<dyn std::error::Error + Sync + Send>> {
        let us = i64::from_be_bytes(raw.try_into()?);
        // The infinities travel as the extreme values.
        if us == i64::MAX || us == i64::MIN {
            return Ok(Time(None));
        }
        Ok(Time(
            us.checked_add(PG_EPOCH_US)
                .and_then(|us| Timestamp::from_microsecond(us).ok()),
        ))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

/// A time for history, where an event is listed whatever its time: one that cannot be held
/// shows as the Unix epoch (as the SQLite registry shows an unreadable one).
fn listed(t: Time) -> Timestamp {
    t.0.unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A consent row the proxy cannot read: a NULL in a list, or a time that is infinite or
/// out of range. The schema lets straight SQL write such rows; each grants nothing, and the
/// rows around it load as usual.
#[derive(Debug)]
pub(super) struct Unreadable {
    pub(super) id: String,
    pub(super) subject: String,
    why: String,
}

/// Column `i` of `row`, or why it cannot be read, naming the column.
fn column<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, String> {
    row.try_get(i).map_err(|e| {
        let why = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        format!("{}: {why}", row.columns()[i].name())
    })
}

/// A finite time in column `i`.
fn time(row: &Row, i: usize) -> Result<Timestamp, String> {
    column::<Time>(row, i)?.0.ok_or_else(|| {
        format!(
            "{}: not a time a consent can hold (infinity, or beyond the years -9999 to 9999)",
            row.columns()[i].name()
        )
    })
}

pub(super) fn state_from_row(row: &Row) -> Result<ConsentRecord, Unreadable> {
    state_from_row_at(row, 0)
}

/// A current state whose [`STATE_COLUMNS`] start at column `at`.
pub(super) fn state_from_row_at(row: &Row, at: usize) -> Result<ConsentRecord, Unreadable> {
    let read = || -> Result<ConsentRecord, String> {
        let granted_at = time(row, at + 7)?;
        Ok(ConsentRecord {
            id: column(row, at)?,
            subject: column(row, at + 1)?,
            recipient: column(row, at + 2)?,
            purposes: column(row, at + 3)?,
            categories: column(row, at + 4)?,
            destinations: column(row, at + 5)?,
            method: column(row, at + 6)?,
            granted_at,
            expires_at: time(row, at + 8)?,
            evidence: column(row, at + 9)?,
            // A revocation whose time cannot be held still revokes, from the grant on: the
            // row says the person withdrew, and only its date is in doubt.
            revoked_at: column::<Option<Time>>(row, at + 10)?.map(|t| t.0.unwrap_or(granted_at)),
        })
    };
    read().map_err(|why| Unreadable {
        id: row.try_get(at).unwrap_or_default(),
        subject: row.try_get(at + 1).unwrap_or_default(),
        why,
    })
}

/// The rows that can be read; the others are logged and skipped.
fn readable(rows: &[Row]) -> Vec<ConsentRecord> {
    rows.iter()
        .filter_map(|row| state_from_row(row).map_err(warn_unreadable).ok())
        .collect()
}

pub(super) fn warn_unreadable(u: Unreadable) {
    tracing::warn!(consent.id = %u.id, subject = %u.subject, reason = %u.why, "unreadable consent row ignored; it grants nothing");
}

/// The selected consents' current states.
pub(super) async fn states(
    client: &impl GenericClient,
    target: &str,
    filter: Filter<'_>,
) -> Result<Vec<ConsentRecord>, PgError> {
    let (cond, param) = condition(filter);
    let sql = format!("SELECT {STATE_COLUMNS} FROM consents c WHERE {cond} ORDER BY c.id");
    let params = params(&param);
    let rows = bounded(target, client.query(&sql, &params)).await?;
    Ok(readable(&rows))
}

/// The states of consents `ids`, each read on its own.
pub(super) async fn states_of(
    client: &impl GenericClient,
    target: &str,
    ids: &[&str],
) -> Result<Vec<Result<ConsentRecord, Unreadable>>, PgError> {
    let sql = format!("SELECT {STATE_COLUMNS} FROM consents c WHERE c.id = ANY($1)");
    let rows = bounded(target, client.query(&sql, &[&ids])).await?;
    Ok(rows.iter().map(state_from_row).collect())
}

/// Every consent, a page at a time (memory stays bounded by the page, not the table).
pub(super) async fn load_all(client: &Client, target: &str) -> Result<Vec<ConsentRecord>, PgError> {
    let sql =
        format!("SELECT {STATE_COLUMNS} FROM consents c WHERE c.id > $1 ORDER BY c.id LIMIT $2");
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let rows = bounded(target, client.query(&sql, &[&after, &PAGE])).await?;
        let done = (rows.len() as i64) < PAGE;
        // The next page starts after the last row, read or not.
        if let Some(last) = rows.last() {
            after = last.try_get(0).map_err(|source| PgError::Query {
                target: target.into(),
                source,
            })?;
        }
        out.extend(readable(&rows));
        if done {
            return Ok(out);
        }
    }
}

enum Param<'a> {
    None,
    Text(&'a str),
}

fn condition(filter: Filter<'_>) -> (&'static str, Param<'_>) {
    match filter {
        Filter::All => ("TRUE", Param::None),
        Filter::Subject(s) => ("c.subject = $1", Param::Text(s)),
        Filter::Id(id) => ("c.id = $1", Param::Text(id)),
    }
}

fn params<'a>(p: &'a Param<'a>) -> Vec<&'a (dyn ToSql + Sync)> {
    match p {
        Param::None => vec![],
        Param::Text(s) => vec![s],
    }
}

pub(super) async fn history(
    client: &Client,
    target: &str,
    filter: Filter<'_>,
) -> Result<Vec<Event>, PgError> {
    let (cond, param) = condition(filter);
    let params = params(&param);
    let recorded = "{t}.recorded_at, {t}.recorded_by";
    let grants = format!(
        "SELECT {STATE_COLUMNS}, {} FROM consents c WHERE {cond}",
        recorded.replace("{t}", "c")
    );
    let query = |source| PgError::Query {
        target: target.into(),
        source,
    };
    let mut events = Vec::new();
    for row in bounded(target, client.query(&grants, &params)).await? {
        let mut r = match state_from_row(&row) {
            Ok(r) => r,
            Err(u) => {
                warn_unreadable(u);
                continue;
            }
        };
        r.revoked_at = None;
        events.push(Event {
            event: "grant",
            consent: r.id.clone(),
            subject: r.subject.clone(),
            at: r.granted_at,
            recorded_at: listed(row.try_get(11).map_err(query)?),
            recorded_by: row.try_get(12).map_err(query)?,
            evidence: r.evidence.clone(),
            record: Some(r),
        });
    }
    let revocations = format!(
        "SELECT r.consent_id, c.subject, r.revoked_at, {}, r.evidence \
         FROM consent_revocations r JOIN consents c ON c.id = r.consent_id WHERE {cond}",
        recorded.replace("{t}", "r")
    );
    for row in bounded(target, client.query(&revocations, &params)).await? {
        events.push(Event {
            event: "revoke",
            consent: row.try_get(0).map_err(query)?,
            subject: row.try_get(1).map_err(query)?,
            at: listed(row.try_get(2).map_err(query)?),
            recorded_at: listed(row.try_get(3).map_err(query)?),
            recorded_by: row.try_get(4).map_err(query)?,
            evidence: row.try_get(5).map_err(query)?,
            record: None,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinite_and_out_of_range_times_are_not_times() {
        let time = |us: i64| {
            Time::from_sql(&Type::TIMESTAMPTZ, &us.to_be_bytes())
                .unwrap()
                .0
        };
        assert_eq!(time(0), Some("2000-01-01T00:00:00Z".parse().unwrap()));
        assert_eq!(time(-PG_EPOCH_US), Some(Timestamp::UNIX_EPOCH));
        assert_eq!(time(i64::MAX), None, "infinity");
        assert_eq!(time(i64::MIN), None, "-infinity");
        // 200000-01-01, which PostgreSQL holds.
        assert_eq!(time(6_248_916_864_000_000_000), None);
    }
}
