//! `audit verify|query|report`: offline tools for security teams.

use super::{CliResult, Exit};
use crate::audit::verify::{VerifyError, verify_log};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain of a log file or folder; print the first broken record or
    /// `ok: N records, M checkpoints`.
    Verify {
        /// A log file, or a folder of rotated log files.
        path: PathBuf,
    },
}

pub fn run(cmd: AuditCommand) -> CliResult {
    match cmd {
        AuditCommand::Verify { path } => match verify_log(&path) {
            Ok(report) => {
                println!(
                    "ok: {} records, {} checkpoints",
                    report.records, report.checkpoints
                );
                Ok(Exit::Ok)
            }
            Err(VerifyError::Broken(broken)) => {
                eprintln!("{broken}");
                Ok(Exit::Failed)
            }
            Err(e @ VerifyError::Read { .. }) => Err(e.into()),
        },
    }
}
