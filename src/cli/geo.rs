//! `geo lookup`: where the proxy locates addresses, and by what.

use super::{CliResult, Exit};
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
}

pub fn run(cmd: GeoCommand) -> CliResult {
    match cmd {
        GeoCommand::Lookup { ips, policy } => lookup(&ips, &policy),
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
