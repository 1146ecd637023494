//! `explain`.

use super::CliResult;

#[derive(clap::Args, Debug)]
pub struct ExplainArgs {}

pub fn run(_args: ExplainArgs) -> CliResult {
    Err(super::fail("not implemented yet"))
}
