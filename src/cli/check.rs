//! `check FILE...`: validate policies like `nginx -t`: compile each one, then open every file
//! it names with the code `serve` opens it with, and locate where its decision log ships;
//! `--offline` stops after compiling.

use super::{CliError, CliResult, Exit, fail};
use crate::audit::keys::{self, SigningKey};
use crate::bundle::VerifiedBundle;
use crate::consent::ConsentIndex;
use crate::consent::registry::Registry;
use crate::geo::{GeoDb, Locator};
use crate::policy::compile::{PolicyFile, Sidecar, load_file, merge};
use crate::policy::model::{ConsentStore, LogTarget, Scheme, UnknownLocation};
use crate::policy::{Diagnostic, Policy, PolicyError};
use crate::proxy::shipping::LocateError;
use crate::tls::{TlsError, UpstreamTls};
use ipnet::{IpNet, Ipv4Net};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
#[command(
    // The subcommand's doc comment in `cli/mod.rs` sets `about` and `long_about`; the
    // details go after the options.
    after_long_help = "Validates policy files without starting anything, like `nginx -t` or \
`opa check`. Each FILE is loaded with the files it includes (`include = [\"other.toml\"]`, \
relative to the including file) and compiled exactly as `serve` would compile it; every error \
is reported, not only the first.\n\n\
Then every file the policy names is opened as `serve` opens it at start-up: the log's \
signing_key, the [tls] cert, key and client_ca, each https upstream's ca, client_cert and \
client_key, the [geo] database, a file: consent store (its malformed lines are warnings), an \
existing sqlite: store, the [admin] token_file, and the decision log (which must be writable, \
or creatable in a writable folder). A policy whose decision log ships ([log.ship]) also has \
its store's host resolved and located: a store outside the home jurisdiction is an error. A \
postgres:// store is not connected to. Relative paths are resolved from the current \
directory, as `serve` resolves them: run `check` where `serve` runs, as the user it runs as.\n\n\
With --offline, none of those files is opened and the log's store is not located: for CI \
pipelines and policy reviews where the deployment's keys, certificates and databases are not \
present.\n\n\
A sidecar's own file (one with [policy.source]) holds only what differs per sidecar; its rules \
come from a signed bundle. On its own it is compiled alone (and its [policy.source] key read). \
With --bundle BUNDLE it is compiled with that bundle's policy as the sidecar would serve them: \
the bundle's signature is checked with the key [policy.source] names (with --offline, only its \
files' hashes), its files are named BUNDLE/PATH in errors, its database is opened, and the \
source is located like the log's store: a source outside the home jurisdiction is an error.\n\n\
Each error goes to standard error as\n\
\n    FILE:LINE: RULE: MESSAGE\n\n\
where FILE is the file that holds the mistake (an included file is named itself; for a file \
that is missing or invalid, the policy file that names it), LINE its line, and RULE the \
rule's path (e.g. datasets.payments.upstream, log.signing_key); then a count per policy. A \
valid policy gets one line on standard output: its name, its counts and its hash.\n\n\
Warnings start with `warning:` and leave the exit status alone. A recipient's declared \
network that neither a [[networks]] override nor the geolocation database locates gets one: \
every request from it meets unknown_location. With --offline the database is not read, so \
only a policy without one is judged.\n\n\
Exit status:\n  0  every policy is valid (warnings or not)\n  1  a policy has an error, or a \
file it names is missing, unreadable or invalid\n  \
2  bad usage, or a policy file (or a file it includes) cannot be read"
)]
pub struct CheckArgs {
    /// Policy files to validate.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Compile the policies only: do not open the files they name (keys, certificates,
    /// token, geolocation database, consent file, decision log) nor locate the log's store.
    #[arg(long)]
    pub offline: bool,
    /// Compile each FILE (a sidecar's own file, with [policy.source]) with this signed bundle.
    #[arg(long, value_name = "BUNDLE")]
    pub bundle: Option<PathBuf>,
}

/// Where a setting is written, to find its line: `key` of `[table]`, or `key` of the
/// `[[array]]` item whose `by` field is `name` (at `index` of its list, if given).
#[derive(Clone, Copy)]
enum At<'p> {
    Key(&'static str, &'static str),
    Item {
        array: &'static str,
        by: &'static str,
        name: &'p str,
        key: &'static str,
        index: Option<usize>,
    },
}

/// One problem with a setting: where it is written, its rule path, and one sentence.
struct Finding<'p> {
    at: At<'p>,
    rule: String,
    message: String,
}

