//! Pseudonymisation of data subjects in the log: `hmac:` + HMAC-SHA256 under a key derived
//! from the log-signing key, wherever the subject appears (field, path, query, header).

use aws_lc_rs::hmac;
use http::HeaderName;

/// Turns raw subject identifiers into stable pseudonyms, or leaves them (when the policy
/// turns pseudonymisation off).
#[derive(Clone)]
pub enum Pseudonymizer {
    Off,
    On(Box<hmac::Key>),
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pseudonymizer::Off => "Pseudonymizer::Off",
            Pseudonymizer::On(_) => "Pseudonymizer::On",
        })
    }
}

/// Query parameters that carry credentials in pre-signed S3 URLs (lower case): SigV4, and
/// SigV2, which MinIO and Ceph still accept, and the session token of either.
const SECRET_PARAMS: [&str; 5] = [
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "signature",
    "awsaccesskeyid",
];

impl Pseudonymizer {
    pub fn new(key: &[u8; 32]) -> Pseudonymizer {
        Pseudonymizer::On(Box::new(hmac::Key::new(hmac::HMAC_SHA256, key)))
    }

    pub fn pseudonym(&self, subject: &str) -> String {
        match self {
            Pseudonymizer::Off => subject.to_string(),
            Pseudonymizer::On(k) => {
                let mut hexed = [0u8; 64];
                hex::encode_to_slice(hmac::sign(k, subject.as_bytes()).as_ref(), &mut hexed)
                    .expect("64 hex digits hold a SHA-256 MAC");
                let mut out = String::with_capacity(5 + hexed.len());
                out.push_str("hmac:");
                out.push_str(std::str::from_utf8(&hexed).expect("hex is ASCII"));
                out
            }
        }
    }

    /// The path with every segment naming the subject replaced by its pseudonym.
    pub fn path(
        &self,
        path: &str,
        subject: Option<&str>,
        segment: Option<usize>,
        pseudonym: Option<&str>,
    ) -> String {
        let (Some(subject), Some(p)) = (subject, pseudonym) else {
            return path.to_string();
        };
        if matches!(self, Pseudonymizer::Off) {
            return path.to_string();
        }
        let mut out = String::with_capacity(path.len() + 70);
        for (i, seg) in path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            let decoded = crate::policy::path::percent_decode(seg);
            if Some(i) == segment || decoded.as_deref() == Some(subject) {
                out.push_str(p);
            } else {
                match decoded {
                    // The subject inside a longer name (`u123-2026.json`) is hidden too.
                    Some(d) if !subject.is_empty() && d.contains(subject) => {
                        out.push_str(&d.replace(subject, p))
                    }
                    _ => out.push_str(seg),
                }
            }
        }
        out
    }

    /// For a request whose subject is not known (no dataset matched, or the path could not
    /// be read): every segment after the first becomes a pseudonym, since any of them might
    /// name a person. `audit query --subject` still finds whole-segment subjects.
    pub fn opaque_path(&self, path: &str) -> String {
        if matches!(self, Pseudonymizer::Off) {
            return path.to_string();
        }
        let mut out = String::with_capacity(path.len() + 140);
        for (i, seg) in path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            if i <= 1 || seg.is_empty() {
                out.push_str(seg);
            } else {
                let decoded = crate::policy::path::percent_decode(seg);
                out.push_str(&self.pseudonym(decoded.as_deref().unwrap_or(seg)));
            }
        }
        out
    }

    /// The query of a request whose subject is not known: every value pseudonymised,
    /// credentials masked.
    pub fn opaque_query(&self, query: &str, masked: &[HeaderName]) -> String {
        map_pairs(query, masked, |pair, k, v| self.value(pair, k, v))
    }

    /// The query of a request whose subject parameter `name` is there but could not be read
    /// (named twice, or not valid UTF-8 once decoded): every value of that parameter (its
    /// key compared decoded, as the decision compares it) pseudonymised, since any of them
    /// may be the raw subject; credentials masked.
    pub fn query_hiding(&self, query: &str, name: &str, masked: &[HeaderName]) -> String {
        map_pairs(query, masked, |pair, k, v| {
            if crate::policy::path::percent_decode(k).as_deref() == Some(name) {
                self.value(pair, k, v)
            } else {
                pair.to_string()
            }
        })
    }

    /// The query with values naming the subject pseudonymised and credentials masked.
    pub fn query(
        &self,
        query: &str,
        subject: Option<&str>,
        pseudonym: Option<&str>,
        masked: &[HeaderName],
    ) -> String {
        map_pairs(query, masked, |pair, k, v| match (subject, pseudonym) {
            (Some(s), Some(p)) if !matches!(self, Pseudonymizer::Off) && !s.is_empty() => {
                match crate::policy::path::percent_decode(v) {
                    Some(d) if d == s => format!("{k}={p}"),
                    Some(d) if d.contains(s) => format!("{k}={}", d.replace(s, p)),
                    _ => pair.to_string(),
                }
            }
            _ => pair.to_string(),
        })
    }

    /// `pair` with its value `v` pseudonymised (decoded first, when it decodes, so that
    /// `audit query --subject` finds it).
    fn value(&self, pair: &str, k: &str, v: &str) -> String {
        if v.is_empty() || matches!(self, Pseudonymizer::Off) {
            return pair.to_string();
        }
        let decoded = crate::policy::path::percent_decode(v);
        format!("{k}={}", self.pseudonym(decoded.as_deref().unwrap_or(v)))
    }
}

