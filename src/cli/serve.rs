//! `serve`: run the proxy until SIGTERM or SIGINT; SIGHUP reloads the policy, SIGUSR1 rotates
//! the decision log (every worker's chain).

use super::{CliResult, Exit, fail};
use crate::policy::model::LogTarget;
use crate::proxy::ServeConfig;
use crate::proxy::snapshot::Overrides;
use crate::proxy::worker::MAX_WORKERS;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Reloads: SIGHUP, or a change to the policy file, one of its includes, the geolocation database or the \
admin token file (examined every second), reloads the policy and the TLS certificates; an invalid version is rejected with every error and \
the old one keeps serving. Certificate files are also re-read within a second of being replaced.\n\
Policy bundles: a file with [policy.source] is a sidecar's own file; its rules come from the signed bundle \
there. Until one is live (the bundle kept on the volume, or the first one fetched) the data port stays closed and \
GET /readyz answers 503 saying why; each newer bundle that verifies and compiles is swapped in on every worker as \
a reload is, and one refused is logged and counted while the live revision keeps serving.\n\
Workers: each worker is a thread with its own listener on the listen address (SO_REUSEPORT: the kernel spreads \
connections between them), its own upstream connection pools and its own decision-log chain. Worker 0 writes the \
configured file (decisions.jsonl) as instance [log].instance; worker K writes decisions.wK.jsonl beside it as \
instance <instance>-wK. One worker writes exactly one chain, as before; a log folder written by one worker is \
continued by worker 0.\n\
Signals: SIGUSR1 rotates the decision log (every worker's active file is closed with a signed checkpoint and renamed \
<name>-<first seq>-<UTC time>.jsonl); SIGTERM or SIGINT stop accepting, finish in-flight requests within \
proxy.drain_timeout, write every chain's final checkpoint and exit 0.\n\
Admin listener ([admin].listen, never the data port): GET /healthz, GET /readyz, GET /metrics (OpenMetrics text for \
Prometheus), GET /v1/policy. With the bearer token of [admin].token_file (reads included; without a token_file these \
routes answer 401): GET /v1/consents?subject=S[&history=true], POST /v1/consents (grant), GET /v1/consents/ID, \
POST /v1/consents/ID/revoke, and POST /v1/log/rotate (rotates every chain of the decision log as SIGUSR1 does)."
)]
pub struct ServeArgs {
    /// The policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// Listen address, overriding [proxy].listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Admin listen address, overriding [admin].listen.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Decision log path ("-" for standard output), overriding [log].path.
    #[arg(long, value_name = "PATH")]
    pub log: Option<String>,
    /// Workers: threads that each accept, decide, log and forward their own connections on
    /// the shared listen address, each writing its own decision-log chain (default:
    /// [proxy].workers, else one per available core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=MAX_WORKERS as i64))]
    pub workers: Option<u16>,
}

pub fn run(args: ServeArgs) -> CliResult {
    let overrides = Overrides {
        listen: args.listen,
        admin: args.admin,
        log: args.log.map(|l| {
            if l == "-" {
                LogTarget::Stdout
            } else {
                LogTarget::File(l.into())
            }
        }),
        workers: args.workers.map(usize::from),
    };
    // Read the policy once up front: its errors are reported before anything starts. A
    // sidecar's own file (with [policy.source]) is compiled alone here, and with its bundle
    // once one is live.
    crate::policy::compile::load_file(&args.policy, |p| std::fs::read_to_string(p))?;
    // This thread's runtime is the control runtime: the admin listener, the consent feeds,
    // reloads, shipping and signals. The workers serve requests on threads of their own,
    // each with its own runtime (`proxy::worker`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Installed before start-up, which can take seconds (a database, resolving upstreams):
        // a SIGHUP meanwhile must not kill the process, and a SIGTERM must still end with the
        // log closed. Both are acted on once serving.
        let mut signals =
            Signals::install().map_err(|e| fail(format!("cannot install signal handlers: {e}")))?;
        // A sidecar waiting for its first policy bundle (its source unreachable, none kept)
        // still stops on SIGTERM or SIGINT; nothing is open yet but the admin listener.
        let config = ServeConfig {
            policy_path: args.policy.clone(),
            overrides,
        };
        let Some(running) = crate::admin::start_unless(config, signals.stopped()).await? else {
            tracing::info!("stopped before a policy bundle was live");
            return Ok(Exit::Ok);
        };
        signals.wait(&running).await;
        tracing::info!("shutting down: draining connections and flushing the decision log");
        running.shutdown().await;
        Ok(Exit::Ok)
    })
}

/// The signals `serve` (and `demo`) act on, installed once: while they are, none of them
/// ends the process unannounced.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    /// Resolves on SIGTERM or SIGINT (while start-up waits).
    pub(super) async fn stopped(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// Serves signals until SIGTERM or SIGINT. A signal that arrives while no call is
    /// waiting is seen by the next one.
    pub(super) async fn wait(&mut self, running: &crate::admin::Sidecar) {
        let Signals {
            term,
            int,
            hup,
            usr1,
        } = self;
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                // A rejection is logged, counted and shown in /v1/policy by the reloader.
                _ = hup.recv() => {
                    let _ = running.reload().await;
                }
                _ = usr1.recv() => {
                    for rotated in running.rotate_logs().await {
                        match rotated {
                            Ok(Some(to)) => tracing::info!(log.rotated = %to.display(), "decision log rotated on SIGUSR1"),
                            Ok(None) => tracing::info!("SIGUSR1: nothing to rotate (the decision log file is empty, or standard output)"),
                            Err(e) => tracing::error!(error = %e, "decision log rotation on SIGUSR1 failed"),
                        }
                    }
                }
            }
        }
    }
}
