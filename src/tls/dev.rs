//! Development certificates: a private CA, a server certificate for the proxy, and client
//! certificates that carry recipient identities. `certs init` writes them; the integration
//! tests make theirs with the same code. ECDSA P-256 keys, PEM files.

use super::TlsError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use std::net::IpAddr;

/// The days a certificate is valid, counted in whole UTC days.
#[derive(Copy, Clone, Debug)]
pub struct Validity {
    pub not_before: jiff::civil::Date,
    pub not_after: jiff::civil::Date,
}

impl Validity {
    /// From yesterday (a little clock skew between hosts is tolerated) for `days` days.
    pub fn days(days: i64) -> Validity {
        let today = jiff::tz::Offset::UTC
            .to_datetime(jiff::Timestamp::now())
            .date();
        Validity {
            not_before: today.saturating_sub(jiff::Span::new().days(1)),
            not_after: today.saturating_add(jiff::Span::new().days(days)),
        }
    }

    /// A certificate that expired yesterday (for tests of refusal).
    pub fn expired() -> Validity {
        let today = jiff::tz::Offset::UTC
            .to_datetime(jiff::Timestamp::now())
            .date();
        Validity {
            not_before: today.saturating_sub(jiff::Span::new().days(30)),
            not_after: today.saturating_sub(jiff::Span::new().days(1)),
        }
    }

    fn apply(&self, params: &mut CertificateParams) {
        let ymd = |d: jiff::civil::Date| {
            rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day() as u8)
        };
        params.not_before = ymd(self.not_before);
        params.not_after = ymd(self.not_after);
    }
}

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
}

impl Issued {
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }
}

/// A certificate authority for development and tests.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
}

fn issue_err(subject: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |source| TlsError::Issue {
        subject: subject.to_string(),
        source,
    }
}

fn name(params: &mut CertificateParams, common_name: &str) {
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "residency-proxy development");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
}

impl DevCa {
    /// A new CA, valid for ten years.
    pub fn generate() -> Result<DevCa, TlsError> {
        // A name of its own: certificates of two development CAs must not look as if one
        // issued the other's (verifiers find the issuer by name).
        let mut tag = [0u8; 4];
        let subject = match aws_lc_rs::rand::fill(&mut tag) {
            Ok(()) => format!("residency-proxy development CA {}", hex::encode(tag)),
            Err(_) => "residency-proxy development CA".to_string(),
        };
        let subject = subject.as_str();
        let err = issue_err(subject);
        let key = KeyPair::generate().map_err(issue_err(subject))?;
        let mut params = CertificateParams::default();
        name(&mut params, subject);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Validity::days(3650).apply(&mut params);
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA written earlier (`ca.crt`, `ca.key`), to issue more certificates under it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<DevCa, TlsError> {
        let subject = "the CA in ca.crt";
        let key = KeyPair::from_pem(key_pem).map_err(issue_err(subject))?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| issue_err(subject)(rcgen::Error::CouldNotParseCertificate))?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(issue_err(subject))?;
        Ok(DevCa {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            cert_der: der,
        })
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A server certificate for `localhost`, `127.0.0.1`, `::1` and `extra` (IP addresses
    /// become IP SANs, anything else a DNS SAN).
    pub fn server(&self, extra: &[String], validity: Validity) -> Result<Issued, TlsError> {
        let mut sans = vec![SanType::DnsName(
            "localhost".try_into().expect("an ASCII name"),
        )];
        sans.push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
        sans.push(SanType::IpAddress("::1".parse().expect("an address")));
        for s in extra {
            let san = match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(s.as_str().try_into().map_err(issue_err(s))?),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let mut params = CertificateParams::default();
        name(&mut params, "residency-proxy");
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, "the server certificate", validity)
    }

    /// A client certificate whose SAN is `identity`: a URI SAN when it has a scheme
    /// (`spiffe://…`), else a DNS SAN.
    pub fn client(&self, identity: &str, validity: Validity) -> Result<Issued, TlsError> {
        let san = if identity.contains("://") {
            SanType::URI(
                identity
                    .try_into()
                    .map_err(|_| TlsError::Identity(identity.into()))?,
            )
        } else if is_dns_name(identity) {
            SanType::DnsName(
                identity
                    .try_into()
                    .map_err(|_| TlsError::Identity(identity.into()))?,
            )
        } else {
            return Err(TlsError::Identity(identity.into()));
        };
        let mut params = CertificateParams::default();
        name(&mut params, identity);
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, identity, validity)
    }

    /// Signs `params` (SANs, names and usages set by the caller) with a new key.
    pub(crate) fn sign(
        &self,
        mut params: CertificateParams,
        subject: &str,
        validity: Validity,
    ) -> Result<Issued, TlsError> {
        validity.apply(&mut params);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(issue_err(subject))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(issue_err(subject))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }
}

/// Letters, digits, `-` and `.`, in labels that neither start nor end with `-`.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_certificates_that_chain_to_it() {
        let ca = DevCa::generate().unwrap();
        let again = DevCa::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let leaf = again
            .client("spiffe://partners/bureau", Validity::days(1))
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.cert_der.as_ref()).unwrap();
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca.cert_der.as_ref()).unwrap();
        assert_eq!(parsed.issuer(), ca_parsed.subject());
        parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .expect("signed by the CA's key");
    }

    #[test]
    fn identities_that_are_neither_uri_nor_dns_are_refused() {
        let ca = DevCa::generate().unwrap();
        assert!(matches!(
            ca.client("credit bureau", Validity::days(1)),
            Err(TlsError::Identity(_))
        ));
        assert!(ca.client("bureau.example", Validity::days(1)).is_ok());
    }
}
