//! Finding the client behind trusted proxies (SPEC step 2): the right-most address in
//! `X-Forwarded-For` / `Forwarded` that is not itself a trusted proxy. Headers are believed
//! only when the socket peer is a trusted proxy.

use super::net::CidrTable;
use http::HeaderMap;
use std::net::{IpAddr, Ipv6Addr};

/// The client address, and whether forwarding headers were used to find it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    /// The socket peer, when it was a trusted proxy that named someone else.
    pub via: Option<IpAddr>,
}

/// Why forwarding headers from a trusted proxy could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ForwardedError {
    #[error("{header} entry \"{value}\" is not an IP address")]
    Malformed { header: &'static str, value: String },
    #[error("X-Forwarded-For and Forwarded name different clients ({xff} and {fwd})")]
    Conflict { xff: IpAddr, fwd: IpAddr },
}

/// Parses one `X-Forwarded-For` element: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`.
pub fn parse_xff_element(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let tail = &rest[end + 1..];
        if !(tail.is_empty() || (tail.starts_with(':') && tail[1..].parse::<u16>().is_ok())) {
            return None;
        }
        return rest[..end]
            .parse::<Ipv6Addr>()
            .ok()
            .map(|v| IpAddr::V6(v).to_canonical());
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Parses the `for=` node of one `Forwarded` element (RFC 7239), quoted or not.
fn parse_forwarded_for(element: &str) -> Option<Result<IpAddr, String>> {
    for pair in element.split(';').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            // A pair without `=` is malformed: the element cannot be trusted.
            return Some(Err(pair.trim().to_string()));
        };
        if k.trim().eq_ignore_ascii_case("for") {
            let v = v.trim().trim_matches('"');
            return Some(parse_xff_element(v).ok_or_else(|| v.to_string()));
        }
    }
    None
}

fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut it = headers.get_all(name).iter().peekable();
    it.peek()?;
    Some(
        it.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(","),
    )
}

fn rightmost_untrusted(chain: &[IpAddr], trusted: &CidrTable<()>) -> Option<IpAddr> {
    chain
        .iter()
        .rev()
        .find(|ip| !trusted.contains(**ip))
        .or(chain.first())
        .copied()
}

/// Determines the client address from the socket peer and, if the peer is trusted, the
/// forwarding headers.
pub fn client_addr(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &CidrTable<()>,
) -> Result<ClientAddr, ForwardedError> {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return Ok(ClientAddr {
            ip: peer,
            via: None,
        });
    }
    let xff = match joined(headers, "x-forwarded-for") {
        None => None,
        Some(v) => {
            let mut chain = Vec::new();
            for e in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                chain.push(
                    parse_xff_element(e).ok_or_else(|| ForwardedError::Malformed {
                        header: "X-Forwarded-For",
                        value: e.into(),
                    })?,
                );
            }
            rightmost_untrusted(&chain, trusted)
        }
    };
    let fwd = match joined(headers, "forwarded") {
        None => None,
        Some(v) => {
            let mut chain = Vec::new();
            for e in v.split(',') {
                match parse_forwarded_for(e) {
                    Some(Ok(ip)) => chain.push(ip),
                    Some(Err(value)) => {
                        return Err(ForwardedError::Malformed {
                            header: "Forwarded",
                            value,
                        });
                    }
                    None => {}
                }
            }
            rightmost_untrusted(&chain, trusted)
        }
    };
    let ip = match (xff, fwd) {
        (Some(a), Some(b)) if a != b => return Err(ForwardedError::Conflict { xff: a, fwd: b }),
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => peer,
    };
    Ok(ClientAddr {
        ip,
        via: (ip != peer).then_some(peer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> CidrTable<()> {
        let mut t = CidrTable::new();
        t.insert("10.0.0.0/8".parse().unwrap(), ());
        t
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let c = client_addr(
            ip("198.51.100.7"),
            &h(&[("x-forwarded-for", "10.1.1.1")]),
            &trusted(),
        )
        .unwrap();
        assert_eq!(
            c,
            ClientAddr {
                ip: ip("198.51.100.7"),
                via: None
            }
        );
    }

    #[test]
    fn rightmost_untrusted_address_wins() {
        let hs = h(&[
            ("x-forwarded-for", "1.1.1.1, 203.0.113.9"),
            ("x-forwarded-for", "10.2.2.2"),
        ]);
        let c = client_addr(ip("10.0.0.1"), &hs, &trusted()).unwrap();
        assert_eq!(
            c,
            ClientAddr {
                ip: ip("203.0.113.9"),
                via: Some(ip("10.0.0.1"))
            }
        );
    }

    #[test]
    fn forwarded_header_forms() {
        let hs = h(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\"",
        )]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &hs, &trusted()).unwrap().ip,
            ip("2001:db8::1")
        );
        assert_eq!(parse_xff_element("192.0.2.1:8080"), Some(ip("192.0.2.1")));
        assert_eq!(parse_xff_element("[::1]:80"), Some(ip("::1")));
        assert_eq!(parse_xff_element("example.com"), None);
    }

    #[test]
    fn malformed_or_conflicting_headers_are_errors() {
        let hs = h(&[("x-forwarded-for", "1.1.1.1, nonsense")]);
        assert!(matches!(
            client_addr(ip("10.0.0.1"), &hs, &trusted()),
            Err(ForwardedError::Malformed { .. })
        ));
        let hs = h(&[("forwarded", "for=unknown")]);
        assert!(matches!(
            client_addr(ip("10.0.0.1"), &hs, &trusted()),
            Err(ForwardedError::Malformed { .. })
        ));
        let hs = h(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert!(matches!(
            client_addr(ip("10.0.0.1"), &hs, &trusted()),
            Err(ForwardedError::Conflict { .. })
        ));
    }

    #[test]
    fn all_trusted_chain_names_the_leftmost() {
        let hs = h(&[("x-forwarded-for", "10.9.9.9, 10.8.8.8")]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &hs, &trusted()).unwrap().ip,
            ip("10.9.9.9")
        );
    }
}
