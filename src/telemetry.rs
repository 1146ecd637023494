//! The proxy's own logs (not the decision log): `tracing` to standard error (or, for `demo`,
//! to a file), as text or one JSON object per line, filtered by `RUST_LOG` (default `info`).
//! Text is coloured only when it goes to a terminal and `NO_COLOR` is not set: a pipe, a file,
//! systemd's journal and `kubectl logs` get plain lines.

use std::ffi::OsStr;
use std::fs::File;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How the proxy's own logs are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, for people (coloured on a terminal).
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, …), for collectors.
    Json,
}

/// Sends the proxy's own logs to standard error.
pub fn init(format: LogFormat) {
    let colour = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    install(format, std::io::stderr, colour);
}

/// Sends the proxy's own logs to `path` (appended to, created if missing), never coloured:
/// `demo` keeps them out of the story it prints.
pub fn init_to_file(format: LogFormat, path: &Path) -> std::io::Result<()> {
    let file = File::options().create(true).append(true).open(path)?;
    install(format, Arc::new(file), false);
    Ok(())
}

/// Whether text goes out coloured: only to a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<impl AsRef<OsStr>>) -> bool {
    terminal && no_color.is_none_or(|v| v.as_ref().is_empty())
}

fn install<W>(format: LogFormat, writer: W, colour: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour)
        // A line that cannot be written (a full disk under a redirected stderr) is lost, as
        // nginx loses its error-log lines: reporting that with `eprintln!` would panic and
        // take the proxy down with it, decision log and all.
        .log_internal_errors(false);
    // A second initialisation (tests that run several commands in one process) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None::<&str>));
        assert!(colour(true, Some("")));
        assert!(!colour(true, Some("1")));
        assert!(!colour(false, None::<&str>));
        assert!(!colour(false, Some("")));
    }
}
