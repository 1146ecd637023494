//! `test [PATH...]`: run policy test suites (SPEC section 2.9). Each suite names a policy and
//! a list of cases; each case is a request, the consents in force, and the decision it must
//! get (and for a records dataset, optionally an object and the records of it that must be
//! kept and dropped). Cases are decided by the proxy's own `decide` through `OfflineEnv`, and
//! bodies run through the proxy's own filter; a failing case prints what was expected, what
//! happened and the trace. The format is in docs/policy-tests.md.

use super::explain::trace_lines;
use super::{CliResult, Exit, fail, load_policy};
use crate::consent::{ConsentIndex, ConsentRecord};
use crate::geo::{GeoDb, Locator};
use crate::offline::{
    BodyConsents, BodyError, FilteredBody, Hypothetical, OfflineEnv, body_compression, filter_body,
    resolve,
};
use crate::policy::country::Country;
use crate::policy::decide::RecordTerms;
use crate::policy::decision::{Decision, Reason, TraceStep};
use crate::policy::model::NetworkOverride;
use crate::policy::{Policy, decide};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "A PATH is a suite file or a folder of them (*.toml). Default: policies/tests.\n\
Prints one line per case, expected and actual decision with the trace for each failing case, \
then `N passed, N failed`. Exit 1 if a case failed, 2 if a suite could not be run."
)]
pub struct TestArgs {
    /// Suite files, or folders holding them.
    pub paths: Vec<PathBuf>,
    /// Print only failing cases and the summary.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A suite file as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    /// The policy under test, relative to the suite file.
    policy: PathBuf,
    /// The clock for every case (RFC 3339); a case may set its own. Default: now.
    now: Option<toml::Value>,
    /// Replaces the policy's `[geo] database` (relative to the suite file), or `false` to
    /// locate by `[[networks]]` only.
    geo_database: Option<GeoChoice>,
    /// Addresses of upstreams by name, instead of resolving their hosts.
    #[serde(default)]
    upstreams: BTreeMap<String, Vec<String>>,
    /// Where test addresses are, added to the policy's own `[[networks]]` (a stand-in for a
    /// geolocation database the tests do not have).
    #[serde(default)]
    networks: Vec<RawNetwork>,
    /// Consent records that cases name by id.
    #[serde(default)]
    consents: Vec<toml::Value>,
    #[serde(default)]
    cases: Vec<RawCase>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    cidr: String,
    country: String,
    name: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum GeoChoice {
    Path(PathBuf),
    Enabled(bool),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    request: RawRequest,
    /// Consents in force: ids of the suite's `[[consents]]`, or inline records.
    #[serde(default)]
    consents: Vec<toml::Value>,
    now: Option<toml::Value>,
    #[serde(default)]
    upstreams: BTreeMap<String, Vec<String>>,
    /// An object the upstream would send (relative to the suite file), run through the
    /// proxy's filter for a request decided `consent_filtered`.
    body: Option<PathBuf>,
    expect: Expect,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    #[serde(default = "get")]
    method: String,
    /// Path, optionally with `?query`.
    path: String,
    client_ip: IpAddr,
    host: Option<String>,
    identity: Option<String>,
    purpose: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn get() -> String {
    "GET".into()
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// `allow`, `deny` or `error`.
    decision: String,
    reason: String,
    rule: Option<String>,
    /// The status the proxy answers with itself (not for forwarded requests).
    status: Option<u16>,
    /// Whether the request is forwarded (allowed, or a would-deny in audit mode).
    forwarded: Option<bool>,
    enforced: Option<bool>,
    dataset: Option<String>,
    /// The id of the consent that allowed the transfer, or of the nearest one that failed.
    consent: Option<String>,
    /// What the case's `body` becomes on the way out.
    records: Option<ExpectRecords>,
}

/// `expect.records` and its `would_drop` table, with one key per reason a record is dropped
/// for (the reasons listed once, so that both tables take the same names).
macro_rules! record_expectations {
    ($($reason:ident),* $(,)?) => {
        /// Records of a body kept and dropped (`expect.records`): only the counts given are
        /// checked.
        #[derive(Deserialize, Debug, Default)]
        #[serde(deny_unknown_fields)]
        struct ExpectRecords {
            /// Records that leave (in audit mode, every record that can be read).
            kept: Option<u64>,
            /// Records dropped, whatever the reason.
            dropped: Option<u64>,
            /// Distinct subjects whose records leave under a consent.
            subjects: Option<u64>,
            /// Audit mode: records that leave although they would have been dropped.
            would_drop: Option<DropCounts>,
            $($reason: Option<u64>,)*
        }

        /// Records by the reason they would have been dropped for.
        #[derive(Deserialize, Debug, Default)]
        #[serde(deny_unknown_fields)]
        struct DropCounts {
            $($reason: Option<u64>,)*
        }

        impl ExpectRecords {
            /// Each reason given, with its count.
            fn dropped_by(&self) -> Vec<(&'static str, u64)> {
                [$((stringify!($reason), self.$reason)),*]
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect()
            }
        }

        impl DropCounts {
            fn given(&self) -> Vec<(&'static str, u64)> {
                [$((stringify!($reason), self.$reason)),*]
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect()
            }
        }
    };
}

record_expectations!(
    no_subject,
    unparsable,
    consent_missing,
    consent_expired,
    consent_revoked,
    consent_method_invalid,
    consent_scope_mismatch,
    consent_store_unavailable,
);

/// Why a suite could not be run.
#[derive(Debug, thiserror::Error)]
enum SuiteError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
}

/// Counts of a run.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    broken_suites: usize,
}

