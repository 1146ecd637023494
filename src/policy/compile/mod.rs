//! Load (files and includes) and compile a policy: every error is collected, each with its
//! file, line and rule path, before anything is returned. File reading is injected so that
//! this module stays free of I/O.
//!
//! This file assembles the `Policy` from its sections, in the order their problems are
//! reported; `source` reads and merges the files, `place` locates and collects diagnostics,
//! `values` holds the checks that sections share, and each section has a file of its own
//! that takes what it refers to (datasets take the upstreams, `[policy]` and the
//! jurisdictions) and returns its compiled part.
//!
//! A policy may also be split between a sidecar's own file (with `[policy.source]`) and a
//! signed bundle of the rules every sidecar shares: `load_file` tells the two kinds of file
//! apart, `load_rules` compiles a bundle's policy on its own (as `bundle build` does), and
//! `merge` compiles a sidecar's file with a bundle's, each file located in its own part;
//! `placement` says which tables belong in which part.

mod consent;
mod datasets;
mod diagnostic;
mod jurisdictions;
mod log;
mod networks;
mod place;
mod placement;
mod policy;
mod policy_source;
mod proxy;
mod recipients;
mod source;
mod upstreams;
mod values;

#[cfg(test)]
mod testing;

pub use consent::{NEVER_CONSENT, parse_store};
pub use diagnostic::{Diagnostic, PolicyError};
pub use policy_source::CACHE_NAME;
pub use values::{parse_duration, parse_size, valid_category};

use super::country::CountrySet;
use super::model::{AdminSettings, Jurisdiction, Policy, PolicySource};
use place::{Cx, Place};
use placement::Side;
use source::{MergedFile, Seg, Source};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Loads the policy at `entry` and every file it includes, through `read`, and compiles it.
/// A sidecar's own file (with `[policy.source]`) is refused: it needs its bundle (`merge`).
pub fn load(
    entry: &Path,
    read: impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<Policy, PolicyError> {
    match load_file(entry, read)? {
        PolicyFile::Whole(policy) => Ok(*policy),
        PolicyFile::Sidecar(sidecar) => {
            let (path, text) = &sidecar.files[0];
            Err(PolicyError::Invalid(vec![Diagnostic {
                file: path.clone(),
                line: source::line_of(
                    text,
                    &[Seg::Key("policy".into()), Seg::Key("source".into())],
                ),
                rule: "policy.source".into(),
                message: format!(
                    "this is a sidecar's own file: its rules come from the bundle at {}, so it is compiled with that bundle (`residency-proxy check {} --bundle BUNDLE`)",
                    sidecar.source.url,
                    path.display()
                ),
            }]))
        }
    }
}

/// A policy file as the proxy is given it.
pub enum PolicyFile {
    /// A whole policy: every setting is in its files.
    Whole(Box<Policy>),
    /// A sidecar's own file: its rules come from the signed bundle `[policy.source]` names.
    Sidecar(Box<Sidecar>),
}

/// A sidecar's own file (and its includes), compiled on its own: valid, and kept as read so
/// that it can be merged with each bundle (`merge`) without reading it again.
#[derive(Clone, Debug)]
pub struct Sidecar {
    /// `[policy.source]`.
    pub source: PolicySource,
    /// `[admin]`: the listener opens before any bundle is live, to say why the sidecar is not
    /// ready yet.
    pub admin: AdminSettings,
    /// Path and text of each file, the entry file first.
    files: Vec<(PathBuf, String)>,
}

impl Sidecar {
    /// The file given (the entry file).
    pub fn path(&self) -> &Path {
        &self.files[0].0
    }

    /// Every file read, the entry file first: path and text.
    pub fn files(&self) -> &[(PathBuf, String)] {
        &self.files
    }
}

/// A bundle's policy files, as `merge` reads them: already verified, and never read from disk.
pub struct BundleRules<'a> {
    /// How diagnostics and the policy name the bundle (its file or its URL): a file in it is
    /// `LABEL/PATH`.
    pub label: &'a Path,
    /// The policy file's path inside the bundle.
    pub entry: &'a str,
    /// Each policy file of the bundle: its path inside the bundle (see [`bundle_path`]) and text.
    pub files: &'a [(String, String)],
    /// Where the geolocation database the bundle carries is on disk: it replaces the one the
    /// policy names, which is then read from the sidecar's own volume.
    pub geo_database: Option<&'a Path>,
    /// The bundle's revision, which the merged policy carries.
    pub revision: u64,
}

