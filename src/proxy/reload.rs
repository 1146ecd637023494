//! Policy reloads: on request (SIGHUP) and when a watched file changes. The policy file and
//! its includes, the geolocation database, the admin token and the TLS files are polled (metadata only: device,
//! inode, size, modification time) every second; a change is acted on once it has held still
//! for one poll, so that an editor's or a downloader's successive writes make one reload.
//!
//! A reload builds the new snapshots off the request path, on the control runtime (the
//! database is read whole and validated by `GeoDb::open`), one per worker, and swaps each in
//! whole: every worker's next request is decided under the new policy. An invalid one is
//! rejected with every error, counted, reported as an error event and in `/v1/policy`, and
//! the running snapshots keep serving.

use super::snapshot::{Snapshot, read_policy};
use super::token::{AdminToken, read_token};
use super::{ServeConfig, ServeError, Shared};
use crate::metrics::ReloadResult;
use crate::policy::{Policy, PolicyError};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Mutex;

/// What asked for a reload.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP, or `RunningProxy::reload`.
    Signal,
    /// A watched file changed on disk.
    FileChange,
    /// A new signed bundle went live at the policy source.
    Bundle,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::FileChange => "file_change",
            Trigger::Bundle => "bundle",
        }
    }
}

/// The last reload attempt, as `/v1/policy` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadStatus {
    /// RFC 3339.
    pub at: String,
    pub trigger: &'static str,
    /// `"ok"` or `"rejected"`.
    pub result: &'static str,
    /// Every error of a rejected reload, one sentence each (policy errors as
    /// `file:line: rule: message`).
    pub errors: Vec<String>,
}

/// Whether a reload swapped a new snapshot in.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reloaded {
    Swapped,
    /// A watched file changed again while the snapshot was built: nothing was swapped, and
    /// the watcher tries again with the newer version.
    Superseded,
}

/// How a reload reads the policy when its file is not the whole of it: a sidecar's own file
/// (read again) merged with the live bundle, with the command line's overrides applied. Given
/// what asked for the reload; called off the runtime threads.
pub type ReadPolicy = Arc<dyn Fn(Trigger) -> Result<Policy, ServeError> + Send + Sync>;

/// Rebuilds and swaps every worker's snapshot; one reload at a time.
pub struct Reloader {
    /// Every worker's state, worker 0 first.
    workers: Arc<[Arc<Shared>]>,
    config: ServeConfig,
    /// `None`: the policy file is read whole (`read_policy`).
    read: Option<ReadPolicy>,
    /// The data listener's TLS: a reload re-reads its certificate too.
    tls: Option<Arc<crate::tls::ServerTls>>,
    lock: Mutex<()>,
}

impl Reloader {
    pub fn new(
        workers: Arc<[Arc<Shared>]>,
        config: ServeConfig,
        read: Option<ReadPolicy>,
        tls: Option<Arc<crate::tls::ServerTls>>,
    ) -> Reloader {
        Reloader {
            workers,
            config,
            read,
            tls,
            lock: Mutex::new(()),
        }
    }

    /// Reloads unconditionally.
    pub async fn reload(&self, trigger: Trigger) -> Result<(), ServeError> {
        self.reload_if_unchanged(trigger, || async { true })
            .await
            .map(|_| ())
    }

    /// Reloads, swapping the new snapshot in only if `unchanged()` still holds once it is
    /// built; records the result (metric, event, status) unless superseded.
    pub async fn reload_if_unchanged<F: Future<Output = bool>>(
        &self,
        trigger: Trigger,
        unchanged: impl FnOnce() -> F,
    ) -> Result<Reloaded, ServeError> {
        let _guard = self.lock.lock().await;
        let result = self.build(trigger).await;
        let (next, token) = match result {
            Ok(next) if !unchanged().await => {
                drop(next);
                tracing::debug!(
                    reload.trigger = trigger.as_str(),
                    "a watched file changed again while reloading; trying again"
                );
                return Ok(Reloaded::Superseded);
            }
            Ok(next) => next,
            Err(e) => {
                let errors = error_lines(&e);
                self.shared().metrics.reloaded(ReloadResult::Rejected);
                tracing::error!(
                    reload.trigger = trigger.as_str(),
                    errors = errors.len(),
                    error = %e,
                    "policy reload rejected; the running policy keeps serving"
                );
                self.record(trigger, "rejected", errors);
                return Err(e);
            }
        };
        tracing::info!(
            reload.trigger = trigger.as_str(),
            policy.name = %next[0].policy.name,
            policy.hash = %next[0].policy.hash,
            policy.revision = next[0].policy.revision,
            geo.db = next[0].geo_label.as_deref().unwrap_or("none"),
            "policy reloaded"
        );
        for (worker, next) in self.workers.iter().zip(next) {
            next.activate();
            worker.snapshot.store(Arc::new(next));
        }
        let shared = self.shared();
        shared.admin_token.store(token.map(Arc::new));
        shared.metrics.reloaded(ReloadResult::Ok);
        self.record(trigger, "ok", Vec::new());
        Ok(Reloaded::Swapped)
    }

