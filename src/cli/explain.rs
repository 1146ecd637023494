//! `explain`: decide one hypothetical request with the proxy's own code and print the
//! decision record it would log, plus the trace of rules it passed through; with `--body`,
//! run an object through the proxy's own filter and count the records that would leave.

use super::{CliError, CliResult, Exit, fail, load_policy};
use crate::audit::Pseudonymizer;
use crate::audit::keys::SigningKey;
use crate::audit::record::{RequestContext, decision_record};
use crate::bulk::Compression;
use crate::consent::ConsentIndex;
use crate::consent::change::Filter;
use crate::consent::registry::Registry;
use crate::geo::{GeoDb, Locator};
use crate::offline::{
    Asking, BodyConsents, BodyError, CacheReader, FilteredBody, Hypothetical, OfflineEnv,
    body_compression, sniff_compression,
};
use crate::policy::Policy;
use crate::policy::decide::{RecordTerms, decide};
use crate::policy::decision::{Decision, TraceStep};
use crate::policy::model::ConsentStore;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples (policies/demo.toml names the files `residency-proxy demo --no-wait` writes into demo/: \
run it once first):\n  residency-proxy explain --policy policies/demo.toml --method GET \\\n    --path /payments/u123/2026-01.json --client-ip 127.0.0.20 --purpose credit_scoring\n  \
residency-proxy explain --policy policies/demo.toml --path /exports/spending/2026-11.jsonl \\\n    \
--client-ip 127.0.0.20 --purpose credit_scoring \\\n    \
--body policies/tests/bodies/spending-2026-11.jsonl --out what-leaves.jsonl"
)]
pub struct ExplainArgs {
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Request target: path, optionally with `?query`.
    #[arg(long)]
    pub path: String,
    /// The socket peer address of the hypothetical client.
    #[arg(long, value_name = "IP")]
    pub client_ip: IpAddr,
    #[arg(long)]
    pub host: Option<String>,
    /// A verified mTLS identity (certificate SAN) the client presents.
    #[arg(long)]
    pub identity: Option<String>,
    /// Shorthand for the policy's purpose header.
    #[arg(long)]
    pub purpose: Option<String>,
    /// Extra request headers, `Name: value`; repeatable.
    #[arg(long = "header", value_name = "K:V")]
    pub headers: Vec<String>,
    /// Consents in force (JSON lines); default: the policy's `file:` store, if it has one.
    #[arg(long, value_name = "FILE")]
    pub consents: Option<PathBuf>,
    /// Decide as of this instant (RFC 3339) instead of now.
    #[arg(long)]
    pub now: Option<jiff::Timestamp>,
    /// Print one JSON object (`record`, `trace`, `message`, and with `--body`, `body`)
    /// instead of text.
    #[arg(long)]
    pub json: bool,
    /// For a request whose object is filtered record by record (`consent_filtered`): the
    /// object as the upstream would send it, run through the proxy's filter; prints the
    /// records kept and dropped, by reason. Compressed as `--header 'Content-Encoding: …'`
    /// or the path's `.gz`/`.zst` says, as the proxy tells.
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// With `--body`: write the filtered object (what would leave) to this file.
    #[arg(long, value_name = "FILE", requires = "body")]
    pub out: Option<PathBuf>,
}

/// The trace as numbered lines, each starting with `indent`.
pub(crate) fn trace_lines(trace: &[TraceStep], indent: &str) -> String {
    trace
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{indent}{:>2}. {:<40} {}\n", i + 1, t.rule, t.note))
        .collect()
}