pub fn run(args: TestArgs) -> CliResult {
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from("policies/tests")]
    } else {
        args.paths.clone()
    };
    let mut files = Vec::new();
    for p in &paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| fail(format!("cannot read folder {}: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml") && f.is_file())
                .collect();
            found.sort();
            files.extend(found);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(fail(format!("{} does not exist", p.display())));
        }
    }
    if files.is_empty() {
        return Err(fail(format!(
            "no test suites (*.toml) in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut tally = Tally::default();
    for f in &files {
        if let Err(e) = run_suite(f, args.quiet, &mut tally) {
            eprintln!("error: {e}");
            tally.broken_suites += 1;
        }
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.broken_suites > 0 {
        return Err(fail(format!(
            "{} suite(s) could not be run",
            tally.broken_suites
        )));
    }
    Ok(if tally.failed > 0 {
        Exit::Failed
    } else {
        Exit::Ok
    })
}

/// A suite ready to run: its policy compiled, locations and upstream addresses settled.
struct Suite {
    path: PathBuf,
    policy: Policy,
    db: Option<Arc<GeoDb>>,
    /// Per upstream: the suite's addresses, else the resolver's answer.
    upstreams: Vec<Result<Arc<[SocketAddr]>, String>>,
    named_consents: BTreeMap<String, ConsentRecord>,
    now: jiff::Timestamp,
}

fn run_suite(path: &Path, quiet: bool, tally: &mut Tally) -> Result<(), SuiteError> {
    let text = std::fs::read_to_string(path).map_err(|source| SuiteError::Read {
        path: path.into(),
        source,
    })?;
    let raw: RawSuite = toml::from_str(&text).map_err(|e| SuiteError::Parse {
        path: path.into(),
        line: e.span().map(|s| text[..s.start].matches('\n').count() + 1),
        message: e.message().trim().to_string(),
    })?;
    let invalid = |what: String| SuiteError::Invalid {
        path: path.into(),
        what,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let policy_path = base.join(&raw.policy);
    let mut policy = load_policy(&policy_path).map_err(|e| invalid(format!("policy: {e}")))?;
    for (i, n) in raw.networks.iter().enumerate() {
        let at = |what: &str| invalid(format!("networks[{i}]: {what}"));
        let cidr = n
            .cidr
            .parse::<IpNet>()
            .or_else(|_| n.cidr.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| at(&format!("\"{}\" is not a network", n.cidr)))?;
        let country = Country::parse(&n.country)
            .ok_or_else(|| at(&format!("\"{}\" is not a country code", n.country)))?;
        policy.networks.push(NetworkOverride {
            cidr,
            country,
            name: n.name.as_deref().unwrap_or("test network").into(),
        });
    }
    let db_path = match &raw.geo_database {
        None => policy.geo_database.clone(),
        Some(GeoChoice::Enabled(false)) => None,
        Some(GeoChoice::Enabled(true)) => {
            return Err(invalid(
                "geo_database is a path or false (true is what leaving it out means)".into(),
            ));
        }
        Some(GeoChoice::Path(p)) => Some(base.join(p)),
    };
    let db = db_path
        .map(|p| GeoDb::open(&p))
        .transpose()
        .map_err(|e| invalid(e.to_string()))?
        .map(Arc::new);
    let overrides = upstream_overrides(&policy, &raw.upstreams).map_err(invalid)?;
    let upstreams = policy
        .upstreams
        .iter()
        .zip(overrides)
        .map(|(u, o)| o.map(Ok).unwrap_or_else(|| resolve(u)))
        .collect();
    let now = match &raw.now {
        Some(v) => timestamp(v).map_err(|e| invalid(format!("now: {e}")))?,
        None => jiff::Timestamp::now(),
    };
    let mut named_consents = BTreeMap::new();
    for (i, v) in raw.consents.iter().enumerate() {
        let r = consent_record(v).map_err(|e| invalid(format!("consents[{i}]: {e}")))?;
        named_consents.insert(r.id.clone(), r);
    }
    let suite = Suite {
        path: path.into(),
        policy,
        db,
        upstreams,
        named_consents,
        now,
    };
    if !quiet {
        println!(
            "{}: policy \"{}\" ({}), {} case(s)",
            path.display(),
            suite.policy.name,
            policy_path.display(),
            raw.cases.len()
        );
    }
    for case in &raw.cases {
        match run_case(&suite, case) {
            Ok(()) => {
                tally.passed += 1;
                if !quiet {
                    println!("  ok    {}", case.name);
                }
            }
            Err(report) => {
                tally.failed += 1;
                println!("  FAIL  {}: {}", suite.path.display(), case.name);
                print!("{report}");
            }
        }
    }
    Ok(())
}

/// Addresses given by the suite (or a case) for upstreams, by upstream index. An address
/// without a port takes the port of the upstream's URL.
fn upstream_overrides(
    policy: &Policy,
    given: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<Option<Arc<[SocketAddr]>>>, String> {
    let mut out = vec![None; policy.upstreams.len()];
    for (name, addrs) in given {
        let i = policy
            .upstreams
            .iter()
            .position(|u| &*u.name == name)
            .ok_or_else(|| format!("upstreams: the policy has no upstream \"{name}\""))?;
        let port = policy.upstreams[i].port;
        let parsed = addrs
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .or_else(|_| a.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, port)))
                    .map_err(|_| format!("upstreams.{name}: \"{a}\" is not an address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out[i] = Some(parsed.into());
    }
    Ok(out)
}

/// A time given as an RFC 3339 string or a TOML offset date-time.
fn timestamp(v: &toml::Value) -> Result<jiff::Timestamp, String> {
    let s = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(d) => d.to_string(),
        other => return Err(format!("a {} is not a time", other.type_str())),
    };
    s.parse()
        .map_err(|e| format!("\"{s}\" is not an RFC 3339 time with an offset: {e}"))
}

/// A consent record written in TOML: the JSON-lines record's fields, with times as strings
/// or TOML date-times.
fn consent_record(v: &toml::Value) -> Result<ConsentRecord, String> {
    fn to_json(v: &toml::Value) -> serde_json::Value {
        match v {
            toml::Value::String(s) => s.clone().into(),
            toml::Value::Integer(i) => (*i).into(),
            toml::Value::Float(f) => serde_json::json!(f),
            toml::Value::Boolean(b) => (*b).into(),
            toml::Value::Datetime(d) => d.to_string().into(),
            toml::Value::Array(a) => a.iter().map(to_json).collect(),
            toml::Value::Table(t) => t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect(),
        }
    }
    let record: ConsentRecord =
        serde_json::from_value(to_json(v)).map_err(|e| format!("not a consent record: {e}"))?;
    record
        .validate()
        .map_err(|e| format!("{}: {e}", record.id))?;
    Ok(record)
}

fn run_case(suite: &Suite, case: &RawCase) -> Result<(), String> {
    let policy = &suite.policy;
    let mut records = Vec::new();
    for (i, v) in case.consents.iter().enumerate() {
        match v {
            toml::Value::String(id) => match suite.named_consents.get(id) {
                Some(r) => records.push(r.clone()),
                None => return Err(broken(format!("consents[{i}]: no suite consent \"{id}\""))),
            },
            other => records
                .push(consent_record(other).map_err(|e| broken(format!("consents[{i}]: {e}")))?),
        }
    }
    let index = Arc::new(ConsentIndex::new());
    index.replace_all(&records);
    let now = match &case.now {
        Some(v) => timestamp(v).map_err(|e| broken(format!("now: {e}")))?,
        None => suite.now,
    };
    let mut upstreams = suite.upstreams.clone();
    for (i, o) in upstream_overrides(policy, &case.upstreams)
        .map_err(broken)?
        .into_iter()
        .enumerate()
    {
        if let Some(addrs) = o {
            upstreams[i] = Ok(addrs);
        }
    }
    let env = OfflineEnv {
        locator: Locator::new(policy, suite.db.clone()),
        upstreams,
        consents: index,
        now: now.as_microsecond(),
    };
    let r = &case.request;
    let hypo = Hypothetical::new(
        policy,
        &r.method,
        &r.path,
        r.client_ip,
        r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        r.purpose.as_deref(),
        r.host.as_deref(),
        r.identity.as_deref(),
    )
    .map_err(|e| broken(format!("request: {e}")))?;
    let mut trace: Vec<TraceStep> = Vec::new();
    let d = decide(policy, &env, &hypo.request(), &mut trace);
    let mut mismatches = compare(&case.expect, &d, policy)?;
    let records = match &case.body {
        Some(body) => {
            let base = suite.path.parent().unwrap_or(Path::new("."));
            let body = base.join(body);
            match filter_case_body(policy, &d, &hypo, &env, &body) {
                Ok(b) => {
                    if let Some(e) = &case.expect.records {
                        mismatches.extend(compare_records(e, &b));
                    }
                    Some(records_line(&b))
                }
                // The expected decision differs too: that is the failure to show.
                Err(e @ BodyError::NotFiltered { .. }) if !mismatches.is_empty() => {
                    if case.expect.records.is_some() {
                        mismatches.push("records".into());
                    }
                    Some(e.to_string())
                }
                Err(e) => return Err(broken(format!("body: {e}"))),
            }
        }
        None if case.expect.records.is_some() => {
            return Err(broken("expect.records needs a body to filter".into()));
        }
        None => None,
    };
    if mismatches.is_empty() {
        return Ok(());
    }
    let mut out = String::new();
    out.push_str(&format!(
        "        expected: {}\n",
        expected_line(&case.expect)
    ));
    out.push_str(&format!("        actual:   {}\n", actual_line(&d, policy)));
    if let Some(r) = records {
        out.push_str(&format!("        records:  {r}\n"));
    }
    out.push_str(&format!("        differs:  {}\n", mismatches.join(", ")));
    out.push_str(&format!("        message:  {}\n", d.message(policy)));
    out.push_str("        trace:\n");
    out.push_str(&trace_lines(&trace, "          "));
    Err(out)
}

/// A case that cannot be run is a failure with its reason.
fn broken(why: String) -> String {
    format!("        cannot run the case: {why}\n")
}

/// The names of the expected fields that differ from the decision.
fn compare(e: &Expect, d: &Decision<'_>, policy: &Policy) -> Result<Vec<String>, String> {
    if !["allow", "deny", "error"].contains(&e.decision.as_str()) {
        return Err(broken(format!(
            "expect.decision \"{}\" is not allow, deny or error",
            e.decision
        )));
    }
    if Reason::parse(&e.reason).is_none() {
        return Err(broken(format!(
            "expect.reason \"{}\" is not a reason code",
            e.reason
        )));
    }
    let mut differs = Vec::new();
    if d.verdict.as_str() != e.decision {
        differs.push("decision");
    }
    if d.reason.as_str() != e.reason {
        differs.push("reason");
    }
    if e.rule.as_deref().is_some_and(|r| r != d.rule) {
        differs.push("rule");
    }
    if e.status.is_some() && e.status != d.status() {
        differs.push("status");
    }
    if e.forwarded.is_some_and(|f| f != d.forwards()) {
        differs.push("forwarded");
    }
    if e.enforced.is_some_and(|x| x != d.enforced) {
        differs.push("enforced");
    }
    let dataset = d.dataset.map(|i| &*policy.datasets[i].name);
    if e.dataset.is_some() && e.dataset.as_deref() != dataset {
        differs.push("dataset");
    }
    let consent = d.consent.as_ref().map(|c| &*c.id);
    if e.consent.is_some() && e.consent.as_deref() != consent {
        differs.push("consent");
    }
    Ok(differs.into_iter().map(String::from).collect())
}

/// Runs a case's body through the proxy's filter with the case's consents.
fn filter_case_body(
    policy: &Policy,
    d: &Decision<'_>,
    hypo: &Hypothetical,
    env: &OfflineEnv,
    body: &Path,
) -> Result<FilteredBody, BodyError> {
    if RecordTerms::of(policy, d, env.now).is_none() {
        return Err(BodyError::not_filtered(d));
    }
    let compression = body_compression(hypo).map_err(|source| BodyError::Encoding {
        path: body.into(),
        source,
    })?;
    filter_body(
        policy,
        d,
        env.now,
        body,
        compression,
        &BodyConsents::Index(&env.consents),
        None,
    )
}

/// The record counts that differ from the expected ones, each with both numbers.
fn compare_records(e: &ExpectRecords, b: &FilteredBody) -> Vec<String> {
    let c = &b.counts;
    let dropped: BTreeMap<&str, u64> = b.dropped().into_iter().collect();
    let would: BTreeMap<&str, u64> = b.would_drop().into_iter().collect();
    let mut checks: Vec<(String, u64, u64)> = Vec::new();
    let totals = [
        ("kept", e.kept, c.kept),
        ("dropped", e.dropped, c.dropped),
        ("subjects", e.subjects, b.subjects_kept),
    ];
    for (name, want, got) in totals {
        if let Some(want) = want {
            checks.push((name.into(), want, got));
        }
    }
    for (reason, want) in e.dropped_by() {
        checks.push((
            reason.into(),
            want,
            dropped.get(reason).copied().unwrap_or(0),
        ));
    }
    for (reason, want) in e.would_drop.iter().flat_map(DropCounts::given) {
        let got = would.get(reason).copied().unwrap_or(0);
        checks.push((format!("would_drop.{reason}"), want, got));
    }
    checks
        .into_iter()
        .filter(|(_, want, got)| want != got)
        .map(|(name, want, got)| format!("records.{name} (expected {want}, got {got})"))
        .collect()
}

/// What the filter made of a body, on one line.
fn records_line(b: &FilteredBody) -> String {
    let list = |v: Vec<(&str, u64)>| {
        v.iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let c = &b.counts;
    let mut s = format!(
        "{} read: kept {} ({} subjects), dropped {}",
        c.records, c.kept, b.subjects_kept, c.dropped
    );
    if c.dropped > 0 {
        s += &format!(" ({})", list(b.dropped()));
    }
    let would = b.would_drop();
    if !would.is_empty() {
        s += &format!(", would drop {}", list(would));
    }
    s
}

/// The expected counts, as `expected_line` shows them.
fn expected_records(e: &ExpectRecords) -> String {
    let mut parts = Vec::new();
    for (name, v) in [
        ("kept", e.kept),
        ("dropped", e.dropped),
        ("subjects", e.subjects),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name} {v}"));
        }
    }
    parts.extend(e.dropped_by().iter().map(|(k, n)| format!("{k} {n}")));
    parts.extend(
        e.would_drop
            .iter()
            .flat_map(DropCounts::given)
            .map(|(k, n)| format!("would_drop.{k} {n}")),
    );
    format!("records {}", parts.join(", "))
}

fn expected_line(e: &Expect) -> String {
    let mut extra = Vec::new();
    if let Some(r) = &e.rule {
        extra.push(format!("rule {r}"));
    }
    if let Some(s) = e.status {
        extra.push(format!("status {s}"));
    }
    if let Some(f) = e.forwarded {
        extra.push(if f { "forwarded" } else { "not forwarded" }.into());
    }
    if let Some(x) = e.enforced {
        extra.push(format!("enforced {x}"));
    }
    if let Some(ds) = &e.dataset {
        extra.push(format!("dataset {ds}"));
    }
    if let Some(c) = &e.consent {
        extra.push(format!("consent {c}"));
    }
    if let Some(r) = &e.records {
        extra.push(expected_records(r));
    }
    if extra.is_empty() {
        format!("{} {}", e.decision, e.reason)
    } else {
        format!("{} {} ({})", e.decision, e.reason, extra.join(", "))
    }
}

fn actual_line(d: &Decision<'_>, policy: &Policy) -> String {
    let status = match d.status() {
        Some(s) => format!("status {s}"),
        None => "forwarded".into(),
    };
    format!(
        "{} {} (rule {}, {status}, enforced {}, dataset {}, consent {})",
        d.verdict.as_str(),
        d.reason,
        d.rule,
        d.enforced,
        d.dataset.map(|i| &*policy.datasets[i].name).unwrap_or("-"),
        d.consent.as_ref().map(|c| &*c.id).unwrap_or("-"),
    )
}
