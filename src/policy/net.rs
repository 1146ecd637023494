//! Longest-prefix-match tables over IPv4 and IPv6 networks, used for location overrides,
//! recipient networks and trusted proxies.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

type Map<V> = HashMap<u128, V, foldhash::fast::RandomState>;

/// Maps networks to values; a lookup returns the value of the longest prefix containing the
/// address. Cost is one hash probe per distinct prefix length present, not per network.
#[derive(Clone, Debug)]
pub struct CidrTable<V> {
    v4: Vec<(u8, Map<V>)>,
    v6: Vec<(u8, Map<V>)>,
}

impl<V> Default for CidrTable<V> {
    fn default() -> Self {
        CidrTable {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn key(addr: IpAddr, len: u8) -> u128 {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a) as u128;
            if len == 0 {
                0
            } else {
                bits & (u32::MAX << (32 - len)) as u128
            }
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            if len == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - len))
            }
        }
    }
}

impl<V> CidrTable<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts a network; returns the previous value for exactly that network, if any.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        // Lookups see IPv4-mapped IPv6 addresses as IPv4, so mapped networks are stored so.
        let net = match net {
            IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
                Some(v4) => {
                    IpNet::V4(ipnet::Ipv4Net::new(v4, n.prefix_len() - 96).expect("prefix <= 32"))
                }
                None => net,
            },
            _ => net,
        };
        let net = net.trunc();
        let (levels, len) = match net {
            IpNet::V4(n) => (&mut self.v4, n.prefix_len()),
            IpNet::V6(n) => (&mut self.v6, n.prefix_len()),
        };
        let pos = match levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                levels.insert(p, (len, Map::default()));
                p
            }
        };
        levels[pos].1.insert(key(net.addr(), len), value)
    }

    /// The value of the longest network containing `addr` (IPv4-mapped IPv6 addresses are
    /// looked up as IPv4).
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        let addr = addr.to_canonical();
        let levels = match addr {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        };
        levels
            .iter()
            .find_map(|(len, map)| map.get(&key(addr, *len)))
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.lookup(addr).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = CidrTable::new();
        t.insert(net("10.0.0.0/8"), "wide");
        t.insert(net("10.20.0.0/16"), "narrow");
        t.insert(net("0.0.0.0/0"), "any");
        assert_eq!(t.lookup("10.20.1.1".parse().unwrap()), Some(&"narrow"));
        assert_eq!(t.lookup("10.21.1.1".parse().unwrap()), Some(&"wide"));
        assert_eq!(t.lookup("192.0.2.1".parse().unwrap()), Some(&"any"));
        assert_eq!(t.lookup("::1".parse().unwrap()), None);
    }

    #[test]
    fn regression_mapped_ipv6_networks_matched_nothing() {
        let mut t = CidrTable::new();
        t.insert(net("::ffff:10.0.0.0/104"), "lb");
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(&"lb"));
        assert_eq!(t.lookup("::ffff:10.1.2.3".parse().unwrap()), Some(&"lb"));
    }

    #[test]
    fn host_bits_are_ignored_and_mapped_v4_is_v4() {
        let mut t = CidrTable::new();
        t.insert(net("127.0.0.2/32"), 2);
        t.insert(net("2001:db8::1/32"), 6);
        assert_eq!(t.lookup("::ffff:127.0.0.2".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("2001:db8:ffff::".parse().unwrap()), Some(&6));
        assert_eq!(t.lookup("127.0.0.3".parse().unwrap()), None);
    }
}
