//! `audit verify|query|report|export|subject`: the command line of the log's readers
//! ([`crate::audit::read`]), for security teams and data protection officers: the
//! arguments, and how each result is printed.

use super::{CliError, CliResult, Exit, fail};
use crate::audit::Pseudonymizer;
use crate::audit::files::{Segments, log_chains};
use crate::audit::keys::{self, SigningKey};
use crate::audit::read::export::ParquetExport;
use crate::audit::read::fleet;
use crate::audit::read::html;
use crate::audit::read::query::{self, Filter, Format, QueryError, Scanned, parse_time};
use crate::audit::read::report;
use crate::audit::read::subject;
use crate::audit::read::verify::{
    KnownHead, VerifyError, VerifyOptions, VerifyReport, verify_files,
};
use crate::audit::store::{self, Location, StoreOptions};
use crate::policy::Reason;
use clap::Subcommand;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::runtime::Runtime;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain, the signed checkpoints and their coverage of a log file (with
    /// its rotated files) or folder; print the first broken record (file, line, why) or
    /// `ok: N records, M checkpoints`; for several chains (a sidecar's workers, a fleet's
    /// instances), a line per chain.
    Verify(VerifyArgs),
    /// Print the records that match every given filter, as JSON lines or a table.
    Query(Box<QueryArgs>),
    /// Count decisions by decision, reason, dataset, recipient and destination country; in
    /// audit mode, what would have been blocked; for bulk exports, the records kept and
    /// dropped by reason and the subjects disclosed.
    Report(ReportArgs),
    /// Write every record of a log, or of a fleet's shipped files, as Parquet with typed
    /// columns, for DuckDB, Trino, Athena, ClickHouse or Spark.
    Export(ExportArgs),
    /// A data subject's disclosure report: every recipient that received their data (bulk
    /// exports that carried their records included), and every refused attempt, after
    /// verifying the log (PIPL art. 45, GDPR art. 15(1)(c)).
    Subject(SubjectArgs),
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "The log is verified first (the chain, and the signatures against --key or the \
key the log carries): a log that does not verify gets no report, only the failure, and exit \
status 1. The subject's identifier is pseudonymised with the key derived from the log-signing \
key, as the proxy did; only that subject's decision records, the disclosures of bulk exports \
naming them, and their outcome records are read into the report, and their request paths, \
queries and headers are left out (but a bulk export's path, which names the export).\n\n\
Example:\n  residency-proxy audit subject u123 --signing-key certs/log-signing.key \
--key certs/log-signing.pub --format html logs/ > u123.html"
)]
pub struct SubjectArgs {
    /// The data subject's identifier, as the requests carry it (never printed).
    pub raw: String,
    /// The local log (file, or folder: every worker's chain) or a location in object
    /// storage (s3://…).
    pub path: PathBuf,
    /// The log-signing key ([log] signing_key): pseudonymises RAW as the log holds it.
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The policy whose [log] section names the signing key; its name heads the report.
    #[arg(long, value_name = "FILE", conflicts_with = "signing_key")]
    pub policy: Option<PathBuf>,
    /// Public key (PEM) that must have signed the log's checkpoints.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Vec<PathBuf>,
    /// The log is still being written: accept it without a final checkpoint.
    #[arg(long)]
    pub open: bool,
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    #[arg(long, value_enum, default_value_t = SubjectFormat::Json)]
    pub format: SubjectFormat,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectFormat {
    Json,
    Html,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "One row per record of every kind (decision, outcome, checkpoint, recovery), \
fields flattened with `_` (request.method is request_method), ts as a UTC timestamp, \
request headers and any field a later version adds as JSON text (request_headers, extra). \
A disclosure (a batch of a bulk export) has a row per subject it names, in subject and \
consent_id as a decision row holds its one subject; a bulk export's outcome counts its records \
in records_kept, records_kept_bytes and, as JSON text by reason, records_dropped and \
records_would_drop. \
Records are read as they are, without checking the chain: run `audit verify` on the same \
PATH|URL first. Example, with DuckDB:\n\n  \
residency-proxy audit export s3://decision-logs/shanghai/ q3.parquet\n  \
duckdb -c \"SELECT reason, count(*) FROM 'q3.parquet' WHERE kind = 'decision' GROUP BY reason\""
)]
pub struct ExportArgs {
    /// A local log (file, or folder: every worker's chain) or a location in object storage
    /// (s3://BUCKET/PREFIX/…).
    pub path: PathBuf,
    /// The Parquet file to write (replaced once complete).
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Parquet)]
    pub format: ExportFormat,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Parquet,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Without --key, each signature is checked against the public key its \
