//! `check FILE...`: validate policies like `nginx -t` / `opa check`.

use super::{CliResult, Exit, load_policy};
use crate::policy::PolicyError;
use crate::proxy::shipping::LocateError;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(
    // The subcommand's doc comment in `cli/mod.rs` sets `about` and `long_about`; the
    // details go after the options.
    after_long_help = "Validates policy files without starting anything, like `nginx -t` or \
`opa check`. A policy whose decision log ships ([log.ship]) also has its store's host resolved \
and located, as `serve` does at start-up: a store outside the home jurisdiction is an error. Each FILE is loaded with the files it includes (`include = [\"other.toml\"]`, \
relative to the including file) and compiled exactly as `serve` would compile it; every error \
is reported, not only the first.\n\n\
Each error goes to standard error as\n\
\n    FILE:LINE: RULE: MESSAGE\n\n\
where FILE is the file that holds the mistake (an included file is named itself), LINE its \
line, and RULE the rule's path (e.g. datasets.payments.upstream); then a count per policy. \
A valid policy gets one line on standard output: its name, its counts and its hash.\n\n\
Exit status:\n  0  every policy is valid\n  1  a policy has an error\n  \
2  bad usage, or a file (or a file it includes) cannot be read"
)]
pub struct CheckArgs {
    /// Policy files to validate.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Where the log would ship must be inside home, as `serve` checks at start-up: the store's
/// host is resolved and located with the policy's overrides and geolocation database.
fn check_ship_store(policy: &crate::policy::Policy) -> Result<(), String> {
    let Some(ship) = &policy.log.ship else {
        return Ok(());
    };
    let db = match &policy.geo_database {
        Some(path) => Some(std::sync::Arc::new(
            crate::geo::GeoDb::open(path).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let locator = crate::geo::Locator::new(policy, db);
    let loc = crate::proxy::shipping::open_store(ship)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match rt.block_on(crate::proxy::shipping::locate_store(policy, &loc, &locator)) {
        Ok(_) => Ok(()),
        Err(LocateError::Refused(why)) => Err(why),
        // This machine may not see the store's DNS; `serve` checks again where it runs.
        Err(LocateError::Resolve(why)) => {
            eprintln!("warning: log.ship: {why}; serve locates it before anything ships");
            Ok(())
        }
    }
}

pub fn run(args: CheckArgs) -> CliResult {
    let mut failed = false;
    // An unreadable file does not stop the others being checked; it makes the run exit 2.
    let mut unreadable: Option<PolicyError> = None;
    for f in &args.files {
        match load_policy(f) {
            Ok(p) if let Err(why) = check_ship_store(&p) => {
                failed = true;
                eprintln!("{}: log.ship: {why}", f.display());
                eprintln!("{}: 1 error(s)", f.display());
            }
            Ok(p) => println!(
                "{}: ok: policy \"{}\" ({} datasets, {} upstreams, {} recipients) {}",
                f.display(),
                p.name,
                p.datasets.len(),
                p.upstreams.len(),
                p.recipients.len(),
                p.hash
            ),
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