pub fn run(a: ExplainArgs) -> CliResult {
    let policy = load_policy(&a.policy)?;
    let headers = a
        .headers
        .iter()
        .map(|h| Hypothetical::header_line(h))
        .collect::<Result<Vec<_>, _>>()?;
    let hypo = Hypothetical::new(
        &policy,
        &a.method,
        &a.path,
        a.client_ip,
        headers,
        a.purpose.as_deref(),
        a.host.as_deref(),
        a.identity.as_deref(),
    )?;
    let consents = Arc::new(ConsentIndex::new());
    let consent_file = a.consents.clone().or(match &policy.consent.store {
        ConsentStore::File(p) => Some(p.clone()),
        _ => None,
    });
    if let Some(f) = &consent_file {
        let report = crate::consent::file::load(f, &consents)?;
        for s in &report.skipped {
            eprintln!("{}:{}: skipped: {}", f.display(), s.line, s.message);
        }
    }
    let db = policy
        .geo_database
        .as_ref()
        .map(|p| GeoDb::open(p))
        .transpose()?
        .map(Arc::new);
    let geo_label = db.as_ref().map(|d| d.label().clone());
    let now = a.now.unwrap_or_else(jiff::Timestamp::now);
    if consent_file.is_none()
        && let ConsentStore::Sqlite(_) | ConsentStore::Postgres(_) = &policy.consent.store
    {
        // Only the subjects the decision asks about are read from the registry, as the proxy
        // reads them on a cache miss (never the whole registry, never created here). A copy
        // asks about its source's subject only once its target is decided: each round reads
        // what the last one asked about, as the proxy's fills do.
        let probe = OfflineEnv::new(
            &policy,
            Locator::new(&policy, db.clone()),
            consents.clone(),
            now.as_microsecond(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut registry = None;
        let mut read: Vec<String> = Vec::new();
        loop {
            let asking = Asking::new(&probe);
            decide(&policy, &asking, &hypo.request(), &mut ());
            let new: Vec<String> = asking
                .asked()
                .into_iter()
                .filter(|s| !read.contains(s))
                .collect();
            if new.is_empty() {
                break;
            }
            let records = rt.block_on(async {
                if registry.is_none() {
                    registry = Some(Registry::open(&policy.consent.store, false).await?);
                }
                let registry = registry.as_ref().expect("opened above");
                let mut records = Vec::new();
                for s in &new {
                    records.extend(registry.list(Filter::Subject(s)).await?);
                }
                Ok::<_, crate::consent::registry::RegistryError>(records)
            })?;
            for r in &records {
                // What the proxy's cache would hold: a record that fails validation grants
                // nothing, there as here.
                let _ = consents.upsert(r);
            }
            read.extend(new);
        }
    }
    let locator = Locator::new(&policy, db);
    let env = OfflineEnv::new(&policy, locator, consents, now.as_microsecond());
    let pseudo = match (&policy.log.signing_key, policy.log.pseudonymize) {
        (Some(k), true) => Pseudonymizer::new(&SigningKey::load(k)?.pseudonym_key()),
        _ => Pseudonymizer::Off,
    };
    let req = hypo.request();
    let mut trace: Vec<TraceStep> = Vec::new();
    let d = decide(&policy, &env, &req, &mut trace);
    let cx = RequestContext {
        id: crate::audit::id::DecisionId::named("explain"),
        ts: now,
        method: &hypo.method,
        host: req.host,
        raw_path: &hypo.path,
        query: hypo.query.as_deref(),
        headers: &hypo.headers,
        peer: a.client_ip,
    };
    let body = match &a.body {
        Some(file) => Some(filter_body(&a, &policy, &hypo, &d, &env, file, now)?),
        None => None,
    };
    let record = decision_record(&policy, geo_label, &pseudo, &cx, &d);
    let message = d.message(&policy);
    if a.json {
        let mut out = serde_json::json!({
            "record": record,
            "message": message,
            "trace": trace.iter().map(|t| serde_json::json!({"rule": t.rule, "note": t.note})).collect::<Vec<_>>(),
        });
        if let (Some(b), Some(file)) = (&body, &a.body) {
            out["body"] = body_json(b, file, &policy, &d, a.out.as_deref());
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(CliError::from)?
        );
        return Ok(Exit::Ok);
    }
    let status = d
        .status()
        .map(|s| s.to_string())
        .unwrap_or_else(|| "forwarded".into());
    println!(
        "decision: {}{}  reason: {}  status: {}",
        d.verdict.as_str(),
        if d.enforced {
            ""
        } else {
            " (audit mode: not enforced, forwarded)"
        },
        d.reason,
        status
    );
    println!("rule:     {}", d.rule);
    println!("message:  {message}");
    println!("trace:");
    print!("{}", trace_lines(&trace, "  "));
    if let (Some(b), Some(file)) = (&body, &a.body) {
        print!("{}", body_lines(b, file, &policy, &d, a.out.as_deref()));
    }
    println!("record:");
    println!(
        "{}",
        serde_json::to_string_pretty(&record).map_err(CliError::from)?
    );
    Ok(Exit::Ok)
}

/// Runs `--body` through the proxy's filter for the decision `d`, with the consents explain
/// reads: the index already loaded from a consents file, or the policy's database store read
/// a batch of subjects at a time, as the proxy reads it.
fn filter_body(
    a: &ExplainArgs,
    policy: &Policy,
    hypo: &Hypothetical,
    d: &Decision<'_>,
    env: &OfflineEnv,
    file: &Path,
    now: jiff::Timestamp,
) -> Result<FilteredBody, CliError> {
    if RecordTerms::of(policy, d, now.as_microsecond()).is_none() {
        return Err(fail(format!(
            "--body {}: {}",
            file.display(),
            BodyError::not_filtered(d)
        )));
    }
    let compression = body_compression(hypo).map_err(|source| BodyError::Encoding {
        path: file.into(),
        source,
    })?;
    if compression == Compression::Identity {
        warn_if_compressed(file, hypo)?;
    }
    let cache = match (&a.consents, &policy.consent.store) {
        (None, ConsentStore::Sqlite(_) | ConsentStore::Postgres(_)) => {
            CacheReader::open(&policy.consent)?
        }
        _ => None,
    };
    let consents = match &cache {
        Some(c) => BodyConsents::Cache(c),
        None => BodyConsents::Index(&env.consents),
    };
    let mut written = match &a.out {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(
            |source| BodyError::Write {
                path: p.clone(),
                source,
            },
        )?)),
        None => None,
    };
    let out = match (&a.out, written.as_mut()) {
        (Some(p), Some(w)) => Some((p.as_path(), w as &mut dyn std::io::Write)),
        _ => None,
    };
    let filtered = crate::offline::filter_body(
        policy,
        d,
        now.as_microsecond(),
        file,
        compression,
        &consents,
        out,
    );
    if let (Err(_), Some(p)) = (&filtered, &a.out) {
        // Half an object would read as what leaves: better none.
        let _ = std::fs::remove_file(p);
    }
    Ok(filtered?)
}