checkpoint carries, and the report names that key's fingerprint: compare it with yours; a \
checkpoint left unsigned after a signed one fails (its signature was removed). With \
--key, every checkpoint must be signed by that key (repeat --key for a log signed by several \
keys over time). A log that does not end in a final checkpoint (written on a clean shutdown) \
fails as open or truncated, unless --open. No signature catches a log cut back to an earlier final \
checkpoint, or cut and then continued by a restart: give --head SEQ:HASH from the proxy's own \
logs (event \"decision log checkpoint\"), kept elsewhere, and the log must still reach it."
)]
pub struct VerifyArgs {
    /// The active log file (its rotated files beside it are read first) or a folder holding
    /// one log (with several workers, their chains `X.jsonl`, `X.w1.jsonl`, …, each verified
    /// on its own); or a location in object storage (s3://BUCKET/PREFIX/, gs://, az://,
    /// file://) holding the shipped files of many instances, each verified as its own chain.
    /// The chain is checked from the log's first record: a rotated file on its own fails as
    /// missing its predecessors.
    pub path: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Public key (PEM, e.g. log-signing.pub from `certs init`) that must have signed the
    /// checkpoints.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Vec<PathBuf>,
    /// The log is still being written: do not require a final checkpoint; report the records
    /// after the last checkpoint as unsigned.
    #[arg(long)]
    pub open: bool,
    /// A head recorded outside the log (`log.seq` and `log.hash` of a `decision log
    /// checkpoint` event in the proxy's own logs): the log must still reach that record with
    /// that hash. Catches a log cut back, which signatures cannot. Repeatable.
    #[arg(long, value_name = "SEQ:HASH")]
    pub head: Vec<KnownHead>,
}

/// Filters of `audit query`; repeat a flag, or separate values with commas, for "any of".
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Filters combine: a record is printed when it matches every flag given, \
and any of the values of each. --country matches the recipient's declared country or the \
client's located country. A disclosure record (the subjects a batch of a bulk export named) \
matches on its export's decision: recipient, dataset, destination, decision and reason. \
--subject pseudonymises RAW with the key derived from the log-signing \
key, so it needs --signing-key or --policy. Times: 2026-11-28T04:00:00Z, 2026-11-28 (midnight UTC), \
or a duration back from now (30m, 24h, 7d); --since is inclusive, --until exclusive."
)]
pub struct QueryArgs {
    /// The active log file (with its rotated files), one rotated file, a folder (every
    /// worker's chain, merged by time), or a location in object storage
    /// (s3://BUCKET/PREFIX/…): every instance's shipped files.
    pub path: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// allow, deny or error.
    #[arg(long, value_delimiter = ',', value_parser = ["allow", "deny", "error"])]
    pub decision: Vec<String>,
    /// A reason code (consent_missing, domestic, …).
    #[arg(long, value_delimiter = ',')]
    pub reason: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub dataset: Vec<String>,
    /// A recipient id, or `anonymous`.
    #[arg(long, value_delimiter = ',')]
    pub recipient: Vec<String>,
    /// A destination country (ISO 3166-1 alpha-2).
    #[arg(long, value_delimiter = ',')]
    pub country: Vec<String>,
    /// A data subject's raw identifier, matched through its pseudonym: their decision records,
    /// and the disclosures of bulk exports that name them.
    #[arg(long, value_name = "RAW")]
    pub subject: Vec<String>,
    /// A decision id (all records of that exchange: decision, disclosures and outcome).
    #[arg(long, value_delimiter = ',')]
    pub id: Vec<String>,
    /// A W3C trace id (32 hex digits, or a whole traceparent header): the decisions of the
    /// requests that carried it in their traceparent header.
    #[arg(long, value_delimiter = ',', value_name = "TRACE_ID")]
    pub trace: Vec<String>,
    /// `false`: denials audit mode only logged (the request was forwarded).
    #[arg(long)]
    pub enforced: Option<bool>,
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Record kinds: decision (the default; with --subject also disclosure), outcome,
    /// disclosure (the subjects a batch of a bulk export named), checkpoint, recovery, or any.
    #[arg(long, value_delimiter = ',', value_parser = ["decision", "outcome", "disclosure", "checkpoint", "recovery", "any"])]
    pub kind: Vec<String>,
    /// The log-signing key ([log] signing_key), for --subject.
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The policy whose [log] section names the signing key, for --subject.
    #[arg(long, value_name = "FILE", conflicts_with = "signing_key")]
    pub policy: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    pub format: OutputFormat,
    /// Stop after this many records.
    #[arg(long)]
    pub limit: Option<u64>,
}