/// What opening a compiled policy's files found.
#[derive(Default)]
struct Findings<'p> {
    errors: Vec<Finding<'p>>,
    warnings: Vec<Finding<'p>>,
    /// Malformed lines of the consent file, each already `FILE:LINE: skipped: WHY`.
    skipped: Vec<String>,
}

impl<'p> Findings<'p> {
    fn error(&mut self, at: At<'p>, rule: impl Into<String>, message: impl ToString) {
        self.errors.push(Finding {
            at,
            rule: rule.into(),
            message: message.to_string(),
        });
    }

    fn warn(&mut self, at: At<'p>, rule: impl Into<String>, message: impl ToString) {
        self.warnings.push(Finding {
            at,
            rule: rule.into(),
            message: message.to_string(),
        });
    }
}

/// Opens what `serve` opens at start-up, each with the function `serve` calls, and reports
/// each failure against the setting that names the file; then looks at recipient networks.
fn check_files(policy: &Policy, offline: bool) -> Findings<'_> {
    let mut f = Findings::default();
    // `Err`: the policy names a database that was not read (offline, or unusable).
    let db: Result<Option<Arc<GeoDb>>, ()> = match (&policy.geo_database, offline) {
        (None, _) => Ok(None),
        (Some(_), true) => Err(()),
        (Some(path), false) => match GeoDb::open(path) {
            Ok(db) => Ok(Some(Arc::new(db))),
            Err(e) => {
                f.error(At::Key("geo", "database"), "geo.database", e);
                Err(())
            }
        },
    };
    if !offline {
        if let Some(path) = &policy.log.signing_key
            && let Err(e) = SigningKey::load(path)
        {
            f.error(At::Key("log", "signing_key"), "log.signing_key", e);
        }
        server_tls(policy, &mut f);
        upstream_tls(policy, &mut f);
        consent_store(policy, &mut f);
        if let Some(path) = &policy.admin.token_file
            && let Err(e) = crate::proxy::token::read_token(path)
        {
            f.error(At::Key("admin", "token_file"), "admin.token_file", e);
        }
        if let LogTarget::File(path) = &policy.log.target
            && let Err(why) = log_file(path)
        {
            f.error(At::Key("log", "path"), "log.path", why);
        }
        // Where the log ships cannot be told while the database is unusable; that error is
        // reported already.
        if let Ok(db) = &db {
            ship_store(policy, db.clone(), &mut f);
            policy_source(policy, db.clone(), &mut f);
        }
    }
    recipient_networks(policy, db.as_ref().ok().map(Option::as_deref), &mut f);
    f
}

/// `[tls]`: each file read on its own first, so that every missing one is reported; then the
/// configuration built exactly as the listener builds it (the key must match the certificate).
fn server_tls<'p>(policy: &'p Policy, f: &mut Findings<'p>) {
    let Some(tls) = &policy.tls else { return };
    let mut readable = true;
    if let Err(e) = crate::tls::read_certs("tls.cert", &tls.cert) {
        f.error(At::Key("tls", "cert"), "tls.cert", e);
        readable = false;
    }
    if let Err(e) = crate::tls::read_key("tls.key", &tls.key) {
        f.error(At::Key("tls", "key"), "tls.key", e);
        readable = false;
    }
    if let Some(ca) = &tls.client_ca
        && let Err(e) =
            crate::tls::add_roots(&mut rustls::RootCertStore::empty(), "tls.client_ca", ca)
    {
        f.error(At::Key("tls", "client_ca"), "tls.client_ca", e);
        readable = false;
    }
    if readable && let Err(e) = crate::tls::server::build_config(tls) {
        let key = match e {
            TlsError::ClientVerifier { .. } | TlsError::Roots { .. } => "client_ca",
            _ => "key",
        };
        f.error(At::Key("tls", key), format!("tls.{key}"), e);
    }
}

