//! The consent registry behind `sqlite:` and `postgres://` stores, as the admin API and the
//! `consent` command use it: grant, revoke, look up, list with history, import. A façade
//! only: it picks the backend a store URL names and runs SQLite's work off the runtime
//! threads; what a change is and how it is planned are [`super::change`]'s, and the SQL is
//! the backends' ([`super::sqlite`], [`super::postgres`]).
//!
//! Two kinds of failure stay apart: a change the registry refuses is answered per change
//! ([`Refusal`], inside the `Ok` of a write), and a store that cannot answer is a
//! [`RegistryError`].

use super::change::{
    Change, Event, Filter, ImportReport, Refusal, Revocation, Written, sort_events,
};
use super::import::{self, ImportCounts, Input, OnRefused, Settle};
use super::postgres::{PgError, PgRegistry};
use super::record::ConsentRecord;
use super::sqlite::{SqliteError, SqliteRegistry};
use crate::policy::model::ConsentStore;
use jiff::Timestamp;
use std::sync::Arc;

/// Changes written per transaction by an import.
pub const IMPORT_BATCH: usize = 1000;

/// A registry: the stores that record consents as facts.
#[derive(Clone)]
pub enum Registry {
    Sqlite(Arc<SqliteRegistry>),
    Postgres(Arc<PgRegistry>),
}

/// Why the registry could not answer at all (a refused change is a [`Refusal`] instead).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("consent.store \"{store}\" is not a registry (use sqlite:PATH or postgres://…)")]
    NotARegistry { store: String },
    #[error(transparent)]
    Sqlite(#[from] SqliteError),
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error("cannot read the import: {0}")]
    Input(std::io::Error),
    #[error("the registry task stopped: {0}")]
    Task(String),
}

impl Registry {
    /// Opens the registry a store URL names. `create`: a missing SQLite file is created (the
    /// proxy at start-up and the `consent` command do; the proxy's admin API later does not,
    /// so that a deleted file is noticed rather than silently replaced).
    pub async fn open(store: &ConsentStore, create: bool) -> Result<Registry, RegistryError> {
        match store {
            ConsentStore::Sqlite(path) => {
                let path = path.clone();
                let reg = blocking(move || SqliteRegistry::open(&path, create).map_err(Into::into))
                    .await?;
                Ok(Registry::Sqlite(Arc::new(reg)))
            }
            ConsentStore::Postgres(url) => Ok(Registry::Postgres(Arc::new(PgRegistry::new(url)?))),
            ConsentStore::File(p) => Err(RegistryError::NotARegistry {
                store: format!("file:{}", p.display()),
            }),
            ConsentStore::None => Err(RegistryError::NotARegistry {
                store: "(none)".into(),
            }),
        }
    }

    /// The store, for messages (without a password).
    pub fn describe(&self) -> String {
        match self {
            Registry::Sqlite(s) => format!("sqlite:{}", s.path().display()),
            Registry::Postgres(p) => p.target().to_string(),
        }
    }

    /// Writes `changes` (each refused on its own, the rest written together); `by` names
    /// who records them.
    pub async fn write(
        &self,
        changes: Vec<Change>,
        by: &str,
    ) -> Result<Vec<Result<Written, Refusal>>, RegistryError> {
        match self {
            Registry::Sqlite(s) => {
                let (s, by) = (s.clone(), by.to_string());
                blocking(move || s.write(&changes, &by).map_err(Into::into)).await
            }
            Registry::Postgres(p) => Ok(p.write(&changes, by).await?),
        }
    }

    /// Records a grant, [`Change::Record`] or [`Change::Undated`]. Granting exactly what is
    /// already recorded changes nothing.
    pub async fn grant(
        &self,
        grant: Change,
        by: &str,
    ) -> Result<Result<Written, Refusal>, RegistryError> {
        self.write_one(grant, by).await
    }

    /// Records a revocation; revoking a revoked consent changes nothing.
    pub async fn revoke(
        &self,
        revocation: Revocation,
        by: &str,
    ) -> Result<Result<Written, Refusal>, RegistryError> {
        self.write_one(Change::Revoke(revocation), by).await
    }

    async fn write_one(
        &self,
        change: Change,
        by: &str,
    ) -> Result<Result<Written, Refusal>, RegistryError> {
        Ok(self
            .write(vec![change], by)
            .await?
            .pop()
            .expect("one result per change"))
    }

