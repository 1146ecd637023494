//! The policy file as written: serde types that mirror the TOML one to one. Nothing here is
//! validated beyond TOML types; `compile` turns these into a `Policy` that cannot be invalid.
//!
//! Unknown keys are not refused by serde (`deny_unknown_fields` would stop at the first one);
//! `load` collects every unknown key with `serde_ignored` and reports them all at once.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
pub struct RawFile {
    #[serde(default)]
    pub include: Vec<String>,
    pub policy: Option<RawPolicy>,
    pub proxy: Option<RawProxy>,
    pub jurisdictions: Option<BTreeMap<String, Vec<String>>>,
    pub geo: Option<RawGeo>,
    #[serde(default)]
    pub networks: Vec<RawNetwork>,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub recipients: Vec<RawRecipient>,
    #[serde(default)]
    pub datasets: Vec<RawDataset>,
    pub consent: Option<RawConsent>,
    pub log: Option<RawLog>,
    pub admin: Option<RawAdmin>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawPolicy {
    pub name: Option<String>,
    pub home: Option<String>,
    pub mode: Option<String>,
    pub unmatched: Option<String>,
    pub unknown_location: Option<String>,
    pub unmatched_upstream: Option<String>,
    /// `[policy.source]`: written only in a sidecar's own file, whose rules come from a bundle.
    pub source: Option<RawPolicySource>,
}

impl RawPolicy {
    /// Whether it holds any of the rules a bundle carries (everything but `source`).
    pub fn has_rules(&self) -> bool {
        let RawPolicy {
            name,
            home,
            mode,
            unmatched,
            unknown_location,
            unmatched_upstream,
            source: _,
        } = self;
        name.is_some()
            || home.is_some()
            || mode.is_some()
            || unmatched.is_some()
            || unknown_location.is_some()
            || unmatched_upstream.is_some()
    }
}

/// `[policy.source]`: where a sidecar fetches the signed bundle of its rules.
#[derive(Debug, Default, Deserialize)]
pub struct RawPolicySource {
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<String>,
    pub key: Option<String>,
    pub poll_interval: Option<String>,
    pub cache: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawProxy {
    pub listen: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
    pub max_header_bytes: Option<u64>,
    pub max_headers: Option<u64>,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub upstream_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<u64>,
    pub drain_timeout: Option<String>,
    pub resolve_interval: Option<String>,
    pub upstream_idle_per_address: Option<u64>,
    pub workers: Option<u64>,
    pub handshake_timeout: Option<String>,
    pub max_concurrent_streams: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawGeo {
    pub database: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawNetwork {
    pub cidr: String,
    pub country: String,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawUpstream {
    pub name: String,
    pub url: String,
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawRecipient {
    pub id: String,
    pub relation: String,
    pub country: Option<String>,
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub networks: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawDataset {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RawMatch,
    pub upstream: String,
    pub category: String,
    pub subject: Option<RawSubject>,
    pub records: Option<RawRecords>,
    pub home: Option<String>,
    pub resident: Option<bool>,
    pub cross_border: Option<String>,
    pub third_party: Option<String>,
    pub egress_methods: Option<Vec<String>>,
    pub mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMatch {
    pub path_prefix: Option<String>,
    pub host: Option<String>,
    pub methods: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSubject {
    pub path_segment: Option<i64>,
    pub header: Option<String>,
    pub query: Option<String>,
}

/// `records = { format, subject }`: a dataset of bulk objects.
#[derive(Debug, Default, Deserialize)]
pub struct RawRecords {
    pub format: Option<String>,
    pub subject: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawConsent {
    pub store: Option<String>,
    pub accept_methods: Option<Vec<String>>,
    pub purpose_header: Option<String>,
    pub max_staleness: Option<String>,
    pub cache_max_bytes: Option<u64>,
    pub lookup_timeout: Option<String>,
    pub preload: Option<bool>,
    pub read_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub path: Option<String>,
    pub durability: Option<String>,
    pub on_failure: Option<String>,
    pub signing_key: Option<String>,
    pub checkpoint_every: Option<u64>,
    pub checkpoint_interval: Option<String>,
    pub rotate_bytes: Option<u64>,
    pub pseudonymize: Option<bool>,
    pub mask_headers: Option<Vec<String>>,
    pub instance: Option<String>,
    pub rotate_interval: Option<String>,
    pub ship: Option<RawShip>,
}

/// `[log.ship]`: where sealed log files go.
#[derive(Debug, Default, Deserialize)]
pub struct RawShip {
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<String>,
    pub spool_max_bytes: Option<RawSize>,
}

/// A size in bytes, as a number or with a unit (`"2GiB"`, `"500MB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub client_ca: Option<String>,
}