/// How to reach object storage when PATH is a URL. Credentials come from the store's
/// standard environment variables (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, …).
#[derive(clap::Args, Debug, Default)]
pub struct StoreArgs {
    /// An S3-compatible store's endpoint (http://10.20.0.9:9000), for s3:// locations.
    #[arg(long, value_name = "URL", env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// The bucket's region (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,
}

impl StoreArgs {
    /// The location `path` names, if it is a URL, with a runtime to read it.
    fn open(&self, path: &std::path::Path) -> Result<Option<(Arc<Runtime>, Location)>, CliError> {
        if !fleet::is_url(path) {
            return Ok(None);
        }
        let text = path.to_string_lossy();
        let url = url::Url::parse(&text).map_err(|e| fail(format!("{text}: not a URL: {e}")))?;
        let endpoint = self
            .endpoint
            .as_deref()
            .map(|e| url::Url::parse(e).map_err(|err| fail(format!("--endpoint {e}: {err}"))))
            .transpose()?;
        let opts = StoreOptions {
            endpoint,
            region: self.region.clone(),
            credentials_file: None,
        };
        let loc = store::open(&url, &opts).map_err(|e| fail(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start a runtime: {e}")))?;
        Ok(Some((Arc::new(rt), loc)))
    }

    /// The files to read for `path`: a local log, or every instance's shipped files.
    pub fn segments(&self, path: &std::path::Path) -> Result<Segments, CliError> {
        Ok(match self.open(path)? {
            Some((rt, loc)) => fleet::segments(&rt, &loc).map_err(QueryError::from)?,
            None => Segments::local(path).map_err(QueryError::from)?,
        })
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    Table,
}

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The active log file (with its rotated files), one rotated file, a folder (every
    /// worker's chain, merged by time), or a location in object storage
    /// (s3://BUCKET/PREFIX/…): every instance's shipped files.
    pub path: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
    /// Rows per table in text.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Text,
    Json,
    /// One self-contained page with charts (inline SVG; nothing fetched), headed by how
    /// `audit verify` judged the same log.
    Html,
}

pub fn run(cmd: AuditCommand) -> CliResult {
    match cmd {
        AuditCommand::Verify(a) => verify(a),
        AuditCommand::Query(a) => run_query(*a),
        AuditCommand::Report(a) => run_report(a),
        AuditCommand::Export(a) => run_export(a),
        AuditCommand::Subject(a) => run_subject(a),
    }
}

fn run_subject(args: SubjectArgs) -> CliResult {
    let mut opts = VerifyOptions {
        open: args.open,
        ..VerifyOptions::default()
    };
    for k in &args.key {
        opts.keys.push(keys::load_public_key(k)?);
    }
    // The report stands on a log that verified: a broken one gets the failure, not a report.
    let verified = match integrity(&args.path, &args.store, &opts)? {
        Ok(lines) => lines,
        Err(why) => {
            eprintln!("{why}");
            eprintln!(
                "audit subject: {} did not verify: no report is made from a log that may have been altered",
                args.path.display()
            );
            return Ok(Exit::Failed);
        }
    };
    let (pseudo, policy_name) = pseudonymizer(
        args.signing_key.as_deref(),
        args.policy.as_deref(),
        "the subject is found through its pseudonym",
    )?;
    let (since, until) = times(&args.since, &args.until)?;
    let segments = args.store.segments(&args.path)?;
    let report = subject::build(segments, &pseudo.pseudonym(&args.raw), since, until)?;
    let now = crate::audit::record::timestamp(jiff::Timestamp::now());
    match args.format {
        SubjectFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "verified": verified,
                "policy_name": policy_name,
                "generated_at": now,
                "report": report,
            }))
            .expect("reports serialise to JSON")
        ),
        SubjectFormat::Html => print!(
            "{}",
            html::subject_page(&report, &verified, policy_name.as_deref(), &now)
        ),
    }
    Ok(Exit::Ok)
}

