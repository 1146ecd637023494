//! Load (files and includes) and compile a policy: every error is collected, each with its
//! file, line and rule path, before anything is returned. File reading is injected so that
//! this module stays free of I/O.
//!
//! One file for one idea, raw policy to checked model: every section's checks share the error
//! collector, the line lookup and the cross-references between sections (datasets name
//! upstreams and jurisdictions, recipients name networks). About 1,950 of its lines are
//! code, the rest its tests.

use super::consent::KNOWN_METHODS;
use super::country::{Country, CountrySet};
use super::model::*;
use super::net::CidrTable;
use super::raw::*;
use http::{HeaderName, Method};
use ipnet::IpNet;
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One problem in a policy, located as precisely as the source allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// The rule path, e.g. `datasets.payments.upstream`.
    pub rule: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: ", self.file.display(), l)?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        if !self.rule.is_empty() {
            write!(f, "{}: ", self.rule)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} error(s) in policy:\n{}", .0.len(), render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(d: &[Diagnostic]) -> String {
    d.iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A segment of a location inside one TOML document.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

struct Source {
    path: PathBuf,
    text: String,
}

/// Where an item came from: the file and its position in that file's array.
#[derive(Clone, Copy, Debug)]
struct Origin {
    file: usize,
    index: usize,
}

struct Loaded {
    sources: Vec<Source>,
    diags: Vec<Diagnostic>,
    /// One merged view; every array item remembers its origin.
    file: MergedFile,
    /// A file could not be parsed, so the merged view is incomplete.
    unparsed: bool,
}

#[derive(Default)]
struct MergedFile {
    policy: Option<(usize, RawPolicy)>,
    proxy: Option<(usize, RawProxy)>,
    jurisdictions: Vec<(usize, String, Vec<String>)>,
    geo: Option<(usize, RawGeo)>,
    networks: Vec<(Origin, RawNetwork)>,
    upstreams: Vec<(Origin, RawUpstream)>,
    recipients: Vec<(Origin, RawRecipient)>,
    datasets: Vec<(Origin, RawDataset)>,
    consent: Option<(usize, RawConsent)>,
    log: Option<(usize, RawLog)>,
    admin: Option<(usize, RawAdmin)>,
    tls: Option<(usize, RawTls)>,
}

/// How deep includes may nest.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Loads the policy at `entry` and every file it includes, through `read`, and compiles it.
pub fn load(
    entry: &Path,
    mut read: impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<Policy, PolicyError> {
    let mut loaded = Loaded {
        sources: Vec::new(),
        diags: Vec::new(),
        file: MergedFile::default(),
        unparsed: false,
    };
    let mut stack = Vec::new();
    load_file(entry, &mut read, &mut loaded, &mut stack)?;
    // Checking what was read of a partly unreadable policy would only report what the
    // unparsed file may well define (a missing [policy], an unknown upstream): stop here.
    if loaded.unparsed {
        return Err(PolicyError::Invalid(loaded.diags));
    }
    let mut cx = Cx {
        sources: &loaded.sources,
        diags: loaded.diags,
    };
    let policy = compile(&mut cx, loaded.file, &loaded.sources);
    if cx.diags.is_empty() {
        Ok(policy.expect("a policy compiles when no diagnostic was raised"))
    } else {
        Err(PolicyError::Invalid(cx.diags))
    }
}

/// Compiles a policy held in memory (tests, benchmarks, `explain` on generated policies).
pub fn from_str(name: &str, text: &str) -> Result<Policy, PolicyError> {
    let path = PathBuf::from(name);
    let owned = text.to_string();
    load(&path, move |_| Ok(owned.clone()))
}

fn load_file(
    path: &Path,
    read: &mut impl FnMut(&Path) -> std::io::Result<String>,
    loaded: &mut Loaded,
    stack: &mut Vec<PathBuf>,
) -> Result<(), PolicyError> {
    let text = read(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file = loaded.sources.len();
    loaded.sources.push(Source {
        path: path.to_path_buf(),
        text,
    });
    stack.push(path.to_path_buf());
    let text = loaded.sources[file].text.clone();
    let raw = match parse_file(&text) {
        Ok((raw, unknown)) => {
            for seg in unknown {
                let rule = display_segments(&seg);
                let line = line_of(&text, &seg);
                loaded.diags.push(Diagnostic {
                    file: path.to_path_buf(),
                    line,
                    rule,
                    message: "unknown key".into(),
                });
            }
            raw
        }
        Err(e) => {
            let line = e.span().map(|s| line_at(&text, s.start));
            // A value of the wrong type is named by its path; a syntax error has none.
            let rule = e
                .span()
                .and_then(|s| path_at(&text, s.start))
                .map(|segs| display_segments(&segs))
                .unwrap_or_default();
            loaded.diags.push(Diagnostic {
                file: path.to_path_buf(),
                line,
                rule,
                message: e.message().trim().to_string(),
            });
            loaded.unparsed = true;
            stack.pop();
            return Ok(());
        }
    };
    let RawFile {
        include,
        policy,
        proxy,
        jurisdictions,
        geo,
        networks,
        upstreams,
        recipients,
        datasets,
        consent,
        log,
        admin,
        tls,
    } = raw;
    // Included files stand where the `include` key is: before this file's own items.
    let base = path.parent().unwrap_or(Path::new(""));
    for (i, inc) in include.iter().enumerate() {
        let inc_path = base.join(inc);
        // A cycle, a second inclusion, or nesting too deep (a cycle spelled through
        // different paths, `a/../x.toml`) is reported instead of loaded again: loading
        // again would repeat every definition, and re-including would not terminate.
        let refused = if stack.contains(&inc_path) {
            Some(format!(
                "\"{inc}\" includes itself (cycle through {})",
                inc_path.display()
            ))
        } else if loaded.sources.iter().any(|s| s.path == inc_path) {
            Some(format!(
                "\"{inc}\" is already included ({}); a file can be included only once",
                inc_path.display()
            ))
        } else if stack.len() >= MAX_INCLUDE_DEPTH {
            Some(format!(
                "\"{inc}\" is nested more than {MAX_INCLUDE_DEPTH} includes deep"
            ))
        } else {
            None
        };
        if let Some(message) = refused {
            loaded.diags.push(Diagnostic {
                file: path.to_path_buf(),
                line: line_of(&text, &[Seg::Key("include".into()), Seg::Index(i)]),
                rule: "include".into(),
                message,
            });
            continue;
        }
        load_file(&inc_path, read, loaded, stack)?;
    }
    let m = &mut loaded.file;
    let single =
        |name: &str, present: bool, previous: Option<usize>, diags: &mut Vec<Diagnostic>| {
            if let (true, Some(prev)) = (present, previous) {
                diags.push(Diagnostic {
                    file: path.to_path_buf(),
                    line: line_of(&text, &[Seg::Key(name.into())]),
                    rule: name.into(),
                    message: format!(
                        "[{name}] is already defined in {}",
                        loaded.sources[prev].path.display()
                    ),
                });
                false
            } else {
                present
            }
        };
    let d = &mut loaded.diags;
    if single(
        "policy",
        policy.is_some(),
        m.policy.as_ref().map(|p| p.0),
        d,
    ) {
        m.policy = policy.map(|p| (file, p));
    }
    if single("proxy", proxy.is_some(), m.proxy.as_ref().map(|p| p.0), d) {
        m.proxy = proxy.map(|p| (file, p));
    }
    if single("geo", geo.is_some(), m.geo.as_ref().map(|p| p.0), d) {
        m.geo = geo.map(|p| (file, p));
    }
    if single(
        "consent",
        consent.is_some(),
        m.consent.as_ref().map(|p| p.0),
        d,
    ) {
        m.consent = consent.map(|p| (file, p));
    }
    if single("log", log.is_some(), m.log.as_ref().map(|p| p.0), d) {
        m.log = log.map(|p| (file, p));
    }
    if single("admin", admin.is_some(), m.admin.as_ref().map(|p| p.0), d) {
        m.admin = admin.map(|p| (file, p));
    }
    if single("tls", tls.is_some(), m.tls.as_ref().map(|p| p.0), d) {
        m.tls = tls.map(|p| (file, p));
    }
    for (name, codes) in jurisdictions.unwrap_or_default() {
        m.jurisdictions.push((file, name, codes));
    }
    let origin = |index| Origin { file, index };
    m.networks.extend(
        networks
            .into_iter()
            .enumerate()
            .map(|(i, x)| (origin(i), x)),
    );
    m.upstreams.extend(
        upstreams
            .into_iter()
            .enumerate()
            .map(|(i, x)| (origin(i), x)),
    );
    m.recipients.extend(
        recipients
            .into_iter()
            .enumerate()
            .map(|(i, x)| (origin(i), x)),
    );
    m.datasets.extend(
        datasets
            .into_iter()
            .enumerate()
            .map(|(i, x)| (origin(i), x)),
    );
    stack.pop();
    Ok(())
}

fn parse_file(text: &str) -> Result<(RawFile, Vec<Vec<Seg>>), toml::de::Error> {
    let de = toml::de::Deserializer::parse(text)?;
    let mut unknown = Vec::new();
    let raw = serde_ignored::deserialize(de, |p| unknown.push(segments(&p)))?;
    Ok((raw, unknown))
}

fn segments(p: &serde_ignored::Path<'_>) -> Vec<Seg> {
    use serde_ignored::Path as P;
    match p {
        P::Root => Vec::new(),
        P::Seq { parent, index } => {
            let mut v = segments(parent);
            v.push(Seg::Index(*index));
            v
        }
        P::Map { parent, key } => {
            let mut v = segments(parent);
            v.push(Seg::Key(key.to_string()));
            v
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            segments(parent)
        }
    }
}

fn display_segments(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The line of the value at `segs` in `text`, or of the nearest enclosing item that exists.
fn line_of(text: &str, segs: &[Seg]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut best = None;
    let mut table: &DeTable<'_> = root.get_ref();
    let mut value: Option<&toml::Spanned<DeValue<'_>>> = None;
    for seg in segs {
        let next = match (seg, value.map(|v| v.get_ref())) {
            (Seg::Key(k), None) => table.get(k.as_str()),
            (Seg::Key(k), Some(DeValue::Table(t))) => t.get(k.as_str()),
            (Seg::Index(i), Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = Some(next.span().start);
        if let DeValue::Table(t) = next.get_ref() {
            table = t;
        }
        value = Some(next);
    }
    best.map(|o| line_at(text, o))
}

/// The path of the innermost value of `text` whose span holds `offset`, when `text` is
/// valid TOML (that is, when `offset` comes from a deserialisation error).
fn path_at(text: &str, offset: usize) -> Option<Vec<Seg>> {
    use toml::de::{DeTable, DeValue};
    type Value<'a> = toml::Spanned<DeValue<'a>>;
    fn in_table(t: &DeTable<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
        t.iter().any(|(k, v)| {
            path.push(Seg::Key(k.get_ref().to_string()));
            in_value(v, offset, path) || {
                path.pop();
                false
            }
        })
    }
    // Tables and arrays are searched whatever their own span says: a `[table]`'s span
    // need not cover the keys under it.
    fn in_value(v: &Value<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
        let inside = match v.get_ref() {
            DeValue::Table(t) => in_table(t, offset, path),
            DeValue::Array(a) => a.iter().enumerate().any(|(i, x)| {
                path.push(Seg::Index(i));
                in_value(x, offset, path) || {
                    path.pop();
                    false
                }
            }),
            _ => false,
        };
        inside || v.span().contains(&offset)
    }
    let root = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    in_table(root.get_ref(), offset, &mut path).then_some(path)
}

/// Collects diagnostics while compiling.
struct Cx<'s> {
    sources: &'s [Source],
    diags: Vec<Diagnostic>,
}

impl Cx<'_> {
    fn err(
        &mut self,
        file: usize,
        at: &[Seg],
        rule: impl Into<String>,
        message: impl Into<String>,
    ) {
        let src = &self.sources[file];
        self.diags.push(Diagnostic {
            file: src.path.clone(),
            line: line_of(&src.text, at),
            rule: rule.into(),
            message: message.into(),
        });
    }
}

fn k(s: &str) -> Seg {
    Seg::Key(s.to_string())
}

fn item(array: &str, origin: Origin, field: Option<&str>) -> Vec<Seg> {
    let mut v = vec![k(array), Seg::Index(origin.index)];
    if let Some(f) = field {
        v.extend(f.split('.').map(k));
    }
    v
}

/// Parses durations written as `250ms`, `10s`, `5m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("\"{s}\" is not a duration (write e.g. \"500ms\", \"10s\", \"5m\")")
    })?;
    let secs = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("\"{s}\" is too long a duration"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!(
            "\"{s}\" is not a duration: the unit must be ms, s, m or h"
        )),
    }
}

