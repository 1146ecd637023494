//! The `residency-proxy` command: parse the command line, start telemetry, dispatch.

use clap::Parser;
use residency_proxy::cli::{self, Cli, Exit};
use std::process::ExitCode;

// Every request allocates (headers, records, buffers): mimalloc's thread-local free lists cost
// a fraction of the system allocator's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
