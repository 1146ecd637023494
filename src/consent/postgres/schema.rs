//! The database's schema: its migrations (versioned in `residency_consent_schema`, applied
//! under the writers' advisory lock), the NOTIFY channel its triggers announce changes on, and
//! how much of the change table is kept. Separate because it is the contract between every
//! writer of the database (this proxy's or straight SQL) and every reader of it.

use super::connect::{PgError, bounded};
use tokio_postgres::Client;

/// The NOTIFY channel.
pub const CHANNEL: &str = "residency_consents";
/// Advisory lock key serialising migrations and writes ("rpconsnt").
pub(super) const LOCK_KEY: i64 = 0x7270_636f_6e73_6e74;

/// How many of the latest changes the change table keeps: a feed that falls further behind
/// (a sidecar cut off for that long) forgets its whole cache, or reloads its whole index.
pub const CHANGES_KEPT: i64 = 1_000_000;

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

/// Ids and subjects compared byte by byte (`COLLATE "C"`), whatever the database's default
/// collation: equality is the same under any deterministic collation, but a locale's
/// comparison costs several times as much in every index insertion and lookup (an import's
/// main cost). Not a numbered migration: a build that predates it reads and writes these
/// columns as before, so it is not locked out of the registry. Changing a column's collation
/// keeps the table but rebuilds the indexes on it, during which the table cannot be read, by
/// any sidecar (about 2 s per million consents): [`migrate`] does it only to an empty
/// registry, and `consent import` (see [`collate_ids`]) to one small enough that the pause
/// is as short as a grant's wait for an import's chunk; a larger one keeps its collation
/// until its operator runs these statements once, at a quiet time.
const COLLATE_IDS: &str = r#"
ALTER TABLE consents ALTER COLUMN id TYPE text COLLATE "C", ALTER COLUMN subject TYPE text COLLATE "C";
ALTER TABLE consent_revocations ALTER COLUMN consent_id TYPE text COLLATE "C";
ALTER TABLE consent_changes ALTER COLUMN subject TYPE text COLLATE "C", ALTER COLUMN consent_id TYPE text COLLATE "C";
"#;

/// Whether the ids are compared byte by byte already (see [`COLLATE_IDS`]).
const IDS_COLLATED: &str = "SELECT coalesce((SELECT c.collname = 'C' FROM pg_attribute a \
     JOIN pg_collation c ON c.oid = a.attcollation \
     WHERE a.attrelid = to_regclass('consents') AND a.attname = 'id'), false)";

/// Brings the schema up to date: the numbered migrations, then [`COLLATE_IDS`] if the
/// registry is empty.
pub(super) async fn migrate(client: &mut Client, target: &str) -> Result<(), PgError> {
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
            return collate_ids(client, target, Rebuild::IfEmpty).await;
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
    if found < known {
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
    }
    bounded(target, tx.commit()).await?;
    collate_ids(client, target, Rebuild::IfEmpty).await
}

/// The most consents an import rebuilds the indexes of by itself (see [`COLLATE_IDS`]):
/// about 0.2 s during which no sidecar can read the registry.
const REBUILD_AT_MOST: i64 = 100_000;

/// When [`collate_ids`] may change the collation of a registry that holds consents.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Rebuild {
    /// Only an empty registry's (nothing to rebuild): what connecting does.
    IfEmpty,
    /// One holding at most [`REBUILD_AT_MOST`] consents: what an import does first. A
    /// larger one is left as it is, with a warning naming the one-time step.
    IfSmall,
}

/// Applies [`COLLATE_IDS`] under the writers' lock if it is not applied yet and the registry
/// is empty (or, with [`Rebuild::IfSmall`], small). A role that may not alter the tables
/// leaves them as they are: the registry works the same, only slower to import into.
pub(super) async fn collate_ids(
    client: &mut Client,
    target: &str,
    rebuild: Rebuild,
) -> Result<(), PgError> {
    let state = format!(
        "SELECT ({IDS_COLLATED}), (SELECT count(*) FROM (SELECT 1 FROM consents LIMIT {}) AS c)",
        REBUILD_AT_MOST + 1
    );
    let wanted = |row: tokio_postgres::Row| {
        let (collated, held): (bool, i64) = (row.get(0), row.get(1));
        let small = held == 0 || (rebuild == Rebuild::IfSmall && held <= REBUILD_AT_MOST);
        (!collated && small, held == 0, !collated && !small)
    };
    // Without the lock first: connecting to a registry that stays as it is takes no lock.
    let (wanted_now, _, left) = wanted(bounded(target, client.query_one(&state, &[])).await?);
    if left && rebuild == Rebuild::IfSmall {
        tracing::warn!(consent.store = %target, "consent ids are compared by the database's collation, which is slower to import into; the registry holds more than {REBUILD_AT_MOST} consents, so the one-time change to comparing them byte by byte (its indexes rebuilt, during which no sidecar can read it) is left to you: see \"Importing in bulk\" in docs/consent.md");
    }
    if !wanted_now {
        return Ok(());
    }
    let tx = bounded(target, client.transaction()).await?;
    bounded(
        target,
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]),
    )
    .await?;
    let (wanted, empty, _) = wanted(bounded(target, tx.query_one(&state, &[])).await?);
    if !wanted {
        return Ok(());
    }
    let started = std::time::Instant::now();
    // Its time grows with the registry (an index rebuild), so it is not bounded.
    match tx.batch_execute(COLLATE_IDS).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::warn!(consent.store = %target, error = %e, "consent ids are compared by the database's collation, which is slower to import into; run `consent import` once as the tables' owner to compare them byte by byte");
            return Ok(());
        }
        Err(source) => {
            return Err(PgError::Query {
                target: target.into(),
                source,
            });
        }
    }
    bounded(target, tx.commit()).await?;
    if !empty {
        tracing::info!(consent.store = %target, ms = started.elapsed().as_millis() as u64, "consent ids are now compared byte by byte (the registry's indexes were rebuilt, once)");
    }
    Ok(())
}
