//! The `residency-proxy` command: parse the command line, start telemetry, dispatch.

use clap::Parser;
use residency_proxy::cli::{self, Cli, Command, Exit};
use std::any::Any;
use std::io::{ErrorKind, Write};
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let cli = Cli::parse();
        // `demo` starts its own logs once it knows its folder: they go to a file there, out of
        // the story it prints.
        if !matches!(cli.command, Command::Demo(_)) {
            residency_proxy::telemetry::init(cli.log_format);
        }
        // One crypto provider for every TLS configuration in the process: aws-lc-rs.
        residency_proxy::tls::install_provider();
        cli::run(cli)
    }));
    let result = match ran {
        Ok(result) => result,
        // The reader of the output went away (`explain … | head -1`): nobody is left to read
        // anything, so the command ends quietly, as a command ending its output early would.
        Err(payload) if is_closed_pipe_panic(&*payload) => return ExitCode::SUCCESS,
        Err(payload) => std::panic::resume_unwind(payload),
    };
    match result {
        Ok(Exit::Ok) => ExitCode::SUCCESS,
        Ok(Exit::Failed) => ExitCode::from(1),
        Err(e) if is_closed_pipe_error(&*e.0) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: its panic would come after the catch above.
            let _ = writeln!(std::io::stderr(), "error: {:#}", anyhow::anyhow!("{e}"));
            ExitCode::from(2)
        }
    }
}

/// Rust ignores SIGPIPE, so a write to a closed pipe fails with `BrokenPipe`, and `println!`
/// panics on it (with a backtrace hint and exit 101). Every command prints with `println!`:
/// rather than handle the error at each of them, the panic's message is kept quiet here, and
/// `main` catches the panic and exits 0. Any other panic is reported as before.
fn quiet_on_closed_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_closed_pipe_panic(info.payload()) {
            report(info);
        }
    }));
}

/// The panic of `print!`/`println!`/`eprintln!` writing to a pipe whose reader has gone
/// (its message is the only thing that tells it apart).
fn is_closed_pipe_panic(payload: &(dyn Any + Send)) -> bool {
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    // `failed printing to stdout: Broken pipe (os error 32)`
    message.starts_with("failed printing to std")
        && message.to_ascii_lowercase().contains("broken pipe")
}

/// A command that writes its output with `write!` returns the pipe's error instead of
/// panicking. Commands meet no other pipe than their standard streams (their network errors
/// come wrapped in their own types), so a bare `BrokenPipe` is the reader going away.
fn is_closed_pipe_error(e: &(dyn std::error::Error + 'static)) -> bool {
    match e.downcast_ref::<std::io::Error>() {
        Some(io) => io.kind() == ErrorKind::BrokenPipe,
        None => {
            e.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == Some(ErrorKind::BrokenPipe)
        }
    }
}