    /// Worker 0's state, through which what all workers share is reached.
    fn shared(&self) -> &Arc<Shared> {
        &self.workers[0]
    }

    /// The next snapshots, one per worker, and the admin token the policy names (read again:
    /// rotating the token takes a reload, not a restart; an unreadable or empty one rejects
    /// the reload).
    async fn build(
        &self,
        trigger: Trigger,
    ) -> Result<(Vec<Snapshot>, Option<AdminToken>), ServeError> {
        let path = self.config.policy_path.clone();
        let overrides = self.config.overrides.clone();
        let read = self.read.clone();
        // Reading and compiling the files is blocking work: off the runtime threads.
        let (policy, token) = tokio::task::spawn_blocking(move || {
            let policy = match read {
                Some(read) => read(trigger)?,
                None => read_policy(&path, &overrides)?,
            };
            let token = policy
                .admin
                .token_file
                .as_deref()
                .map(read_token)
                .transpose()?;
            Ok::<_, ServeError>((policy, token))
        })
        .await
        .expect("the policy loader does not panic")?;
        let running: Vec<Arc<Snapshot>> = self
            .workers
            .iter()
            .map(|w| w.snapshot.load_full())
            .collect();
        let current = &running[0];
        if policy.log.target != current.policy.log.target {
            return Err(ServeError::NeedsRestart { what: "log.path" });
        }
        if policy.log.ship != current.policy.log.ship
            || policy.log.instance != current.policy.log.instance
            || policy.log.rotate_interval != current.policy.log.rotate_interval
        {
            return Err(ServeError::NeedsRestart {
                what: "log.instance, log.rotate_interval and [log.ship]",
            });
        }
        if policy.log.signing_key != current.policy.log.signing_key
            || policy.log.pseudonymize != current.policy.log.pseudonymize
        {
            return Err(ServeError::NeedsRestart {
                what: "log.signing_key and log.pseudonymize",
            });
        }
        let (new, old) = (&policy.consent, &current.policy.consent);
        if new.store != old.store
            || new.read_url != old.read_url
            || new.preload != old.preload
            || new.cache_max_bytes != old.cache_max_bytes
            || new.lookup_timeout != old.lookup_timeout
        {
            return Err(ServeError::NeedsRestart {
                what: "consent.store, read_url, preload, cache_max_bytes and lookup_timeout",
            });
        }
        if policy.proxy.listen != current.policy.proxy.listen {
            return Err(ServeError::NeedsRestart {
                what: "proxy.listen",
            });
        }
        if policy.proxy.workers != current.policy.proxy.workers {
            return Err(ServeError::NeedsRestart {
                what: "proxy.workers",
            });
        }
        if policy.admin.listen != current.policy.admin.listen {
            return Err(ServeError::NeedsRestart {
                what: "admin.listen",
            });
        }
        let tls = match (&policy.tls, &self.tls) {
            (None, None) => None,
            (Some(settings), Some(tls)) => Some((settings.clone(), tls.clone())),
            _ => return Err(ServeError::NeedsRestart { what: "[tls]" }),
        };
        let previous: Vec<&Snapshot> = running.iter().map(|s| &**s).collect();
        let shared = self.shared();
        let next = Snapshot::build_workers(
            policy,
            &previous,
            self.workers.len(),
            shared.consents.clone(),
            &shared.metrics,
        )
        .await?;
        // The certificate is re-read last: nothing is swapped in unless everything loaded.
        if let Some((settings, tls)) = tls {
            tokio::task::spawn_blocking(move || tls.reload(&settings))
                .await
                .map_err(|e| ServeError::Task(e.to_string()))??;
        }
        Ok((next, token))
    }

