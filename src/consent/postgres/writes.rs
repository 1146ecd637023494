//! The registry's writer and reader for the admin API and the `consent` command: writes
//! planned by [`crate::consent::change::plan`] and committed in one transaction under the
//! writers' lock, bulk imports by binary `COPY` in a transaction per chunk, listings and
//! history.
//! Separate from the reader and the feed, which serve the proxy and never write.

use super::connect::{PgError, bounded, config, connect};
use super::rows::{
    PG_EPOCH_US, STATE_COLUMNS, history, state_from_row, states, states_of, warn_unreadable,
};
use super::schema::{CHANGES_KEPT, LOCK_KEY, Rebuild, collate_ids, migrate};
use crate::consent::change::{
    Change, Event, Filter, Outcome, Refusal, Revocation, Written, plan, plan_distinct,
};
use crate::consent::import::{Chunks, Fresh, Settle};
use crate::consent::record::ConsentRecord;
use foldhash::fast::RandomState;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::HashMap;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Config, Statement};

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
) -> Result<Vec<Result<Written, Refusal>>, PgError> {
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

/// The statements an import prepares once on its connection.
struct ImportStatements {
    /// Prepared, so that it goes on the wire as one message before the read it is pipelined
    /// with: a statement given as text is prepared first (a round trip), and the prepared
    /// read would then run before the lock is taken.
    lock: Statement,
    held: Statement,
    grants: Statement,
    revocations: Statement,
}

/// Writes the chunks of an import (see [`crate::consent::import`]), each in a transaction of
/// its own holding the writers' lock: a grant made meanwhile through any sidecar's API waits
/// for one chunk, not for the import, and an import cut short leaves the registry holding the
/// chunks before the cut, which running it again completes. A chunk whose ids the registry
/// does not hold (the common case) is written without reading first: the grants go in by
/// binary `COPY`, and a grant of an id the registry holds fails the `COPY` on the primary key,
/// which undoes the chunk; it is then written after reading what the registry holds, as are
/// the chunks after it while they find ids held. Returns the read failure that stopped it, if
/// any (the chunks before it are written). Ids are first made to compare byte by byte
/// ([`collate_ids`]) if the registry is small enough for its indexes to be rebuilt at once. The `COPY`s are not bounded by [`super::connect::QUERY_TIMEOUT`]:
/// their time grows with the chunk and the registry.
async fn import(
    client: &mut Client,
    target: &str,
    chunks: &mut Chunks,
    by: &str,
    settle: &mut Settle,
) -> Result<Option<std::io::Error>, PgError> {
    collate_ids(client, target, Rebuild::IfSmall).await?;
    let held_sql = format!("SELECT {STATE_COLUMNS} FROM consents c WHERE c.id = ANY($1)");
    let statements = ImportStatements {
        lock: bounded(target, client.prepare("SELECT pg_advisory_xact_lock($1)")).await?,
        held: bounded(target, client.prepare(&held_sql)).await?,
        grants: bounded(target, client.prepare(COPY_GRANTS)).await?,
        revocations: bounded(target, client.prepare(COPY_REVOCATIONS)).await?,
    };
    // Whether the last chunk found ids held: then the next one reads before it writes.
    let mut read_first = false;
    while let Some(chunk) = chunks.recv().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => return Ok(Some(e)),
        };
        let (changes, chunk) = chunk.take();
        let fresh = match read_first {
            true => None,
            false => write_fresh(client, target, &statements, &changes, by).await?,
        };
        let results = match fresh {
            Some(results) => results,
            None => {
                let (results, held) =
                    write_planned(client, target, &statements, changes, by).await?;
                read_first = held > 0;
                results
            }
        };
        settle.chunk(chunk, results);
    }
    Ok(None)
}

/// Takes the writers' lock in a new transaction and reads what the registry holds for `ids`
/// (nothing for none), in one round trip: the lock's statement is sent first, so the server
/// reads only once the lock is held.
async fn lock_and_read<'c>(
    client: &'c mut Client,
    target: &str,
    statements: &ImportStatements,
    ids: &[&str],
) -> Result<
    (
        tokio_postgres::Transaction<'c>,
        HashMap<String, ConsentRecord, RandomState>,
    ),
    PgError,
> {
    let tx = bounded(target, client.transaction()).await?;
    let lock = bounded(target, tx.execute(&statements.lock, &[&LOCK_KEY]));
    let rows = async {
        match ids.is_empty() {
            true => Ok(Vec::new()),
            false => bounded(target, tx.query(&statements.held, &[&ids])).await,
        }
    };
    let (locked, rows) = tokio::join!(lock, rows);
    locked?;
    let held = rows?
        .iter()
        .filter_map(|row| state_from_row(row).map_err(warn_unreadable).ok())
        .map(|r| (r.id.clone(), r))
        .collect();
    Ok((tx, held))
}