fn parse_method(s: &str) -> Result<Method, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Method::from_bytes(s.as_bytes()).map_err(|e| e.to_string())
    } else {
        Err(format!(
            "\"{s}\" is not an HTTP method (write it in upper case, e.g. \"GET\")"
        ))
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A fideslang-style category: dot-separated lower-case segments.
pub fn valid_category(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_token)
}

/// Collection methods that the SPEC says are never consent, whatever the policy says.
pub const NEVER_CONSENT: [&str; 4] = ["pre_ticked", "implied", "bundled", "opt_out"];

const DEFAULT_MASK: [&str; 3] = ["authorization", "x-amz-security-token", "cookie"];

fn compile(cx: &mut Cx<'_>, m: MergedFile, sources: &[Source]) -> Option<Policy> {
    let hash = {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for s in sources {
            ctx.update(s.path.to_string_lossy().as_bytes());
            ctx.update(&[0]);
            ctx.update(s.text.as_bytes());
            ctx.update(&[0]);
        }
        format!("sha256:{}", hex::encode(ctx.finish().as_ref()))
    };
    let entry = 0;

    // [jurisdictions]
    let mut jurisdictions = Jurisdictions::default();
    for (file, name, codes) in &m.jurisdictions {
        let at = [k("jurisdictions"), k(name)];
        let rule = format!("jurisdictions.{name}");
        if name.is_empty() {
            cx.err(*file, &at, rule.clone(), "a jurisdiction needs a name");
            continue;
        }
        if jurisdictions.named.contains_key(name) {
            cx.err(
                *file,
                &at,
                rule.clone(),
                format!("jurisdiction \"{name}\" is defined twice"),
            );
            continue;
        }
        if Country::parse(name).is_some() {
            cx.err(*file, &at, rule.clone(), format!("\"{name}\" is a country code, which is already a jurisdiction of itself; choose another name"));
            continue;
        }
        let mut set = CountrySet::new();
        for (i, c) in codes.iter().enumerate() {
            match Country::parse(c) {
                Some(c) => set.insert(c),
                None => cx.err(
                    *file,
                    &[k("jurisdictions"), k(name), Seg::Index(i)],
                    rule.clone(),
                    format!(
                        "\"{c}\" is not an ISO 3166-1 alpha-2 country code{}",
                        iso_hint(c)
                    ),
                ),
            }
        }
        if codes.is_empty() {
            cx.err(
                *file,
                &at,
                rule.clone(),
                "a jurisdiction must list at least one country",
            );
        }
        jurisdictions.named.insert(name.clone(), set);
    }
    let resolve = |cx: &mut Cx<'_>,
                   file: usize,
                   at: &[Seg],
                   rule: &str,
                   name: &str|
     -> Option<Jurisdiction> {
        let j = jurisdictions.resolve(name);
        if j.is_none() {
            cx.err(file, at, rule, format!("\"{name}\" is neither a declared jurisdiction nor an ISO 3166-1 alpha-2 country code{}", iso_hint(name)));
        }
        j
    };

    // [policy]
    let (pfile, p) = m.policy.unwrap_or((entry, RawPolicy::default()));
    let pat = |f: &str| vec![k("policy"), k(f)];
    let name = match p.name {
        Some(n) if !n.trim().is_empty() => n,
        _ => {
            cx.err(
                pfile,
                &[k("policy")],
                "policy.name",
                "required: name the policy (it appears in every decision record)",
            );
            String::new()
        }
    };
    let home = match p.home.as_deref() {
        Some(h) => resolve(cx, pfile, &pat("home"), "policy.home", h),
        None => None,
    };
    let mode = parse_mode(cx, pfile, &pat("mode"), "policy.mode", p.mode.as_deref())
        .unwrap_or(Mode::Enforce);
    let unmatched = choice(
        cx,
        pfile,
        &pat("unmatched"),
        "policy.unmatched",
        p.unmatched.as_deref(),
        &[("deny", Unmatched::Deny), ("allow", Unmatched::Allow)],
        Unmatched::Deny,
    );
    let unknown_location = choice(
        cx,
        pfile,
        &pat("unknown_location"),
        "policy.unknown_location",
        p.unknown_location.as_deref(),
        &[
            ("deny", UnknownLocation::Deny),
            ("foreign", UnknownLocation::Foreign),
        ],
        UnknownLocation::Deny,
    );

    // [proxy]
    let (xfile, x) = m.proxy.unwrap_or((entry, RawProxy::default()));
    let xat = |f: &str| vec![k("proxy"), k(f)];
    let dur = |cx: &mut Cx<'_>, f: &str, v: &Option<String>, default: Duration| -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    cx.err(
                        xfile,
                        &xat(f),
                        format!("proxy.{f}"),
                        "must be greater than zero",
                    );
                    default
                }
                Err(e) => {
                    cx.err(xfile, &xat(f), format!("proxy.{f}"), e);
                    default
                }
            },
        }
    };
    let header_read_timeout = dur(
        cx,
        "header_read_timeout",
        &x.header_read_timeout,
        Duration::from_secs(10),
    );
    let connect_timeout = dur(
        cx,
        "connect_timeout",
        &x.connect_timeout,
        Duration::from_secs(5),
    );
    let upstream_timeout = dur(
        cx,
        "upstream_timeout",
        &x.upstream_timeout,
        Duration::from_secs(60),
    );
    let idle_timeout = dur(cx, "idle_timeout", &x.idle_timeout, Duration::from_secs(60));
    let drain_timeout = dur(
        cx,
        "drain_timeout",
        &x.drain_timeout,
        Duration::from_secs(30),
    );
    let resolve_interval = dur(
        cx,
        "resolve_interval",
        &x.resolve_interval,
        Duration::from_secs(30),
    );
    let listen = parse_addr(
        cx,
        xfile,
        &xat("listen"),
        "proxy.listen",
        x.listen.as_deref(),
        "0.0.0.0:8080",
    );
    let mut trusted_proxies = CidrTable::new();
    for (i, t) in x.trusted_proxies.iter().flatten().enumerate() {
        match parse_net(t) {
            Ok(n) => {
                trusted_proxies.insert(n, ());
            }
            Err(e) => cx.err(
                xfile,
                &[k("proxy"), k("trusted_proxies"), Seg::Index(i)],
                "proxy.trusted_proxies",
                e,
            ),
        }
    }
    let bounded = |cx: &mut Cx<'_>, f: &str, v: Option<u64>, default: u64, min: u64| -> u64 {
        match v {
            None => default,
            Some(n) if n >= min => n,
            Some(n) => {
                cx.err(
                    xfile,
                    &xat(f),
                    format!("proxy.{f}"),
                    format!("{n} is too small (at least {min})"),
                );
                default
            }
        }
    };
    let proxy = ProxySettings {
        listen,
        max_header_bytes: bounded(cx, "max_header_bytes", x.max_header_bytes, 64 * 1024, 1024)
            as usize,
        max_headers: bounded(cx, "max_headers", x.max_headers, 100, 8) as usize,
        max_body_bytes: x.max_body_bytes,
        header_read_timeout,
        connect_timeout,
        upstream_timeout,
        idle_timeout,
        max_connections: bounded(cx, "max_connections", x.max_connections, 10_000, 1) as usize,
        drain_timeout,
        resolve_interval,
        upstream_idle_per_address: bounded(
            cx,
            "upstream_idle_per_address",
            x.upstream_idle_per_address,
            256,
            0,
        ) as usize,
        workers: x.workers.map(|w| w.max(1) as usize),
        handshake_timeout: dur(
            cx,
            "handshake_timeout",
            &x.handshake_timeout,
            Duration::from_secs(10),
        ),
        // hyper's own default (200) is generous for a sidecar; 100 is what RFC 9113 asks
        // a peer to allow at least, and what nginx and Envoy's edge settings use.
        max_concurrent_streams: bounded(
            cx,
            "max_concurrent_streams",
            x.max_concurrent_streams.map(|n| n.min(u64::from(u32::MAX))),
            100,
            1,
        ) as u32,
    };

    // [geo]
    let geo_database = m.geo.and_then(|(_, g)| g.database).map(PathBuf::from);

    // [[networks]]
    let mut networks = Vec::new();
    let mut seen_nets: HashSet<IpNet> = HashSet::new();
    for (o, n) in m.networks {
        let label = n.name.clone().unwrap_or_else(|| n.cidr.clone());
        let rule = format!("networks.{label}");
        let cidr = match parse_net(&n.cidr) {
            Ok(c) => Some(c),
            Err(e) => {
                cx.err(o.file, &item("networks", o, Some("cidr")), rule.clone(), e);
                None
            }
        };
        let country = Country::parse(&n.country);
        if country.is_none() {
            cx.err(
                o.file,
                &item("networks", o, Some("country")),
                rule.clone(),
                format!(
                    "\"{}\" is not an ISO 3166-1 alpha-2 country code{}",
                    n.country,
                    iso_hint(&n.country)
                ),
            );
        }
        if let (Some(cidr), Some(country)) = (cidr, country) {
            if !seen_nets.insert(cidr) {
                cx.err(
                    o.file,
                    &item("networks", o, Some("cidr")),
                    rule.clone(),
                    format!("network {cidr} is listed twice"),
                );
            }
            networks.push(NetworkOverride {
                cidr,
                country,
                name: label.into(),
            });
        }
    }

    // [[upstreams]]
    let mut upstreams: Vec<Upstream> = Vec::new();
    // Names seen so far, valid or not: a duplicate of an invalid item is still a duplicate.
    let mut upstream_names = HashSet::new();
    for (o, u) in m.upstreams {
        let rule = format!("upstreams.{}", u.name);
        if u.name.is_empty() {
            cx.err(
                o.file,
                &item("upstreams", o, Some("name")),
                rule.clone(),
                "an upstream needs a name",
            );
        } else if !upstream_names.insert(u.name.clone()) {
            cx.err(
                o.file,
                &item("upstreams", o, Some("name")),
                rule.clone(),
                format!("upstream \"{}\" is defined twice", u.name),
            );
            continue;
        }
        let client_cert = match (u.client_cert, u.client_key) {
            (Some(cert), Some(key)) => Some(ClientCert {
                cert: cert.into(),
                key: key.into(),
            }),
            (None, None) => None,
            (cert, _) => {
                let (have, missing) = if cert.is_some() {
                    ("client_cert", "client_key")
                } else {
                    ("client_key", "client_cert")
                };
                cx.err(
                    o.file,
                    &item("upstreams", o, Some(have)),
                    format!("{rule}.{missing}"),
                    format!("{have} needs {missing}: a client certificate is presented with its private key"),
                );
                None
            }
        };
        let ca = u.ca.map(PathBuf::from);
        match parse_upstream_url(&u.url) {
            Ok((scheme, host, port)) => {
                if scheme == Scheme::Http {
                    let tls_keys = [("ca", ca.is_some()), ("client_cert", client_cert.is_some())];
                    for (key, _) in tls_keys.iter().filter(|(_, set)| *set) {
                        cx.err(
                            o.file,
                            &item("upstreams", o, Some(key)),
                            format!("{rule}.{key}"),
                            format!(
                                "{key} applies to https upstreams only; \"{}\" is plain http",
                                u.url
                            ),
                        );
                    }
                }
                upstreams.push(Upstream {
                    name: u.name.into(),
                    scheme,
                    host,
                    port,
                    rule: rule.into(),
                    ca,
                    client_cert,
                })
            }
            Err(e) => cx.err(
                o.file,
                &item("upstreams", o, Some("url")),
                format!("{rule}.url"),
                e,
            ),
        }
    }

    // [[recipients]]
    let mut recipients: Vec<Recipient> = Vec::new();
    let mut recipients_by_identity = FastMap::default();
    let mut recipients_by_network = CidrTable::new();
    for (o, r) in m.recipients {
        let rule = format!("recipients.{}", r.id);
        if r.id.is_empty() || r.id.contains('*') {
            cx.err(
                o.file,
                &item("recipients", o, Some("id")),
                rule.clone(),
                "a recipient needs an id, and ids are never wildcards",
            );
        }
        if recipients.iter().any(|x| *x.id == *r.id) {
            cx.err(
                o.file,
                &item("recipients", o, Some("id")),
                rule.clone(),
                format!("recipient \"{}\" is defined twice", r.id),
            );
            continue;
        }
        let relation = match r.relation.as_str() {
            "first_party" => Relation::FirstParty,
            "third_party" => Relation::ThirdParty,
            other => {
                cx.err(
                    o.file,
                    &item("recipients", o, Some("relation")),
                    format!("{rule}.relation"),
                    format!("\"{other}\" is not one of \"first_party\", \"third_party\""),
                );
                Relation::ThirdParty
            }
        };
        let country = r.country.as_deref().and_then(|c| {
            let parsed = Country::parse(c);
            if parsed.is_none() {
                cx.err(
                    o.file,
                    &item("recipients", o, Some("country")),
                    format!("{rule}.country"),
                    format!(
                        "\"{c}\" is not an ISO 3166-1 alpha-2 country code{}",
                        iso_hint(c)
                    ),
                );
            }
            parsed
        });
        let idx = recipients.len();
        // Whom a repeated identity or network already belongs to: this very recipient (not
        // yet in `recipients`) when it lists the same one twice.
        let owner = |prev: usize| match recipients.get(prev) {
            Some(other) if prev != idx => format!("recipient \"{}\"", other.id),
            _ => "this recipient: it is listed twice".to_string(),
        };
        for (i, id) in r.identities.iter().enumerate() {
            let at = [
                k("recipients"),
                Seg::Index(o.index),
                k("identities"),
                Seg::Index(i),
            ];
            if id.is_empty() || id.contains('*') {
                cx.err(o.file, &at, format!("{rule}.identities"), format!("\"{id}\" is not an identity (a certificate SAN: URI or DNS name, no wildcards)"));
            } else if let Some(prev) = recipients_by_identity.insert(id.clone(), idx) {
                cx.err(
                    o.file,
                    &at,
                    format!("{rule}.identities"),
                    format!("identity \"{id}\" already belongs to {}", owner(prev)),
                );
            }
        }
        let mut nets = Vec::new();
        for (i, n) in r.networks.iter().enumerate() {
            let at = [
                k("recipients"),
                Seg::Index(o.index),
                k("networks"),
                Seg::Index(i),
            ];
            match parse_net(n) {
                Ok(net) => {
                    if let Some(prev) = recipients_by_network.insert(net, idx) {
                        cx.err(
                            o.file,
                            &at,
                            format!("{rule}.networks"),
                            format!("network {net} already belongs to {}", owner(prev)),
                        );
                    }
                    nets.push(net);
                }
                Err(e) => cx.err(o.file, &at, format!("{rule}.networks"), e),
            }
        }
        if r.identities.is_empty() && r.networks.is_empty() {
            cx.err(
                o.file,
                &item("recipients", o, None),
                rule.clone(),
                "a recipient needs identities or networks, or nothing can ever match it",
            );
        }
        recipients.push(Recipient {
            id: r.id.into(),
            relation,
            country,
            identities: r.identities,
            networks: nets,
        });
    }

    // [consent]
    let (cfile, c) = m.consent.unwrap_or((entry, RawConsent::default()));
    let cat = |f: &str| vec![k("consent"), k(f)];
    let store = match c.store.as_deref() {
        None => ConsentStore::None,
        Some(s) => match parse_store(s) {
            Ok(st) => st,
            Err(e) => {
                cx.err(cfile, &cat("store"), "consent.store", e);
                ConsentStore::None
            }
        },
    };
    let accept_methods = c.accept_methods.unwrap_or_else(|| vec!["explicit".into()]);
    for (i, am) in accept_methods.iter().enumerate() {
        let at = [k("consent"), k("accept_methods"), Seg::Index(i)];
        if NEVER_CONSENT.contains(&am.as_str()) {
            cx.err(cfile, &at, "consent.accept_methods", format!("\"{am}\" is not consent: pre-ticked, implied, bundled or opt-out agreement never counts"));
        } else if !KNOWN_METHODS.contains(&am.as_str()) {
            cx.err(
                cfile,
                &at,
                "consent.accept_methods",
                format!(
                    "\"{am}\" is not a known collection method ({})",
                    KNOWN_METHODS.join(", ")
                ),
            );
        }
    }
    if accept_methods.is_empty() {
        cx.err(
            cfile,
            &cat("accept_methods"),
            "consent.accept_methods",
            "must name at least one method, e.g. [\"explicit\"]",
        );
    }
    let purpose_header = parse_header(
        cx,
        cfile,
        &cat("purpose_header"),
        "consent.purpose_header",
        c.purpose_header.as_deref().unwrap_or("x-purpose"),
    );
    let max_staleness = match c.max_staleness.as_deref().map(parse_duration) {
        None => Duration::from_secs(30),
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            cx.err(cfile, &cat("max_staleness"), "consent.max_staleness", e);
            Duration::from_secs(30)
        }
    };
    let lookup_timeout = match c.lookup_timeout.as_deref().map(parse_duration) {
        None => Duration::from_millis(200),
        Some(Ok(d)) if !d.is_zero() && d <= Duration::from_secs(30) => d,
        Some(Ok(_)) => {
            cx.err(
                cfile,
                &cat("lookup_timeout"),
                "consent.lookup_timeout",
                "must be more than 0 and at most 30s (a request waits this long on a cache miss)",
            );
            Duration::from_millis(200)
        }
        Some(Err(e)) => {
            cx.err(cfile, &cat("lookup_timeout"), "consent.lookup_timeout", e);
            Duration::from_millis(200)
        }
    };
    const MIN_CACHE: u64 = 1024 * 1024;
    let cache_max_bytes = match c.cache_max_bytes {
        None => 64 * 1024 * 1024,
        Some(n) if n >= MIN_CACHE => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            cx.err(
                cfile,
                &cat("cache_max_bytes"),
                "consent.cache_max_bytes",
                format!("{n} is too small: at least {MIN_CACHE} (1 MiB; the default is 67108864, 64 MiB)"),
            );
            64 * 1024 * 1024
        }
    };
    let preload = c.preload.unwrap_or(false);
    let read_url = match (c.read_url, &store) {
        (None, _) => None,
        (Some(u), ConsentStore::Postgres(_))
            if u.starts_with("postgres://") || u.starts_with("postgresql://") =>
        {
            Some(u)
        }
        (Some(_), ConsentStore::Postgres(_)) => {
            cx.err(
                cfile,
                &cat("read_url"),
                "consent.read_url",
                "must be a postgres:// URL of a read replica of consent.store",
            );
            None
        }
        (Some(_), _) => {
            cx.err(
                cfile,
                &cat("read_url"),
                "consent.read_url",
                "a read replica is for a postgres:// consent.store only",
            );
            None
        }
    };
    let consent = ConsentSettings {
        store,
        accept_methods,
        purpose_header,
        max_staleness,
        cache_max_bytes,
        lookup_timeout,
        preload,
        read_url,
    };

    // [log]
    let (lfile, l) = m.log.unwrap_or((entry, RawLog::default()));
    let lat = |f: &str| vec![k("log"), k(f)];
    let target = match l.path.as_deref() {
        None => LogTarget::File(PathBuf::from("logs/decisions.jsonl")),
        Some("-") => LogTarget::Stdout,
        Some("") => {
            cx.err(
                lfile,
                &lat("path"),
                "log.path",
                "must be a file path or \"-\" for standard output",
            );
            LogTarget::Stdout
        }
        Some(p) => LogTarget::File(PathBuf::from(p)),
    };
    let durability = choice(
        cx,
        lfile,
        &lat("durability"),
        "log.durability",
        l.durability.as_deref(),
        &[("write", Durability::Write), ("fsync", Durability::Fsync)],
        Durability::Write,
    );
    let on_failure = choice(
        cx,
        lfile,
        &lat("on_failure"),
        "log.on_failure",
        l.on_failure.as_deref(),
        &[("deny", OnFailure::Deny), ("allow", OnFailure::Allow)],
        OnFailure::Deny,
    );
    let pseudonymize = l.pseudonymize.unwrap_or(true);
    let signing_key = l.signing_key.map(PathBuf::from);
    if pseudonymize && signing_key.is_none() {
        cx.err(lfile, &[k("log")], "log.signing_key", "required while log.pseudonymize is on (the default): the pseudonym key is derived from it (create one with `residency-proxy certs init DIR`)");
    }
    let checkpoint_every = l.checkpoint_every.unwrap_or(1000);
    if checkpoint_every == 0 {
        cx.err(
            lfile,
            &lat("checkpoint_every"),
            "log.checkpoint_every",
            "must be at least 1",
        );
    }
    let checkpoint_interval = match l.checkpoint_interval.as_deref().map(parse_duration) {
        None => Duration::from_secs(10),
        Some(Ok(d)) if !d.is_zero() => d,
        Some(Ok(_)) => {
            cx.err(
                lfile,
                &lat("checkpoint_interval"),
                "log.checkpoint_interval",
                "must be greater than zero",
            );
            Duration::from_secs(10)
        }
        Some(Err(e)) => {
            cx.err(
                lfile,
                &lat("checkpoint_interval"),
                "log.checkpoint_interval",
                e,
            );
            Duration::from_secs(10)
        }
    };
    let mut mask_headers: Vec<HeaderName> = DEFAULT_MASK
        .iter()
        .map(|h| HeaderName::from_static(h))
        .collect();
    for (i, h) in l.mask_headers.iter().flatten().enumerate() {
        let hn = parse_header(
            cx,
            lfile,
            &[k("log"), k("mask_headers"), Seg::Index(i)],
            "log.mask_headers",
            h,
        );
        if !mask_headers.contains(&hn) {
            mask_headers.push(hn);
        }
    }
    let instance = match l.instance.as_deref() {
        None => default_instance(),
        Some(name) => {
            if let Err(why) = check_instance(name) {
                cx.err(lfile, &lat("instance"), "log.instance", why);
            }
            Arc::from(name)
        }
    };
    let ship = l.ship.map(|raw| {
        let ship = compile_ship(cx, lfile, raw);
        if matches!(target, LogTarget::Stdout) {
            cx.err(
                lfile,
                &[k("log"), k("ship")],
                "log.ship",
                "needs log.path to be a file: only sealed files ship, and standard output is never sealed",
            );
        }
        ship
    });
    // Shipping seals files on a schedule by default, so that a quiet sidecar ships too.
    let rotate_interval = match l.rotate_interval.as_deref().map(parse_duration) {
        None => ship.as_ref().map(|_| Duration::from_secs(300)),
        Some(Ok(d)) if d >= Duration::from_secs(1) => Some(d),
        Some(Ok(_)) => {
            cx.err(
                lfile,
                &lat("rotate_interval"),
                "log.rotate_interval",
                "must be at least 1s",
            );
            None
        }
        Some(Err(e)) => {
            cx.err(lfile, &lat("rotate_interval"), "log.rotate_interval", e);
            None
        }
    };
    let rotate_bytes = l.rotate_bytes.unwrap_or(100 * 1024 * 1024);
    let ship = ship.flatten();
    if let Some(sh) = &ship
        && sh.spool_max_bytes <= rotate_bytes
    {
        cx.err(
            lfile,
            &[k("log"), k("ship"), k("spool_max_bytes")],
            "log.ship.spool_max_bytes",
            format!(
                "{} is not more than log.rotate_bytes ({rotate_bytes}): every file sealed by size would fill the spool, and the log would refuse records until it shipped; give it room for several files",
                sh.spool_max_bytes
            ),
        );
    }
    let log = LogSettings {
        instance,
        rotate_interval,
        ship,
        target,
        durability,
        on_failure,
        signing_key,
        checkpoint_every: checkpoint_every.max(1),
        checkpoint_interval,
        rotate_bytes,
        pseudonymize,
        mask_headers,
    };

    // [admin]
    let (afile, a) = m.admin.unwrap_or((entry, RawAdmin::default()));
    let admin = AdminSettings {
        listen: parse_addr(
            cx,
            afile,
            &[k("admin"), k("listen")],
            "admin.listen",
            a.listen.as_deref(),
            "127.0.0.1:9901",
        ),
        token_file: a.token_file.map(PathBuf::from),
    };

    // [tls]
    let tls = m.tls.and_then(|(tfile, t)| match (t.cert, t.key) {
        (Some(cert), Some(key)) => Some(TlsSettings {
            cert: cert.into(),
            key: key.into(),
            client_ca: t.client_ca.map(PathBuf::from),
        }),
        _ => {
            cx.err(
                tfile,
                &[k("tls")],
                "tls",
                "cert and key are both required to terminate TLS",
            );
            None
        }
    });

    // [[datasets]]
    let mut datasets: Vec<Dataset> = Vec::new();
    let mut dataset_names = HashSet::new();
    for (o, d) in m.datasets {
        let base = if d.name.is_empty() {
            format!("datasets[{}]", datasets.len())
        } else {
            format!("datasets.{}", d.name)
        };
        let r = |f: &str| -> Arc<str> { format!("{base}.{f}").into() };
        let at = |f: &str| item("datasets", o, Some(f));
        if d.name.is_empty() {
            cx.err(o.file, &at("name"), base.clone(), "a dataset needs a name");
        } else if !dataset_names.insert(d.name.clone()) {
            cx.err(
                o.file,
                &at("name"),
                base.clone(),
                format!("dataset \"{}\" is defined twice", d.name),
            );
            continue;
        }
        let upstream = upstreams.iter().position(|u| *u.name == *d.upstream);
        // An upstream that is defined but invalid has its own error already.
        if upstream.is_none() && !upstream_names.contains(&d.upstream) {
            let known: Vec<&str> = upstreams.iter().map(|u| &*u.name).collect();
            cx.err(
                o.file,
                &at("upstream"),
                r("upstream").to_string(),
                format!(
                    "no upstream named \"{}\" (defined: {})",
                    d.upstream,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        if !valid_category(&d.category) {
            cx.err(o.file, &at("category"), r("category").to_string(), format!("\"{}\" is not a category (dot-separated lower-case names, e.g. \"user.financial\")", d.category));
        }
        let path_prefix = d.matcher.path_prefix.clone().unwrap_or_else(|| "/".into());
        if let Err(e) = check_prefix(&path_prefix) {
            cx.err(o.file, &at("match.path_prefix"), r("match").to_string(), e);
        }
        let host = d.matcher.host.as_ref().map(|h| h.to_ascii_lowercase());
        if let Some(h) = &host
            && (h.is_empty()
                || h.contains(['/', ' ', ':'])
                || h.strip_prefix("*.").unwrap_or(h).contains('*'))
        {
            cx.err(
                o.file,
                &at("match.host"),
                r("match").to_string(),
                format!(
                    "\"{h}\" is not a host name (no port; a leading \"*.\" matches sub-domains)"
                ),
            );
        }
        let methods = d.matcher.methods.as_ref().map(|ms| {
            ms.iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    parse_method(s)
                        .map_err(|e| {
                            cx.err(
                                o.file,
                                &[
                                    k("datasets"),
                                    Seg::Index(o.index),
                                    k("match"),
                                    k("methods"),
                                    Seg::Index(i),
                                ],
                                r("match").to_string(),
                                e,
                            )
                        })
                        .ok()
                })
                .collect::<Vec<_>>()
        });
        let subject =
            d.subject
                .as_ref()
                .and_then(|s| match (s.path_segment, &s.header, &s.query) {
                    (Some(n), None, None) if n >= 1 => Some(SubjectSource::PathSegment(n as usize)),
                    (Some(n), None, None) => {
                        cx.err(
                            o.file,
                            &at("subject.path_segment"),
                            r("subject").to_string(),
                            format!("{n} is not a path segment: segments count from 1"),
                        );
                        None
                    }
                    (None, Some(h), None) => Some(SubjectSource::Header(parse_header(
                        cx,
                        o.file,
                        &at("subject.header"),
                        &r("subject"),
                        h,
                    ))),
                    (None, None, Some(q)) if !q.is_empty() => Some(SubjectSource::Query(q.clone())),
                    _ => {
                        cx.err(
                            o.file,
                            &at("subject"),
                            r("subject").to_string(),
                            "give exactly one of path_segment, header or query",
                        );
                        None
                    }
                });
        let home_j = match d.home.as_deref() {
            Some(h) => resolve(cx, o.file, &at("home"), &r("home"), h),
            None => {
                if home.is_none() && p.home.is_none() {
                    cx.err(
                        o.file,
                        &item("datasets", o, None),
                        r("home").to_string(),
                        "no home jurisdiction: set datasets.*.home or policy.home",
                    );
                }
                home.clone()
            }
        };
        let rule = |cx: &mut Cx<'_>, f: &str, v: &Option<String>| -> Rule {
            match v.as_deref() {
                None => Rule::Consent,
                Some("deny") => Rule::Deny,
                Some("consent") => Rule::Consent,
                Some("allow") => Rule::Allow,
                Some(o2) => {
                    cx.err(
                        o.file,
                        &at(f),
                        r(f).to_string(),
                        format!("\"{o2}\" is not one of \"deny\", \"consent\", \"allow\""),
                    );
                    Rule::Deny
                }
            }
        };
        let cross_border = rule(cx, "cross_border", &d.cross_border);
        let third_party = rule(cx, "third_party", &d.third_party);
        if (cross_border == Rule::Consent || third_party == Rule::Consent) && d.subject.is_none() {
            cx.err(o.file, &item("datasets", o, None), r("subject").to_string(), "required when cross_border or third_party is \"consent\": consent is given by a data subject");
        }
        if d.egress_methods.as_ref().is_some_and(Vec::is_empty) {
            cx.err(
                o.file,
                &at("egress_methods"),
                r("egress_methods").to_string(),
                "must name at least one method: with none, every request would skip the transfer rules",
            );
        }
        if d.matcher.methods.as_ref().is_some_and(Vec::is_empty) {
            cx.err(
                o.file,
                &at("match.methods"),
                r("match").to_string(),
                "must name at least one method (leave it out to match every method): with none, the dataset matches nothing",
            );
        }
        let egress_methods = match &d.egress_methods {
            None => vec![Method::GET, Method::HEAD],
            Some(ms) => ms
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    parse_method(s)
                        .map_err(|e| {
                            cx.err(
                                o.file,
                                &[
                                    k("datasets"),
                                    Seg::Index(o.index),
                                    k("egress_methods"),
                                    Seg::Index(i),
                                ],
                                r("egress_methods").to_string(),
                                e,
                            )
                        })
                        .ok()
                })
                .collect(),
        };
        let dmode = match d.mode.as_deref() {
            None => mode,
            Some(_) => {
                parse_mode(cx, o.file, &at("mode"), &r("mode"), d.mode.as_deref()).unwrap_or(mode)
            }
        };
        let (Some(upstream), Some(home_j)) = (upstream, home_j) else {
            continue;
        };
        datasets.push(Dataset {
            name: d.name.as_str().into(),
            host,
            path_prefix,
            methods,
            upstream,
            category: d.category.as_str().into(),
            subject,
            home: home_j,
            resident: d.resident.unwrap_or(true),
            cross_border,
            third_party,
            egress_mask: egress_methods
                .iter()
                .filter_map(method_bit)
                .fold(0, |m, b| m | b),
            egress_methods,
            mode: dmode,
            rules: DatasetRules {
                matcher: r("match"),
                upstream: r("upstream"),
                home: r("home"),
                cross_border: r("cross_border"),
                third_party: r("third_party"),
                subject: r("subject"),
                egress: r("egress_methods"),
            },
        });
    }

    let unmatched_upstream = match (&p.unmatched_upstream, unmatched) {
        (Some(u), _) => {
            let found = upstreams.iter().position(|x| *x.name == **u);
            if found.is_none() {
                cx.err(
                    pfile,
                    &pat("unmatched_upstream"),
                    "policy.unmatched_upstream",
                    format!("no upstream named \"{u}\""),
                );
            }
            found
        }
        (None, Unmatched::Allow) => {
            if upstreams.len() == 1 {
                Some(0)
            } else {
                cx.err(pfile, &pat("unmatched"), "policy.unmatched_upstream", "required when unmatched = \"allow\" and there is not exactly one upstream: name where unmatched requests go");
                None
            }
        }
        (None, Unmatched::Deny) => None,
    };
    if p.unmatched_upstream.is_some() && unmatched == Unmatched::Deny {
        cx.err(
            pfile,
            &pat("unmatched_upstream"),
            "policy.unmatched_upstream",
            "has no effect while unmatched = \"deny\": set unmatched = \"allow\" or remove it",
        );
    }
    let dataset_index = build_index(&datasets);
    let sources_paths = sources.iter().map(|s| s.path.clone()).collect();
    let home = home.unwrap_or(Jurisdiction {
        name: "".into(),
        countries: CountrySet::new(),
    });
    Some(Policy {
        name,
        hash: hash.into(),
        sources: sources_paths,
        home,
        mode,
        unmatched,
        unmatched_upstream,
        unknown_location,
        proxy,
        trusted_proxies,
        jurisdictions,
        geo_database,
        networks,
        upstreams,
        recipients,
        datasets,
        consent,
        log,
        admin,
        tls,
        recipients_by_identity,
        recipients_by_network,
        dataset_index,
    })
}

