//! The `residency-proxy` command: parse the command line, start telemetry, dispatch.

use clap::Parser;
use residency_proxy::cli::{self, Cli, Exit};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    residency_proxy::telemetry::init(cli.log_format);
    // One crypto provider for every TLS configuration in the process: aws-lc-rs.
    residency_proxy::tls::install_provider();
    match cli::run(cli).map_err(|e| anyhow::anyhow!("{e}")) {
        Ok(Exit::Ok) => ExitCode::SUCCESS,
        Ok(Exit::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
