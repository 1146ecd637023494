//! TLS to `https` upstreams: the platform's trust anchors plus the upstream's own `ca`, SNI
//! and verification against the host named in the URL, an optional client certificate
//! (mTLS to storage), and ALPN offering `h2` then `http/1.1`.

use super::{TlsError, add_roots, provider, read_certs, read_key};
use crate::policy::model::Upstream;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use std::sync::{Arc, OnceLock};
use tokio_rustls::TlsConnector;

/// How the proxy talks TLS to one upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: TlsConnector,
    /// The URL's host: sent as SNI (unless it is an IP address) and verified against the
    /// certificate's SANs.
    pub server_name: ServerName<'static>,
}

/// The platform's trust anchors, read once per process (the files do not change under a
/// running proxy often enough to justify re-reading them on every policy reload).
fn platform_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "a platform trust anchor could not be loaded");
        }
        if found.certs.is_empty() {
            tracing::warn!("no platform trust anchors found: https upstreams need their own `ca`");
        }
        found.certs
    })
}

impl UpstreamTls {
    /// The client configuration for `up` (an `https` upstream). Reads files: call it off
    /// the request path.
    pub fn for_upstream(up: &Upstream) -> Result<UpstreamTls, TlsError> {
        let server_name =
            ServerName::try_from(up.host.clone()).map_err(|e| TlsError::ServerName {
                host: up.host.clone(),
                reason: e.to_string(),
            })?;
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(platform_roots().iter().cloned());
        if let Some(ca) = &up.ca {
            add_roots(&mut roots, "upstream ca", ca)?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default protocol versions")
            .with_root_certificates(roots);
        let mut config = match &up.client_cert {
            None => builder.with_no_client_auth(),
            Some(cc) => {
                let chain = read_certs("upstream client_cert", &cc.cert)?;
                let key = read_key("upstream client_key", &cc.key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|source| TlsError::Pair {
                        cert: cc.cert.clone(),
                        key: cc.key.clone(),
                        source,
                    })?
            }
        };
        config.alpn_protocols = super::ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}
