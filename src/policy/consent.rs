//! A consent as a decision reads it: the terms it grants and when it is in force, and the
//! collection methods the registry knows. The registry's record, its validation and the
//! in-memory index that holds these live in the consent module; the policy only reads them.

use std::sync::Arc;

/// Collection methods the registry knows. Only those named in `[consent].accept_methods`
/// count as consent, and pre-ticked, implied, bundled or opt-out agreement never does.
pub const KNOWN_METHODS: [&str; 5] = ["explicit", "pre_ticked", "implied", "bundled", "opt_out"];

/// The in-memory form of a consent, holding only what a decision reads.
#[derive(Clone, Debug)]
pub struct Consent {
    /// Held inline (ids up to 24 bytes need no allocation): the hot path copies it into the
    /// decision without touching another cache line.
    pub id: compact_str::CompactString,
    /// What was consented to. Consents with the same terms share one `Scope` (the index
    /// interns them), which keeps a consent at 56 bytes plus its id.
    pub scope: Arc<Scope>,
    /// Unix microseconds.
    pub granted_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// The terms of a consent: to whom, for what, which data, where, and how it was collected.
/// Its strings and lists are interned too, so a million consents on a few hundred distinct
/// terms hold each string once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope {
    pub recipient: Arc<str>,
    pub purposes: Arc<[Arc<str>]>,
    pub categories: Arc<[Arc<str>]>,
    pub destinations: Arc<[Arc<str>]>,
    pub method: Arc<str>,
}