/// Each `https` upstream's `ca` and client certificate, then its client configuration as
/// the proxy builds it.
fn upstream_tls<'p>(policy: &'p Policy, f: &mut Findings<'p>) {
    for up in policy
        .upstreams
        .iter()
        .filter(|u| u.scheme == Scheme::Https)
    {
        let at = |key| At::Item {
            array: "upstreams",
            by: "name",
            name: &up.name,
            key,
            index: None,
        };
        let before = f.errors.len();
        if let Some(ca) = &up.ca
            && let Err(e) =
                crate::tls::add_roots(&mut rustls::RootCertStore::empty(), "upstream ca", ca)
        {
            f.error(at("ca"), format!("{}.ca", up.rule), e);
        }
        if let Some(cc) = &up.client_cert {
            if let Err(e) = crate::tls::read_certs("upstream client_cert", &cc.cert) {
                f.error(at("client_cert"), format!("{}.client_cert", up.rule), e);
            }
            if let Err(e) = crate::tls::read_key("upstream client_key", &cc.key) {
                f.error(at("client_key"), format!("{}.client_key", up.rule), e);
            }
        }
        if f.errors.len() == before
            && let Err(e) = UpstreamTls::for_upstream(up)
        {
            let key = match e {
                TlsError::Pair { .. } => "client_key",
                _ => "url",
            };
            f.error(at(key), format!("{}.{key}", up.rule), e);
        }
    }
}

/// A `file:` store is read as `serve` reads it (a malformed line is skipped, as there); an
/// existing `sqlite:` file is opened as the proxy opens its registry (a missing one is
/// created by `serve`). A `postgres://` store is a service, not a file: it is not contacted.
fn consent_store<'p>(policy: &'p Policy, f: &mut Findings<'p>) {
    let at = At::Key("consent", "store");
    match &policy.consent.store {
        ConsentStore::File(path) => {
            // `check` reports the skipped lines itself, in its own format.
            let loaded = tracing::subscriber::with_default(
                tracing::subscriber::NoSubscriber::default(),
                || crate::consent::file::load(path, &ConsentIndex::new()),
            );
            match loaded {
                Ok(report) => f.skipped.extend(
                    report
                        .skipped
                        .iter()
                        .map(|s| format!("{}:{}: skipped: {}", path.display(), s.line, s.message)),
                ),
                Err(e) => f.error(at, "consent.store", e),
            }
        }
        ConsentStore::Sqlite(path) if path.exists() => {
            let opened = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(Registry::open(&policy.consent.store, false))
                        .map(drop)
                        .map_err(|e| e.to_string())
                });
            if let Err(why) = opened {
                f.error(at, "consent.store", why);
            }
        }
        ConsentStore::Sqlite(_) | ConsentStore::Postgres(_) | ConsentStore::None => {}
    }
}

/// The decision log: `serve` opens it for appending, creating it and its folders, and
/// rotation and recovery create files beside it; so an existing log must open for appending
/// and the nearest existing folder on its path must let a file be created.
fn log_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(format!("{} is a folder, not a file", path.display())),
        Ok(_) => {
            std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    format!(
                        "cannot open the decision log {} for appending: {e}",
                        path.display()
                    )
                })?;
        }
        // Not there yet (or a file stands where a folder should: said below).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) => {}
        Err(e) => {
            return Err(format!(
                "cannot read the decision log {}: {e}",
                path.display()
            ));
        }
    }
    let mut folder = path.parent();
    while let Some(dir) = folder {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        match std::fs::metadata(dir) {
            // An unnamed file, gone when closed: nothing is left behind.
            Ok(m) if m.is_dir() => {
                return tempfile::tempfile_in(dir).map(drop).map_err(|e| {
                    format!(
                        "cannot create the decision log {}: folder {} does not let a file be created: {e}",
                        path.display(),
                        dir.display()
                    )
                });
            }
            Ok(_) => {
                return Err(format!(
                    "cannot create the decision log {}: {} is not a folder",
                    path.display(),
                    dir.display()
                ));
            }
            Err(_) => folder = dir.parent(),
        }
    }
    Ok(())
}

/// Where the log would ship must be inside home, as `serve` checks at start-up: the store's
/// host is resolved and located with the policy's overrides and geolocation database.
fn ship_store<'p>(policy: &'p Policy, db: Option<Arc<GeoDb>>, f: &mut Findings<'p>) {
    let Some(ship) = &policy.log.ship else {
        return;
    };
    let at = At::Key("log", "ship");
    let loc = match crate::proxy::shipping::open_store(ship) {
        Ok(loc) => loc,
        Err(why) => return f.error(at, "log.ship", why),
    };
    let locator = Locator::new(policy, db);
    let located = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LocateError::Refused(e.to_string()))
        .and_then(|rt| rt.block_on(crate::proxy::shipping::locate_store(policy, &loc, &locator)));
    match located {
        Ok(_) => {}
        Err(LocateError::Refused(why)) => f.error(at, "log.ship", why),
        // This machine may not see the store's DNS; `serve` checks again where it runs.
        Err(LocateError::Resolve(why)) => f.warn(
            at,
            "log.ship",
            format!("{why}; serve locates it before anything ships"),
        ),
    }
}