fn run_export(args: ExportArgs) -> CliResult {
    let segments = args.store.segments(&args.path)?;
    // Written beside the target and renamed once complete: a failed export leaves no
    // half-written file under the name asked for.
    let mut tmp = args.out.clone().into_os_string();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let mut export = ParquetExport::create(&tmp).map_err(|e| fail(e.to_string()))?;
    let filter = Filter {
        kinds: vec!["any".into()],
        ..Filter::default()
    };
    let mut failed = None;
    let scanned = query::scan_segments(segments, &filter, |line, _| {
        // The scan has read the line as JSON already (lines that are not are skipped and
        // counted): a failure here is the exporter's.
        let pushed = serde_json::from_slice::<serde_json::Value>(line)
            .map_err(|e| e.to_string())
            .and_then(|v| export.push(&v).map_err(|e| e.to_string()));
        match pushed {
            Ok(()) => Ok(std::ops::ControlFlow::Continue(())),
            Err(why) => {
                failed = Some(why);
                Ok(std::ops::ControlFlow::Break(()))
            }
        }
    });
    let scanned = match (scanned, failed) {
        (Ok(s), None) => s,
        (Err(e), _) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        (Ok(_), Some(why)) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(why));
        }
    };
    let records = export.records();
    let rows = export.finish().map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&tmp, &args.out).map_err(|e| fail(format!("{}: {e}", args.out.display())))?;
    warn_unread(&scanned);
    if rows == records {
        eprintln!("{}: {rows} records", args.out.display());
    } else {
        eprintln!(
            "{}: {records} records in {rows} rows (a disclosure has a row per subject it names)",
            args.out.display()
        );
    }
    Ok(Exit::Ok)
}

fn verify(args: VerifyArgs) -> CliResult {
    let mut opts = VerifyOptions {
        keys: Vec::new(),
        open: args.open,
        heads: args.head,
        instance: None,
    };
    for k in &args.key {
        opts.keys.push(keys::load_public_key(k)?);
    }
    if let Some((rt, loc)) = args.store.open(&args.path)? {
        let report = fleet::verify(&rt, &loc, &opts)?;
        if report.instances.is_empty() {
            return Err(fail(format!(
                "{}: holds no shipped log files (PREFIX/INSTANCE/FIRSTSEQ-LASTSEQ-TIME.jsonl.zst)",
                loc.url
            )));
        }
        return Ok(print_chains(&report, "instances"));
    }
    let mut chains = log_chains(&args.path)?;
    if chains.len() > 1 {
        let report = fleet::verify_local(&args.path, chains, &opts)?;
        return Ok(print_chains(&report, "chains"));
    }
    let files = chains.pop().map(|c| c.files).unwrap_or_default();
    match verify_files(&files, &args.path, &opts) {
        Ok(report) => {
            for line in describe(&report) {
                println!("{line}");
            }
            Ok(Exit::Ok)
        }
        Err(VerifyError::Broken(broken)) => {
            eprintln!("{broken}");
            Ok(Exit::Failed)
        }
        Err(e @ VerifyError::Files(_)) => Err(e.into()),
    }
}

