//! `serve`.

use super::CliResult;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs) -> CliResult {
    Err(super::fail("not implemented yet"))
}
