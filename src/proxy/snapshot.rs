//! The immutable snapshot every request reads once: policy, locator, upstreams, pseudonym
//! key. Each worker has its own (sharing the policy and what was read from disk, with
//! upstream runtimes, so connection pools, of its own). Reloads build new snapshots off the
//! request path and swap each in whole.

use super::ServeError;
use super::upstream::UpstreamRuntime;
use crate::audit::Pseudonymizer;
use crate::audit::keys::SigningKey;
use crate::consent::ConsentIndex;
use crate::consent::index::Lookup;
use crate::consent::record::Consent;
use crate::geo::{GeoDb, Locator};
use crate::metrics::{Metrics, SnapshotMetrics};
use crate::policy::Policy;
use crate::policy::decide::{ConsentLookup, Env};
use crate::policy::decision::Location;
use crate::policy::model::{LogTarget, Scheme};
use crate::tls::UpstreamTls;
use compact_str::CompactString;
use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Values given on the command line, which win over the policy file on every (re)load.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub log: Option<LogTarget>,
    /// Workers (`serve --workers`), overriding `[proxy] workers`.
    pub workers: Option<usize>,
}

impl Overrides {
    pub fn apply(&self, policy: &mut Policy) {
        if let Some(l) = self.listen {
            policy.proxy.listen = l;
        }
        if let Some(a) = self.admin {
            policy.admin.listen = a;
        }
        if let Some(t) = &self.log {
            policy.log.target = t.clone();
        }
        if let Some(w) = self.workers {
            policy.proxy.workers = Some(w);
        }
    }
}

pub struct Snapshot {
    pub policy: Arc<Policy>,
    pub locator: Locator,
    pub upstreams: Vec<Arc<UpstreamRuntime>>,
    pub pseudo: Pseudonymizer,
    pub geo_label: Option<Arc<str>>,
    pub consents: Arc<ConsentIndex>,
    pub signing_key: Option<Arc<SigningKey>>,
    pub loaded_at: jiff::Timestamp,
    /// The counters this snapshot's requests update, indexed like `policy`.
    pub metrics: SnapshotMetrics,
    /// New TLS settings for upstream runtimes kept from the previous snapshot, applied by
    /// [`Snapshot::activate`] when this snapshot is swapped in: a reload that is rejected
    /// after building must leave the running upstreams as they were.
    pending_tls: std::sync::Mutex<Vec<(Arc<UpstreamRuntime>, Option<UpstreamTls>)>>,
}

/// Reads and compiles a policy from disk.
pub fn load_policy(path: &Path) -> Result<Policy, crate::policy::PolicyError> {
    crate::policy::load(path, |p| std::fs::read_to_string(p))
}

/// Reads a policy from disk and applies the command-line overrides.
pub fn read_policy(path: &Path, overrides: &Overrides) -> Result<Policy, ServeError> {
    let mut p = load_policy(path)?;
    overrides.apply(&mut p);
    Ok(p)
}

impl Snapshot {
    /// Builds a snapshot: opens the geolocation database and the signing key, resolves
    /// every upstream (keeping the pools of a previous snapshot's identical upstreams), and
    /// registers the metrics of its datasets and upstreams.
    pub async fn build(
        policy: Policy,
        previous: Option<&Snapshot>,
        consents: Arc<ConsentIndex>,
        metrics: &Metrics,
    ) -> Result<Snapshot, ServeError> {
        let previous: Vec<&Snapshot> = previous.into_iter().collect();
        let mut built = Snapshot::build_workers(policy, &previous, 1, consents, metrics).await?;
        Ok(built.pop().expect("one snapshot per worker"))
    }

