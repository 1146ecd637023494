//! Geolocation of addresses: operator CIDR overrides first (longest prefix), then a MaxMind
//! DB (MaxMind `country.iso_code` or DB-IP `country_code` layout). A `Locator` is immutable;
//! reloads build a new one and swap it in whole.

use crate::policy::Policy;
use crate::policy::country::Country;
use crate::policy::decision::Location;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a geolocation database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read geolocation database {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a usable MaxMind DB: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
}

/// A MaxMind DB held in memory.
pub struct GeoDb {
    _todo: (),
}

impl GeoDb {
    /// Reads the whole file into memory and checks that it is a MaxMind DB with country data.
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        let _ = path;
        todo!()
    }

    /// Same as `open`, from bytes already read; `origin` names the file in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<GeoDb, GeoError> {
        let _ = (bytes, origin);
        todo!()
    }

    /// `"<database_type> <build date YYYY-MM-DD>"`, e.g. `"GeoLite2-Country 2026-11-25"`.
    pub fn label(&self) -> &Arc<str> {
        todo!()
    }

    /// The country of `ip`, if the database has one.
    pub fn country(&self, ip: IpAddr) -> Option<Country> {
        let _ = ip;
        todo!()
    }
}

/// Locates addresses for one policy snapshot.
pub struct Locator {
    _todo: (),
}

impl Locator {
    /// Builds the override table from `policy.networks` (longest prefix wins) over `db`.
    pub fn new(policy: &Policy, db: Option<Arc<GeoDb>>) -> Locator {
        let _ = (policy, db);
        todo!()
    }

    pub fn locate(&self, ip: IpAddr) -> Location {
        let _ = ip;
        todo!()
    }

    pub fn database(&self) -> Option<&Arc<GeoDb>> {
        todo!()
    }
}