/// A bundle's policy, compiled on its own (`bundle build`): the rules every sidecar shares.
#[derive(Clone, Debug)]
pub struct BundlePolicy {
    pub name: String,
    /// As `Policy::hash`, over the bundle's policy files only.
    pub hash: Arc<str>,
    /// Every file read, the entry file first, as read (paths as the includes spell them).
    pub sources: Vec<PathBuf>,
    /// `[geo] database` as written.
    pub geo_database: Option<PathBuf>,
    pub datasets: usize,
    pub upstreams: usize,
    pub recipients: usize,
}

/// Loads the file at `entry` and every file it includes, and compiles it: a whole policy, or a
/// sidecar's own file (its entry has `[policy.source]`) on its own, with no rules in it.
pub fn load_file(
    entry: &Path,
    read: impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<PolicyFile, PolicyError> {
    let loaded = source::read_all(entry, read, Side::Whole)?;
    // Checking what was read of a partly unreadable policy would only report what the
    // unparsed file may well define (a missing [policy], an unknown upstream): stop here.
    if loaded.unparsed {
        return Err(PolicyError::Invalid(loaded.diags));
    }
    let mut cx = Cx::new(&loaded.sources, loaded.diags);
    if loaded.side == Side::Sidecar {
        let (source, admin) = compile_sidecar(&mut cx, loaded.file);
        let diags = cx.into_diagnostics();
        return match source {
            Some(source) if diags.is_empty() => Ok(PolicyFile::Sidecar(Box::new(Sidecar {
                source,
                admin,
                files: loaded
                    .sources
                    .into_iter()
                    .map(|s| (s.path, s.text))
                    .collect(),
            }))),
            _ => Err(PolicyError::Invalid(diags)),
        };
    }
    let policy = compile(&mut cx, loaded.file, &loaded.sources, ENTRY);
    finish(cx, policy).map(|p| PolicyFile::Whole(Box::new(p)))
}

/// Compiles a bundle's policy on its own, as `bundle build` does before it signs anything:
/// the tables that belong in a sidecar's own file are errors.
pub fn load_rules(
    entry: &Path,
    read: impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<BundlePolicy, PolicyError> {
    let loaded = source::read_all(entry, read, Side::Bundle)?;
    if loaded.unparsed {
        return Err(PolicyError::Invalid(loaded.diags));
    }
    let mut cx = Cx::new(&loaded.sources, loaded.diags);
    let rules = compile_rules(&mut cx, loaded.file, &loaded.sources);
    finish(cx, rules)
}

/// Compiles a sidecar's own file with a bundle's policy into the one policy the sidecar
/// serves. Each file is located in its own part (the bundle's as `LABEL/PATH`); a table in
/// the wrong part is an error naming the part it belongs in. Pure: nothing is read from disk.
pub fn merge(sidecar: &Sidecar, bundle: &BundleRules<'_>) -> Result<Policy, PolicyError> {
    let from_sidecar = |p: &Path| {
        sidecar
            .files
            .iter()
            .find(|(path, _)| path == p)
            .map(|(_, text)| text.clone())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    };
    let mut loaded = source::read_all(sidecar.path(), from_sidecar, Side::Sidecar)?;
    let rules_entry = loaded.sources.len();
    let from_bundle = |p: &Path| {
        let inside = p
            .strip_prefix(bundle.label)
            .ok()
            .and_then(|rel| bundle_path(Path::new(""), rel));
        inside
            .and_then(|rel| bundle.files.iter().find(|(path, _)| *path == rel))
            .map(|(_, text)| text.clone())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the bundle holds no such file",
                )
            })
    };
    source::read_more(
        &mut loaded,
        &bundle.label.join(bundle.entry),
        from_bundle,
        Side::Bundle,
    )?;
    if loaded.unparsed {
        return Err(PolicyError::Invalid(loaded.diags));
    }
    let mut cx = Cx::new(&loaded.sources, loaded.diags);
    let mut policy = compile(&mut cx, loaded.file, &loaded.sources, rules_entry);
    policy.revision = Some(bundle.revision);
    if let Some(db) = bundle.geo_database {
        policy.geo_database = Some(db.to_path_buf());
    }
    finish(cx, policy)
}

