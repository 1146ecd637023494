//! `explain`: decide one hypothetical request with the proxy's own code and print the
//! decision record it would log, plus the trace of rules it passed through.

use super::{CliError, CliResult, Exit, load_policy};
use crate::audit::Pseudonymizer;
use crate::audit::keys::SigningKey;
use crate::audit::record::{RequestContext, decision_record};
use crate::consent::ConsentIndex;
use crate::consent::registry::{Filter, Registry};
use crate::geo::{GeoDb, Locator};
use crate::offline::{Asking, Hypothetical, OfflineEnv};
use crate::policy::decide::decide;
use crate::policy::decision::TraceStep;
use crate::policy::model::ConsentStore;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  residency-proxy explain --policy policies/demo.toml --method GET \\\n    --path /payments/u123/2026-01.json --client-ip 127.0.0.3 --purpose credit_scoring"
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
    /// Print one JSON object (`record`, `trace`, `message`) instead of text.
    #[arg(long)]
    pub json: bool,
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
    let record = decision_record(&policy, geo_label, &pseudo, &cx, &d);
    let message = d.message(&policy);
    if a.json {
        let out = serde_json::json!({
            "record": record,
            "message": message,
            "trace": trace.iter().map(|t| serde_json::json!({"rule": t.rule, "note": t.note})).collect::<Vec<_>>(),
        });
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
    println!("record:");
    println!(
        "{}",
        serde_json::to_string_pretty(&record).map_err(CliError::from)?
    );
    Ok(Exit::Ok)
}
