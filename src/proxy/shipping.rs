//! Start-up of log shipping: the store must sit inside the home jurisdiction, located like an
//! upstream (by every address its host resolves to: operator overrides, then the geolocation
//! database), or the proxy refuses to start. An unreachable store is not fatal, since the
//! spool absorbs it; nor is a host that does not resolve yet: nothing ships until it resolves
//! and is located at home (checked again every few seconds).
//!
//! Each worker's chain has a spool of its own (the sealed files beside its active file) and
//! ships under its own instance name, as the sidecars of a fleet do.

use crate::audit::store::{self, StoreOptions};
use crate::audit::write::ship::{self, ShipperHandle, Spool};
use crate::audit::write::worker_settings;
use crate::geo::Locator;
use crate::policy::Policy;
use crate::policy::model::{LogTarget, ShipSettings};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often a store whose host did not resolve at start-up is looked up again.
const RELOCATE_EVERY: Duration = Duration::from_secs(5);

/// Why the store could not be located.
#[derive(Debug)]
pub enum LocateError {
    /// Its host does not resolve (now): nothing may ship until it does.
    Resolve(String),
    /// It is outside home, or where it is cannot be told: nothing may ever ship there.
    Refused(String),
}

impl std::fmt::Display for LocateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocateError::Resolve(why) | LocateError::Refused(why) => f.write_str(why),
        }
    }
}

/// Why shipping cannot start.
#[derive(Debug, thiserror::Error)]
#[error("log.ship: {0}")]
pub struct ShipStartError(pub String);

/// What a located store is for, as its messages say it.
pub struct Purpose {
    /// `store`, `policy source`.
    pub what: &'static str,
    /// What waits while its host does not resolve: `nothing ships`.
    pub waits: &'static str,
    /// Why it must be at home.
    pub why_home: &'static str,
    /// What is done only with a store known to be at home: `the log ships only to a store`.
    pub only: &'static str,
}

/// The decision log's store.
pub const LOG_STORE: Purpose = Purpose {
    what: "store",
    waits: "nothing ships",
    why_home: "the decision log describes people and stays home",
    only: "the log ships only to a store",
};

/// Resolves the store's host and locates every address: all must be inside `policy.home`.
/// Returns what was found, one `ADDR (COUNTRY)` each, for the start-up line.
pub async fn locate_store(
    policy: &Policy,
    loc: &store::Location,
    locator: &Locator,
) -> Result<Vec<String>, LocateError> {
    locate_host(policy, loc, locator, &LOG_STORE).await
}

/// As [`locate_store`], for a store used for `purpose`.
pub async fn locate_host(
    policy: &Policy,
    loc: &store::Location,
    locator: &Locator,
    purpose: &Purpose,
) -> Result<Vec<String>, LocateError> {
    let what = purpose.what;
    let Some((host, port)) = &loc.host else {
        return Ok(vec!["local folder".into()]);
    };
    let (host, port) = (host.as_str(), *port);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            LocateError::Resolve(format!(
                "cannot resolve the {what}'s host {host}: {e} ({} until it is located inside {})",
                purpose.waits, policy.home.name
            ))
        })?
        .collect();
    let mut found = Vec::new();
    for addr in &addrs {
        let location = locator.locate(addr.ip());
        match location.country() {
            Some(c) if policy.home.countries.contains(c) => {
                found.push(format!("{} ({c})", addr.ip()));
            }
            Some(c) => {
                return Err(LocateError::Refused(format!(
                    "the {what} {host} resolves to {} located in {c}, outside the home jurisdiction {}: {}",
                    addr.ip(),
                    policy.home.name,
                    purpose.why_home
                )));
            }
            None => {
                return Err(LocateError::Refused(format!(
                    "the {what} {host} resolves to {}, whose country is unknown (add a [[networks]] override or a geolocation database): {} known to be inside {}",
                    addr.ip(),
                    purpose.only,
                    policy.home.name
                )));
            }
        }
    }
    if found.is_empty() {
        return Err(LocateError::Resolve(format!(
            "the {what}'s host {host} resolves to no address"
        )));
    }
    Ok(found)
}

/// The store `[log.ship]` names (nothing is contacted).
pub fn open_store(ship: &ShipSettings) -> Result<store::Location, String> {
    let opts = StoreOptions::new(
        ship.endpoint.clone(),
        ship.region.clone(),
        &ship.credentials,
    );
    store::open(&ship.url, &opts).map_err(|e| e.to_string())
}

/// The spools of a sidecar's chains (one per worker, worker 0 first) and their store, ready
/// to ship.
pub struct Prepared {
    /// Each chain's spool and the instance name it ships under.
    chains: Vec<(Arc<Spool>, Arc<str>)>,
    loc: store::Location,
    /// The store's host did not resolve at start-up: locate it before shipping.
    unlocated: bool,
}

impl Prepared {
    /// Worker `worker`'s spool.
    pub fn spool(&self, worker: usize) -> &Arc<Spool> {
        &self.chains[worker].0
    }
}

