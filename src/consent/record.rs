//! The consent record (after the Kantara Consent Receipt and ISO/IEC TS 27560) and the rules
//! that make one well-formed. Validity *for a transfer* is decided in `policy::decide`.

use crate::policy::compile::valid_category;
pub use crate::policy::consent::{Consent, KNOWN_METHODS, Scope};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Longest consent id: ids travel in change notifications, URLs and log records.
pub const MAX_ID_BYTES: usize = 200;

/// A consent as stored and exchanged (JSON lines, admin API, CLI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRecord {
    pub id: String,
    pub subject: String,
    pub recipient: String,
    pub purposes: Vec<String>,
    pub categories: Vec<String>,
    pub destinations: Vec<String>,
    pub method: String,
    pub granted_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
}

/// A record refused, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

fn token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl ConsentRecord {
    /// Checks that the record is well-formed; the first field at fault is reported.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.id.trim().is_empty() {
            return Err(field("id", "must not be empty"));
        }
        if self.id.len() > MAX_ID_BYTES || self.id.contains(char::is_control) {
            return Err(field(
                "id",
                format!("must be at most {MAX_ID_BYTES} bytes without control characters"),
            ));
        }
        if self.subject.trim().is_empty() {
            return Err(field("subject", "must not be empty"));
        }
        if self.recipient.trim().is_empty() || self.recipient.contains('*') {
            return Err(field(
                "recipient",
                format!(
                    "\"{}\" is not a recipient id: consent names one recipient, never a wildcard",
                    self.recipient
                ),
            ));
        }
        if self.purposes.is_empty() {
            return Err(field("purposes", "must name at least one purpose"));
        }
        if let Some(p) = self.purposes.iter().find(|p| !token(p)) {
            return Err(field(
                "purposes",
                format!("\"{p}\" is not a purpose (lower-case letters, digits, _ and -)"),
            ));
        }
        if self.categories.is_empty() {
            return Err(field("categories", "must name at least one data category"));
        }
        if let Some(c) = self.categories.iter().find(|c| !valid_category(c)) {
            return Err(field(
                "categories",
                format!(
                    "\"{c}\" is not a category (dot-separated lower-case names, e.g. \"user.financial\")"
                ),
            ));
        }
        if self.destinations.is_empty() {
            return Err(field(
                "destinations",
                "must name at least one destination country or jurisdiction",
            ));
        }
        if let Some(d) = self
            .destinations
            .iter()
            .find(|d| d.is_empty() || d.contains('*') || d.contains(char::is_whitespace))
        {
            return Err(field(
                "destinations",
                format!("\"{d}\" is not a country code or jurisdiction name"),
            ));
        }
        if !KNOWN_METHODS.contains(&self.method.as_str()) {
            return Err(field(
                "method",
                format!(
                    "\"{}\" is not a known collection method ({})",
                    self.method,
                    KNOWN_METHODS.join(", ")
                ),
            ));
        }
        if self.expires_at <= self.granted_at {
            return Err(field("expires_at", "must be after granted_at"));
        }
        // A revocation dated before the grant is allowed: the consent never came into force
        // (withdrawn before its start, or a clock a little behind the granting host's).
        Ok(())
    }
}

/// Unix microseconds of a timestamp.
pub fn micros(t: Timestamp) -> i64 {
    t.as_microsecond()
}

/// A valid explicit consent of `subject` for `credit-bureau-us` (credit scoring, financial
/// data, to the US, during 2026), for unit tests.
#[cfg(test)]
pub(crate) fn sample(id: &str, subject: &str) -> ConsentRecord {
    ConsentRecord {
        id: id.into(),
        subject: subject.into(),
        recipient: "credit-bureau-us".into(),
        purposes: vec!["credit_scoring".into()],
        categories: vec!["user.financial".into()],
        destinations: vec!["US".into()],
        method: "explicit".into(),
        granted_at: "2026-01-01T00:00:00Z".parse().unwrap(),
        expires_at: "2027-01-01T00:00:00Z".parse().unwrap(),
        revoked_at: None,
        evidence: Some("receipt".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ConsentRecord {
        sample("c1", "u123")
    }

    #[test]
    fn well_formed_record_passes() {
        assert_eq!(good().validate(), Ok(()));
    }

    #[test]
    fn each_fault_names_its_field() {
        type Mutation = Box<dyn Fn(&mut ConsentRecord)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("recipient", Box::new(|r| r.recipient = "*".into())),
            ("purposes", Box::new(|r| r.purposes.clear())),
            (
                "categories",
                Box::new(|r| r.categories = vec!["User Financial".into()]),
            ),
            ("destinations", Box::new(|r| r.destinations.clear())),
            ("method", Box::new(|r| r.method = "telepathy".into())),
            ("expires_at", Box::new(|r| r.expires_at = r.granted_at)),
            ("subject", Box::new(|r| r.subject = " ".into())),
        ];
        for (f, mutate) in cases {
            let mut r = good();
            mutate(&mut r);
            assert_eq!(r.validate().unwrap_err().field, f);
        }
    }

    #[test]
    fn json_round_trip_refuses_unknown_fields() {
        let line = serde_json::to_string(&good()).unwrap();
        let back: ConsentRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, good());
        assert!(serde_json::from_str::<ConsentRecord>(&line.replace("\"id\"", "\"idx\"")).is_err());
    }
}
