//! The registry's writer and reader for the admin API and the `consent` command: writes
//! planned by [`crate::consent::change::plan`] and committed in one transaction under the
//! writers' lock, bulk imports by binary `COPY` in one transaction, listings and history.
//! Separate from the reader and the feed, which serve the proxy and never write.

use super::connect::{PgError, bounded, config, connect};
use super::rows::{
    PG_EPOCH_US, STATE_COLUMNS, history, state_from_row, states, states_of, warn_unreadable,
};
use super::schema::{CHANGES_KEPT, LOCK_KEY, migrate};
use crate::consent::change::{Change, Event, Filter, Refusal, Written, plan, plan_distinct};
use crate::consent::import::{Chunks, Settle};
use crate::consent::record::ConsentRecord;
use jiff::Timestamp;
use serde::Serialize;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Config};

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

/// Writes the chunks of an import (see [`crate::consent::import`]) in one transaction holding the
/// writers' lock: for each chunk, one query reads what the registry holds for its ids, the
/// plan decides, and the new facts go in by binary `COPY`. Returns the read failure that
/// stopped it, if any: then nothing is written. The COPYs and the commit are not bounded by
/// [`super::connect::QUERY_TIMEOUT`]: their time grows with the import.
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