    /// Imports the changes of a file (each with the number of its line), in batches: a
    /// record (a grant, revoked when `revoked_at` is set) or the withdrawal of an id (a
    /// revocation, which changes nothing if the registry does not hold the id).
    pub async fn import(
        &self,
        changes: Vec<(usize, Change)>,
        by: &str,
    ) -> Result<ImportReport, RegistryError> {
        let mut report = ImportReport::default();
        for chunk in changes.chunks(IMPORT_BATCH) {
            let batch = chunk.iter().map(|(_, c)| c.clone()).collect();
            let results = self.write(batch, by).await?;
            for ((line, change), result) in chunk.iter().zip(results) {
                report.count(*line, change, result);
            }
        }
        Ok(report)
    }

    /// Imports a JSON lines file in bulk, as the file store reads it (see [`super::import`]):
    /// the latest word on each id, streamed to the store in chunks and written a chunk (in
    /// SQLite, about a second) per transaction: a grant made meanwhile waits for one
    /// transaction, and an import cut short is completed by running it again. `refused`
    /// hears each refused line, in line order.
    pub async fn import_file(
        &self,
        input: Arc<Input>,
        by: &str,
        refused: OnRefused,
    ) -> Result<ImportCounts, RegistryError> {
        let (mut chunks, reader) = import::start(input, Timestamp::now());
        let mut settle = Settle::new(refused);
        let unread = match self {
            Registry::Sqlite(s) => {
                let (s, by) = (s.clone(), by.to_string());
                let (unread, back) = blocking(move || {
                    let unread = s.import(&mut chunks, &by, &mut settle)?;
                    Ok((unread, settle))
                })
                .await?;
                settle = back;
                unread
            }
            Registry::Postgres(p) => p.import(&mut chunks, by, &mut settle).await?,
        };
        if let Some(e) = unread {
            return Err(RegistryError::Input(e));
        }
        let superseded = tokio::task::spawn_blocking(move || reader.join())
            .await
            .map_err(|e| RegistryError::Task(e.to_string()))?
            .map_err(|_| RegistryError::Task("the import reader panicked".into()))?
            .map_err(RegistryError::Input)?;
        settle.counts.superseded = superseded;
        Ok(settle.counts)
    }

    /// Current states of the consents `filter` selects.
    pub async fn list(&self, filter: Filter<'_>) -> Result<Vec<ConsentRecord>, RegistryError> {
        match self {
            Registry::Sqlite(s) => {
                let (s, f) = (s.clone(), OwnedFilter::from(filter));
                blocking(move || s.list(f.borrow()).map_err(Into::into)).await
            }
            Registry::Postgres(p) => Ok(p.list(filter).await?),
        }
    }

    /// One consent's current state.
    pub async fn get(&self, id: &str) -> Result<Option<ConsentRecord>, RegistryError> {
        Ok(self.list(Filter::Id(id)).await?.pop())
    }

    /// Every fact about the consents `filter` selects, in the order they were recorded.
    pub async fn history(&self, filter: Filter<'_>) -> Result<Vec<Event>, RegistryError> {
        let mut events = match self {
            Registry::Sqlite(s) => {
                let (s, f) = (s.clone(), OwnedFilter::from(filter));
                blocking(move || s.history(f.borrow()).map_err(Into::into)).await?
            }
            Registry::Postgres(p) => p.history(filter).await?,
        };
        sort_events(&mut events);
        Ok(events)
    }
}

/// A [`Filter`] that can move to another thread.
enum OwnedFilter {
    All,
    Subject(String),
    Id(String),
}

impl From<Filter<'_>> for OwnedFilter {
    fn from(f: Filter<'_>) -> Self {
        match f {
            Filter::All => OwnedFilter::All,
            Filter::Subject(s) => OwnedFilter::Subject(s.into()),
            Filter::Id(s) => OwnedFilter::Id(s.into()),
        }
    }
}

impl OwnedFilter {
    fn borrow(&self) -> Filter<'_> {
        match self {
            OwnedFilter::All => Filter::All,
            OwnedFilter::Subject(s) => Filter::Subject(s),
            OwnedFilter::Id(s) => Filter::Id(s),
        }
    }
}

/// Runs SQLite work off the runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Task(e.to_string()))?
}
