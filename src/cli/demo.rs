//! `demo`.

use super::CliResult;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

pub fn run(_args: DemoArgs) -> CliResult {
    Err(super::fail("not implemented yet"))
}
