//! Start-up of log shipping: the store must sit inside the home jurisdiction, located like an
//! upstream (by every address its host resolves to: operator overrides, then the geolocation
//! database), or the proxy refuses to start. An unreachable store is not fatal, since the
//! spool absorbs it; nor is a host that does not resolve yet: nothing ships until it resolves
//! and is located at home (checked again every few seconds).

use crate::audit::store::{self, StoreOptions};
use crate::audit::write::ship::{self, ShipperHandle, Spool};
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

/// Resolves the store's host and locates every address: all must be inside `policy.home`.
/// Returns what was found, one `ADDR (COUNTRY)` each, for the start-up line.
pub async fn locate_store(
    policy: &Policy,
    loc: &store::Location,
    locator: &Locator,
) -> Result<Vec<String>, LocateError> {
    let Some((host, port)) = &loc.host else {
        return Ok(vec!["local folder".into()]);
    };
    let (host, port) = (host.as_str(), *port);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            LocateError::Resolve(format!(
                "cannot resolve the store's host {host}: {e} (nothing ships until it is located inside {})",
                policy.home.name
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
                    "the store {host} resolves to {} located in {c}, outside the home jurisdiction {}: the decision log describes people and stays home",
                    addr.ip(),
                    policy.home.name
                )));
            }
            None => {
                return Err(LocateError::Refused(format!(
                    "the store {host} resolves to {}, whose country is unknown (add a [[networks]] override or a geolocation database): the log ships only to a store known to be inside {}",
                    addr.ip(),
                    policy.home.name
                )));
            }
        }
    }
    if found.is_empty() {
        return Err(LocateError::Resolve(format!(
            "the store's host {host} resolves to no address"
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

/// A spool and its store, ready to ship.
pub struct Prepared {
    spool: Arc<Spool>,
    loc: store::Location,
    /// The store's host did not resolve at start-up: locate it before shipping.
    unlocated: bool,
}

impl Prepared {
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }
}

/// Opens the spool (counting what an earlier run left) and the store, after checking where
/// the store is. Nothing is contacted but DNS.
pub async fn prepare(
    policy: &Policy,
    locator: &Locator,
) -> Result<Option<Prepared>, ShipStartError> {
    let Some(ship) = &policy.log.ship else {
        return Ok(None);
    };
    let LogTarget::File(active) = &policy.log.target else {
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
    let spool =
        Spool::scan(active, ship.spool_max_bytes).map_err(|e| ShipStartError(e.to_string()))?;
    let waiting = spool.stats();
    tracing::info!(
        log.ship = %ship.url,
        log.instance = %policy.log.instance,
        log.store_at = %located,
        log.spool_files = waiting.spool_files,
        log.spool_bytes = waiting.spool_bytes,
        "decision log ships sealed files"
    );
    Ok(Some(Prepared {
        spool,
        loc,
        unlocated,
    }))
}

/// The shipper, or the wait for the store to be located before it starts.
pub enum Shipping {
    Running(ShipperHandle),
    Locating(JoinHandle<Option<ShipperHandle>>),
}

/// Starts the shipper, at once if the store was located, else once it is.
pub fn start(policy: &Arc<Policy>, locator: Locator, prepared: Prepared) -> Shipping {
    let Prepared {
        spool,
        loc,
        unlocated,
    } = prepared;
    let instance = policy.log.instance.clone();
    if !unlocated {
        return Shipping::Running(ship::start(spool, loc, instance));
    }
    let policy = policy.clone();
    Shipping::Locating(tokio::spawn(async move {
        let ship = policy.log.ship.as_ref()?;
        loop {
            tokio::time::sleep(RELOCATE_EVERY).await;
            match locate_store(&policy, &loc, &locator).await {
                Ok(found) => {
                    tracing::info!(log.ship = %ship.url, log.store_at = %found.join(", "), "decision log store located: shipping starts");
                    return Some(ship::start(spool, loc, instance));
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
    /// Ships what is sealed within `timeout`; a store not located yet ships nothing.
    pub async fn drain(self, timeout: Duration) {
        let handle = match self {
            Shipping::Running(h) => Some(h),
            Shipping::Locating(task) if task.is_finished() => task.await.ok().flatten(),
            Shipping::Locating(task) => {
                task.abort();
                tracing::warn!(
                    "decision log store never located: the spool ships at the next start"
                );
                None
            }
        };
        if let Some(h) = handle {
            h.drain(timeout).await;
        }
    }
}