/// A file's path inside a bundle: `path` relative to `base` (the policy's folder), with `.`
/// and `..` resolved and `/` between its parts; `None` when it is not inside `base`.
pub fn bundle_path(base: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(base).ok()?;
    let mut parts: Vec<&str> = Vec::new();
    for c in rel.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// `value`, unless something was reported.
fn finish<T>(cx: Cx<'_>, value: T) -> Result<T, PolicyError> {
    let diags = cx.into_diagnostics();
    if diags.is_empty() {
        Ok(value)
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
/// policy (which is used only when nothing was reported). `rules_entry` is the file an
/// unwritten `[policy]` is reported in: the bundle's policy, when there is one.
fn compile(cx: &mut Cx<'_>, m: MergedFile, sources: &[Source], rules_entry: usize) -> Policy {
    let jurisdictions = jurisdictions::compile(cx, &m.jurisdictions);
    let (at, raw) = table_in(m.policy, "policy", rules_entry);
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
    let source = m.policy_source.and_then(|(file, raw)| {
        let place = Place::table(file, "policy").field("source");
        policy_source::compile(cx, &place, raw, &log)
    });
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
        source,
        revision: None,
        recipients_by_identity: recipients.by_identity,
        recipients_by_network: recipients.by_network,
    }
}

/// The rules of a bundle's policy compiled on its own: the sections a bundle carries, in the
/// order `compile` reports them.
fn compile_rules(cx: &mut Cx<'_>, m: MergedFile, sources: &[Source]) -> BundlePolicy {
    let jurisdictions = jurisdictions::compile(cx, &m.jurisdictions);
    let (at, raw) = table(m.policy, "policy");
    let head = policy::compile(cx, at, raw, &jurisdictions);
    let geo_database = networks::geo(m.geo.map(|(_, g)| g));
    networks::compile(cx, m.networks);
    let upstreams = upstreams::compile(cx, m.upstreams);
    let recipients = recipients::compile(cx, m.recipients);
    let refs = datasets::References {
        policy: &head,
        jurisdictions: &jurisdictions,
        upstreams: &upstreams,
    };
    let datasets = datasets::compile(cx, m.datasets, &refs);
    policy::unmatched_upstream(cx, &head, &upstreams.list);
    BundlePolicy {
        name: head.name,
        hash: source::hash(sources).into(),
        sources: sources.iter().map(|s| s.path.clone()).collect(),
        geo_database,
        datasets: datasets.len(),
        upstreams: upstreams.list.len(),
        recipients: recipients.list.len(),
    }
}

/// A sidecar's own file compiled on its own: its sections, in the order `compile` reports
/// them, its `[policy.source]` (`None` when it has a problem, reported already) and `[admin]`.
fn compile_sidecar(cx: &mut Cx<'_>, m: MergedFile) -> (Option<PolicySource>, AdminSettings) {
    let (at, raw) = table(m.proxy, "proxy");
    proxy::compile(cx, &at, raw);
    let (at, raw) = table(m.consent, "consent");
    consent::compile(cx, &at, raw);
    let (at, raw) = table(m.log, "log");
    let log = log::compile(cx, &at, raw);
    let (at, raw) = table(m.admin, "admin");
    let admin = proxy::admin(cx, &at, raw);
    if let Some((file, raw)) = m.tls {
        proxy::tls(cx, &Place::table(file, "tls"), raw);
    }
    let source = m.policy_source.and_then(|(file, raw)| {
        policy_source::compile(cx, &Place::table(file, "policy").field("source"), raw, &log)
    });
    (source, admin)
}

/// A table and where it is: the one written, or its defaults in the entry file.
fn table<T: Default>(written: Option<(usize, T)>, name: &str) -> (Place, T) {
    table_in(written, name, ENTRY)
}

/// A table and where it is: the one written, or its defaults in file number `file`.
fn table_in<T: Default>(written: Option<(usize, T)>, name: &str, file: usize) -> (Place, T) {
    let (file, raw) = written.unwrap_or_else(|| (file, T::default()));
    (Place::table(file, name), raw)
}
