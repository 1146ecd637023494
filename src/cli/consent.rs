//! `consent grant|revoke|list|import`: manage the consent registry directly, against a
//! `sqlite:PATH` or `postgres://…` store, while proxies using it run.

use super::{CliResult, Exit, fail};
use crate::consent::ConsentRecord;
use crate::consent::change::{Change, Filter, Outcome, Revocation};
use crate::consent::import::Input;
use crate::consent::registry::{Registry, RegistryError};
use crate::consent::sqlite::SqliteError;
use crate::policy::compile::parse_store;
use jiff::Timestamp;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Subcommand, Debug)]
pub enum ConsentCommand {
    /// Record a consent. Prints the record as JSON.
    Grant(GrantArgs),
    /// Record that a consent was revoked (the grant is kept). Prints the record as JSON.
    Revoke(RevokeArgs),
    /// Print consents as JSON lines: their current state, or every grant and revocation.
    List(ListArgs),
    /// Record the consents of a JSON lines file as the file: store reads it (each id's last
    /// line is its state); running it again changes nothing. Exits 1 if a line was refused.
    Import(ImportArgs),
}

#[derive(clap::Args, Debug)]
pub struct Store {
    /// The registry: sqlite:PATH (created by the first grant or import) or postgres://…
    #[arg(long, value_name = "URL", env = "RESIDENCY_CONSENT_STORE")]
    pub store: String,
}

#[derive(clap::Args, Debug)]
pub struct Author {
    /// Who records the change, kept in the registry's history (default: cli:$USER).
    #[arg(long, value_name = "NAME")]
    pub by: Option<String>,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  residency-proxy consent grant --store sqlite:data/consent.db \
--subject u123 --recipient credit-bureau-us --purpose credit_scoring --category user.financial \
--destination US --method explicit --expires-at 2027-11-01T00:00:00Z --evidence 'receipt 7f3a'"
)]
pub struct GrantArgs {
    #[command(flatten)]
    pub store: Store,
    /// The data subject.
    #[arg(long)]
    pub subject: String,
    /// The one recipient the subject consented to (no wildcards).
    #[arg(long)]
    pub recipient: String,
    /// Purposes consented to (repeat, or give several).
    #[arg(long = "purpose", value_name = "PURPOSE", required = true, num_args = 1..)]
    pub purposes: Vec<String>,
    /// Data categories (a parent covers its children).
    #[arg(long = "category", value_name = "CATEGORY", required = true, num_args = 1..)]
    pub categories: Vec<String>,
    /// Destination countries or jurisdictions.
    #[arg(long = "destination", value_name = "DESTINATION", required = true, num_args = 1..)]
    pub destinations: Vec<String>,
    /// How the consent was collected: explicit, pre_ticked, implied, bundled, opt_out.
    #[arg(long)]
    pub method: String,
    /// When the consent was given (RFC 3339; default: now, or the recorded time if --id is
    /// already recorded).
    #[arg(long, value_name = "TIME")]
    pub granted_at: Option<Timestamp>,
    /// When it lapses (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub expires_at: Timestamp,
    /// Free text or a URI to the signed consent receipt.
    #[arg(long)]
    pub evidence: Option<String>,
    /// The consent's id (default: a new one).
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub author: Author,
}

#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub store: Store,
    /// The consent to revoke.
    pub id: String,
    /// When it was revoked (RFC 3339; default: now).
    #[arg(long, value_name = "TIME")]
    pub revoked_at: Option<Timestamp>,
    /// Free text or a URI to the record of the withdrawal.
    #[arg(long)]
    pub evidence: Option<String>,
    #[command(flatten)]
    pub author: Author,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: Store,
    /// Only this data subject's consents.
    #[arg(long)]
    pub subject: Option<String>,
    /// Every grant and revocation (who, when, evidence) in the order recorded, instead of
    /// current states.
    #[arg(long)]
    pub history: bool,
    /// Output format: JSON lines, one record (or event) per line, each of which `consent
    /// import` and `POST /v1/consents` accept back as it is (a grant event's `record`).
    #[arg(long, value_enum, default_value_t = ListFormat::Json)]
    pub format: ListFormat,
}

/// How `consent list` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListFormat {
    /// JSON lines.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub store: Store,
    /// JSON lines, one consent record each ("-": standard input). Each id's last line is its
    /// state: a later line with revoked_at set records its revocation, and a malformed last
    /// line withdraws the consent (revokes it if the registry holds it).
    pub file: PathBuf,
    #[command(flatten)]
    pub author: Author,
}