fn build_index(datasets: &[Dataset]) -> DatasetIndex {
    let mut by_prefix: FastMap<String, Vec<usize>> = FastMap::default();
    for (i, d) in datasets.iter().enumerate() {
        by_prefix.entry(d.path_prefix.clone()).or_default().push(i);
    }
    for list in by_prefix.values_mut() {
        // Most specific first: an exact host, then a wildcard host (a longer suffix first),
        // then none; then a method constraint; ties keep file order.
        let host_rank = |d: &Dataset| match d.host.as_deref() {
            Some(h) if !h.starts_with("*.") => (0, 0),
            Some(h) => (1, usize::MAX - h.len()),
            None => (2, 0),
        };
        list.sort_by_key(|&i| {
            let d = &datasets[i];
            (host_rank(d), d.methods.is_none(), i)
        });
    }
    let mut lengths: Vec<usize> = by_prefix
        .keys()
        .map(|p| p.len())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    let mut last_bytes = vec![[0u64; 4]; lengths.len()];
    for p in by_prefix.keys() {
        if let (Some(k), Some(&b)) = (
            lengths.iter().position(|&l| l == p.len()),
            p.as_bytes().last(),
        ) {
            last_bytes[k][usize::from(b / 64)] |= 1 << (b % 64);
        }
    }
    DatasetIndex {
        lengths,
        last_bytes,
        by_prefix,
    }
}

