//! Shared helpers for the integration tests; each test file declares `mod support;`.
//!
//! `upstream` (storage servers that count what reaches them), `proxy` (a policy in a temp
//! dir and the real proxy started in process), `client` (requests from a chosen source
//! address), `log` (reading the decision log), `body` (generated bodies and hashes),
//! `mmdb` (generated MaxMind databases), `binary` (the real `serve` process), `prom`
//! (a strict reader of the Prometheus text format), `tls` (certificates and TLS configurations),
//! `registry` (the consent API, the `consent` command, PostgreSQL databases and a relay that
//! cuts them off), `s3` (a real S3-compatible server for log shipping), `browser` (headless Chromium for the
//! audit tools' pages).

pub mod binary;
pub mod body;
pub mod browser;
pub mod client;
pub mod log;
pub mod mmdb;
pub mod objects;
pub mod prom;
pub mod proxy;
pub mod registry;
pub mod s3;
pub mod tls;
pub mod upstream;

use std::time::Duration;

/// Polls `cond` every 10 ms until it holds; panics after 10 s naming `what`.
#[allow(dead_code)]
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