    fn record(&self, trigger: Trigger, result: &'static str, errors: Vec<String>) {
        self.shared().last_reload.store(Some(Arc::new(ReloadStatus {
            at: crate::audit::record::timestamp(jiff::Timestamp::now()),
            trigger: trigger.as_str(),
            result,
            errors,
        })));
    }
}

/// Every error of a failed reload, one line each.
fn error_lines(e: &ServeError) -> Vec<String> {
    match e {
        ServeError::Policy(PolicyError::Invalid(diags)) => {
            diags.iter().map(ToString::to_string).collect()
        }
        other => vec![other.to_string()],
    }
}

/// One version of a watched file; `None` in a list: the file does not exist (or cannot be
/// examined), which is a version too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    modified: SystemTime,
}

/// The files a policy was built from, and their versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    paths: Vec<PathBuf>,
    versions: Vec<Option<Version>>,
}

/// The files `p` was built from: the policy and its includes, the geolocation database, the
/// admin token (a rotated Secret takes effect without a signal), the TLS files.
fn watched_paths(p: &Policy) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = p.sources.clone();
    paths.extend(p.geo_database.iter().cloned());
    paths.extend(p.admin.token_file.iter().cloned());
    // Certificate files are watched by the TLS module itself (`ServerTls::watch`).
    paths
}

/// Examines `paths` (a `stat` each) off the runtime threads: a stalled file system must not
/// stall requests.
async fn examine(paths: Vec<PathBuf>) -> Watched {
    tokio::task::spawn_blocking(move || {
        let versions = paths
            .iter()
            .map(|p| {
                std::fs::metadata(p).ok().map(|m| Version {
                    dev: m.dev(),
                    ino: m.ino(),
                    size: m.size(),
                    modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                })
            })
            .collect();
        Watched { paths, versions }
    })
    .await
    .expect("examining files does not panic")
}

/// The versions of the files `policy` names, taken when it is read at start-up: a change
/// made while the proxy starts is then seen by the first poll.
pub async fn baseline(policy: &Policy) -> Watched {
    examine(watched_paths(policy)).await
}

/// Polls the files the running snapshot was built from every `every`, and reloads once a
/// change (from `applied`, the versions in force) has held still for one poll.
pub async fn watch(reloader: Arc<Reloader>, every: Duration, mut applied: Watched) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut pending: Option<Watched> = None;
    loop {
        tick.tick().await;
        let current = examine(watched_paths(&reloader.shared().snapshot.load().policy)).await;
        if current.paths != applied.paths {
            // Another reload (SIGHUP) changed what the policy names: start from its files.
            applied = current;
            pending = None;
            continue;
        }
        if current == applied {
            pending = None;
            continue;
        }
        if pending.as_ref() != Some(&current) {
            // Changed since the last poll: wait for it to hold still.
            pending = Some(current);
            continue;
        }
        pending = None;
        let changed: Vec<String> = current
            .paths
            .iter()
            .zip(current.versions.iter().zip(&applied.versions))
            .filter(|(_, (now, before))| now != before)
            .map(|(p, _)| p.display().to_string())
            .collect();
        tracing::info!(files = ?changed, "watched files changed; reloading");
        let result = reloader
            .reload_if_unchanged(Trigger::FileChange, || async {
                examine(current.paths.clone()).await == current
            })
            .await;
        applied = match result {
            // The next poll sees the newer version and starts over.
            Ok(Reloaded::Superseded) => applied,
            // The new snapshot may name other files (an include added or removed): the
            // versions just read stand for the files it kept, new ones are examined now.
            Ok(Reloaded::Swapped) => {
                let paths = watched_paths(&reloader.shared().snapshot.load().policy);
                let fresh = examine(paths).await;
                let versions = fresh
                    .paths
                    .iter()
                    .zip(fresh.versions)
                    .map(|(p, v)| match current.paths.iter().position(|c| c == p) {
                        Some(i) => current.versions[i],
                        None => v,
                    })
                    .collect();
                Watched {
                    paths: fresh.paths,
                    versions,
                }
            }
            // Rejected: wait for the next change rather than retrying the same files.
            Err(_) => current,
        };
    }
}
