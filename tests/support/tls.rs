//! Certificates for the TLS tests, made by the code `certs init` runs
//! (`residency_proxy::tls::dev`) and written as PEM files into a temp dir, and the rustls
//! configurations of test clients and test upstreams built from them.

#![allow(dead_code)]

use residency_proxy::policy::model::TlsSettings;
use residency_proxy::tls::dev::{DevCa, Issued, Validity};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;

/// ALPN offers.
pub const H2_AND_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
pub const H1_ONLY: &[&[u8]] = &[b"http/1.1"];

/// A development CA and the files issued under it.
pub struct Pki {
    pub ca: DevCa,
    pub dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Pki {
    /// A new CA (written to `ca.crt`) and a server certificate for localhost and the
    /// loopback addresses (`server.crt`, `server.key`).
    pub fn new() -> Pki {
        residency_proxy::tls::install_provider();
        let pki = Pki {
            ca: DevCa::generate().unwrap(),
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(pki.path("ca.crt"), &pki.ca.cert_pem).unwrap();
        let server = pki.ca.server(&[], Validity::days(30)).unwrap();
        pki.write("server", &server);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `NAME.crt` and `NAME.key` (atomically, each by rename).
    pub fn write(&self, name: &str, issued: &Issued) {
        for (ext, text) in [("key", &issued.key_pem), ("crt", &issued.cert_pem)] {
            let tmp = self.path(&format!("{name}.{ext}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.path(&format!("{name}.{ext}"))).unwrap();
        }
    }

    /// A client certificate for `identity`, valid for a month.
    pub fn client_cert(&self, identity: &str) -> Issued {
        self.ca.client(identity, Validity::days(30)).unwrap()
    }

    /// `[tls]` for the proxy: this server certificate, and with `mtls` this CA for clients.
    pub fn tls_table(&self, mtls: bool) -> String {
        let mut t = format!(
            "[tls]\ncert = '{}'\nkey = '{}'\n",
            self.path("server.crt").display(),
            self.path("server.key").display()
        );
        if mtls {
            t.push_str(&format!(
                "client_ca = '{}'\n",
                self.path("ca.crt").display()
            ));
        }
        t
    }

    /// A client that trusts this CA, presents `cert` if given, and offers `alpn`.
    pub fn client_config(&self, cert: Option<&Issued>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert_der()).unwrap();
        let builder = ClientConfig::builder_with_provider(residency_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match cert {
            None => builder.with_no_client_auth(),
            Some(c) => builder
                .with_client_auth_cert(vec![c.cert_der()], key(c))
                .unwrap(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A server configuration for a test upstream: a certificate for `sans` under this CA
    /// (written as `NAME.crt`/`NAME.key`), offering `alpn`, and with `client_ca` requiring
    /// client certificates from this CA.
    pub fn upstream_config(
        &self,
        name: &str,
        sans: &[&str],
        alpn: &[&[u8]],
        client_ca: bool,
    ) -> Arc<ServerConfig> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        self.write(name, &self.ca.server(&sans, Validity::days(30)).unwrap());
        let mut config = residency_proxy::tls::server::build_config(&TlsSettings {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
            client_ca: client_ca.then(|| self.path("ca.crt")),
        })
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// The private key of `issued`, for rustls.
pub fn key(issued: &Issued) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap()
}

/// The certificate in a PEM file.
pub fn cert_in(path: &std::path::Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}
