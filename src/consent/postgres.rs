//! The `postgres://` store, for fleets: many sidecars share one database. One file because
//! it is one backend: its schema, writes, bulk import, change feed and cache-miss reads share
//! the SQL of a consent's current state, the decoding of its rows and the connection helpers.
//!
//! Every grant and revocation, however written (any sidecar's admin API, the `consent`
//! command, straight SQL), is numbered in `consent_changes` by statement-level triggers,
//! under the writers' advisory lock so that numbers follow commit order, and NOTIFYs its
//! subject on the `residency_consents` channel (an empty notification for a large
//! statement). Each proxy's feed LISTENs on one connection and reads the change table after
//! every notification, heartbeat and reconnection: a cache forgets the changed subjects, a
//! complete index (`preload`) applies their consents' new states and is also reloaded every
//! [`RESYNC_EVERY`]. A feed that fell behind what the table keeps starts over. The heartbeat
//! proves the database reachable for the staleness bound; a lost connection is re-established
//! with capped, jittered exponential backoff. Cache misses are point queries over a small
//! pool ([`PgReader`]), from a read replica when one is configured.
//!
//! Rows are facts: triggers refuse to update, delete or truncate them. The schema is
//! versioned in `residency_consent_schema` and migrated under an advisory lock, so sidecars
//! starting together migrate once.

use super::import::{Chunks, Settle};
use super::index::{ConsentIndex, FeedMode as Mode};
use super::record::ConsentRecord;
use super::registry::{Change, Event, Filter, RegistryError, Written, plan, plan_distinct, redact};
use jiff::Timestamp;
use serde::Serialize;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{AsyncMessage, Client, Config, GenericClient, NoTls, Row};

/// The `application_name` of the proxy's connections, unless the URL sets one.
const APPLICATION: &str = "residency-proxy";
/// The `application_name` of the change feed's connection, unless the URL sets one.
pub const FEED_APPLICATION: &str = "residency-proxy-feed";

/// The NOTIFY channel.
pub const CHANNEL: &str = "residency_consents";
/// How often the feed reloads everything even when notifications flow.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// A query that takes longer counts as a lost connection.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows per page of a full load.
const PAGE: i64 = 20_000;
/// Advisory lock key serialising migrations and writes ("rpconsnt").
const LOCK_KEY: i64 = 0x7270_636f_6e73_6e74;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("consent.store {target} is not a PostgreSQL connection URL: {source}")]
    Url {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot reach consent database {target}: {source}")]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("consent database {target}: {source}")]
    Query {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("consent database {target} did not answer within {} s", timeout.as_secs())]
    Timeout { target: String, timeout: Duration },
    #[error("consent database {target}: the connection closed")]
    Closed { target: String },
    #[error(
        "consent database {target} has schema version {found}, newer than this build knows ({known}): upgrade residency-proxy"
    )]
    TooNew {
        target: String,
        found: i32,
        known: i32,
    },
}

/// Schema migrations, in order; `residency_consent_schema.version` counts those applied.
///
/// A build refuses a database migrated past what it knows ([`PgError::TooNew`]) when it next
/// connects, so each migration takes a fleet's not-yet-upgraded sidecars off the registry at
/// their next reconnection. That is why rows the schema lets through but a consent cannot
/// hold (an `'infinity'` time, a NULL in a list) are not refused by a CHECK constraint: they
/// are read one by one, and one that cannot be read grants nothing.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE consents (
    id           text PRIMARY KEY,
    subject      text NOT NULL,
    recipient    text NOT NULL,
    purposes     text[] NOT NULL,
    categories   text[] NOT NULL,
    destinations text[] NOT NULL,
    method       text NOT NULL,
    granted_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    evidence     text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    recorded_by  text NOT NULL DEFAULT session_user
);
CREATE INDEX consents_by_subject ON consents (subject);

CREATE TABLE consent_revocations (
    consent_id  text NOT NULL REFERENCES consents (id),
    revoked_at  timestamptz NOT NULL,
    evidence    text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    recorded_by text NOT NULL DEFAULT session_user
);
CREATE INDEX consent_revocations_by_consent ON consent_revocations (consent_id);

CREATE FUNCTION residency_consent_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('residency_consents', to_jsonb(NEW) ->> TG_ARGV[0]);
    RETURN NULL;
END $$;
CREATE TRIGGER consents_notify AFTER INSERT ON consents
    FOR EACH ROW EXECUTE FUNCTION residency_consent_notify('id');
CREATE TRIGGER consent_revocations_notify AFTER INSERT ON consent_revocations
    FOR EACH ROW EXECUTE FUNCTION residency_consent_notify('consent_id');

CREATE FUNCTION residency_consent_fact_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are facts: they are never changed or deleted (revoke, or grant a new consent)', TG_TABLE_NAME;
END $$;
CREATE TRIGGER consents_kept BEFORE UPDATE OR DELETE ON consents
    FOR EACH ROW EXECUTE FUNCTION residency_consent_fact_kept();
