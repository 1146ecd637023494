//! The proxy's change feed: one connection LISTENing on the channel, reading the change table
//! after every notification, heartbeat and reconnection, so that a cache forgets changed
//! subjects (and tells the replica reader about them) and a complete index applies their new
//! states; reconnects with backoff. Separate because it is a long-running task of its own,
//! the only part that follows changes.

use super::connect::{APPLICATION, PgError, bounded, config, connect};
use super::reader::Recent;
use super::rows::{load_all, states_of, warn_unreadable};
use super::schema::{CHANNEL, migrate};
use crate::consent::index::{ConsentIndex, FeedMode as Mode};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{Client, Config};

/// The `application_name` of the change feed's connection, unless the URL sets one.
pub const FEED_APPLICATION: &str = "residency-proxy-feed";

/// How often the feed reloads everything even when notifications flow.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
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
}