/// `audit verify` of many chains (a location's instances, a folder's workers, named by
/// `what`): a line per chain, then what else the location holds.
fn print_chains(report: &fleet::FleetReport, what: &str) -> Exit {
    for i in &report.instances {
        println!("{}", instance_line(i));
    }
    if let Some(first) = report.strangers.first() {
        eprintln!(
            "note: {} objects under the location are not shipped log files and were not read (e.g. {first})",
            report.strangers.len()
        );
    }
    let failed = report
        .instances
        .iter()
        .filter(|i| i.result.is_err())
        .count();
    if failed > 0 {
        eprintln!(
            "audit verify: {failed} of {} {what} failed",
            report.instances.len()
        );
        return Exit::Failed;
    }
    Exit::Ok
}

/// What `verify` says of one instance of a location: `INSTANCE: ok, N records, …` or why it
/// failed.
fn instance_line(i: &fleet::InstanceVerdict) -> String {
    match &i.result {
        Ok(r) => format!(
            "{}: {}, {} records, {} checkpoints, last seq {} at {}{}",
            i.instance,
            if r.closed { "ok" } else { "open" },
            r.records,
            r.checkpoints,
            r.last_seq,
            r.last_ts.as_deref().unwrap_or("-"),
            signed_by(r)
        ),
        Err(why) => format!("{}: {why}", i.instance),
    }
}

/// How an instance's checkpoints were signed, for its verify line.
fn signed_by(r: &VerifyReport) -> String {
    let signers = r.signers.join(", ");
    match (r.signed, r.trusted) {
        (0, _) => ", NOT SIGNED".into(),
        (_, true) => format!(", signed with the given key ({signers})"),
        (_, false) => format!(", signed by {signers} (the key the log carries; pass --key)"),
    }
}

/// The lines `audit verify` prints for a log that verified.
pub fn describe(r: &VerifyReport) -> Vec<String> {
    let mut out = vec![format!(
        "ok: {} records, {} checkpoints",
        r.records, r.checkpoints
    )];
    let signers = r.signers.join(", ");
    if r.signed > 0 {
        out.push(if r.trusted {
            format!("signatures: {} verified with the given key ({signers})", r.signed)
        } else {
            format!(
                "signatures: {} verified against the public key the log carries ({signers}); pass --key to check it is yours",
                r.signed
            )
        });
    }
    // Verify fails an unsigned checkpoint after a signed one, so unsigned ones come first.
    if r.unsigned_checkpoints > 0 && r.signed == 0 {
        out.push(format!(
            "NOT SIGNED: none of the {} checkpoints carries a signature, so nothing shows who wrote this log (written without [log] signing_key, or its signatures were all removed); pass --key to require them",
            r.unsigned_checkpoints
        ));
    } else if r.unsigned_checkpoints > 0 {
        out.push(format!(
            "unsigned: the first {} checkpoints carry no signature (written before a signing key was configured); the signed ones after them cover those records",
            r.unsigned_checkpoints
        ));
    }
    if r.unsigned_tail > 0 {
        let after = r
            .last_checkpoint
            .map_or("from the start".to_string(), |c| format!("after seq {c}"));
        out.push(format!(
            "open: {} records {after} are not signed yet (up to seq {})",
            r.unsigned_tail, r.last_seq
        ));
    }
    for rec in &r.recoveries {
        let torn = if rec.torn_bytes > 0 {
            format!(", {} bytes of a torn record cut off", rec.torn_bytes)
        } else {
            String::new()
        };
        let (file, line) = (rec.file.display(), rec.line);
        out.push(match rec.expected_seq {
            None => format!(
                "recovered: {file}:{line} after a crash: the log ended at seq {}{torn}",
                rec.last_seq
            ),
            // Verify fails the other cases (records lost or replaced).
            Some(e) => format!(
                "recovered: {file}:{line} while running: the file, reopened after a failed write, held {} records past seq {e}, the last the writer had written (a failed batch it could not cut off, or records added by someone else){torn}",
                rec.last_seq - e
            ),
        });
    }
    if r.heads > 0 {
        out.push(format!(
            "heads: {} recorded outside the log, each reached with its hash",
            r.heads
        ));
    }
    if r.disclosures > 0 {
        out.push(format!(
            "disclosures: {} records naming the subjects of a bulk object's batches, each under a consent_filtered decision of the chain",
            r.disclosures
        ));
    }
    if r.files > 1 {
        out.push(format!("files: {}", r.files));
    }
    out
}

