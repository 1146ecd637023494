//! Forwarding headers: never panics on any header bytes, and an untrusted peer is always the
//! client. Input: a byte choosing the peer, then lines of a byte choosing the header name
//! followed by the value.
#![no_main]

#[path = "../../tests/support/invariants.rs"]
mod invariants;

use http::{HeaderMap, HeaderName, HeaderValue};
use residency_proxy::policy::forwarded::parse_xff_element;
use std::net::IpAddr;
use std::sync::OnceLock;

static TRUSTED: OnceLock<residency_proxy::policy::net::CidrTable<()>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let trusted = TRUSTED.get_or_init(invariants::trusted_proxies);
    let names = ["x-forwarded-for", "forwarded", "x-real-ip"];
    let mut headers = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some((&name, value)) = line.split_first() else {
            continue;
        };
        parse_xff_element(&String::from_utf8_lossy(value));
        if let Ok(v) = HeaderValue::from_bytes(value) {
            let name = names[name as usize % names.len()];
            headers.append(HeaderName::from_static(name), v);
        }
    }
    let peer: IpAddr = invariants::PEERS[pick as usize % invariants::PEERS.len()]
        .parse()
        .unwrap();
    invariants::check_client_addr(peer, &headers, trusted);
});
