//! The identity a verified client certificate carries: its subject alternative name.
//!
//! A URI SAN (a SPIFFE ID such as `spiffe://partners/credit-bureau-us`) wins over a DNS SAN,
//! as in SPIFFE's X.509-SVID, where the one URI SAN is the workload's identity; a
//! certificate with neither carries no identity. Only certificates rustls has already
//! verified against `client_ca` are ever read here.

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The identity of a (verified) end-entity certificate: its first URI SAN, else its first
/// DNS SAN, else none. A certificate that cannot be parsed carries none.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(u) if !u.is_empty() => Some(*u),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) if !d.is_empty() => Some(*d),
            _ => None,
        })
    };
    uri.or_else(dns).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::dev::{DevCa, Validity};

    fn leaf(identity: &str) -> CertificateDer<'static> {
        let ca = DevCa::generate().unwrap();
        let issued = ca.client(identity, Validity::days(1)).unwrap();
        issued.cert_der()
    }

    #[test]
    fn a_spiffe_uri_san_is_the_identity() {
        let cert = leaf("spiffe://partners/credit-bureau-us");
        assert_eq!(
            identity_of(&cert).as_deref(),
            Some("spiffe://partners/credit-bureau-us")
        );
    }

    #[test]
    fn a_dns_san_is_the_identity_when_there_is_no_uri() {
        let cert = leaf("bureau.partners.example");
        assert_eq!(
            identity_of(&cert).as_deref(),
            Some("bureau.partners.example")
        );
    }

    #[test]
    fn a_uri_san_wins_over_a_dns_san() {
        let ca = DevCa::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName("bureau.example".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://partners/bureau".try_into().unwrap()),
        ];
        let both = ca.sign(params, "both", Validity::days(1)).unwrap();
        assert_eq!(
            identity_of(&both.cert_der()).as_deref(),
            Some("spiffe://partners/bureau")
        );
    }

    #[test]
    fn garbage_carries_no_identity() {
        assert_eq!(identity_of(&CertificateDer::from(vec![1, 2, 3])), None);
    }
}