/// The pseudonymiser that turns a subject's identifier into what the log holds, from the
/// log-signing key or the policy naming it (then also the policy's name); `why` says what
/// needs it when neither is given.
fn pseudonymizer(
    signing_key: Option<&std::path::Path>,
    policy: Option<&std::path::Path>,
    why: &str,
) -> Result<(Pseudonymizer, Option<String>), CliError> {
    if let Some(path) = signing_key {
        return Ok((
            Pseudonymizer::new(&SigningKey::load(path)?.pseudonym_key()),
            None,
        ));
    }
    if let Some(path) = policy {
        let policy = super::load_policy(path)?;
        let pseudo = match (&policy.log.signing_key, policy.log.pseudonymize) {
            (Some(k), true) => Pseudonymizer::new(&SigningKey::load(k)?.pseudonym_key()),
            _ => Pseudonymizer::Off,
        };
        return Ok((pseudo, Some(policy.name)));
    }
    Err(fail(format!(
        "{why}: pass --signing-key FILE (the policy's [log] signing_key) or --policy FILE"
    )))
}

fn times(
    since: &Option<String>,
    until: &Option<String>,
) -> Result<(Option<String>, Option<String>), CliError> {
    let now = jiff::Timestamp::now();
    let parse = |s: &Option<String>, flag: &str| {
        s.as_deref()
            .map(|s| parse_time(s, now).map_err(|e| fail(format!("--{flag}: {e}"))))
            .transpose()
    };
    Ok((parse(since, "since")?, parse(until, "until")?))
}

fn run_query(args: QueryArgs) -> CliResult {
    for r in &args.reason {
        if Reason::parse(r).is_none() {
            let known: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
            return Err(fail(format!(
                "--reason \"{r}\" is not a reason code (one of: {})",
                known.join(", ")
            )));
        }
    }
    let mut countries = Vec::new();
    for c in &args.country {
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(fail(format!(
                "--country \"{c}\" is not an ISO 3166-1 alpha-2 code (e.g. US)"
            )));
        }
        countries.push(c.to_ascii_uppercase());
    }
    let subjects = if args.subject.is_empty() {
        Vec::new()
    } else {
        let (p, _) = pseudonymizer(
            args.signing_key.as_deref(),
            args.policy.as_deref(),
            "--subject needs the log's key to pseudonymise the subject",
        )?;
        args.subject.iter().map(|s| p.pseudonym(s)).collect()
    };
    let mut traces = Vec::new();
    for t in &args.trace {
        // A whole header pasted from an application's log names its trace too.
        let id = match crate::audit::trace::TraceParent::parse(t.as_bytes()) {
            Some(header) => header.trace_id().to_string(),
            None => t.trim().to_ascii_lowercase(),
        };
        if !crate::audit::trace::is_trace_id(&id) {
            return Err(fail(format!(
                "--trace \"{t}\" is not a trace id (32 hex digits, not all zero)"
            )));
        }
        traces.push(id);
    }
    let (since, until) = times(&args.since, &args.until)?;
    let filter = Filter {
        kinds: args.kind.clone(),
        decisions: args.decision.clone(),
        reasons: args.reason.clone(),
        datasets: args.dataset.clone(),
        recipients: args.recipient.clone(),
        countries,
        subjects,
        ids: args.id.clone(),
        traces,
        enforced: args.enforced,
        since,
        until,
        bulk_outcomes: false,
        // A table shows a disclosure's recipient, dataset and destination.
        with_exchanges: args.format == OutputFormat::Table,
    };
    let format = match args.format {
        OutputFormat::Json => Format::Json,
        OutputFormat::Table => Format::Table,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let segments = args.store.segments(&args.path)?;
    let scanned = match query::query_segments(segments, &filter, format, args.limit, &mut out)
        .and_then(|s| out.flush().map(|()| s).map_err(QueryError::Output))
    {
        Ok(s) => s,
        // The reader went away (`| head`): not an error.
        Err(QueryError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(Exit::Ok);
        }
        Err(e) => return Err(e.into()),
    };
    if format == Format::Table {
        let _ = writeln!(
            out,
            "{} of {} records matched ({} file{}){}",
            scanned.matched,
            scanned.records,
            scanned.files,
            if scanned.files == 1 { "" } else { "s" },
            match args.limit {
                Some(l) if l < scanned.matched => format!("; the first {l} shown (--limit {l})"),
                _ => String::new(),
            }
        );
        let _ = out.flush();
    }
    warn_unread(&scanned);
    Ok(Exit::Ok)
}