/// Rebuilds `query` pair by pair: credentials (built-in names and `masked`) become
/// `[masked]`, every other pair is what `shown(pair, key, value)` makes of it.
fn map_pairs(
    query: &str,
    masked: &[HeaderName],
    mut shown: impl FnMut(&str, &str, &str) -> String,
) -> String {
    query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let lk = k.to_ascii_lowercase();
            if SECRET_PARAMS.contains(&lk.as_str()) || masked.iter().any(|h| h.as_str() == lk) {
                format!("{k}=[masked]")
            } else {
                shown(pair, k, v)
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_vanish_from_path_and_query() {
        let p = Pseudonymizer::new(&[7; 32]);
        let ps = p.pseudonym("alice@example.com");
        assert!(ps.starts_with("hmac:") && ps.len() == 5 + 64);
        assert_eq!(ps, p.pseudonym("alice@example.com"));
        let path = p.path(
            "/payments/alice%40example.com/2026.json",
            Some("alice@example.com"),
            Some(2),
            Some(&ps),
        );
        assert_eq!(path, format!("/payments/{ps}/2026.json"));
        let q = p.query(
            "uid=alice%40example.com&X-Amz-Signature=abc&x=1",
            Some("alice@example.com"),
            Some(&ps),
            &[],
        );
        assert_eq!(q, format!("uid={ps}&X-Amz-Signature=[masked]&x=1"));
    }

    #[test]
    fn regression_subjects_inside_names_reached_the_log() {
        let p = Pseudonymizer::new(&[7; 32]);
        let ps = p.pseudonym("dave");
        let path = p.path(
            "/payments/dave/dave-2026.json",
            Some("dave"),
            Some(2),
            Some(&ps),
        );
        assert_eq!(path, format!("/payments/{ps}/{ps}-2026.json"));
        let q = p.query("prefix=dave/&x=1", Some("dave"), Some(&ps), &[]);
        assert_eq!(q, format!("prefix={ps}/&x=1"));
        // Unknown subject: every segment after the first, every query value.
        let o = p.opaque_path("/payments/dave/x.json");
        assert!(
            !o.contains("dave") && o.starts_with("/payments/hmac:"),
            "{o}"
        );
        assert!(
            o.contains(&ps),
            "a whole-segment subject stays findable: {o}"
        );
        let oq = p.opaque_query("uid=dave&X-Amz-Signature=s", &[]);
        assert_eq!(oq, format!("uid={ps}&X-Amz-Signature=[masked]"));
    }

    #[test]
    fn a_subject_parameter_that_could_not_be_read_is_hidden_in_every_value() {
        let p = Pseudonymizer::new(&[7; 32]);
        let ps = p.pseudonym("alice");
        let q = p.query_hiding("uid=alice&x=1&u%69d=alice&uid=bob%FF&uid=", "uid", &[]);
        assert_eq!(
            q,
            format!("uid={ps}&x=1&u%69d={ps}&uid={}&uid=", p.pseudonym("bob%FF"))
        );
        // Pseudonymisation off: the operator chose raw subjects.
        assert_eq!(
            Pseudonymizer::Off.query_hiding("uid=alice&uid=bob", "uid", &[]),
            "uid=alice&uid=bob"
        );
    }

    /// Found by review: a SigV2 pre-signed URL (`AWSAccessKeyId`, `Signature`) was logged
    /// whole, a bearer URL anyone reading the log could replay until it expired.
    #[test]
    fn regression_sigv2_presigned_credentials_reached_the_log() {
        let p = Pseudonymizer::new(&[7; 32]);
        let url = "AWSAccessKeyId=AKIAEXAMPLE&Expires=1700000000&Signature=abc%2Bdef&X-Amz-Security-Token=tok";
        let want = "AWSAccessKeyId=[masked]&Expires=1700000000&Signature=[masked]&X-Amz-Security-Token=[masked]";
        assert_eq!(p.query(url, None, None, &[]), want);
        let opaque = p.opaque_query(url, &[]);
        for secret in ["AKIAEXAMPLE", "abc%2Bdef", "tok"] {
            assert!(!opaque.contains(secret), "{opaque}");
        }
    }

    #[test]
    fn different_keys_give_different_pseudonyms() {
        assert_ne!(
            Pseudonymizer::new(&[1; 32]).pseudonym("u1"),
            Pseudonymizer::new(&[2; 32]).pseudonym("u1")
        );
    }
}
