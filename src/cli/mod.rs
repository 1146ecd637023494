//! The command line: one file per subcommand. Each returns an `Exit` (0 ok, 1 a check
//! failed) or a `CliError` (exit 2: bad usage or unreadable input).

pub mod audit;
pub mod bundle;
pub mod certs;
pub mod check;
pub mod consent;
pub mod demo;
pub mod explain;
pub mod geo;
pub mod serve;
pub mod test;

pub use crate::telemetry::LogFormat;
use clap::{Parser, Subcommand};

/// How a command ended when it did not fail outright.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok,
    /// A check ran and found a problem (exit 1).
    Failed,
}

/// A command that could not run: bad usage or unreadable input (exit 2). Holds any error;
/// deliberately not an `Error` itself so that `?` converts every error into it.
#[derive(Debug)]
pub struct CliError(pub Box<dyn std::error::Error + Send + Sync>);

impl<E: std::error::Error + Send + Sync + 'static> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(Box::new(e))
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A one-sentence usage or input error.
pub fn fail(msg: impl Into<String>) -> CliError {
    CliError(msg.into().into())
}

pub type CliResult = Result<Exit, CliError>;

#[derive(Parser, Debug)]
#[command(
    name = "residency-proxy",
    version,
    about = "A reverse proxy that keeps residency-bound data at home and lets it leave only with valid consent",
    long_about = "residency-proxy sits in front of storage endpoints (S3-compatible object stores, REST data APIs). \
It forwards a request for a residency-bound dataset only to upstream addresses located inside the dataset's home \
jurisdiction, refuses cross-border or third-party sharing without the data subject's valid, explicit consent, and \
writes every decision to a hash-chained log before a byte is forwarded.\n\nStart with `residency-proxy demo`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Format of the proxy's own logs (not the decision log), written to standard error (by
    /// `demo`, to proxy.log in its folder): text (coloured only on a terminal, and not with
    /// NO_COLOR set) or one JSON object per line for log collectors. RUST_LOG filters them
    /// (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy.
    Serve(serve::ServeArgs),
    /// Validate policy files; print every error with file, line and rule path.
    Check(check::CheckArgs),
    /// Decide one hypothetical request and print the decision with its trace.
    Explain(explain::ExplainArgs),
    /// Run policy test suites; print `N passed, N failed`.
    Test(test::TestArgs),
    /// Verify, query and report on decision logs.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Geolocation look-ups as the proxy sees them.
    #[command(subcommand)]
    Geo(geo::GeoCommand),
    /// Manage the consent registry (sqlite: or postgres:// stores): grant, revoke, list, import.
    #[command(subcommand)]
    Consent(consent::ConsentCommand),
    /// Create keys and certificates: a development CA, server and client certificates, the
    /// log-signing key pair and the admin token.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Start a self-contained demonstration on loopback and leave it running.
    Demo(demo::DemoArgs),
    /// Signed policy bundles for a fleet: build, verify, inspect.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
}

pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Check(a) => check::run(a),
        Command::Explain(a) => explain::run(a),
        Command::Test(a) => test::run(a),
        Command::Audit(a) => audit::run(a),
        Command::Geo(a) => geo::run(a),
        Command::Consent(a) => consent::run(a),
        Command::Certs(a) => certs::run(a),
        Command::Demo(a) => demo::run(a, cli.log_format),
        Command::Bundle(a) => bundle::run(a),
    }
}

pub use crate::proxy::snapshot::load_policy;