    /// Builds one snapshot per worker, worker 0 first: what is read from disk (the
    /// geolocation database, the signing key, TLS settings) is read once and shared, and each
    /// worker gets upstream runtimes of its own, so that its connection pools are its own.
    /// `previous` holds the running snapshots, one per worker (empty at start-up): a worker
    /// keeps the pools of its own identical upstreams. A host is resolved once, for worker 0;
    /// the others start from its addresses.
    pub async fn build_workers(
        policy: Policy,
        previous: &[&Snapshot],
        workers: usize,
        consents: Arc<ConsentIndex>,
        metrics: &Metrics,
    ) -> Result<Vec<Snapshot>, ServeError> {
        let geo = match &policy.geo_database {
            Some(p) => {
                let path = p.clone();
                let db = tokio::task::spawn_blocking(move || GeoDb::open(&path))
                    .await
                    .map_err(|e| ServeError::Task(e.to_string()))??;
                Some(Arc::new(db))
            }
            None => None,
        };
        // The key the log writer signs with is read once: a reload keeps it, so that pseudonyms
        // and signatures never change in the middle of a log.
        let signing_key = match (&policy.log.signing_key, previous.first()) {
            (Some(p), Some(prev)) if prev.policy.log.signing_key.as_ref() == Some(p) => {
                prev.signing_key.clone()
            }
            (Some(p), _) => Some(Arc::new(SigningKey::load(p)?)),
            (None, _) => None,
        };
        let pseudo = match (&signing_key, policy.log.pseudonymize) {
            (Some(k), true) => Pseudonymizer::new(&k.pseudonym_key()),
            _ => Pseudonymizer::Off,
        };
        let geo_label = geo.as_ref().map(|g| g.label().clone());
        let mut tls = Vec::with_capacity(policy.upstreams.len());
        for up in &policy.upstreams {
            tls.push(match up.scheme {
                Scheme::Http => None,
                Scheme::Https => {
                    let owned = up.clone();
                    let built =
                        tokio::task::spawn_blocking(move || UpstreamTls::for_upstream(&owned))
                            .await
                            .expect("building a TLS client configuration does not panic");
                    Some(built.map_err(|source| ServeError::UpstreamTls {
                        upstream: up.name.to_string(),
                        source: Box::new(source),
                    })?)
                }
            });
        }
        let idle = policy.proxy.idle_timeout;
        let cap = policy.proxy.upstream_idle_per_address;
        let loaded_at = jiff::Timestamp::now();
        let mut first: Vec<Arc<UpstreamRuntime>> = Vec::with_capacity(policy.upstreams.len());
        let mut per_worker = Vec::with_capacity(workers);
        for worker in 0..workers.max(1) {
            let mut upstreams = Vec::with_capacity(policy.upstreams.len());
            let mut pending_tls = Vec::new();
            for (i, up) in policy.upstreams.iter().enumerate() {
                // Kept only for the same upstream (name and target): two upstreams on one
                // address may present different client certificates.
                let reuse = previous.get(worker).and_then(|s| {
                    s.upstreams
                        .iter()
                        .find(|r| r.name == up.name && r.same_target(up))
                        .cloned()
                });
                let rt = match (reuse, first.get(i)) {
                    (Some(r), _) => {
                        pending_tls.push((r.clone(), tls[i].clone()));
                        r
                    }
                    (None, Some(r0)) => r0.sibling(tls[i].clone()),
                    (None, None) => {
                        let r = UpstreamRuntime::new(up, cap, idle, tls[i].clone());
                        if tokio::time::timeout(Duration::from_secs(5), r.refresh())
                            .await
                            .is_err()
                        {
                            tracing::warn!(upstream = %up.name, host = %up.host, "resolving the upstream took over 5 s; requests get 502 until it resolves");
                        }
                        r
                    }
                };
                upstreams.push(rt);
            }
            if worker == 0 {
                first.clone_from(&upstreams);
            }
            per_worker.push((upstreams, pending_tls));
        }
        let policy = Arc::new(policy);
        Ok(per_worker
            .into_iter()
            .map(|(upstreams, pending_tls)| Snapshot {
                metrics: metrics.for_policy(&policy),
                locator: Locator::new(&policy, geo.clone()),
                policy: policy.clone(),
                upstreams,
                pseudo: pseudo.clone(),
                geo_label: geo_label.clone(),
                consents: consents.clone(),
                signing_key: signing_key.clone(),
                loaded_at,
                pending_tls: std::sync::Mutex::new(pending_tls),
            })
            .collect())
    }

    /// Applies what must wait until this snapshot serves: the new TLS settings of the
    /// upstreams it kept (their new connections use them; open ones keep theirs).
    pub fn activate(&self) {
        let pending =
            std::mem::take(&mut *self.pending_tls.lock().unwrap_or_else(|e| e.into_inner()));
        for (rt, tls) in pending {
            rt.set_tls(tls);
        }
    }

    /// The world for a decision at `now`. With `fill`, a consent cache miss is noted
    /// ([`ProxyEnv::take_missed`]) for the caller to fill and decide again; without, a miss
    /// reads as an unavailable store. `filled` names the subjects this request has had filled
    /// already: their lookups are not counted again, and a miss of one of them (evicted or
    /// invalidated meanwhile) reads as an unavailable store rather than asking once more.
    pub fn env<'e>(&'e self, now: i64, fill: bool, filled: &'e [CompactString]) -> ProxyEnv<'e> {
        ProxyEnv {
            snap: self,
            now,
            fill,
            filled,
            missed: RefCell::new(Vec::new()),
        }
    }
}

/// The world as `decide` sees it from inside the proxy.
pub struct ProxyEnv<'s> {
    snap: &'s Snapshot,
    now: i64,
    fill: bool,
    filled: &'s [CompactString],
    missed: RefCell<Vec<CompactString>>,
}

impl ProxyEnv<'_> {
    /// The subjects the decision needed that the consent cache does not hold: it was decided
    /// as if the store were unavailable for them, and must be decided again once they are
    /// filled. A server-side copy can need two (the target's and the source's).
    pub fn take_missed(&self) -> Vec<CompactString> {
        self.missed.take()
    }
}

/// Resolved addresses of one upstream, held for the length of a decision.
pub struct Addrs(Arc<super::upstream::Resolved>);

impl Deref for Addrs {
    type Target = [SocketAddr];
    fn deref(&self) -> &[SocketAddr] {
        &self.0.addrs
    }
}

impl Env for ProxyEnv<'_> {
    type Addrs = Addrs;

    fn locate(&self, ip: IpAddr) -> Location {
        self.snap.locator.locate(ip)
    }

    fn upstream_addrs(&self, upstream: usize) -> Result<Addrs, String> {
        let r = self.snap.upstreams[upstream].resolved();
        match (&r.error, r.addrs.is_empty()) {
            (Some(e), true) => Err(e.clone()),
            _ => Ok(Addrs(r)),
        }
    }

    fn with_consents<R>(&self, subject: &str, f: impl FnOnce(ConsentLookup<&[Consent]>) -> R) -> R {
        // Asked only for requests that need consent: others never see the store's state.
        let index = &self.snap.consents;
        if index
            .freshness()
            .is_stale(self.snap.policy.consent.max_staleness)
        {
            return f(ConsentLookup::Unavailable);
        }
        let again = self.filled.iter().any(|s| s == subject);
        let fill = self.fill && !again;
        index.lookup(subject, fill, |found| match found {
            Lookup::Found(c) => f(ConsentLookup::Found(c)),
            Lookup::NotFound => f(ConsentLookup::NotFound),
            Lookup::Miss => {
                if fill {
                    self.missed.borrow_mut().push(subject.into());
                }
                f(ConsentLookup::Unavailable)
            }
        })
    }

    fn now(&self) -> i64 {
        self.now
    }
}
