//! `check FILE...`: validate policies like `nginx -t` / `opa check`.

use super::{CliResult, Exit, load_policy};
use crate::policy::PolicyError;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Policy files to validate.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(args: CheckArgs) -> CliResult {
    let mut failed = false;
    for f in &args.files {
        match load_policy(f) {
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
            Err(e @ PolicyError::Read { .. }) => return Err(e.into()),
        }
    }
    Ok(if failed { Exit::Failed } else { Exit::Ok })
}
