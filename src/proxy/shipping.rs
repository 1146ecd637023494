//! Start-up of log shipping: the store must sit inside the home jurisdiction, located like an
//! upstream (by every address its host resolves to: operator overrides, then the geolocation
//! database), or the proxy refuses to start; an unreachable store is not fatal, since the
//! spool absorbs it.

use crate::audit::ship::{self, ShipperHandle, Spool};
use crate::audit::store::{self, StoreOptions};
use crate::geo::Locator;
use crate::policy::Policy;
use crate::policy::model::{LogTarget, ShipSettings};
use std::sync::Arc;

/// Why shipping cannot start.
#[derive(Debug, thiserror::Error)]
#[error("log.ship: {0}")]
pub struct ShipStartError(pub String);

/// The host and port the store is reached at, or `None` for a local folder (`file://`).
pub fn store_host(ship: &ShipSettings) -> Result<Option<(String, u16)>, String> {
    if let Some(e) = &ship.endpoint {
        let host = e.host_str().ok_or("the endpoint has no host")?;
        let port = e.port_or_known_default().unwrap_or(443);
        return Ok(Some((host.trim_matches(['[', ']']).to_string(), port)));
    }
    let bucket = ship.url.host_str().unwrap_or_default();
    let host = match ship.url.scheme() {
        "file" => return Ok(None),
        "s3" => {
            let region = ship
                .region
                .clone()
                .or_else(|| std::env::var("AWS_REGION").ok())
                .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                .unwrap_or_else(|| "us-east-1".into());
            format!("{bucket}.s3.{region}.amazonaws.com")
        }
        "gs" => "storage.googleapis.com".to_string(),
        "az" => match std::env::var("AZURE_STORAGE_ACCOUNT_NAME") {
            Ok(account) => format!("{account}.blob.core.windows.net"),
            Err(_) => {
                return Err(
                    "cannot tell where an az:// store is without AZURE_STORAGE_ACCOUNT_NAME (or give endpoint)"
                        .into(),
                );
            }
        },
        other => return Err(format!("scheme {other}: is not s3, gs, az or file")),
    };
    Ok(Some((host, 443)))
}

/// Resolves the store's host and locates every address: all must be inside `policy.home`.
/// Returns what was found, one `ADDR (COUNTRY)` each, for the start-up line.
pub async fn locate_store(
    policy: &Policy,
    ship: &ShipSettings,
    locator: &Locator,
) -> Result<Vec<String>, String> {
    let Some((host, port)) = store_host(ship)? else {
        return Ok(vec!["local folder".into()]);
    };
    let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| {
            format!("cannot resolve the store's host {host}: {e} (its location must be known before anything ships)")
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
                return Err(format!(
                    "the store {host} resolves to {} located in {c}, outside the home jurisdiction {}: the decision log describes people and stays home",
                    addr.ip(),
                    policy.home.name
                ));
            }
            None => {
                return Err(format!(
                    "the store {host} resolves to {}, whose country is unknown (add a [[networks]] override or a geolocation database): the log ships only to a store known to be inside {}",
                    addr.ip(),
                    policy.home.name
                ));
            }
        }
    }
    if found.is_empty() {
        return Err(format!("the store's host {host} resolves to no address"));
    }
    Ok(found)
}

/// Opens the spool (counting what an earlier run left) and the store, after checking where
/// the store is. Nothing is contacted but DNS.
pub async fn prepare(
    policy: &Policy,
    locator: &Locator,
) -> Result<Option<(Arc<Spool>, store::Location)>, ShipStartError> {
    let Some(ship) = &policy.log.ship else {
        return Ok(None);
    };
    let LogTarget::File(active) = &policy.log.target else {
        return Err(ShipStartError("needs log.path to be a file".into()));
    };
    let located = locate_store(policy, ship, locator)
        .await
        .map_err(ShipStartError)?;
    let opts = StoreOptions::new(
        ship.endpoint.clone(),
        ship.region.clone(),
        &ship.credentials,
    );
    let loc = store::open(&ship.url, &opts).map_err(|e| ShipStartError(e.to_string()))?;
    let spool =
        Spool::scan(active, ship.spool_max_bytes).map_err(|e| ShipStartError(e.to_string()))?;
    let waiting = spool.stats();
    tracing::info!(
        log.ship = %ship.url,
        log.instance = %policy.log.instance,
        log.store_at = %located.join(", "),
        log.spool_files = waiting.spool_files,
        log.spool_bytes = waiting.spool_bytes,
        "decision log ships sealed files"
    );
    Ok(Some((spool, loc)))
}

/// Starts the shipper for a prepared spool.
pub fn start(policy: &Policy, spool: Arc<Spool>, loc: store::Location) -> ShipperHandle {
    ship::start(spool, loc, policy.log.instance.clone())
}
