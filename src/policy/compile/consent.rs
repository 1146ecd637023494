//! `[consent]`: where consents are stored (and read from), which collection methods count as
//! consent, the purpose header, and the cache's staleness, size and lookup timeout.
//!
//! Its own file like every section. `parse_store` is also the `consent` command's reading of
//! `--store`, and `NEVER_CONSENT` is also checked by every decision.

use super::place::{Cx, Place};
use super::values::{ANY, Bounds, duration_or, parse_header};
use crate::policy::consent::KNOWN_METHODS;
use crate::policy::model::{ConsentSettings, ConsentStore};
use crate::policy::raw::RawConsent;
use std::time::Duration;

/// Collection methods that the SPEC says are never consent, whatever the policy says.
pub const NEVER_CONSENT: [&str; 4] = ["pre_ticked", "implied", "bundled", "opt_out"];

/// A consent lookup waits at most this long on a cache miss, the request with it.
const LOOKUP_TIMEOUT: Bounds = Bounds {
    min: Duration::from_nanos(1),
    max: Duration::from_secs(30),
    refusal: "must be more than 0 and at most 30s (a request waits this long on a cache miss)",
};

/// The smallest consent cache.
const MIN_CACHE: u64 = 1024 * 1024;

/// Compiles `[consent]` (at `place`). Every setting has a default; without a store no consent
/// exists.
pub(super) fn compile(cx: &mut Cx<'_>, place: &Place, c: RawConsent) -> ConsentSettings {
    let store = match c.store.as_deref() {
        None => ConsentStore::None,
        Some(s) => parse_store(s).unwrap_or_else(|e| {
            cx.err(&place.field("store"), e);
            ConsentStore::None
        }),
    };
    let accept_methods = accept_methods(cx, place, c.accept_methods);
    let purpose_header = parse_header(
        cx,
        &place.field("purpose_header"),
        c.purpose_header.as_deref().unwrap_or("x-purpose"),
    );
    let max_staleness = duration_or(
        cx,
        &place.field("max_staleness"),
        c.max_staleness.as_deref(),
        &ANY,
        Duration::from_secs(30),
    );
    let lookup_timeout = duration_or(
        cx,
        &place.field("lookup_timeout"),
        c.lookup_timeout.as_deref(),
        &LOOKUP_TIMEOUT,
        Duration::from_millis(200),
    );
    let cache_max_bytes = match c.cache_max_bytes {
        None => 64 * 1024 * 1024,
        Some(n) if n >= MIN_CACHE => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            cx.err(
                &place.field("cache_max_bytes"),
                format!("{n} is too small: at least {MIN_CACHE} (1 MiB; the default is 67108864, 64 MiB)"),
            );
            64 * 1024 * 1024
        }
    };
    let read_url = read_url(cx, place, c.read_url, &store);
    ConsentSettings {
        store,
        accept_methods,
        purpose_header,
        max_staleness,
        cache_max_bytes,
        lookup_timeout,
        preload: c.preload.unwrap_or(false),
        read_url,
    }
}

/// `accept_methods`: `["explicit"]` when absent; never a method that is not consent.
fn accept_methods(cx: &mut Cx<'_>, place: &Place, raw: Option<Vec<String>>) -> Vec<String> {
    let methods = raw.unwrap_or_else(|| vec!["explicit".into()]);
    let list = place.field("accept_methods");
    for (i, am) in methods.iter().enumerate() {
        if NEVER_CONSENT.contains(&am.as_str()) {
            cx.err(&list.index(i), format!("\"{am}\" is not consent: pre-ticked, implied, bundled or opt-out agreement never counts"));
        } else if !KNOWN_METHODS.contains(&am.as_str()) {
            cx.err(
                &list.index(i),
                format!(
                    "\"{am}\" is not a known collection method ({})",
                    KNOWN_METHODS.join(", ")
                ),
            );
        }
    }
    if methods.is_empty() {
        cx.err(&list, "must name at least one method, e.g. [\"explicit\"]");
    }
    methods
}

/// `read_url`: a read replica, for a PostgreSQL store only.
fn read_url(
    cx: &mut Cx<'_>,
    place: &Place,
    raw: Option<String>,
    store: &ConsentStore,
) -> Option<String> {
    match (raw, store) {
        (None, _) => None,
        (Some(u), ConsentStore::Postgres(_))
            if u.starts_with("postgres://") || u.starts_with("postgresql://") =>
        {
            Some(u)
        }
        (Some(_), ConsentStore::Postgres(_)) => {
            cx.err(
                &place.field("read_url"),
                "must be a postgres:// URL of a read replica of consent.store",
            );
            None
        }
        (Some(_), _) => {
            cx.err(
                &place.field("read_url"),
                "a read replica is for a postgres:// consent.store only",
            );
            None
        }
    }
}

/// Parses a consent store URL (`sqlite:PATH`, `postgres://…`, `file:PATH`), as
/// `[consent].store` and the `consent` command's `--store` take it.
pub fn parse_store(s: &str) -> Result<ConsentStore, String> {
    if let Some(p) = s.strip_prefix("sqlite:") {
        if p.is_empty() {
            return Err("sqlite: needs a path, e.g. \"sqlite:data/consent.db\"".into());
        }
        Ok(ConsentStore::Sqlite(p.into()))
    } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(ConsentStore::Postgres(s.into()))
    } else if let Some(p) = s.strip_prefix("file:") {
        if p.is_empty() {
            return Err("file: needs a path, e.g. \"file:policies/consents.jsonl\"".into());
        }
        Ok(ConsentStore::File(p.into()))
    } else {
        Err(format!(
            "\"{s}\" is not a store: use \"sqlite:PATH\", \"postgres://…\" or \"file:PATH\""
        ))
    }
}
