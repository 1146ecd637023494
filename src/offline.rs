//! The decision environment for offline tools (`explain`, `test`, benchmarks): the same
//! locator and consent index as the proxy, upstreams resolved once, a clock that can be set.

use crate::consent::ConsentIndex;
use crate::consent::record::Consent;
use crate::geo::Locator;
use crate::policy::Policy;
use crate::policy::decide::{ConsentLookup, Env};
use crate::policy::decision::Location;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// A fixed environment for deciding requests outside the proxy.
pub struct OfflineEnv {
    pub locator: Locator,
    pub upstreams: Vec<Result<Arc<[SocketAddr]>, String>>,
    pub consents: Arc<ConsentIndex>,
    /// Unix microseconds.
    pub now: i64,
}

impl OfflineEnv {
    /// Resolves every upstream of `policy` now, with the system resolver.
    pub fn new(
        policy: &Policy,
        locator: Locator,
        consents: Arc<ConsentIndex>,
        now: i64,
    ) -> OfflineEnv {
        let upstreams = policy
            .upstreams
            .iter()
            .map(|u| {
                (u.host.as_str(), u.port)
                    .to_socket_addrs()
                    .map(|a| {
                        a.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                            .collect::<Vec<_>>()
                            .into()
                    })
                    .map_err(|e| format!("does not resolve: {e}"))
            })
            .collect();
        OfflineEnv {
            locator,
            upstreams,
            consents,
            now,
        }
    }
}

impl Env for OfflineEnv {
    type Addrs = Arc<[SocketAddr]>;
    type Consents = Arc<[Consent]>;

    fn locate(&self, ip: IpAddr) -> Location {
        self.locator.locate(ip)
    }

    fn upstream_addrs(&self, upstream: usize) -> Result<Arc<[SocketAddr]>, String> {
        self.upstreams[upstream].clone()
    }

    fn consents(&self, subject: &str) -> ConsentLookup<Arc<[Consent]>> {
        match self.consents.get(subject) {
            Some(c) => ConsentLookup::Found(c),
            None => ConsentLookup::NotFound,
        }
    }

    fn now(&self) -> i64 {
        self.now
    }
}
