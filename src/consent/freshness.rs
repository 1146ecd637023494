//! How current the in-memory consent index is: when its store last confirmed it, and why it
//! could not since. The hot path asks only "is it older than `max_staleness`?" (one atomic
//! load and a monotonic clock read); readiness asks why.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// `confirmed` value of an index that no store keeps current (none, or a `file:` store that
/// is read by the proxy itself): it never goes stale.
const UNTRACKED: u64 = u64::MAX;
/// `confirmed` value of a tracked index that no store has confirmed yet.
const NEVER: u64 = 0;

/// When the consent store last confirmed the index (see the module doc).
#[derive(Debug)]
pub struct Freshness {
    origin: Instant,
    /// Milliseconds after `origin` of the last confirmation, plus one; or `NEVER`/`UNTRACKED`.
    confirmed: AtomicU64,
    /// The latest failure to reach the store, cleared by the next confirmation. Read by
    /// readiness and written by the store's feed, never by requests.
    problem: Mutex<Option<String>>,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            origin: Instant::now(),
            confirmed: AtomicU64::new(UNTRACKED),
            problem: Mutex::new(None),
        }
    }
}

impl Freshness {
    /// Starts tracking: until the first [`confirm`](Self::confirm) the index is stale.
    pub fn track(&self) {
        self.confirmed.store(NEVER, Ordering::Release);
    }

    /// The store was reached and the index holds everything it had.
    pub fn confirm(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.confirmed.store(ms, Ordering::Release);
        *self.lock() = None;
    }

    /// The store could not be reached (the index keeps what it holds).
    pub fn fail(&self, why: impl Into<String>) {
        *self.lock() = Some(why.into());
    }

    /// Whether the index went unconfirmed for longer than `max`: consents it holds may no
    /// longer be in force, so the caller must not grant on them.
    pub fn is_stale(&self, max: Duration) -> bool {
        match self.confirmed.load(Ordering::Acquire) {
            UNTRACKED => false,
            NEVER => true,
            ms => self.age(ms) > max.as_millis() as u64,
        }
    }

    /// Why the index is stale, for readiness; `None` while it is fresh.
    pub fn stale_reason(&self, max: Duration) -> Option<String> {
        if !self.is_stale(max) {
            return None;
        }
        let problem = self.lock().clone();
        let problem = problem.as_deref().unwrap_or("no answer yet");
        Some(match self.confirmed.load(Ordering::Acquire) {
            NEVER => format!("consent store: never reached since start-up ({problem})"),
            ms => {
                let age = self.age(ms);
                format!(
                    "consent store: unreachable for {:.1} s, over consent.max_staleness {} s ({problem})",
                    age as f64 / 1000.0,
                    max.as_secs_f64()
                )
            }
        })
    }

    /// The latest failure, if the store has not been reached since.
    pub fn problem(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Milliseconds since the confirmation stored as `ms`.
    fn age(&self, ms: u64) -> u64 {
        (self.origin.elapsed().as_millis() as u64 + 1).saturating_sub(ms)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.problem.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untracked_never_goes_stale_and_tracked_starts_stale() {
        let f = Freshness::default();
        assert!(!f.is_stale(Duration::ZERO));
        f.track();
        assert!(f.is_stale(Duration::from_secs(3600)));
        assert!(
            f.stale_reason(Duration::from_secs(1))
                .unwrap()
                .contains("never reached")
        );
        f.confirm();
        assert!(!f.is_stale(Duration::from_secs(3600)));
        assert_eq!(f.stale_reason(Duration::from_secs(3600)), None);
    }

    #[test]
    fn a_failure_is_reported_once_the_bound_passes_and_cleared_by_a_confirmation() {
        let f = Freshness::default();
        f.track();
        f.confirm();
        f.fail("connection refused");
        assert!(!f.is_stale(Duration::from_secs(3600)), "within the bound");
        std::thread::sleep(Duration::from_millis(5));
        let why = f.stale_reason(Duration::from_millis(1)).unwrap();
        assert!(why.contains("connection refused"), "{why}");
        f.confirm();
        assert_eq!(f.problem(), None);
    }
}