/// `[policy.source]`: its key is read, and the source located as a sidecar locates it before
/// fetching, with the policy's overrides and database.
fn policy_source<'p>(policy: &'p Policy, db: Option<Arc<GeoDb>>, f: &mut Findings<'p>) {
    let Some(source) = &policy.source else {
        return;
    };
    let at = At::Key("policy", "source");
    if let Err(e) = keys::load_public_key(&source.key) {
        f.error(at, "policy.source.key", e);
    }
    let located = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LocateError::Refused(e.to_string()))
        .and_then(|rt| rt.block_on(crate::bundle::source::locate_source(policy, db)));
    match located {
        Ok(_) => {}
        Err(LocateError::Refused(why)) => f.error(at, "policy.source", why),
        Err(LocateError::Resolve(why)) => f.warn(
            at,
            "policy.source",
            format!("{why}; the sidecar locates it before it fetches a bundle"),
        ),
    }
}

/// Warns about each recipient network that the overrides and the database leave partly or
/// wholly unlocated: every request from there meets `unknown_location`. `db` is `None` when
/// the policy's database was not read (offline, or unusable): only a policy without one can
/// then be judged.
///
/// The judgement is exact, not a sample address: the network is split into the CIDR blocks
/// no override contains (halving it wherever an override lies inside it, since CIDR blocks
/// either nest or are disjoint), and the database is asked about each block as a whole
/// ([`GeoDb::coverage`] reads every record inside it and names the blocks without a country).
fn recipient_networks<'p>(policy: &'p Policy, db: Option<Option<&GeoDb>>, f: &mut Findings<'p>) {
    let Some(db) = db else { return };
    let overrides: Vec<IpNet> = policy.networks.iter().map(|n| n.cidr).collect();
    let consequence = match policy.unknown_location {
        UnknownLocation::Deny => {
            "with unknown_location = \"deny\", requests from there are refused location_unknown"
        }
        UnknownLocation::Foreign => {
            "with unknown_location = \"foreign\", requests from there are treated as coming from abroad"
        }
    };
    let locators = if db.is_some() {
        "no [[networks]] override nor the geolocation database"
    } else {
        "no [[networks]] override (and the policy has no geolocation database)"
    };
    for r in &policy.recipients {
        for (i, &declared) in r.networks.iter().enumerate() {
            let net = canonical(declared);
            let mut outside = Vec::new();
            outside_overrides(net, &overrides, &mut outside);
            let mut some_located = outside.first() != Some(&net);
            let mut unlocated = Vec::new();
            for block in outside {
                match db {
                    Some(db) => {
                        let found = db.coverage(block);
                        some_located |= found.located;
                        unlocated.extend(found.unlocated);
                    }
                    None => unlocated.push(block),
                }
            }
            let Some(first) = unlocated.first() else {
                continue;
            };
            let message = if some_located {
                let more = match unlocated.len() {
                    1 => String::new(),
                    n => format!(" and {} more block(s)", n - 1),
                };
                format!(
                    "recipient \"{}\": part of network {declared} ({first}{more}) is located by {locators}; {consequence}",
                    r.id
                )
            } else {
                format!(
                    "recipient \"{}\": network {declared} is located by {locators}; {consequence}",
                    r.id
                )
            };
            f.warn(
                At::Item {
                    array: "recipients",
                    by: "id",
                    name: &r.id,
                    key: "networks",
                    index: Some(i),
                },
                format!("recipients.{}.networks", r.id),
                message,
            );
        }
    }
}

/// An IPv4-mapped IPv6 network as the IPv4 network it is: the proxy locates such addresses as
/// IPv4.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .network()
            .to_ipv4_mapped()
            .and_then(|v4| Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, IpNet::V4),
        _ => net,
    }
}

/// Appends to `out` the CIDR blocks of `net` that no override contains.
fn outside_overrides(net: IpNet, overrides: &[IpNet], out: &mut Vec<IpNet>) {
    if overrides.iter().any(|o| o.contains(&net)) {
        return;
    }
    if !overrides.iter().any(|o| net.contains(o)) {
        out.push(net);
        return;
    }
    // An override lies strictly inside `net`: each half is inside it, holds it, or misses it.
    if let Ok(halves) = net.subnets(net.prefix_len() + 1) {
        for half in halves {
            outside_overrides(half, overrides, out);
        }
    }
}