/// The host name, as a chain name: `[log] instance` when not given.
fn default_instance() -> Arc<str> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = host
        .trim()
        .chars()
        .map(|c| if instance_char(c) { c } else { '-' })
        .take(INSTANCE_MAX)
        .collect();
    if name.is_empty() {
        Arc::from("residency-proxy")
    } else {
        Arc::from(name)
    }
}

const INSTANCE_MAX: usize = 128;

fn instance_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// An instance names a folder of object storage and appears in every record: letters,
/// digits, `-`, `_` and `.`, not starting with a dot.
fn check_instance(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > INSTANCE_MAX {
        return Err(format!("must be 1 to {INSTANCE_MAX} characters"));
    }
    if name.starts_with('.') || !name.chars().all(instance_char) {
        return Err(format!(
            "\"{name}\" may hold only letters, digits, '-', '_' and '.', and not start with '.' (it names a folder in object storage)"
        ));
    }
    Ok(())
}

/// `[log.ship]`; `None` (after reporting why) when it cannot be used.
fn compile_ship(cx: &mut Cx<'_>, file: usize, raw: RawShip) -> Option<ShipSettings> {
    let at = |f: &str| vec![k("log"), k("ship"), k(f)];
    let before = cx.diags.len();
    let url = match raw.url.as_deref() {
        None => {
            cx.err(
                file,
                &[k("log"), k("ship")],
                "log.ship.url",
                "is required: where sealed files go, e.g. \"s3://decision-logs/shanghai/\"",
            );
            None
        }
        Some(text) => match url::Url::parse(text) {
            Ok(u) if matches!(u.scheme(), "s3" | "gs" | "az" | "file") => Some(u),
            Ok(u) => {
                cx.err(
                    file,
                    &at("url"),
                    "log.ship.url",
                    format!(
                        "\"{text}\": scheme {}: is not one of s3://, gs://, az://, file://",
                        u.scheme()
                    ),
                );
                None
            }
            Err(e) => {
                cx.err(
                    file,
                    &at("url"),
                    "log.ship.url",
                    format!("\"{text}\" is not a URL: {e}"),
                );
                None
            }
        },
    };
    let endpoint = raw
        .endpoint
        .as_deref()
        .and_then(|text| match url::Url::parse(text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            _ => {
                cx.err(
                    file,
                    &at("endpoint"),
                    "log.ship.endpoint",
                    format!("\"{text}\" is not an http:// or https:// URL with a host"),
                );
                None
            }
        });
    let credentials = match raw.credentials.as_deref() {
        None | Some("env") => ShipCredentials::Env,
        Some("") => {
            cx.err(
                file,
                &at("credentials"),
                "log.ship.credentials",
                "must be \"env\" or the path of a credentials file",
            );
            ShipCredentials::Env
        }
        Some(path) => ShipCredentials::File(PathBuf::from(path)),
    };
    let spool_max_bytes = match raw.spool_max_bytes {
        None => 2 << 30,
        Some(RawSize::Bytes(n)) => n,
        Some(RawSize::Text(t)) => parse_size(&t).unwrap_or_else(|why| {
            cx.err(
                file,
                &at("spool_max_bytes"),
                "log.ship.spool_max_bytes",
                why,
            );
            0
        }),
    };
    if spool_max_bytes == 0 && cx.diags.len() == before {
        cx.err(
            file,
            &at("spool_max_bytes"),
            "log.ship.spool_max_bytes",
            "must be more than 0",
        );
    }
    if cx.diags.len() > before {
        return None;
    }
    Some(ShipSettings {
        url: url?,
        endpoint,
        region: raw.region,
        credentials,
        spool_max_bytes,
    })
}

