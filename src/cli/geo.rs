//! `geo lookup`: where the proxy locates addresses, and by what. `geo update`: keep the
//! database current.

use super::{CliResult, Exit, fail};
use crate::geo::download::Credentials;
use crate::geo::update::{self, Previous, Source, Update, Updated};
use crate::geo::{GeoDb, Locator};
use crate::policy::Policy;
use crate::policy::decision::Location;
use crate::policy::model::UnknownLocation;
use clap::Subcommand;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub enum GeoCommand {
    /// Print the country of each address, its source (override or database, with the
    /// database's build date) and the policy's jurisdictions that contain it.
    Lookup {
        #[arg(required = true)]
        ips: Vec<IpAddr>,
        #[arg(long)]
        policy: PathBuf,
    },
    /// Fetch a new MaxMind-format database and replace the file at --out with it, as
    /// geoipupdate does: only once it opens as a Country or City database, reads whole, and is
    /// built no earlier than the file it replaces. It is written beside the file, synced and
    /// renamed over it, so that a running proxy (which reloads a replaced database by itself)
    /// never reads a part. Exit 1, with the file untouched, when the new database is refused.
    #[command(after_help = UPDATE_EXAMPLES)]
    Update(UpdateArgs),
}

const UPDATE_EXAMPLES: &str = "\
Sources:
  DB-IP Lite (free, CC BY 4.0), monthly:
    --source https://download.db-ip.com/free/dbip-country-lite-2026-11.mmdb.gz
  GeoLite2 (free account; the account id and licence key from MaxMind's site):
    --source 'https://download.maxmind.com/geoip/databases/GeoLite2-Country/download?suffix=tar.gz'
    with GEOIPUPDATE_ACCOUNT_ID and GEOIPUPDATE_LICENSE_KEY set (or the flags)
  A file already downloaded: --source geo/new.mmdb (or .mmdb.gz, .tar.gz)";

#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// An http(s) URL, or a file (`file:PATH` or a path): a .mmdb, gzipped (.mmdb.gz), or a
    /// tar archive holding one .mmdb (.tar.gz), recognised by content.
    #[arg(long, value_name = "URL|FILE")]
    source: String,
    /// The database file to replace: the policy's [geo] database. Created if absent.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// MaxMind account id, sent with the licence key as HTTP basic authentication to the
    /// source's host (not to where it redirects).
    #[arg(
        long,
        value_name = "ID",
        env = "GEOIPUPDATE_ACCOUNT_ID",
        requires = "license_key"
    )]
    account_id: Option<String>,
    /// MaxMind licence key (better from the environment than on a command line that `ps`
    /// shows).
    #[arg(
        long,
        value_name = "KEY",
        env = "GEOIPUPDATE_LICENSE_KEY",
        hide_env_values = true,
        requires = "account_id"
    )]
    license_key: Option<String>,
}

pub fn run(cmd: GeoCommand) -> CliResult {
    match cmd {
        GeoCommand::Lookup { ips, policy } => lookup(&ips, &policy),
        GeoCommand::Update(args) => update(args),
    }
}

/// Prints one line saying what is now at `--out`; a refusal is one sentence on standard error
/// and exit 1.
fn update(args: UpdateArgs) -> CliResult {
    let source = Source::parse(&args.source).map_err(fail)?;
    let credentials = match (args.account_id, args.license_key) {
        (Some(user), Some(password)) => Some(Credentials { user, password }),
        _ => None,
    };
    let u = Update {
        source,
        out: args.out,
        credentials,
    };
    let out = u.out.display();
    match update::run(&u) {
        Ok(Updated::Replaced {
            new,
            coverage,
            previous,
            wrapping,
        }) => {
            let was = match previous {
                Previous::Absent => "new file".to_string(),
                Previous::Unusable(why) => format!("was a file that {why}"),
                Previous::Database(old) => format!("was {}", old.label),
            };
            let from = if wrapping.is_empty() {
                u.source.to_string()
            } else {
                format!("{} ({})", u.source, wrapping.join(", "))
            };
            println!(
                "{out}: updated to {} ({was}); {} networks, {} located; from {from}",
                new.label, coverage.networks, coverage.located
            );
            Ok(Exit::Ok)
        }
        Ok(Updated::Unchanged(current)) => {
            println!("{out}: already {}, unchanged", current.label);
            Ok(Exit::Ok)
        }
        Err(e) if e.is_refusal() => {
            eprintln!("geo update: {e}");
            Ok(Exit::Failed)
        }
        Err(e) => Err(e.into()),
    }
}

/// Locates each address with exactly the `Locator` that `serve` builds from this policy.
fn lookup(ips: &[IpAddr], policy_path: &Path) -> CliResult {
    let policy = super::load_policy(policy_path)?;
    let db = match &policy.geo_database {
        Some(path) => Some(Arc::new(GeoDb::open(path)?)),
        None => None,
    };
    let locator = Locator::new(&policy, db);
    let rows: Vec<[String; 5]> = ips.iter().map(|ip| row(&policy, &locator, *ip)).collect();
    let mut out = std::io::stdout().lock();
    for line in aligned(&rows) {
        writeln!(out, "{line}")?;
    }
    Ok(Exit::Ok)
}

/// Address, country, source, jurisdictions, and whether it is at home.
fn row(policy: &Policy, locator: &Locator, ip: IpAddr) -> [String; 5] {
    let location = locator.locate(ip);
    let country = location.country();
    let source = match &location {
        Location::Override { network, .. } => {
            let n = &policy.networks[*network];
            format!("override {} ({})", n.name, n.cidr)
        }
        Location::Database { .. } => match locator.database() {
            Some(db) => format!("database ({})", db.label()),
            None => "database".to_string(),
        },
        Location::Unknown if locator.database().is_none() => "none (no [geo] database)".into(),
        Location::Unknown => "none".to_string(),
    };
    let jurisdictions = match country {
        Some(c) => {
            let mut names = vec![c.as_str().to_string()];
            names.extend(
                policy
                    .jurisdictions
                    .named
                    .iter()
                    .filter(|(name, set)| set.contains(c) && name.as_str() != c.as_str())
                    .map(|(name, _)| name.clone()),
            );
            names.join(", ")
        }
        None => "-".to_string(),
    };
    let home = match country {
        Some(c) if policy.home.countries.contains(c) => "inside".to_string(),
        Some(_) => "outside".to_string(),
        None => match policy.unknown_location {
            UnknownLocation::Deny => "unknown (unknown_location = \"deny\")".to_string(),
            UnknownLocation::Foreign => "unknown, treated as outside".to_string(),
        },
    };
    [
        ip.to_string(),
        country.map_or_else(|| "unknown".to_string(), |c| c.to_string()),
        source,
        format!("jurisdictions: {jurisdictions}"),
        format!("home {}: {home}", policy.home.name),
    ]
}

/// Pads every column but the last to its widest cell, two spaces apart.
fn aligned(rows: &[[String; 5]]) -> Vec<String> {
    let mut widths = [0usize; 5];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (i, cell) in r.iter().enumerate() {
                if i + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            line
        })
        .collect()
}