/// The policy's source files, to find the line a setting is written on.
struct Sources(Vec<(PathBuf, String)>);

/// `--bundle`: the bundle file, read once, and where its database is unpacked while checking.
struct BundleArg {
    path: PathBuf,
    bytes: Vec<u8>,
    geo_dir: tempfile::TempDir,
}

impl BundleArg {
    fn read(path: &Path) -> Result<BundleArg, CliError> {
        Ok(BundleArg {
            path: path.to_path_buf(),
            bytes: std::fs::read(path)
                .map_err(|e| fail(format!("cannot read bundle {}: {e}", path.display())))?,
            geo_dir: tempfile::tempdir()?,
        })
    }
}

/// What `check` found in one FILE.
enum Loaded {
    /// A policy to open the files of, and its sources for the lines of findings.
    Policy(Box<Policy>, Sources),
    /// Nothing more to examine: the outcome is printed already (`true`: it failed).
    Printed(bool),
}

/// Compiles `file`: a whole policy, a sidecar's own file alone, or a sidecar's own file with
/// `--bundle` (verified with the sidecar's key first: a bundle it would refuse is an error).
fn load(file: &Path, bundle: Option<&BundleArg>, offline: bool) -> Result<Loaded, PolicyError> {
    let sidecar = match (load_file(file, |p| std::fs::read_to_string(p))?, bundle) {
        (PolicyFile::Whole(p), None) => {
            let sources = Sources::read(&p);
            return Ok(Loaded::Policy(p, sources));
        }
        (PolicyFile::Whole(_), Some(b)) => {
            eprintln!(
                "{}: --bundle {}: this is a whole policy, not a sidecar's own file (one with [policy.source]): check it alone",
                file.display(),
                b.path.display()
            );
            return Ok(Loaded::Printed(true));
        }
        (PolicyFile::Sidecar(s), None) => return Ok(Loaded::Printed(sidecar_alone(&s, offline))),
        (PolicyFile::Sidecar(s), Some(_)) => s,
    };
    let bundle = bundle.expect("a sidecar with a bundle");
    let refused = |why: &dyn std::fmt::Display| {
        eprintln!("{}: {why}", bundle.path.display());
        eprintln!("{}: 1 error(s)", file.display());
        Ok(Loaded::Printed(true))
    };
    let parsed = match crate::bundle::parse(&bundle.bytes) {
        Ok(b) => b,
        Err(e) => return refused(&format_args!("{}: {e}", e.reason())),
    };
    // Without the key (offline, or unreadable: reported with the files) only the hashes.
    let checked = match keys::load_public_key(&sidecar.source.key) {
        Ok(key) if !offline => parsed.verify(&key),
        _ => parsed.check_hashes(),
    };
    if let Err(e) = checked {
        return refused(&format_args!("{}: {e}", e.reason()));
    }
    let verified = match VerifiedBundle::from_checked(
        &parsed,
        &bundle.bytes,
        bundle.path.clone(),
        bundle.geo_dir.path(),
    ) {
        Ok(v) => v,
        Err(refusal) => return refused(&refusal),
    };
    let policy = merge(&sidecar, &verified.rules())?;
    let mut files = sidecar.files().to_vec();
    files.extend(
        verified
            .policy_files()
            .iter()
            .map(|(p, text)| (verified.label.join(p), text.clone())),
    );
    Ok(Loaded::Policy(Box::new(policy), Sources(files)))
}

/// A sidecar's own file without its bundle: compiled (it was), and its key read unless
/// offline; `true` when that failed.
fn sidecar_alone(sidecar: &Sidecar, offline: bool) -> bool {
    let file = sidecar.path();
    if !offline && let Err(e) = keys::load_public_key(&sidecar.source.key) {
        let sources = Sources(sidecar.files().to_vec());
        let (path, line) = sources.locate(file, At::Key("policy", "source"));
        let d = Diagnostic {
            file: path,
            line,
            rule: "policy.source.key".into(),
            message: e.to_string(),
        };
        eprintln!("{d}");
        eprintln!("{}: 1 error(s)", file.display());
        return true;
    }
    println!(
        "{}: ok: a sidecar's own file; its rules come from the bundle at {} (give --bundle BUNDLE to check them together)",
        file.display(),
        sidecar.source.url
    );
    false
}

impl Sources {
    fn read(policy: &Policy) -> Sources {
        Sources(
            policy
                .sources
                .iter()
                .filter_map(|p| Some((p.clone(), std::fs::read_to_string(p).ok()?)))
                .collect(),
        )
    }