/// Parses sizes written as `1048576`, `512KiB`, `500MB`, `2GiB` (binary and decimal units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("\"{s}\" is not a size (write e.g. \"512MiB\", \"2GiB\", \"500MB\")");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

/// One of a closed set of words, or the default when absent; anything else is an error
/// naming the choices (and the default is used to go on compiling).
fn choice<T: Copy>(
    cx: &mut Cx<'_>,
    file: usize,
    at: &[Seg],
    rule: &str,
    value: Option<&str>,
    options: &[(&str, T)],
    default: T,
) -> T {
    let Some(v) = value else { return default };
    if let Some((_, t)) = options.iter().find(|(w, _)| *w == v) {
        return *t;
    }
    let names: Vec<String> = options.iter().map(|(w, _)| format!("\"{w}\"")).collect();
    cx.err(
        file,
        at,
        rule,
        format!("\"{v}\" is not one of {}", names.join(", ")),
    );
    default
}

fn parse_mode(
    cx: &mut Cx<'_>,
    file: usize,
    at: &[Seg],
    rule: &str,
    v: Option<&str>,
) -> Option<Mode> {
    match v {
        None | Some("enforce") => Some(Mode::Enforce),
        Some("audit") => Some(Mode::Audit),
        Some(o) => {
            cx.err(
                file,
                at,
                rule,
                format!("\"{o}\" is not one of \"enforce\", \"audit\""),
            );
            None
        }
    }
}

