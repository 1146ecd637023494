//! TLS with rustls on the aws-lc-rs provider: the data listener's server configuration and
//! its reload, client configurations for `https` upstreams, identities read from client
//! certificates, and the development certificates that `certs init` writes.

pub mod client;
pub mod dev;
pub mod identity;
pub mod server;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use client::UpstreamTls;
pub use identity::identity_of;
pub use server::ServerTls;

/// The protocols offered and accepted by ALPN, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate, key or TLS configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} holds no usable PEM item: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no CA certificate rustls accepts: {reason}", path.display())]
    Roots { path: PathBuf, reason: String },
    #[error("certificate {} and key {} cannot be used together: {source}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("client CA {} cannot verify client certificates: {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("\"{host}\" is not a host name TLS can verify: {reason}")]
    ServerName { host: String, reason: String },
    #[error("cannot issue a certificate for {subject}: {source}")]
    Issue {
        subject: String,
        source: rcgen::Error,
    },
    #[error(
        "\"{0}\" is neither a URI (scheme://…) nor a DNS name, so it cannot be a certificate identity"
    )]
    Identity(String),
}

/// The one crypto provider this build uses (aws-lc-rs), shared by every configuration so
/// that none depends on a process-wide default having been installed.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Installs aws-lc-rs as the process-wide rustls provider (idempotent: a second call, or a
/// provider already installed, is fine).
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_path_buf(),
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn read_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Adds every certificate of a PEM file to `roots`; at least one must be a usable anchor.
pub fn add_roots(
    roots: &mut RootCertStore,
    what: &'static str,
    path: &Path,
) -> Result<(), TlsError> {
    let certs = read_certs(what, path)?;
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::Roots {
            path: path.to_path_buf(),
            reason: format!("{ignored} certificate(s) could not be parsed as trust anchors"),
        });
    }
    Ok(())
}