    /// The file and line of the setting at `at`, or of the nearest enclosing item written
    /// (the table, for a key left at its default); the entry file without a line when
    /// nothing is written.
    fn locate(&self, entry: &Path, at: At<'_>) -> (PathBuf, Option<usize>) {
        for (path, text) in &self.0 {
            if let Some(offset) = offset_of(text, at) {
                let line = text[..offset.min(text.len())].matches('\n').count() + 1;
                return (path.clone(), Some(line));
            }
        }
        (entry.to_path_buf(), None)
    }

    /// `findings` as diagnostics, in the order of the files and their lines.
    fn diagnostics(&self, entry: &Path, findings: &[Finding<'_>]) -> Vec<Diagnostic> {
        let mut diags: Vec<Diagnostic> = findings
            .iter()
            .map(|finding| {
                let (file, line) = self.locate(entry, finding.at);
                Diagnostic {
                    file,
                    line,
                    rule: finding.rule.clone(),
                    message: finding.message.clone(),
                }
            })
            .collect();
        let source = |d: &Diagnostic| self.0.iter().position(|(p, _)| *p == d.file);
        diags.sort_by_key(|d| (source(d), d.line));
        diags
    }
}

/// Where in `text` (one policy file) the setting at `at` is written, if that file holds it
/// or the item around it.
fn offset_of(text: &str, at: At<'_>) -> Option<usize> {
    use toml::Spanned;
    use toml::de::{DeTable, DeValue};
    fn table<'v, 't>(v: &'v Spanned<DeValue<'t>>) -> Option<&'v DeTable<'t>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        }
    }
    let root = DeTable::parse(text).ok()?;
    let root = root.get_ref();
    match at {
        At::Key(name, key) => {
            let t = root.get(name)?;
            let value = table(t).and_then(|fields| fields.get(key));
            Some(value.unwrap_or(t).span().start)
        }
        At::Item {
            array,
            by,
            name,
            key,
            index,
        } => {
            let DeValue::Array(items) = root.get(array)?.get_ref() else {
                return None;
            };
            let item = items.iter().find(|item| {
                table(item).and_then(|t| t.get(by)).is_some_and(
                    |v| matches!(v.get_ref(), DeValue::String(s) if s.as_ref() == name),
                )
            })?;
            let Some(value) = table(item).and_then(|t| t.get(key)) else {
                return Some(item.span().start);
            };
            let element = match (value.get_ref(), index) {
                (DeValue::Array(list), Some(i)) => list.get(i),
                _ => None,
            };
            Some(element.unwrap_or(value).span().start)
        }
    }
}

pub fn run(args: CheckArgs) -> CliResult {
    let bundle = args.bundle.as_deref().map(BundleArg::read).transpose()?;
    let mut failed = false;
    // An unreadable file does not stop the others being checked; it makes the run exit 2.
    let mut unreadable: Option<PolicyError> = None;
    for f in &args.files {
        match load(f, bundle.as_ref(), args.offline) {
            Ok(Loaded::Printed(failed_here)) => failed |= failed_here,
            Ok(Loaded::Policy(p, sources)) => {
                let found = check_files(&p, args.offline);
                for s in &found.skipped {
                    eprintln!("warning: {s}");
                }
                for w in sources.diagnostics(f, &found.warnings) {
                    eprintln!("warning: {w}");
                }
                if found.errors.is_empty() {
                    println!(
                        "{}: ok: policy \"{}\" ({} datasets, {} upstreams, {} recipients) {}",
                        f.display(),
                        p.name,
                        p.datasets.len(),
                        p.upstreams.len(),
                        p.recipients.len(),
                        p.hash
                    );
                } else {
                    failed = true;
                    for e in sources.diagnostics(f, &found.errors) {
                        eprintln!("{e}");
                    }
                    eprintln!("{}: {} error(s)", f.display(), found.errors.len());
                }
            }
            Err(PolicyError::Invalid(diags)) => {
                failed = true;
                for d in &diags {
                    eprintln!("{d}");
                }
                eprintln!("{}: {} error(s)", f.display(), diags.len());
            }
            Err(e @ PolicyError::Read { .. }) => {
                if let Some(earlier) = unreadable.replace(e) {
                    eprintln!("error: {earlier}");
                }
            }
        }
    }
    if let Some(e) = unreadable {
        return Err(e.into());
    }
    Ok(if failed { Exit::Failed } else { Exit::Ok })
}