/// Writes a chunk as [`Fresh`] plans it; `None` (and nothing written) if the registry holds
/// the id of one of its grants.
async fn write_fresh(
    client: &mut Client,
    target: &str,
    statements: &ImportStatements,
    changes: &[Change],
    by: &str,
) -> Result<Option<Vec<Result<Outcome, Refusal>>>, PgError> {
    let fresh = Fresh::plan(changes);
    let withdrawn: Vec<Change> = changes
        .iter()
        .filter(|c| matches!(c, Change::Revoke(_)))
        .cloned()
        .collect();
    let ids: Vec<&str> = withdrawn.iter().map(Change::id).collect();
    let (tx, held) = lock_and_read(client, target, statements, &ids).await?;
    let (withdrawals, mut withdrawn) = plan_distinct(held, withdrawn);
    let copied = copy_grants(&tx, target, &statements.grants, fresh.records(changes), by).await;
    match copied {
        Err(PgError::Query { source, .. }) if holds_an_id(&source) => return Ok(None),
        other => other?,
    }
    let mut revocations = fresh.revocations(changes);
    revocations.extend(withdrawals.revocations);
    copy_revocations(&tx, target, &statements.revocations, &revocations, by).await?;
    prune_changes(&tx, target).await?;
    bounded(target, tx.commit()).await?;
    let mut withdrawn = withdrawn.drain(..);
    let results = fresh
        .outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| withdrawn.next().expect("one result per withdrawal")))
        .collect();
    Ok(Some(results))
}

/// Writes a chunk as [`plan_distinct`] plans it after reading what the registry holds for
/// its ids; returns the results and how many of the ids were held.
async fn write_planned(
    client: &mut Client,
    target: &str,
    statements: &ImportStatements,
    changes: Vec<Change>,
    by: &str,
) -> Result<(Vec<Result<Outcome, Refusal>>, usize), PgError> {
    let ids: Vec<&str> = changes.iter().map(Change::id).collect();
    let (tx, held) = lock_and_read(client, target, statements, &ids).await?;
    drop(ids);
    let found = held.len();
    let (batch, results) = plan_distinct(held, changes);
    copy_grants(&tx, target, &statements.grants, batch.grants.iter(), by).await?;
    copy_revocations(&tx, target, &statements.revocations, &batch.revocations, by).await?;
    prune_changes(&tx, target).await?;
    bounded(target, tx.commit()).await?;
    Ok((results, found))
}

/// Whether a failed `COPY` of grants met an id the registry holds.
fn holds_an_id(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.table() == Some("consents")
    })
}

async fn copy_grants<'a>(
    tx: &tokio_postgres::Transaction<'_>,
    target: &str,
    statement: &Statement,
    grants: impl Iterator<Item = &'a ConsentRecord>,
    by: &str,
) -> Result<(), PgError> {
    let query = |source| PgError::Query {
        target: target.into(),
        source,
    };
    let mut grants = grants.peekable();
    if grants.peek().is_none() {
        return Ok(());
    }
    let sink = tx.copy_in(statement).await.map_err(query)?;
    let mut rows = std::pin::pin!(BinaryCopyInWriter::new(sink, &COPY_GRANT_TYPES));
    for r in grants {
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
    Ok(())
}

async fn copy_revocations(
    tx: &tokio_postgres::Transaction<'_>,
    target: &str,
    statement: &Statement,
    revocations: &[Revocation],
    by: &str,
) -> Result<(), PgError> {
    if revocations.is_empty() {
        return Ok(());
    }
    let query = |source| PgError::Query {
        target: target.into(),
        source,
    };
    let sink = tx.copy_in(statement).await.map_err(query)?;
    let mut rows = std::pin::pin!(BinaryCopyInWriter::new(sink, &COPY_REVOCATION_TYPES));
    for r in revocations {
        rows.as_mut()
            .write(&[&r.consent_id, &CopyTime(r.revoked_at), &r.evidence, &by])
            .await
            .map_err(query)?;
    }
    rows.finish().await.map_err(query)?;
    Ok(())
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

    /// See [`crate::consent::Registry::write`].
    pub async fn write(
        &self,
        changes: &[Change],
        by: &str,
    ) -> Result<Vec<Result<Written, Refusal>>, PgError> {
        let mut guard = self.session().await?;
        let client = guard.as_mut().expect("connected");
        let result = write(client, &self.target, changes, by).await;
        Self::settle(&mut guard, result)
    }

    /// See [`crate::consent::Registry::import_file`].
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_url_is_refused_without_echoing_its_password() {
        let e = PgRegistry::new("postgres://u:hunter2@host:notaport/db")
            .err()
            .unwrap();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
