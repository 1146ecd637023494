//! Load (files and includes) and compile a policy: every error is collected, each with its
//! file, line and rule path, before anything is returned. File reading is injected so that
//! this module stays free of I/O.
//!
//! This file assembles the `Policy` from its sections, in the order their problems are
//! reported; `source` reads and merges the files, `place` locates and collects diagnostics,
//! `values` holds the checks that sections share, and each section has a file of its own
//! that takes what it refers to (datasets take the upstreams, `[policy]` and the
//! jurisdictions) and returns its compiled part.

mod consent;
mod datasets;
mod diagnostic;
mod jurisdictions;
mod log;
mod networks;
mod place;
mod policy;
mod proxy;
mod recipients;
mod source;
mod upstreams;
mod values;

#[cfg(test)]
mod testing;

pub use consent::{NEVER_CONSENT, parse_store};
pub use diagnostic::{Diagnostic, PolicyError};
pub use values::{parse_duration, parse_size, valid_category};

use super::country::CountrySet;
use super::model::{Jurisdiction, Policy};
use place::{Cx, Place};
use source::{MergedFile, Source};
use std::path::{Path, PathBuf};

/// Loads the policy at `entry` and every file it includes, through `read`, and compiles it.
pub fn load(
    entry: &Path,
    read: impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<Policy, PolicyError> {
    let loaded = source::read_all(entry, read)?;
    // Checking what was read of a partly unreadable policy would only report what the
    // unparsed file may well define (a missing [policy], an unknown upstream): stop here.
    if loaded.unparsed {
        return Err(PolicyError::Invalid(loaded.diags));
    }
    let mut cx = Cx::new(&loaded.sources, loaded.diags);
    let policy = compile(&mut cx, loaded.file, &loaded.sources);
    let diags = cx.into_diagnostics();
    if diags.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyError::Invalid(diags))
    }
}

/// Compiles a policy held in memory (tests, benchmarks, `explain` on generated policies).
pub fn from_str(name: &str, text: &str) -> Result<Policy, PolicyError> {
    let path = PathBuf::from(name);
    let owned = text.to_string();
    load(&path, move |_| Ok(owned.clone()))
}

/// The entry file: a table that is not written compiles from its defaults, located there.
const ENTRY: usize = 0;

/// Compiles every section, in the order their problems are reported, and assembles the
/// policy (which is used only when nothing was reported).
fn compile(cx: &mut Cx<'_>, m: MergedFile, sources: &[Source]) -> Policy {
    let jurisdictions = jurisdictions::compile(cx, &m.jurisdictions);
    let (at, raw) = table(m.policy, "policy");
    let head = policy::compile(cx, at, raw, &jurisdictions);
    let (at, raw) = table(m.proxy, "proxy");
    let proxy = proxy::compile(cx, &at, raw);
    let geo_database = networks::geo(m.geo.map(|(_, g)| g));
    let networks = networks::compile(cx, m.networks);
    let upstreams = upstreams::compile(cx, m.upstreams);
    let recipients = recipients::compile(cx, m.recipients);
    let (at, raw) = table(m.consent, "consent");
    let consent = consent::compile(cx, &at, raw);
    let (at, raw) = table(m.log, "log");
    let log = log::compile(cx, &at, raw);
    let (at, raw) = table(m.admin, "admin");
    let admin = proxy::admin(cx, &at, raw);
    let tls = m
        .tls
        .and_then(|(file, raw)| proxy::tls(cx, &Place::table(file, "tls"), raw));
    let refs = datasets::References {
        policy: &head,
        jurisdictions: &jurisdictions,
        upstreams: &upstreams,
    };
    let datasets = datasets::compile(cx, m.datasets, &refs);
    let unmatched_upstream = policy::unmatched_upstream(cx, &head, &upstreams.list);
    Policy {
        name: head.name,
        hash: source::hash(sources).into(),
        sources: sources.iter().map(|s| s.path.clone()).collect(),
        home: head.home.unwrap_or(Jurisdiction {
            name: "".into(),
            countries: CountrySet::new(),
        }),
        mode: head.mode,
        unmatched: head.unmatched,
        unmatched_upstream,
        unknown_location: head.unknown_location,
        proxy: proxy.settings,
        trusted_proxies: proxy.trusted_proxies,
        jurisdictions,
        geo_database,
        networks,
        upstreams: upstreams.list,
        recipients: recipients.list,
        dataset_index: datasets::build_index(&datasets),
        datasets,
        consent,
        log,
        admin,
        tls,
        recipients_by_identity: recipients.by_identity,
        recipients_by_network: recipients.by_network,
    }
}

/// A table and where it is: the one written, or its defaults in the entry file.
fn table<T: Default>(written: Option<(usize, T)>, name: &str) -> (Place, T) {
    let (file, raw) = written.unwrap_or_else(|| (ENTRY, T::default()));
    (Place::table(file, name), raw)
}