/// A body whose bytes are compressed while nothing tells the proxy so would be read as it
/// is, every record unparsable: say how to tell it.
fn warn_if_compressed(file: &Path, hypo: &Hypothetical) -> Result<(), CliError> {
    let mut first = [0u8; 4];
    let mut f = std::fs::File::open(file).map_err(|source| BodyError::Read {
        path: file.into(),
        source,
    })?;
    let n = std::io::Read::read(&mut f, &mut first).unwrap_or(0);
    if let Some(c) = sniff_compression(&first[..n]) {
        let name = c.content_encoding().unwrap_or_default();
        eprintln!(
            "warning: {} is {name}-compressed, but neither a Content-Encoding nor the path {} says so: the proxy would read it as it is; give --header 'Content-Encoding: {name}' if the store sends it so",
            file.display(),
            hypo.path
        );
    }
    Ok(())
}

fn compression_name(c: Compression) -> &'static str {
    c.content_encoding().unwrap_or("not compressed")
}

fn subject_text<'p>(policy: &'p Policy, d: &Decision<'_>) -> &'p str {
    d.dataset
        .and_then(|i| policy.datasets[i].records.as_ref())
        .map_or("", |r| &r.spec.subject_text)
}

/// The body's counts as `explain` prints them.
fn body_lines(
    b: &FilteredBody,
    file: &Path,
    policy: &Policy,
    d: &Decision<'_>,
    out: Option<&Path>,
) -> String {
    let c = &b.counts;
    let mut s = format!(
        "body:     {} ({} records, subject \"{}\", {})\n",
        file.display(),
        b.format,
        subject_text(policy, d),
        compression_name(b.compression)
    );
    if b.audit {
        let would: u64 = b.would_drop().iter().map(|(_, n)| n).sum();
        s += &format!(
            "records:  {} read, {} kept, {} dropped (audit mode: {would} would have been dropped)\n",
            c.records, c.kept, c.dropped
        );
    } else {
        s += &format!(
            "records:  {} read, {} kept, {} dropped\n",
            c.records, c.kept, c.dropped
        );
    }
    let mut subjects = format!(
        "{} distinct subject{} under a consent",
        b.subjects_kept,
        if b.subjects_kept == 1 { "" } else { "s" }
    );
    if b.audit {
        subjects += &format!(", {} without", b.subjects_would_drop);
    }
    s += &format!(
        "  {:<34} {:>6}  ({subjects}, {} bytes)\n",
        "kept", c.kept, c.kept_bytes
    );
    for (reason, n) in b.dropped() {
        s += &format!("  {:<34} {n:>6}\n", format!("dropped {reason}"));
    }
    for (reason, n) in b.would_drop() {
        s += &format!("  {:<34} {n:>6}\n", format!("would drop {reason}"));
    }
    s += &format!(
        "bytes:    {} in, {} out{}\n",
        c.bytes_in_raw,
        c.bytes_out,
        out.map(|p| format!(" (written to {})", p.display()))
            .unwrap_or_default()
    );
    s
}

/// The body's counts as `explain --json` prints them: the outcome record's names.
fn body_json(
    b: &FilteredBody,
    file: &Path,
    policy: &Policy,
    d: &Decision<'_>,
    out: Option<&Path>,
) -> serde_json::Value {
    let map = |v: Vec<(&'static str, u64)>| {
        v.into_iter()
            .map(|(k, n)| (k.to_string(), serde_json::Value::from(n)))
            .collect::<serde_json::Map<_, _>>()
    };
    let c = &b.counts;
    serde_json::json!({
        "file": file.display().to_string(),
        "format": b.format.name(),
        "subject": subject_text(policy, d),
        "compression": b.compression.content_encoding().unwrap_or("identity"),
        "audit": b.audit,
        "records": c.records,
        "kept": c.kept,
        "kept_bytes": c.kept_bytes,
        "dropped": map(b.dropped()),
        "would_drop": map(b.would_drop()),
        "subjects_kept": b.subjects_kept,
        "subjects_would_drop": b.subjects_would_drop,
        "bytes_in": c.bytes_in_raw,
        "bytes_out": c.bytes_out,
        "out": out.map(|p| p.display().to_string()),
    })
}