/// Opens the spool of each of the `workers` chains (counting what an earlier run left) and
/// the store, after checking where the store is. Nothing is contacted but DNS. The chains
/// share `spool_max_bytes` equally.
pub async fn prepare(
    policy: &Policy,
    locator: &Locator,
    workers: usize,
) -> Result<Option<Prepared>, ShipStartError> {
    let Some(ship) = &policy.log.ship else {
        return Ok(None);
    };
    let LogTarget::File(log_path) = &policy.log.target else {
        return Err(ShipStartError("needs log.path to be a file".into()));
    };
    let loc = open_store(ship).map_err(ShipStartError)?;
    let (located, unlocated) = match locate_store(policy, &loc, locator).await {
        Ok(found) => (found.join(", "), false),
        Err(LocateError::Refused(why)) => return Err(ShipStartError(why)),
        Err(LocateError::Resolve(why)) => {
            tracing::warn!(log.ship = %ship.url, error = %why, "decision log store not located yet: sealed files wait in the spool");
            ("not yet located".into(), true)
        }
    };
    let share = (ship.spool_max_bytes / workers.max(1) as u64).max(1);
    let mut chains = Vec::with_capacity(workers);
    for worker in 0..workers.max(1) {
        let chain = worker_settings(&policy.log, worker);
        let LogTarget::File(active) = &chain.target else {
            unreachable!("a file's chains are files");
        };
        let spool = Spool::scan(active, share).map_err(|e| ShipStartError(e.to_string()))?;
        chains.push((spool, chain.instance));
    }
    // Chains a run with more workers left: nobody writes them now, but what they sealed
    // still ships (under their own names), and their spools count against nobody's share.
    let beyond = crate::audit::files::chains_beyond(log_path, workers)
        .map_err(|e| ShipStartError(e.to_string()))?;
    for worker in beyond {
        let chain = worker_settings(&policy.log, worker);
        let LogTarget::File(active) = &chain.target else {
            unreachable!("a file's chains are files");
        };
        let spool = Spool::scan(active, share).map_err(|e| ShipStartError(e.to_string()))?;
        if spool.stats().spool_files > 0 {
            tracing::info!(log.chain = %active.display(), log.spool_files = spool.stats().spool_files, "a chain no worker writes now still ships what it sealed");
            chains.push((spool, chain.instance));
        }
    }
    let waiting = chains
        .iter()
        .map(|(s, _)| s.stats())
        .fold((0, 0), |(f, b), s| (f + s.spool_files, b + s.spool_bytes));
    tracing::info!(
        log.ship = %ship.url,
        log.instance = %policy.log.instance,
        log.chains = chains.len(),
        log.store_at = %located,
        log.spool_files = waiting.0,
        log.spool_bytes = waiting.1,
        "decision log ships sealed files"
    );
    Ok(Some(Prepared {
        chains,
        loc,
        unlocated,
    }))
}

/// The shippers (one per chain), or the wait for the store to be located before they start.
pub enum Shipping {
    Running(Vec<ShipperHandle>),
    Locating(JoinHandle<Option<Vec<ShipperHandle>>>),
}

/// Starts a shipper per chain, each under its chain's instance name: at once if the store
/// was located, else once it is.
pub fn start(policy: &Arc<Policy>, locator: Locator, prepared: Prepared) -> Shipping {
    let Prepared {
        chains,
        loc,
        unlocated,
    } = prepared;
    let start_all = move |chains: Vec<(Arc<Spool>, Arc<str>)>, loc: store::Location| {
        chains
            .into_iter()
            .map(|(spool, instance)| ship::start(spool, loc.clone(), instance))
            .collect()
    };
    if !unlocated {
        return Shipping::Running(start_all(chains, loc));
    }
    let policy = policy.clone();
    Shipping::Locating(tokio::spawn(async move {
        let ship = policy.log.ship.as_ref()?;
        loop {
            tokio::time::sleep(RELOCATE_EVERY).await;
            match locate_store(&policy, &loc, &locator).await {
                Ok(found) => {
                    tracing::info!(log.ship = %ship.url, log.store_at = %found.join(", "), "decision log store located: shipping starts");
                    return Some(start_all(chains, loc));
                }
                Err(LocateError::Resolve(_)) => {}
                Err(LocateError::Refused(why)) => {
                    tracing::error!(log.ship = %ship.url, error = %why, "decision log store refused: nothing ships, and the spool fills until the log refuses records");
                    return None;
                }
            }
        }
    }))
}

impl Shipping {
    /// Ships what every chain has sealed within `timeout` (the chains ship side by side); a
    /// store not located yet ships nothing.
    pub async fn drain(self, timeout: Duration) {
        let handles = match self {
            Shipping::Running(h) => h,
            Shipping::Locating(task) if task.is_finished() => {
                task.await.ok().flatten().unwrap_or_default()
            }
            Shipping::Locating(task) => {
                task.abort();
                tracing::warn!(
                    "decision log store never located: the spool ships at the next start"
                );
                Vec::new()
            }
        };
        futures_util::future::join_all(handles.into_iter().map(|h| h.drain(timeout))).await;
    }
}
