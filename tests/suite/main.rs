//! The integration suite in one binary (one link instead of one per file keeps `cargo test`
//! fast): the real proxy, its commands and its stores, driven over real sockets and files.
//! `tests/proxy_streaming.rs` stays a binary of its own, since it measures its process's
//! memory.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod audit_chains;
mod audit_cli;
mod audit_durability;
mod audit_subject;
mod audit_tamper;
mod bulk_cli;
mod bulk_proxy;
mod bulk_stream;
mod bundle_cli;
mod bundle_fleet;
mod bundle_source;
mod check_cli;
mod cli;
mod consent_api;
mod consent_batch;
mod consent_cache;
mod consent_import;
mod consent_postgres;
mod consent_sqlite;
mod decision_trace;
mod deploy;
mod geo;
mod geo_update;
mod layout;
mod log_ship;
mod ops_admin;
mod ops_drain;
mod ops_reload;
mod own_logs;
mod properties;
mod proxy_decisions;
mod proxy_forwarding;
mod proxy_lifecycle;
mod serve_explain;
mod shipped_policies;
mod tls;
mod tls_upstream;
mod workers;
