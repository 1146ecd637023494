//! residency-proxy: a reverse proxy that keeps residency-bound data at home, lets it leave
//! only with valid consent, and logs every decision in a verifiable chain.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod bulk;
pub mod bundle;
pub mod cli;
pub mod consent;
pub mod geo;
pub mod metrics;
pub mod offline;
pub mod policy;
pub mod proxy;
pub mod telemetry;
pub mod tls;