fn parse_addr(
    cx: &mut Cx<'_>,
    file: usize,
    at: &[Seg],
    rule: &str,
    v: Option<&str>,
    default: &str,
) -> SocketAddr {
    let s = v.unwrap_or(default);
    s.parse().unwrap_or_else(|_| {
        cx.err(
            file,
            at,
            rule,
            format!("\"{s}\" is not an address:port (e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"),
        );
        default.parse().expect("default listen addresses parse")
    })
}

fn parse_header(cx: &mut Cx<'_>, file: usize, at: &[Seg], rule: &str, v: &str) -> HeaderName {
    HeaderName::from_bytes(v.to_ascii_lowercase().as_bytes()).unwrap_or_else(|_| {
        cx.err(
            file,
            at,
            rule,
            format!("\"{v}\" is not an HTTP header name"),
        );
        HeaderName::from_static("x-invalid")
    })
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        // `10.20.5.0/16` written for `/24` would silently cover 256 times the addresses.
        if n.trunc() != n {
            return Err(format!(
                "\"{s}\" has bits set past its prefix length: write the network \"{}\", or a longer prefix",
                n.trunc()
            ));
        }
        return Ok(n);
    }
    s.parse::<std::net::IpAddr>().map(IpNet::from).map_err(|_| {
        format!("\"{s}\" is not a network (CIDR such as \"10.0.0.0/8\") or an address")
    })
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