CREATE TRIGGER consents_kept_whole BEFORE TRUNCATE ON consents
    FOR EACH STATEMENT EXECUTE FUNCTION residency_consent_fact_kept();
CREATE TRIGGER consent_revocations_kept BEFORE UPDATE OR DELETE ON consent_revocations
    FOR EACH ROW EXECUTE FUNCTION residency_consent_fact_kept();
CREATE TRIGGER consent_revocations_kept_whole BEFORE TRUNCATE ON consent_revocations
    FOR EACH STATEMENT EXECUTE FUNCTION residency_consent_fact_kept();
"#,
    r#"
CREATE TABLE consent_changes (
    seq         bigserial PRIMARY KEY,
    subject     text NOT NULL,
    consent_id  text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

DROP TRIGGER consents_notify ON consents;
DROP TRIGGER consent_revocations_notify ON consent_revocations;
DROP FUNCTION residency_consent_notify();

-- One call per statement, however many rows it wrote (an import's COPY included). The
-- writers' advisory lock, taken before a change is numbered and held to commit, makes
-- sequence numbers follow commit order: a feed that has read the changes up to N has seen
-- every change numbered N or less, whoever wrote it and however.
CREATE FUNCTION residency_consent_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    first bigint;
    s text;
BEGIN
    PERFORM pg_advisory_xact_lock(8246200247960956532);
    IF TG_TABLE_NAME = 'consents' THEN
        INSERT INTO consent_changes (subject, consent_id)
            SELECT subject, id FROM new_rows;
    ELSE
        INSERT INTO consent_changes (subject, consent_id)
            SELECT c.subject, r.consent_id FROM new_rows r JOIN consents c ON c.id = r.consent_id;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    -- The subject travels in the notification of a small change; a large one (an import)
    -- sends one empty notification, and the feeds read the change table.
    IF n > 64 THEN
        PERFORM pg_notify('residency_consents', '');
    ELSIF n > 0 THEN
        -- Computed once: in the condition, the volatile currval() would be evaluated per
        -- row and keep the primary key from being used.
        first := currval('consent_changes_seq_seq') - n;
        FOR s IN SELECT DISTINCT x.subject FROM consent_changes x WHERE x.seq > first LOOP
            PERFORM pg_notify('residency_consents', CASE WHEN octet_length(s) <= 1000 THEN s ELSE '' END);
        END LOOP;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER consents_changed AFTER INSERT ON consents
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION residency_consent_changed();
CREATE TRIGGER consent_revocations_changed AFTER INSERT ON consent_revocations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION residency_consent_changed();
"#,
];

/// The columns of a current state, in the order [`state_from_row`] reads them. Times are read
/// as `timestamptz` and converted here ([`Time`]), not in SQL: an `::int8` cast of
/// `'infinity'` fails the whole query, and with it every full load.
const STATE_COLUMNS: &str = "c.id, c.subject, c.recipient, c.purposes, c.categories, c.destinations, c.method, \
     c.granted_at, c.expires_at, c.evidence, \
     (SELECT min(r.revoked_at) FROM consent_revocations r WHERE r.consent_id = c.id)";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

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
struct Unreadable {
    id: String,
    subject: String,
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

fn state_from_row(row: &Row) -> Result<ConsentRecord, Unreadable> {
    state_from_row_at(row, 0)
}

/// A current state whose [`STATE_COLUMNS`] start at column `at`.
fn state_from_row_at(row: &Row, at: usize) -> Result<ConsentRecord, Unreadable> {
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

fn warn_unreadable(u: Unreadable) {
    tracing::warn!(consent.id = %u.id, subject = %u.subject, reason = %u.why, "unreadable consent row ignored; it grants nothing");
}

/// Parses a store URL, with defaults suited to a sidecar.
fn config(url: &str) -> Result<(Config, String), PgError> {
    let target = redact(url);
    let mut config = Config::from_str(url).map_err(|source| PgError::Url {
        target: target.clone(),
        source,
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION);
    }
    config.keepalives(true);
    Ok((config, target))
}

/// Bounds a database call, naming the database when it takes too long.
async fn bounded<T>(
    target: &str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(QUERY_TIMEOUT, f).await {
        Ok(r) => r.map_err(|source| PgError::Query {
            target: target.into(),
            source,
        }),
        Err(_) => Err(PgError::Timeout {
            target: target.into(),
            timeout: QUERY_TIMEOUT,
        }),
    }
}

async fn migrate(client: &mut Client, target: &str) -> Result<(), PgError> {
    let known = MIGRATIONS.len() as i32;
    // The usual case, with no lock and no privilege beyond SELECT: already up to date.
    let exists: bool = bounded(
        target,
        client.query_one(
            "SELECT to_regclass('residency_consent_schema') IS NOT NULL",
            &[],
        ),
    )
    .await?
    .get(0);
    if exists {
        let current: i32 = bounded(
            target,
            client.query_one(
                "SELECT coalesce(max(version), 0) FROM residency_consent_schema",
                &[],
            ),
        )
        .await?
        .get(0);
        if current == known {
            return Ok(());
        }
    }
    let tx = bounded(target, client.transaction()).await?;
    bounded(
        target,
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]),
    )
    .await?;
    bounded(
        target,
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS residency_consent_schema (version integer NOT NULL)",
        ),
    )
    .await?;
    let found: i32 = bounded(
        target,
        tx.query_one(
            "SELECT coalesce(max(version), 0) FROM residency_consent_schema",
            &[],
        ),
    )
    .await?
    .get(0);
    if found > known {
        return Err(PgError::TooNew {
            target: target.into(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(());
    }
    for m in &MIGRATIONS[found as usize..] {
        bounded(target, tx.batch_execute(m)).await?;
    }
    bounded(
        target,
        tx.execute("DELETE FROM residency_consent_schema", &[]),
    )
    .await?;
    bounded(
        target,
        tx.execute(
            "INSERT INTO residency_consent_schema (version) VALUES ($1)",
            &[&known],
        ),
    )
    .await?;
    bounded(target, tx.commit()).await
}

/// The selected consents' current states.
async fn states(
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
async fn states_of(
    client: &impl GenericClient,
    target: &str,
    ids: &[&str],
) -> Result<Vec<Result<ConsentRecord, Unreadable>>, PgError> {
    let sql = format!("SELECT {STATE_COLUMNS} FROM consents c WHERE c.id = ANY($1)");
    let rows = bounded(target, client.query(&sql, &[&ids])).await?;
    Ok(rows.iter().map(state_from_row).collect())
}

/// Every consent, a page at a time (memory stays bounded by the page, not the table).
async fn load_all(client: &Client, target: &str) -> Result<Vec<ConsentRecord>, PgError> {
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

async fn history(client: &Client, target: &str, filter: Filter<'_>) -> Result<Vec<Event>, PgError> {
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

#[derive(Serialize)]
struct RevocationRow<'a> {
    consent_id: &'a str,
    revoked_at: Timestamp,
    evidence: Option<&'a str>,
}

/// Writes a batch in one transaction, serialised with every other writer of the database.
async fn write(
    client: &mut Client,
    target: &str,
    changes: &[Change],
    by: &str,
) -> Result<Vec<Result<Written, RegistryError>>, PgError> {
    let tx = bounded(target, client.transaction()).await?;
    bounded(
        target,
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]),
    )
    .await?;
    let ids: Vec<&str> = changes.iter().map(Change::id).collect();
    let held = states_of(&tx, target, &ids)
        .await?
        .into_iter()
        .filter_map(Result::ok)
        .map(|r| (r.id.clone(), r))
        .collect();
    let (batch, results) = plan(held, changes);
    // One statement per kind of fact, whatever the batch size: the rows travel as JSON.
    if !batch.grants.is_empty() {
        let rows = serde_json::to_string(&batch.grants).expect("records serialise");
        bounded(
            target,
            tx.execute(
                "INSERT INTO consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at, evidence, recorded_by) \
                 SELECT id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at, evidence, $2 \
                 FROM jsonb_to_recordset($1::text::jsonb) AS x(id text, subject text, recipient text, purposes text[], categories text[], \
                      destinations text[], method text, granted_at timestamptz, expires_at timestamptz, evidence text)",
                &[&rows, &by],
            ),
        )
        .await?;
    }
    if !batch.revocations.is_empty() {
        let rows: Vec<RevocationRow> = batch
            .revocations
            .iter()
            .map(|r| RevocationRow {
                consent_id: &r.consent_id,
                revoked_at: r.revoked_at,
                evidence: r.evidence.as_deref(),
            })
            .collect();
        let rows = serde_json::to_string(&rows).expect("revocations serialise");
        bounded(
            target,
            tx.execute(
                "INSERT INTO consent_revocations (consent_id, revoked_at, evidence, recorded_by) \
                 SELECT consent_id, revoked_at, evidence, $2 \
                 FROM jsonb_to_recordset($1::text::jsonb) AS x(consent_id text, revoked_at timestamptz, evidence text)",
                &[&rows, &by],
            ),
        )
        .await?;
    }
    prune_changes(&tx, target).await?;
    bounded(target, tx.commit()).await?;
    Ok(results)
}

/// A time as a binary COPY sends a `timestamptz`: microseconds from PostgreSQL's epoch.
#[derive(Debug)]
struct CopyTime(Timestamp);

impl ToSql for CopyTime {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        bytes::BufMut::put_i64(out, self.0.as_microsecond() - PG_EPOCH_US);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

const COPY_GRANTS: &str = "COPY consents (id, subject, recipient, purposes, categories, destinations, method, granted_at, expires_at, evidence, recorded_by) FROM STDIN (FORMAT binary)";
const COPY_GRANT_TYPES: [Type; 11] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
];
const COPY_REVOCATIONS: &str = "COPY consent_revocations (consent_id, revoked_at, evidence, recorded_by) FROM STDIN (FORMAT binary)";
const COPY_REVOCATION_TYPES: [Type; 4] = [Type::TEXT, Type::TIMESTAMPTZ, Type::TEXT, Type::TEXT];

/// Writes the chunks of an import (see [`super::import`]) in one transaction holding the
/// writers' lock: for each chunk, one query reads what the registry holds for its ids, the
/// plan decides, and the new facts go in by binary `COPY`. Returns the read failure that
/// stopped it, if any: then nothing is written. The COPYs and the commit are not bounded by
/// [`QUERY_TIMEOUT`]: their time grows with the import.
async fn import(
    client: &mut Client,
    target: &str,
    chunks: &mut Chunks,
    by: &str,
    settle: &mut Settle,
) -> Result<Option<std::io::Error>, PgError> {
    let query = |source| PgError::Query {
        target: target.into(),
        source,
    };
    let tx = bounded(target, client.transaction()).await?;
    bounded(
        target,
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]),
    )
    .await?;
    let held_sql = format!("SELECT {STATE_COLUMNS} FROM consents c WHERE c.id = ANY($1)");
    let held_stmt = bounded(target, tx.prepare(&held_sql)).await?;
    let grants = bounded(target, tx.prepare(COPY_GRANTS)).await?;
    let revocations = bounded(target, tx.prepare(COPY_REVOCATIONS)).await?;
    while let Some(chunk) = chunks.recv().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // Dropping the transaction rolls it back.
            Err(e) => return Ok(Some(e)),
        };
        let rows = bounded(target, tx.query(&held_stmt, &[&chunk.ids()])).await?;
        let held = rows
            .iter()
            .filter_map(|row| state_from_row(row).map_err(warn_unreadable).ok())
            .map(|r| (r.id.clone(), r))
            .collect();
        let (changes, chunk) = chunk.take();
        let (batch, results) = plan_distinct(held, changes);
        if !batch.grants.is_empty() {
            let sink = tx.copy_in(&grants).await.map_err(query)?;
            let mut rows = std::pin::pin!(BinaryCopyInWriter::new(sink, &COPY_GRANT_TYPES));
            for r in &batch.grants {
                rows.as_mut()
                    .write(&[
                        &r.id,
                        &r.subject,
                        &r.recipient,
                        &r.purposes,
                        &r.categories,
                        &r.destinations,
                        &r.method,
                        &CopyTime(r.granted_at),
                        &CopyTime(r.expires_at),
                        &r.evidence,
                        &by,
                    ])
                    .await
                    .map_err(query)?;
            }
            rows.finish().await.map_err(query)?;
        }
        if !batch.revocations.is_empty() {
            let sink = tx.copy_in(&revocations).await.map_err(query)?;
            let mut rows = std::pin::pin!(BinaryCopyInWriter::new(sink, &COPY_REVOCATION_TYPES));
            for r in &batch.revocations {
                rows.as_mut()
                    .write(&[&r.consent_id, &CopyTime(r.revoked_at), &r.evidence, &by])
                    .await
                    .map_err(query)?;
            }
            rows.finish().await.map_err(query)?;
        }
        settle.chunk(chunk, results);
    }
    prune_changes(&tx, target).await?;
    tx.commit().await.map_err(query)?;
    Ok(None)
}