pub fn run(cmd: ConsentCommand) -> CliResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            ConsentCommand::Grant(a) => grant(a).await,
            ConsentCommand::Revoke(a) => revoke(a).await,
            ConsentCommand::List(a) => list(a).await,
            ConsentCommand::Import(a) => import(a).await,
        }
    })
}

/// Opens the registry; `create`: a missing SQLite file is created (writes), else refused
/// (reads and revocations, where a new empty file would only hide a mistyped path).
async fn open(store: &Store, create: bool) -> Result<Registry, super::CliError> {
    let parsed = parse_store(&store.store).map_err(fail)?;
    Registry::open(&parsed, create).await.map_err(|e| match e {
        RegistryError::Sqlite(missing @ SqliteError::Missing { .. }) => fail(format!(
            "{missing}: `consent grant` or `consent import` creates it; check the path"
        )),
        e => e.into(),
    })
}

fn author(a: &Author) -> String {
    a.by.clone().unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    })
}

fn print_json(value: &impl serde::Serialize) -> Result<(), super::CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

async fn grant(a: GrantArgs) -> CliResult {
    let registry = open(&a.store, true).await?;
    let now = Timestamp::now();
    let record = ConsentRecord {
        id: a
            .id
            .clone()
            .unwrap_or_else(|| format!("c-{}", crate::audit::id::new_id(now))),
        subject: a.subject,
        recipient: a.recipient,
        purposes: a.purposes,
        categories: a.categories,
        destinations: a.destinations,
        method: a.method,
        granted_at: a.granted_at.unwrap_or(now),
        expires_at: a.expires_at,
        revoked_at: None,
        evidence: a.evidence,
    };
    // The field at fault, named as the command line names it.
    record.validate().map_err(|e| {
        let flag = match e.field {
            "purposes" => "purpose".to_string(),
            "categories" => "category".to_string(),
            "destinations" => "destination".to_string(),
            other => other.replace('_', "-"),
        };
        fail(format!("--{flag}: {}", e.message))
    })?;
    // Without --granted-at, the time of an id already recorded stands: running the same
    // command again finds the first run's grant.
    let grant = match a.granted_at {
        Some(_) => Change::Record(record),
        None => Change::Undated(record),
    };
    let w = registry.grant(grant, &author(&a.author)).await??;
    if w.outcome == Outcome::Unchanged {
        eprintln!("consent {} was already recorded exactly so", w.record.id);
    }
    print_json(&w.record)?;
    Ok(Exit::Ok)
}

async fn revoke(a: RevokeArgs) -> CliResult {
    let registry = open(&a.store, false).await?;
    let w = registry
        .revoke(
            Revocation {
                consent_id: a.id,
                revoked_at: a.revoked_at.unwrap_or_else(Timestamp::now),
                evidence: a.evidence,
            },
            &author(&a.author),
        )
        .await??;
    if w.outcome == Outcome::Unchanged {
        eprintln!("consent {} was already revoked", w.record.id);
    }
    print_json(&w.record)?;
    Ok(Exit::Ok)
}

async fn list(a: ListArgs) -> CliResult {
    let registry = open(&a.store, false).await?;
    let filter = match &a.subject {
        Some(s) => Filter::Subject(s),
        None => Filter::All,
    };
    if a.history {
        for e in registry.history(filter).await? {
            print_json(&e)?;
        }
    } else {
        for r in registry.list(filter).await? {
            print_json(&r)?;
        }
    }
    Ok(Exit::Ok)
}

async fn import(a: ImportArgs) -> CliResult {
    let registry = open(&a.store, true).await?;
    let by = author(&a.author);
    let file = a.file.clone();
    let name = file.display().to_string();
    // The file is read as the file store reads it (the latest word on an id stands, whatever
    // an earlier line said) and streamed to the registry: memory does not grow with it.
    let input = tokio::task::spawn_blocking(move || Input::open(&file))
        .await
        .map_err(|e| fail(format!("reading {name} failed: {e}")))?
        .map_err(|e| fail(format!("cannot read {name}: {e}")))?;
    let shown = name.clone();
    let refused = Box::new(move |line: usize, why: &str| {
        eprintln!("{shown}:{line}: refused: {why}");
    });
    let counts = registry
        .import_file(Arc::new(input), &by, refused)
        .await
        .map_err(|e| match e {
            RegistryError::Input(e) => fail(format!("cannot read {name}: {e}")),
            e => e.into(),
        })?;
    println!(
        "{name}: {} granted, {} revoked, {} unchanged, {} superseded, {} refused",
        counts.granted, counts.revoked, counts.unchanged, counts.superseded, counts.refused
    );
    Ok(if counts.refused == 0 {
        Exit::Ok
    } else {
        Exit::Failed
    })
}
