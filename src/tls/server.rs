//! TLS on the data listener: the rustls server configuration (ALPN `h2` and `http/1.1`,
//! client certificates required and verified when `client_ca` is set), the handshake with
//! its timeout, refusal accounting, and reload when the files change or on `SIGHUP`.
//!
//! The configuration sits behind an `ArcSwap`: each handshake loads it once, a reload builds
//! a whole new one off the accept path and swaps it in, and connections already open keep
//! the session they negotiated. A pair that fails to load is refused and the old one stays.

use super::{TlsError, add_roots, identity_of, provider, read_certs, read_key};
use crate::policy::model::TlsSettings;
use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Builds the listener's configuration from the files `settings` names.
pub fn build_config(settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let chain = read_certs("tls.cert", &settings.cert)?;
    let key = read_key("tls.key", &settings.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports the default protocol versions");
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            add_roots(&mut roots, "tls.client_ca", ca)?;
            // Client authentication is mandatory: no certificate, no connection.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Pair {
            cert: settings.cert.clone(),
            key: settings.key.clone(),
            source,
        })?;
    config.alpn_protocols = super::ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Why a client's handshake was refused, for the connection event and its counter.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client did not finish within `proxy.handshake_timeout`.
    Timeout,
    /// mTLS is required and the client presented no certificate.
    NoCertificate,
    /// The client's certificate does not chain to `client_ca`.
    UnknownIssuer,
    /// The client's certificate has expired (or is not valid yet).
    Expired,
    /// Any other certificate problem (bad signature, wrong usage, revoked…).
    BadCertificate,
    /// Anything else: not TLS, no shared protocol or cipher suite, an alert, a reset.
    Protocol,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Timeout => "handshake_timeout",
            Refusal::NoCertificate => "no_client_certificate",
            Refusal::UnknownIssuer => "unknown_issuer",
            Refusal::Expired => "certificate_expired",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Protocol => "protocol_error",
        }
    }

    fn of(e: &std::io::Error) -> Refusal {
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Refusal::Protocol;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Refusal::NoCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Refusal::UnknownIssuer,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Refusal::Expired,
                _ => Refusal::BadCertificate,
            },
            _ => Refusal::Protocol,
        }
    }
}

/// Handshake and reload counters (the admin listener's metrics read them).
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes: AtomicU64,
    pub refused: AtomicU64,
    pub refused_no_certificate: AtomicU64,
    pub refused_unknown_issuer: AtomicU64,
    pub refused_expired: AtomicU64,
    pub refused_timeout: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl TlsStats {
    fn count(&self, r: Refusal) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let per = match r {
            Refusal::NoCertificate => &self.refused_no_certificate,
            Refusal::UnknownIssuer => &self.refused_unknown_issuer,
            Refusal::Expired => &self.refused_expired,
            Refusal::Timeout => &self.refused_timeout,
            Refusal::BadCertificate | Refusal::Protocol => return,
        };
        per.fetch_add(1, Ordering::Relaxed);
    }
}

/// What identifies one file on disk: a replaced file (new inode) or a rewritten one (new
/// length or mtime) differs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    len: u64,
}

/// The stamps of the certificate, key and client CA files (`None`: missing).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Vec<Option<FileStamp>>);

impl Stamp {
    fn paths(s: &TlsSettings) -> Vec<&Path> {
        let mut v = vec![s.cert.as_path(), s.key.as_path()];
        v.extend(s.client_ca.as_deref());
        v
    }

    fn of_meta(metas: impl Iterator<Item = Option<std::fs::Metadata>>) -> Stamp {
        Stamp(
            metas
                .map(|m| {
                    m.map(|m| FileStamp {
                        dev: m.dev(),
                        ino: m.ino(),
                        mtime: (m.mtime(), m.mtime_nsec()),
                        len: m.len(),
                    })
                })
                .collect(),
        )
    }

    fn read(s: &TlsSettings) -> Stamp {
        Stamp::of_meta(
            Stamp::paths(s)
                .into_iter()
                .map(|p| std::fs::metadata(p).ok()),
        )
    }

    async fn read_async(s: &TlsSettings) -> Stamp {
        let mut metas = Vec::new();
        for p in Stamp::paths(s) {
            metas.push(tokio::fs::metadata(p).await.ok());
        }
        Stamp::of_meta(metas.into_iter())
    }
}

struct Source {
    settings: TlsSettings,
    /// The files as last loaded or last refused: a refused version is not retried until
    /// the files change again.
    stamp: Stamp,
}

/// The data listener's TLS: the configuration in force, where it comes from, and counters.
pub struct ServerTls {
    current: ArcSwap<ServerConfig>,
    /// Only the watcher and `reload` take it, never a connection.
    source: Mutex<Source>,
    pub stats: TlsStats,
}

/// A client that completed the handshake.
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    /// The verified client certificate's identity (mTLS), if it carries one.
    pub identity: Option<Arc<str>>,
}

impl ServerTls {
    /// Loads the files `settings` names; fails with the first problem found.
    pub fn load(settings: &TlsSettings) -> Result<ServerTls, TlsError> {
        let stamp = Stamp::read(settings);
        let config = build_config(settings)?;
        Ok(ServerTls {
            current: ArcSwap::from_pointee(config),
            source: Mutex::new(Source {
                settings: settings.clone(),
                stamp,
            }),
            stats: TlsStats::default(),
        })
    }

    /// The configuration the next handshake uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files (those `settings` names from now on) and swaps the new
    /// configuration in. On error nothing changes and the error is returned.
    pub fn reload(&self, settings: &TlsSettings) -> Result<(), TlsError> {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = Stamp::read(settings);
        let built = build_config(settings);
        source.settings = settings.clone();
        source.stamp = stamp;
        match built {
            Ok(config) => {
                self.current.store(Arc::new(config));
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(tls.cert = %settings.cert.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Polls the files every `every` and reloads when one of them changes (replaced,
    /// rewritten or removed). A broken version is logged once and the old one keeps
    /// serving until the files change again.
    pub fn watch(self: Arc<Self>, every: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (settings, seen) = {
                    let s = self.source.lock().unwrap_or_else(|p| p.into_inner());
                    (s.settings.clone(), s.stamp.clone())
                };
                if Stamp::read_async(&settings).await == seen {
                    continue;
                }
                let me = self.clone();
                let result = tokio::task::spawn_blocking(move || me.reload(&settings)).await;
                if let Ok(Err(e)) = result {
                    tracing::error!(error = %e, "TLS certificate reload rejected; the previous certificate keeps serving");
                }
            }
        })
    }

    /// Runs the server side of the handshake within `timeout`. A refusal is counted and
    /// logged as a connection event with its reason, and yields `None`.
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Option<Accepted> {
        let acceptor = TlsAcceptor::from(self.config());
        let refusal = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(identity_of)
                    .map(Arc::from);
                return Some(Accepted { stream, identity });
            }
            Ok(Err(e)) => (Refusal::of(&e), e.to_string()),
            Err(_) => (Refusal::Timeout, format!("no handshake within {timeout:?}")),
        };
        self.stats.count(refusal.0);
        tracing::warn!(
            client.addr = %peer,
            tls.refusal = refusal.0.as_str(),
            error = %refusal.1,
            "TLS handshake refused"
        );
        None
    }
}
