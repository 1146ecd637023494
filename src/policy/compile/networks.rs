//! How a client's country is found: `[geo]` (the geolocation database) and `[[networks]]`
//! (networks located by hand, which take precedence over it).
//!
//! Its own file like every section; the two are together because they answer the same
//! question.

use super::place::{Cx, Place};
use super::source::Origin;
use super::values::{country, parse_net};
use crate::policy::model::NetworkOverride;
use crate::policy::raw::{RawGeo, RawNetwork};
use ipnet::IpNet;
use std::collections::HashSet;
use std::path::PathBuf;

/// `[geo]`: the database's path, if any.
pub(super) fn geo(raw: Option<RawGeo>) -> Option<PathBuf> {
    raw.and_then(|g| g.database).map(PathBuf::from)
}

/// Compiles `[[networks]]`: each is named by its `name`, else by its CIDR.
pub(super) fn compile(cx: &mut Cx<'_>, raw: Vec<(Origin, RawNetwork)>) -> Vec<NetworkOverride> {
    let mut networks = Vec::new();
    let mut seen: HashSet<IpNet> = HashSet::new();
    for (o, n) in raw {
        let label = n.name.clone().unwrap_or_else(|| n.cidr.clone());
        let place = Place::item("networks", o, format!("networks.{label}"));
        let cidr = match parse_net(&n.cidr) {
            Ok(c) => Some(c),
            Err(e) => {
                cx.err(&place.key("cidr"), e);
                None
            }
        };
        let country = country(cx, &place.key("country"), &n.country);
        if let (Some(cidr), Some(country)) = (cidr, country) {
            if !seen.insert(cidr) {
                cx.err(
                    &place.key("cidr"),
                    format!("network {cidr} is listed twice"),
                );
            }
            networks.push(NetworkOverride {
                cidr,
                country,
                name: label.into(),
            });
        }
    }
    networks
}

#[cfg(test)]
mod tests {
    use super::super::testing::diags;

    #[test]
    fn a_network_with_host_bits_set_is_an_error_naming_the_network() {
        let d = diags("[[networks]]\ncidr = '10.20.5.0/16'\ncountry = 'CN'\n");
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].message.contains("\"10.20.0.0/16\""), "{}", d[0]);
    }
}
