//! The listeners and their limits: `[proxy]` (the data listener, its timeouts and protocol
//! limits, the proxies trusted to say who the client is), `[admin]` (the admin listener) and
//! `[tls]` (terminating TLS on the data listener).
//!
//! Together because all three describe how the proxy listens and none refers to another
//! section.

use super::place::{Cx, Place};
use super::values::{POSITIVE, duration_or, parse_net};
use crate::policy::model::{AdminSettings, ProxySettings, TlsSettings};
use crate::policy::net::CidrTable;
use crate::policy::raw::{RawAdmin, RawProxy, RawTls};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[proxy]`, compiled.
pub(super) struct ProxyTable {
    pub settings: ProxySettings,
    /// The proxies whose forwarded headers name the client.
    pub trusted_proxies: CidrTable<()>,
}

/// Compiles `[proxy]` (at `place`). Every setting has a default.
pub(super) fn compile(cx: &mut Cx<'_>, place: &Place, x: RawProxy) -> ProxyTable {
    let dur = |cx: &mut Cx<'_>, name: &str, v: &Option<String>, default_secs: u64| {
        duration_or(
            cx,
            &place.field(name),
            v.as_deref(),
            &POSITIVE,
            Duration::from_secs(default_secs),
        )
    };
    let header_read_timeout = dur(cx, "header_read_timeout", &x.header_read_timeout, 10);
    let connect_timeout = dur(cx, "connect_timeout", &x.connect_timeout, 5);
    let upstream_timeout = dur(cx, "upstream_timeout", &x.upstream_timeout, 60);
    let idle_timeout = dur(cx, "idle_timeout", &x.idle_timeout, 60);
    let drain_timeout = dur(cx, "drain_timeout", &x.drain_timeout, 30);
    let resolve_interval = dur(cx, "resolve_interval", &x.resolve_interval, 30);
    let listen = parse_addr(
        cx,
        &place.field("listen"),
        x.listen.as_deref(),
        "0.0.0.0:8080",
    );
    let mut trusted_proxies = CidrTable::new();
    for (i, t) in x.trusted_proxies.iter().flatten().enumerate() {
        match parse_net(t) {
            Ok(n) => {
                trusted_proxies.insert(n, ());
            }
            Err(e) => cx.err(&place.field("trusted_proxies").index(i), e),
        }
    }
    let bounded = |cx: &mut Cx<'_>, name: &str, v: Option<u64>, default: u64, min: u64| {
        at_least(cx, &place.field(name), v, default, min)
    };
    let max_header_bytes = bounded(cx, "max_header_bytes", x.max_header_bytes, 64 * 1024, 1024);
    let max_headers = bounded(cx, "max_headers", x.max_headers, 100, 8);
    let max_connections = bounded(cx, "max_connections", x.max_connections, 10_000, 1);
    let upstream_idle_per_address = bounded(
        cx,
        "upstream_idle_per_address",
        x.upstream_idle_per_address,
        256,
        0,
    );
    let handshake_timeout = dur(cx, "handshake_timeout", &x.handshake_timeout, 10);
    // hyper's own default (200) is generous for a sidecar; 100 is what RFC 9113 asks a peer
    // to allow at least, and what nginx and Envoy's edge settings use.
    let max_concurrent_streams = bounded(
        cx,
        "max_concurrent_streams",
        x.max_concurrent_streams.map(|n| n.min(u64::from(u32::MAX))),
        100,
        1,
    );
    let settings = ProxySettings {
        listen,
        max_header_bytes: max_header_bytes as usize,
        max_headers: max_headers as usize,
        max_body_bytes: x.max_body_bytes,
        header_read_timeout,
        connect_timeout,
        upstream_timeout,
        idle_timeout,
        max_connections: max_connections as usize,
        drain_timeout,
        resolve_interval,
        upstream_idle_per_address: upstream_idle_per_address as usize,
        workers: x.workers.map(|w| w.max(1) as usize),
        handshake_timeout,
        max_concurrent_streams: max_concurrent_streams as u32,
    };
    ProxyTable {
        settings,
        trusted_proxies,
    }
}

/// Compiles `[admin]` (at `place`).
pub(super) fn admin(cx: &mut Cx<'_>, place: &Place, a: RawAdmin) -> AdminSettings {
    AdminSettings {
        listen: parse_addr(
            cx,
            &place.field("listen"),
            a.listen.as_deref(),
            "127.0.0.1:9901",
        ),
        token_file: a.token_file.map(PathBuf::from),
    }
}

/// Compiles `[tls]` (at `place`); `None` (after reporting why) without both cert and key.
pub(super) fn tls(cx: &mut Cx<'_>, place: &Place, t: RawTls) -> Option<TlsSettings> {
    match (t.cert, t.key) {
        (Some(cert), Some(key)) => Some(TlsSettings {
            cert: cert.into(),
            key: key.into(),
            client_ca: t.client_ca.map(PathBuf::from),
        }),
        _ => {
            cx.err(place, "cert and key are both required to terminate TLS");
            None
        }
    }
}

/// A listen address, `default` when absent or refused (after reporting why).
fn parse_addr(cx: &mut Cx<'_>, place: &Place, v: Option<&str>, default: &str) -> SocketAddr {
    let s = v.unwrap_or(default);
    s.parse().unwrap_or_else(|_| {
        cx.err(
            place,
            format!("\"{s}\" is not an address:port (e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"),
        );
        default.parse().expect("default listen addresses parse")
    })
}

/// A count with a floor: `default` when absent or below `min` (after reporting why).
fn at_least(cx: &mut Cx<'_>, place: &Place, v: Option<u64>, default: u64, min: u64) -> u64 {
    match v {
        None => default,
        Some(n) if n >= min => n,
        Some(n) => {
            cx.err(place, format!("{n} is too small (at least {min})"));
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_str;
    use super::super::testing::{BASE, diags};
    use std::time::Duration;

    #[test]
    fn protocol_limits_have_safe_defaults_and_are_checked() {
        let p = from_str("p.toml", BASE).unwrap();
        assert_eq!(p.proxy.handshake_timeout, Duration::from_secs(10));
        assert_eq!(p.proxy.max_concurrent_streams, 100);
        let d = diags("[proxy]\nhandshake_timeout = 'soon'\nmax_concurrent_streams = 0\n");
        let rules: Vec<&str> = d.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(
            rules,
            ["proxy.handshake_timeout", "proxy.max_concurrent_streams"]
        );
    }
}