/// How `audit verify` judges the log at `path` with `opts` (a local log, each chain of a
/// folder written by several workers, or every instance of a location): its lines, or why it
/// failed.
fn integrity(
    path: &std::path::Path,
    store: &StoreArgs,
    opts: &VerifyOptions,
) -> Result<Result<Vec<String>, String>, CliError> {
    let report = if let Some((rt, loc)) = store.open(path)? {
        let report = fleet::verify(&rt, &loc, opts)?;
        if report.instances.is_empty() {
            return Ok(Err(format!("{}: holds no shipped log files", loc.url)));
        }
        report
    } else {
        let mut chains = log_chains(path)?;
        if chains.len() > 1 {
            fleet::verify_local(path, chains, opts)?
        } else {
            let files = chains.pop().map(|c| c.files).unwrap_or_default();
            return Ok(match verify_files(&files, path, opts) {
                Ok(r) => Ok(describe(&r)),
                Err(VerifyError::Broken(b)) => Err(b.to_string()),
                Err(e @ VerifyError::Files(_)) => return Err(e.into()),
            });
        }
    };
    let lines = report.instances.iter().map(instance_line).collect();
    Ok(if report.ok() {
        Ok(lines)
    } else {
        Err(report
            .instances
            .iter()
            .filter(|i| i.result.is_err())
            .map(instance_line)
            .collect::<Vec<_>>()
            .join("\n"))
    })
}

/// Lines a query or report could not read: said on stderr, with where to look.
fn warn_unread(s: &Scanned) {
    if let Some((file, line, why)) = &s.first_bad {
        eprintln!(
            "warning: {} lines are not records and were skipped, the first at {}:{line} ({why}); run `audit verify`",
            s.bad,
            file.display()
        );
    }
    if s.incomplete > 0 {
        eprintln!("note: skipped a last line still being written");
    }
}

fn run_report(args: ReportArgs) -> CliResult {
    let (since, until) = times(&args.since, &args.until)?;
    let integrity = match args.format {
        // A log still being written passes as open.
        ReportFormat::Html => Some(integrity(
            &args.path,
            &args.store,
            &VerifyOptions {
                open: true,
                ..VerifyOptions::default()
            },
        )?),
        _ => None,
    };
    let segments = args.store.segments(&args.path)?;
    let charts = args.format == ReportFormat::Html;
    let (report, scanned) = report::report_segments(segments, since, until, charts)?;
    match args.format {
        ReportFormat::Html => print!(
            "{}",
            html::report_page(
                &report,
                &args.path.display().to_string(),
                integrity.as_ref().expect("computed for html"),
                args.top.max(1),
                &crate::audit::record::timestamp(jiff::Timestamp::now()),
            )
        ),
        ReportFormat::Text => print!("{}", report.text(args.top.max(1))),
        ReportFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialise to JSON")
        ),
    }
    warn_unread(&scanned);
    Ok(Exit::Ok)
}