/// The change table keeps the latest [`CHANGES_KEPT`] changes only: every writer deletes
/// older ones in its transaction (feeds further behind start over).
async fn prune_changes(tx: &tokio_postgres::Transaction<'_>, target: &str) -> Result<(), PgError> {
    bounded(
        target,
        tx.execute(
            "DELETE FROM consent_changes WHERE seq <= (SELECT max(seq) FROM consent_changes) - $1",
            &[&CHANGES_KEPT],
        ),
    )
    .await?;
    Ok(())
}

/// Connects, driving the connection on its own task. Notifications go to `notes` when given.
async fn connect(
    config: &Config,
    target: &str,
    notes: Option<mpsc::UnboundedSender<String>>,
) -> Result<Client, PgError> {
    let (client, mut conn) = config
        .connect(NoTls)
        .await
        .map_err(|source| PgError::Connect {
            target: target.into(),
            source,
        })?;
    let target = target.to_string();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Some(tx) = &notes {
                        let _ = tx.send(n.payload().to_string());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(consent.store = %target, error = %e, "consent database connection ended");
                    return;
                }
                None => return,
            }
        }
    });
    Ok(client)
}

/// The registry's writer and reader for the admin API and the `consent` command: one
/// connection, opened on first use and re-opened after a failure.
pub struct PgRegistry {
    config: Config,
    target: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl PgRegistry {
    /// Parses the URL; connects on first use.
    pub fn new(url: &str) -> Result<PgRegistry, PgError> {
        let (config, target) = config(url)?;
        Ok(PgRegistry {
            config,
            target,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The database, for messages (without a password).
    pub fn target(&self) -> &str {
        &self.target
    }

    async fn session(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, PgError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            let mut client = connect(&self.config, &self.target, None).await?;
            migrate(&mut client, &self.target).await?;
            *guard = Some(client);
        }
        Ok(guard)
    }

    /// Keeps the connection after a success, drops it after a failure.
    fn settle<T>(guard: &mut Option<Client>, result: Result<T, PgError>) -> Result<T, PgError> {
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// See [`super::Registry::write`].
    pub async fn write(
        &self,
        changes: &[Change],
        by: &str,
    ) -> Result<Vec<Result<Written, RegistryError>>, PgError> {
        let mut guard = self.session().await?;
        let client = guard.as_mut().expect("connected");
        let result = write(client, &self.target, changes, by).await;
        Self::settle(&mut guard, result)
    }

    /// See [`super::Registry::import_file`].
    pub async fn import(
        &self,
        chunks: &mut Chunks,
        by: &str,
        settle: &mut Settle,
    ) -> Result<Option<std::io::Error>, PgError> {
        let mut guard = self.session().await?;
        let client = guard.as_mut().expect("connected");
        let result = import(client, &self.target, chunks, by, settle).await;
        Self::settle(&mut guard, result)
    }

    pub async fn list(&self, filter: Filter<'_>) -> Result<Vec<ConsentRecord>, PgError> {
        let mut guard = self.session().await?;
        let client = guard.as_ref().expect("connected");
        let result = states(client, &self.target, filter).await;
        Self::settle(&mut guard, result)
    }

    pub async fn history(&self, filter: Filter<'_>) -> Result<Vec<Event>, PgError> {
        let mut guard = self.session().await?;
        let client = guard.as_ref().expect("connected");
        let result = history(client, &self.target, filter).await;
        Self::settle(&mut guard, result)
    }
}

/// How many of the latest changes the change table keeps: a feed that falls further behind
/// (a sidecar cut off for that long) forgets its whole cache, or reloads its whole index.
pub const CHANGES_KEPT: i64 = 1_000_000;
/// Most changes read from the change table at once.
const CHANGES_PAGE: i64 = 10_000;

/// One connection of the feed: LISTENing, with its notifications.
struct Session {
    client: Client,
    notes: mpsc::UnboundedReceiver<String>,
}

/// One change read from the change table.
struct ChangeRow {
    seq: i64,
    subject: String,
    consent_id: String,
}

/// The proxy's change feed: keeps `index` equal to the database, or a cache of it (see the
/// module doc).
struct Feed {
    config: Config,
    target: String,
    index: Arc<ConsentIndex>,
    heartbeat: Duration,
    mode: Mode,
    /// The last change applied; `None` until the first connection.
    last_seq: Option<i64>,
    /// Subjects changed lately, for reads from a replica (see [`Recent`]).
    recent: Option<Arc<Recent>>,
}

/// Most notified subjects gathered before the change table is read.
const FETCH_MAX: usize = 5000;

impl Feed {
    /// Connects and LISTENs; then a complete index is loaded whole (a change committed after
    /// the load began is in the change table and applied after it), and a cache catches up
    /// with the changes since its last connection.
    async fn open(&mut self) -> Result<Session, PgError> {
        let (tx, notes) = mpsc::unbounded_channel();
        let mut client = connect(&self.config, &self.target, Some(tx)).await?;
        migrate(&mut client, &self.target).await?;
        bounded(
            &self.target,
            client.batch_execute(&format!("LISTEN {CHANNEL}")),
        )
        .await?;
        match (self.mode, self.last_seq) {
            (Mode::Preload, _) => self.resync(&client).await?,
            (Mode::Invalidate, None) => {
                let seq = max_seq(&client, &self.target).await?;
                tracing::info!(consent.store = %self.target, change_seq = seq, "consent store connected (cache mode: nothing loaded)");
                self.last_seq = Some(seq);
            }
            (Mode::Invalidate, Some(_)) => self.catch_up(&client).await?,
        }
        Ok(Session { client, notes })
    }

    /// Loads the whole registry into a complete index.
    async fn resync(&mut self, client: &Client) -> Result<(), PgError> {
        let started = std::time::Instant::now();
        // Read first: changes committed during the load are applied after it.
        let seq = max_seq(client, &self.target).await?;
        let records = load_all(client, &self.target).await?;
        let read = started.elapsed();
        let index = self.index.clone();
        let (total, rejected) = tokio::task::spawn_blocking(move || {
            let rejected = index.replace_all(&records);
            (records.len(), rejected)
        })
        .await
        .expect("replace_all does not panic");
        self.last_seq = Some(seq);
        self.index.freshness().confirm();
        tracing::info!(
            consent.store = %self.target,
            consents = total - rejected,
            rejected,
            read_ms = read.as_millis() as u64,
            ms = started.elapsed().as_millis() as u64,
            "consents loaded"
        );
        Ok(())
    }

    /// Applies the changes numbered after the last one applied. A feed that fell behind what
    /// the table keeps, or (cache) by more than a page, starts over: a cache forgets
    /// everything, a complete index reloads.
    async fn catch_up(&mut self, client: &Client) -> Result<(), PgError> {
        let Some(mut last) = self.last_seq else {
            return Ok(());
        };
        let oldest: Option<i64> = bounded(
            &self.target,
            client.query_one("SELECT min(seq) FROM consent_changes", &[]),
        )
        .await?
        .get(0);
        if oldest.is_some_and(|o| o > last + 1) {
            tracing::warn!(consent.store = %self.target, last_applied = last, oldest_kept = oldest, "the change table no longer holds every change since the last one applied: starting over");
            return self.start_over(client).await;
        }
        loop {
            let rows = bounded(
                &self.target,
                client.query(
                    "SELECT seq, subject, consent_id, \
                            extract(epoch FROM clock_timestamp() - recorded_at)::float8 \
                     FROM consent_changes WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&last, &CHANGES_PAGE],
                ),
            )
            .await?;
            let full = rows.len() as i64 == CHANGES_PAGE;
            if self.mode == Mode::Invalidate && full {
                tracing::info!(consent.store = %self.target, "over {CHANGES_PAGE} consent changes at once: the whole cache is forgotten");
                return self.start_over(client).await;
            }
            let mut changes = Vec::with_capacity(rows.len());
            let mut lag = 0f64;
            for row in &rows {
                let q = |source| PgError::Query {
                    target: self.target.clone(),
                    source,
                };
                changes.push(ChangeRow {
                    seq: row.try_get(0).map_err(q)?,
                    subject: row.try_get(1).map_err(q)?,
                    consent_id: row.try_get(2).map_err(q)?,
                });
                lag = lag.max(row.try_get::<_, f64>(3).unwrap_or(0.0));
            }
            if let Some(c) = changes.last() {
                last = c.seq;
                self.index
                    .stats()
                    .feed_lag_micros
                    .store((lag * 1e6) as u64, std::sync::atomic::Ordering::Relaxed);
            }
            self.apply(client, &changes).await?;
            self.last_seq = Some(last);
            if !full {
                return Ok(());
            }
        }
    }

    /// Forgets the cache, or reloads the complete index, and follows from the table's end.
    async fn start_over(&mut self, client: &Client) -> Result<(), PgError> {
        match self.mode {
            Mode::Preload => self.resync(client).await,
            Mode::Invalidate => {
                let seq = max_seq(client, &self.target).await?;
                self.index.invalidate_all();
                if let Some(r) = &self.recent {
                    r.forget_upto(seq);
                }
                self.last_seq = Some(seq);
                Ok(())
            }
        }
    }

    async fn apply(&self, client: &Client, changes: &[ChangeRow]) -> Result<(), PgError> {
        if changes.is_empty() {
            return Ok(());
        }
        match self.mode {
            Mode::Invalidate => {
                for c in changes {
                    if let Some(r) = &self.recent {
                        r.note(&c.subject, c.seq);
                    }
                    self.index.invalidate(&c.subject);
                }
            }
            Mode::Preload => {
                let mut ids: Vec<&str> = changes.iter().map(|c| c.consent_id.as_str()).collect();
                ids.sort_unstable();
                ids.dedup();
                for state in states_of(client, &self.target, &ids).await? {
                    match state {
                        Ok(r) => {
                            if let Err(e) = self.index.upsert(&r) {
                                tracing::warn!(consent.id = %r.id, error = %e, "invalid consent in the registry ignored");
                            }
                        }
                        // Withdrawn, as an update the index refuses is: the latest word on a
                        // consent, if unreadable, grants nothing.
                        Err(u) => {
                            self.index.remove(&u.subject, &u.id);
                            warn_unreadable(u);
                        }
                    }
                }
            }
        }
        tracing::debug!(changes = changes.len(), "consent changes applied");
        Ok(())
    }

    /// Serves one session until its connection fails.
    async fn follow(&mut self, mut session: Session) -> PgError {
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            let step = tokio::select! {
                note = session.notes.recv() => match note {
                    Some(subject) => {
                        // The subjects named are forgotten at once; the change table then
                        // says everything that changed, named or not.
                        let mut notes = vec![subject];
                        while notes.len() < FETCH_MAX {
                            match session.notes.try_recv() {
                                Ok(more) => notes.push(more),
                                Err(_) => break,
                            }
                        }
                        if self.mode == Mode::Invalidate {
                            for s in notes.iter().filter(|s| !s.is_empty()) {
                                self.index.invalidate(s);
                            }
                        }
                        self.catch_up(&session.client).await
                    }
                    None => Err(PgError::Closed { target: self.target.clone() }),
                },
                // The heartbeat reads the change table: it proves the database reachable and
                // picks up any change whose notification did not arrive.
                _ = heartbeat.tick() => {
                    let limit = self.heartbeat.max(Duration::from_secs(1));
                    let client = &session.client;
                    let target = self.target.clone();
                    match tokio::time::timeout(limit, self.catch_up(client)).await {
                        Ok(r) => r,
                        Err(_) => Err(PgError::Timeout { target, timeout: limit }),
                    }
                }
                _ = resync.tick(), if self.mode == Mode::Preload => self.resync(&session.client).await,
            };
            match step {
                Ok(()) => self.index.freshness().confirm(),
                Err(e) => return e,
            }
        }
    }

    async fn run(mut self, mut session: Option<Session>) {
        let mut backoff = Backoff::default();
        loop {
            let s = match session.take() {
                Some(s) => s,
                None => match self.open().await {
                    Ok(s) => {
                        if backoff.failed() {
                            tracing::info!(consent.store = %self.target, "consent database reachable again");
                        }
                        backoff = Backoff::default();
                        self.index.freshness().confirm();
                        s
                    }
                    Err(e) => {
                        self.index.freshness().fail(e.to_string());
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                },
            };
            let e = self.follow(s).await;
            tracing::error!(error = %e, "consent database connection lost; what is held stays in force until consent.max_staleness");
            self.index.freshness().fail(e.to_string());
            backoff.next();
        }
    }
}

/// The highest change number, 0 for none.
async fn max_seq(client: &Client, target: &str) -> Result<i64, PgError> {
    Ok(bounded(
        target,
        client.query_one("SELECT coalesce(max(seq), 0) FROM consent_changes", &[]),
    )
    .await?
    .get(0))
}

/// Subjects changed lately, with the number of their latest change: a read from a replica
/// that has not replayed that change yet is done again on the primary. The map is bounded:
/// past [`RECENT_MAX`] subjects it is emptied, and any replica read older than what was
/// emptied goes to the primary.
#[derive(Default)]
pub struct Recent {
    inner: std::sync::Mutex<RecentInner>,
}

#[derive(Default)]
struct RecentInner {
    subjects: std::collections::HashMap<String, i64, foldhash::fast::RandomState>,
    /// Every change numbered up to here has left the map.
    forgotten: i64,
}

const RECENT_MAX: usize = 65_536;

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecentInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, subject: &str, seq: i64) {
        let mut r = self.lock();
        if r.subjects.len() >= RECENT_MAX {
            let top = r.subjects.values().copied().max().unwrap_or(0);
            r.forgotten = r.forgotten.max(top);
            r.subjects.clear();
        }
        r.subjects.insert(subject.to_string(), seq);
    }

    fn forget_upto(&self, seq: i64) {
        let mut r = self.lock();
        r.forgotten = r.forgotten.max(seq);
        r.subjects.clear();
    }

    /// The change a read of `subject` must reflect.
    fn required(&self, subject: &str) -> i64 {
        let r = self.lock();
        r.subjects
            .get(subject)
            .copied()
            .unwrap_or(0)
            .max(r.forgotten)
    }
}

/// A connection of the reader, with its prepared lookup.
struct ReadConn {
    client: Client,
    lookup: tokio_postgres::Statement,
}

/// A pool of connections to one database for cache misses: each connection runs its
/// queries pipelined; a failed one is opened again on next use.
struct ReadPool {
    config: Config,
    target: String,
    slots: Vec<tokio::sync::Mutex<Option<Arc<ReadConn>>>>,
    next: std::sync::atomic::AtomicUsize,
}

/// The point query of a miss: the subject's consents (by the subject index) and the change
/// number the database has reached, in one statement and so one snapshot.
fn lookup_sql() -> String {
    format!(
        "SELECT (SELECT coalesce(max(seq), 0) FROM consent_changes), x.* FROM (SELECT 1) AS one \
         LEFT JOIN LATERAL (SELECT {STATE_COLUMNS} FROM consents c WHERE c.subject = $1) AS x ON TRUE"
    )
}

impl ReadPool {
    fn new(url: &str) -> Result<ReadPool, PgError> {
        let (config, target) = config(url)?;
        Ok(ReadPool {
            config,
            target,
            slots: (0..super::cache::POOL_SIZE)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: Default::default(),
        })
    }

    async fn conn(&self) -> Result<Arc<ReadConn>, PgError> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        *slot = None;
        let client = connect(&self.config, &self.target, None).await?;
        let lookup = bounded(&self.target, client.prepare(&lookup_sql())).await?;
        let c = Arc::new(ReadConn { client, lookup });
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The subject's consents and the change number they reflect.
    async fn subject(&self, subject: &str) -> Result<(Vec<ConsentRecord>, i64), PgError> {
        let c = self.conn().await?;
        let rows = bounded(&self.target, c.client.query(&c.lookup, &[&subject])).await?;
        let seq: i64 = rows.first().map_or(0, |r| r.get(0));
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            // The left join's one row of nothing: no consent.
            if row.try_get::<_, Option<String>>(1).ok().flatten().is_none() {
                continue;
            }
            match state_from_row_at(row, 1) {
                Ok(r) => out.push(r),
                Err(u) => warn_unreadable(u),
            }
        }
        Ok((out, seq))
    }
}

/// Reads one subject's consents for the cache (SPEC section 4.1): from the replica when
/// `[consent] read_url` names one, else from the primary; a replica that has not yet
/// replayed the subject's latest change known to the feed is passed over for the primary.
pub struct PgReader {
    primary: ReadPool,
    replica: Option<ReadPool>,
    recent: Arc<Recent>,
}

impl PgReader {
    pub fn new(url: &str, read_url: Option<&str>) -> Result<PgReader, PgError> {
        Ok(PgReader {
            primary: ReadPool::new(url)?,
            replica: read_url.map(ReadPool::new).transpose()?,
            recent: Arc::default(),
        })
    }

