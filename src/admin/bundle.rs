//! A sidecar whose rules come from a signed bundle (its file has `[policy.source]`): the source
//! is started on the control runtime before the proxy; until a bundle is live (the one kept on
//! the volume, or the first one fetched) the data port stays closed and the admin listener says
//! why the sidecar is not ready; then the proxy starts on it, and each bundle that goes live
//! after is swapped in on every worker the way a reload is (a request already decided finishes
//! under the policy it was decided by). A refused bundle never reaches the proxy: the source
//! logs it, counts it and shows it, and the live revision keeps serving.

use super::StartError;
use crate::bundle::VerifiedBundle;
use crate::bundle::source::{Compile, Source, SourceHandle, Status, StatusHandle, Waker};
use crate::policy::compile::{Diagnostic, PolicyFile, load_file, merge};
use crate::policy::{Policy, PolicyError};
use crate::proxy::reload::{ReadPolicy, Reloader, Trigger};
use crate::proxy::snapshot::Overrides;
use crate::proxy::{ServeConfig, ServeError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The live bundles of a running source, and the task that swaps each new one in.
pub struct Follower {
    source: SourceHandle,
    task: Option<JoinHandle<()>>,
}

/// A sidecar's source, started and with a bundle live.
pub struct Started {
    /// The policy the live bundle makes with the sidecar's own file.
    pub policy: Policy,
    /// How reloads read the policy: the sidecar's file, merged with the bundle live then.
    pub read: ReadPolicy,
    pub status: StatusHandle,
    /// The running source; [`Follower::follow`] swaps its bundles in.
    pub follower: Follower,
}

impl Follower {
    /// Stops polling and swapping.
    pub fn stop(self) {
        if let Some(task) = self.task {
            task.abort();
        }
        self.source.stop();
    }

    /// Swaps each bundle that goes live from now on into the running proxy, through
    /// `reloader` (every worker, atomically).
    pub fn follow(&mut self, reloader: Arc<Reloader>) {
        let mut bundles = self.source.bundles.clone();
        self.task = Some(tokio::spawn(async move {
            while bundles.changed().await.is_ok() {
                let revision = bundles.borrow_and_update().as_ref().map(|b| b.revision());
                // A rejection is logged, counted and shown in /v1/policy by the reloader; the
                // running policy keeps serving.
                if reloader.reload(Trigger::Bundle).await.is_err() {
                    tracing::error!(
                        bundle.revision = revision,
                        "the proxy could not swap in the live policy bundle; the previous revision keeps deciding"
                    );
                }
            }
        }));
    }
}

/// The policy a sidecar serves: its own file at `path`, read again (an edit takes effect with
/// the next bundle or reload), merged with `bundle`, with the command line's overrides.
pub fn merged(
    path: &Path,
    overrides: &Overrides,
    bundle: &VerifiedBundle,
) -> Result<Policy, PolicyError> {
    match load_file(path, |p| std::fs::read_to_string(p))? {
        PolicyFile::Sidecar(sidecar) => {
            let mut policy = merge(&sidecar, &bundle.rules())?;
            overrides.apply(&mut policy);
            Ok(policy)
        }
        PolicyFile::Whole(_) => Err(PolicyError::Invalid(vec![Diagnostic {
            file: path.to_path_buf(),
            line: Some(1),
            rule: "policy.source".into(),
            message: "no longer names a policy source: a sidecar started on a bundle changes to a whole policy file only by a restart".into(),
        }])),
    }
}

/// Opens the source (the kept bundle, verified and compiled again) and polls it on this
/// runtime, handing its status to `opened` (for the admin listener to say why the sidecar
/// waits); waits until a bundle is live, or `stop` resolves (`None`).
pub async fn start(
    config: &ServeConfig,
    source: crate::policy::model::PolicySource,
    stop: impl Future<Output = ()>,
    opened: impl FnOnce(&StatusHandle),
) -> Result<Option<Started>, StartError> {
    let path = config.policy_path.clone();
    let overrides = config.overrides.clone();
    let compile: Compile = {
        let (path, overrides) = (path.clone(), overrides.clone());
        Arc::new(move |b: &VerifiedBundle| merged(&path, &overrides, b))
    };
    let mut handle = Source::open(source, compile).await?.start();
    let status = handle.status_handle();
    opened(&status);
    let mut bundles = handle.bundles.clone();
    let wait = async {
        loop {
            if bundles.borrow_and_update().is_some() {
                return true;
            }
            if bundles.changed().await.is_err() {
                return false;
            }
        }
    };
    tokio::pin!(stop);
    let live = tokio::select! {
        live = wait => live,
        () = &mut stop => false,
    };
    if !live {
        handle.stop();
        return Ok(None);
    }
    // Marked seen on the handle's own receiver: the follower (a clone of it) swaps in only the
    // bundles that go live after this one.
    let bundle = handle
        .bundles
        .borrow_and_update()
        .clone()
        .expect("a bundle is live once waited for");
    let policy = compile_off_runtime(&path, &overrides, bundle).await?;
    let read = reader(path, overrides, handle.bundles.clone(), handle.waker());
    Ok(Some(Started {
        policy,
        read,
        status,
        follower: Follower {
            source: handle,
            task: None,
        },
    }))
}

async fn compile_off_runtime(
    path: &Path,
    overrides: &Overrides,
    bundle: Arc<VerifiedBundle>,
) -> Result<Policy, ServeError> {
    let (path, overrides) = (path.to_path_buf(), overrides.clone());
    tokio::task::spawn_blocking(move || merged(&path, &overrides, &bundle))
        .await
        .map_err(|e| ServeError::Task(e.to_string()))?
        .map_err(ServeError::from)
}

/// How reloads read the policy: the sidecar's file merged with the bundle live at the time.
/// A reload for another cause than a new bundle (SIGHUP, the sidecar's own file edited) also
/// makes the source look again: a bundle refused as not compiling with the old file may
/// compile with the new one.
fn reader(
    path: PathBuf,
    overrides: Overrides,
    bundles: watch::Receiver<Option<Arc<VerifiedBundle>>>,
    waker: Waker,
) -> ReadPolicy {
    Arc::new(move |trigger| {
        if trigger != Trigger::Bundle {
            waker.poll_now();
        }
        let bundle = bundles.borrow().clone();
        let bundle = bundle.ok_or_else(|| ServeError::Task("no policy bundle is live".into()))?;
        Ok(merged(&path, &overrides, &bundle)?)
    })
}

/// Why a sidecar waiting for its first bundle is not ready: one sentence.
pub fn waiting(status: &Status) -> String {
    let mut why = format!("policy: no verified bundle is live yet from {}", status.url);
    match status.refused.as_ref().or(status.last_failure.as_ref()) {
        Some(f) => why.push_str(&format!("; {}: {}", f.reason, f.message)),
        None => why.push_str("; waiting for the source to answer"),
    }
    why
}

/// The source as `/readyz` shows it once a bundle is live: the live revision, how old the last
/// successful poll is, and a bundle refused since.
#[derive(Debug, Serialize)]
pub struct SourceReadiness {
    pub url: String,
    pub revision: Option<u64>,
    /// Seconds since the source last answered a poll; `None`: not since start (the kept
    /// bundle is serving).
    pub last_poll_age_seconds: Option<f64>,
    /// The bundle the source holds, refused: `REASON: why`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The last poll failed: `REASON: why`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

impl SourceReadiness {
    pub fn of(status: &Status, now: jiff::Timestamp) -> SourceReadiness {
        let line = |f: &crate::bundle::source::Failure| format!("{}: {}", f.reason, f.message);
        // The last failure is shown while no poll has succeeded since.
        let failing = status
            .last_failure
            .as_ref()
            .filter(|f| status.last_poll.is_none_or(|p| f.at > p));
        SourceReadiness {
            url: status.url.clone(),
            revision: status.live.as_ref().map(|l| l.revision),
            last_poll_age_seconds: status.last_poll.map(|p| age(p, now)),
            refused: status.refused.as_ref().map(line),
            last_failure: failing.map(line),
        }
    }
}

/// Seconds from `then` to `now`, to the millisecond.
fn age(then: jiff::Timestamp, now: jiff::Timestamp) -> f64 {
    let ms = (now.as_millisecond() - then.as_millisecond()).max(0);
    ms as f64 / 1000.0
}

/// The source as `/v1/policy` shows it: its status (url, the live bundle with its revision,
/// build time and builder, the last poll, a refused bundle and why, failures by reason) and
/// how old the last successful poll is.
pub fn source_json(status: &Status, now: jiff::Timestamp) -> serde_json::Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = v.as_object_mut() {
        fields.insert(
            "last_poll_age_seconds".into(),
            serde_json::json!(status.last_poll.map(|p| age(p, now))),
        );
    }
    v
}

/// The source's figures for the metrics.
pub fn source_scrape(status: &Status) -> crate::metrics::SourceScrape {
    crate::metrics::SourceScrape {
        last_poll: status.last_poll,
        failures: crate::bundle::Reason::ALL
            .iter()
            .map(|r| (r.as_str(), status.failures.get(r).copied().unwrap_or(0)))
            .collect(),
    }
}