fn parse_upstream_url(s: &str) -> Result<(Scheme, String, u16), String> {
    let uri: http::Uri = s.parse().map_err(|_| format!("\"{s}\" is not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        _ => return Err(format!("\"{s}\": the scheme must be http or https")),
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("\"{s}\" has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if let Some(pq) = uri.path_and_query()
        && (pq.as_str() != "/" && !pq.as_str().is_empty())
    {
        return Err(format!(
            "\"{s}\": an upstream URL names a server only (no path or query); requests keep their own path"
        ));
    }
    let port = uri.port_u16().unwrap_or(match scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    });
    Ok((scheme, host, port))
}

fn check_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path_prefix \"{p}\" must start with \"/\""));
    }
    let normal = super::path::normalize(p).map(|n| n.into_owned());
    match normal {
        Ok(n) if n == p => Ok(()),
        _ => Err(format!(
            "path_prefix \"{p}\" is not a normalised path (no \"//\", \".\" or \"..\"; characters written as themselves, only %, ?, #, space and control characters percent-encoded, in upper case): requests are matched after normalisation, so it could never match"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[policy]\nname = 't'\nhome = 'CN'\n[log]\npseudonymize = false\n";

    fn diags(extra: &str) -> Vec<Diagnostic> {
        match from_str("p.toml", &format!("{BASE}{extra}")) {
            Ok(_) => Vec::new(),
            Err(PolicyError::Invalid(d)) => d,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn shipping_settings_compile_and_their_mistakes_are_located() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}instance = 'payments-0'\n[log.ship]\nurl = 's3://logs/sh/'\nendpoint = 'http://10.20.0.9:9000'\nspool_max_bytes = '2GiB'\n"
            ),
        )
        .unwrap();
        assert_eq!(&*p.log.instance, "payments-0");
        // Shipping seals every 5 minutes unless told otherwise.
        assert_eq!(p.log.rotate_interval, Some(Duration::from_secs(300)));
        let ship = p.log.ship.unwrap();
        assert_eq!(
            (ship.url.as_str(), ship.spool_max_bytes),
            ("s3://logs/sh/", 2 << 30)
        );
        assert_eq!(ship.credentials, ShipCredentials::Env);

        for (extra, rule, says) in [
            (
                "instance = '../x'\n",
                "log.instance",
                "may hold only letters",
            ),
            (
                "rotate_interval = '10ms'\n",
                "log.rotate_interval",
                "at least 1s",
            ),
            (
                "[log.ship]\nurl = 'ftp://x/'\n",
                "log.ship.url",
                "is not one of s3://",
            ),
            (
                "[log.ship]\nendpoint = 'http://x'\n",
                "log.ship.url",
                "is required",
            ),
            (
                "[log.ship]\nurl = 's3://x/'\nspool_max_bytes = '2 parsecs'\n",
                "log.ship.spool_max_bytes",
                "is not a size",
            ),
            (
                "rotate_bytes = 1000\n[log.ship]\nurl = 's3://x/'\nspool_max_bytes = 1000\n",
                "log.ship.spool_max_bytes",
                "is not more than log.rotate_bytes",
            ),
        ] {
            let d = diags(extra);
            assert!(
                d.iter().any(|d| d.rule == rule && d.message.contains(says)),
                "{extra}: {d:?}"
            );
        }
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn upstream_tls_files_compile() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}[[upstreams]]\nname = 's'\nurl = 'https://store.internal'\nca = 'certs/store-ca.crt'\nclient_cert = 'certs/c.crt'\nclient_key = 'certs/c.key'\n"
            ),
        )
        .unwrap();
        let up = &p.upstreams[0];
        assert_eq!(up.port, 443);
        assert_eq!(up.ca.as_deref(), Some(Path::new("certs/store-ca.crt")));
        let cc = up.client_cert.as_ref().unwrap();
        assert_eq!(cc.key, PathBuf::from("certs/c.key"));
    }

    #[test]
    fn tls_keys_on_a_plain_upstream_are_located_errors() {
        let d = diags(
            "[[upstreams]]\nname = 's'\nurl = 'http://store.internal'\nca = 'certs/ca.crt'\n",
        );
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule, "upstreams.s.ca");
        assert_eq!(d[0].line, Some(9));
        assert!(d[0].message.contains("https upstreams only"), "{}", d[0]);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let d = diags(
            "[[upstreams]]\nname = 's'\nurl = 'https://store.internal'\nclient_cert = 'c.crt'\n",
        );
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule, "upstreams.s.client_key");
        assert_eq!(d[0].line, Some(9));
    }

    const DATASET_BASE: &str = "[[upstreams]]\nname = 's'\nurl = 'http://127.0.0.2:9000'\n[[networks]]\ncidr = '127.0.0.0/8'\ncountry = 'CN'\n";

    fn dataset(name: &str, fields: &str) -> String {
        format!(
            "[[datasets]]\nname = '{name}'\nupstream = 's'\ncategory = 'system.operations'\ncross_border = 'allow'\nthird_party = 'allow'\n{fields}\n"
        )
    }

    #[test]
    fn empty_method_lists_are_errors_not_silent_switches() {
        let d = diags(&format!(
            "{DATASET_BASE}{}{}",
            dataset("a", "match = { path_prefix = '/a/' }\negress_methods = []"),
            dataset("b", "match = { path_prefix = '/b/', methods = [] }"),
        ));
        let rules: Vec<&str> = d.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(
            rules,
            ["datasets.a.egress_methods", "datasets.b.match"],
            "{d:?}"
        );
        assert!(d[0].message.contains("at least one"), "{}", d[0]);
    }

    #[test]
    fn an_exact_host_outranks_a_wildcard_whatever_the_file_order() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}{DATASET_BASE}{}{}{}{}",
                dataset("any", "match = { path_prefix = '/' }"),
                dataset("wide", "match = { host = '*.example', path_prefix = '/' }"),
                dataset(
                    "narrow",
                    "match = { host = '*.s3.example', path_prefix = '/' }"
                ),
                dataset(
                    "exact",
                    "match = { host = 'pay.s3.example', path_prefix = '/' }"
                ),
            ),
        )
        .unwrap();
        let name = |host: &str| {
            crate::policy::decide::match_dataset(&p, Some(host), &Method::GET, "/u1/x")
                .map(|i| p.datasets[i].name.to_string())
        };
        assert_eq!(name("pay.s3.example").as_deref(), Some("exact"));
        assert_eq!(name("other.s3.example").as_deref(), Some("narrow"));
        assert_eq!(name("x.example").as_deref(), Some("wide"));
        assert_eq!(name("elsewhere.test").as_deref(), Some("any"));
    }

    #[test]
    fn raw_and_escaped_spellings_of_a_prefix_match_the_same_dataset() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}{DATASET_BASE}{}{}",
                dataset("all", "match = { path_prefix = '/' }"),
                dataset("health", "match = { path_prefix = '/santé/v1:export/' }"),
            ),
        )
        .unwrap();
        for raw in [
            "/santé/v1:export/u1",
            "/sant%C3%A9/v1%3Aexport/u1",
            "/sant%c3%a9/v1:export/u1",
        ] {
            let n = crate::policy::path::normalize(raw).unwrap();
            let i = crate::policy::decide::match_dataset(&p, None, &Method::GET, &n);
            assert_eq!(i.map(|i| &*p.datasets[i].name), Some("health"), "{raw}");
        }
        // A prefix has one spelling, the normal one.
        let d = diags(&format!(
            "{DATASET_BASE}{}",
            dataset("health", "match = { path_prefix = '/sant%C3%A9/' }")
        ));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].message.contains("not a normalised path"), "{}", d[0]);
    }

    #[test]
    fn an_unmatched_upstream_that_can_never_be_used_is_an_error() {
        let text = BASE.replace(
            "home = 'CN'\n",
            "home = 'CN'\nunmatched = 'deny'\nunmatched_upstream = 's'\n",
        );
        let d = match from_str("p.toml", &format!("{text}{DATASET_BASE}")) {
            Err(PolicyError::Invalid(d)) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule, "policy.unmatched_upstream");
        assert!(d[0].message.contains("no effect"), "{}", d[0]);
    }

    #[test]
    fn a_network_with_host_bits_set_is_an_error_naming_the_network() {
        let d = diags("[[networks]]\ncidr = '10.20.5.0/16'\ncountry = 'CN'\n");
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].message.contains("\"10.20.0.0/16\""), "{}", d[0]);
    }

    #[test]
    fn protocol_limits_have_safe_defaults_and_are_checked() {
        let p = from_str("p.toml", BASE).unwrap();
        assert_eq!(p.proxy.handshake_timeout, Duration::from_secs(10));
        assert_eq!(p.proxy.max_concurrent_streams, 100);
        let d = diags("[proxy]\nhandshake_timeout = 'soon'\nmax_concurrent_streams = 0\n");
        let rules: Vec<&str> = d.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(
            rules,
            ["proxy.handshake_timeout", "proxy.max_concurrent_streams"]
        );
    }
}