    /// What the feed shares with this reader.
    pub fn recent(&self) -> Option<Arc<Recent>> {
        self.replica.as_ref().map(|_| self.recent.clone())
    }

    pub async fn subject(&self, subject: &str) -> Result<Vec<ConsentRecord>, PgError> {
        if let Some(replica) = &self.replica {
            let required = self.recent.required(subject);
            match replica.subject(subject).await {
                Ok((records, seq)) if seq >= required => return Ok(records),
                Ok((_, seq)) => {
                    tracing::debug!(
                        replica_seq = seq,
                        required,
                        "consent replica behind: read from the primary"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consent replica failed: read from the primary");
                }
            }
        }
        Ok(self.primary.subject(subject).await?.0)
    }
}

/// Reconnection delays: 100 ms doubling to 5 s, each with up to 25% jitter so that a fleet
/// does not reconnect in lockstep.
#[derive(Default)]
struct Backoff {
    attempts: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = Duration::from_millis(100) * 2u32.saturating_pow(self.attempts.min(6));
        self.attempts += 1;
        let base = base.min(Duration::from_secs(5));
        base + base.mul_f64(fastrand::f64() * 0.25)
    }

    fn failed(&self) -> bool {
        self.attempts > 0
    }
}

/// How often the feed proves the database reachable: often enough that `max_staleness`
/// spans several heartbeats.
fn heartbeat_for(max_staleness: Duration) -> Duration {
    (max_staleness / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

/// Connects to the database at `url`, loads it into `index` (unless the index is a cache),
/// and starts the task that keeps the index current. `recent` is the replica reader's (see
/// [`PgReader::recent`]). An unreachable database does not stop start-up: the index stays
/// stale (consent-needing requests are refused) until the feed reaches it. A malformed URL
/// does.
pub async fn start_feed(
    url: &str,
    index: Arc<ConsentIndex>,
    max_staleness: Duration,
    recent: Option<Arc<Recent>>,
) -> Result<tokio::task::JoinHandle<()>, PgError> {
    let (mut config, target) = config(url)?;
    // Told apart from the other connections in pg_stat_activity (an operator can see, or
    // end, the one that LISTENs).
    if config.get_application_name() == Some(APPLICATION) {
        config.application_name(FEED_APPLICATION);
    }
    index.freshness().track();
    let mode = index.feed_mode();
    let mut feed = Feed {
        config,
        target,
        index,
        heartbeat: heartbeat_for(max_staleness),
        mode,
        last_seq: None,
        recent,
    };
    let first = match feed.open().await {
        Ok(s) => {
            feed.index.freshness().confirm();
            Some(s)
        }
        Err(e) => {
            tracing::error!(error = %e, "consent database unreachable at start-up; consent-needing requests are refused until it is reached");
            feed.index.freshness().fail(e.to_string());
            None
        }
    };
    Ok(tokio::spawn(feed.run(first)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_fit_several_times_in_the_staleness_bound() {
        assert_eq!(
            heartbeat_for(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(
            heartbeat_for(Duration::from_secs(30)),
            Duration::from_secs(5)
        );
        assert_eq!(
            heartbeat_for(Duration::from_millis(100)),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn backoff_grows_to_a_cap() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
        for _ in 0..20 {
            b.next();
        }
        let late = b.next();
        assert!(late >= Duration::from_secs(5) && late <= Duration::from_millis(6250));
    }

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

    #[test]
    fn a_malformed_url_is_refused_without_echoing_its_password() {
        let e = PgRegistry::new("postgres://u:hunter2@host:notaport/db")
            .err()
            .unwrap();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
