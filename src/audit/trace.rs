//! The W3C Trace Context `traceparent` header of a request, read strictly, so that a decision
//! record can name the application's trace it belongs to and a trace can lead to its
//! decisions. Only a well-formed version-00 value counts; anything else is ignored, as the
//! W3C Trace Context recommendation tells a receiver to do.

use http::{HeaderMap, HeaderName};
use serde::ser::{Serialize, SerializeStruct, Serializer};

/// `traceparent`, named once.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `00-` + 32 hex + `-` + 16 hex + `-` + 2 hex.
const VERSION_00_LEN: usize = 55;

/// A well-formed version-00 `traceparent`: the trace id and the caller's span id (the
/// header's `parent-id`), held inline as the lowercase hex they arrived as.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 32],
    span_id: [u8; 16],
}

impl TraceParent {
    /// Reads one header value: `00-{trace-id}-{parent-id}-{flags}`, lowercase hex, neither id
    /// all zeros. Another version (including the invalid `ff`), upper-case hex, a missing or
    /// extra part: `None`.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let value = value.trim_ascii();
        if value.len() != VERSION_00_LEN
            || !value.starts_with(b"00-")
            || value[35] != b'-'
            || value[52] != b'-'
        {
            return None;
        }
        let (trace, span, flags) = (&value[3..35], &value[36..52], &value[53..55]);
        if !is_id(trace) || !is_id(span) || !lower_hex(flags) {
            return None;
        }
        Some(TraceParent {
            trace_id: trace.try_into().expect("32 bytes"),
            span_id: span.try_into().expect("16 bytes"),
        })
    }

    /// The request's trace context: its one `traceparent` header, if well formed. A request
    /// carrying two is ambiguous, and counts as carrying none.
    pub fn from_headers(headers: &HeaderMap) -> Option<TraceParent> {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let one = values.next()?;
        if values.next().is_some() {
            return None;
        }
        TraceParent::parse(one.as_bytes())
    }

    /// 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.trace_id).expect("checked hex")
    }

    /// 16 lowercase hex digits: the span of the caller that sent the request.
    pub fn span_id(&self) -> &str {
        std::str::from_utf8(&self.span_id).expect("checked hex")
    }
}

/// Whether `s` has the form of a trace id (32 lowercase hex digits, not all zero).
pub fn is_trace_id(s: &str) -> bool {
    s.len() == 32 && is_id(s.as_bytes())
}

fn lower_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lowercase hex, not all zeros (an all-zero id is the recommendation's "invalid").
fn is_id(s: &[u8]) -> bool {
    lower_hex(s) && s.iter().any(|b| *b != b'0')
}

impl std::fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceParent")
            .field("trace_id", &self.trace_id())
            .field("span_id", &self.span_id())
            .finish()
    }
}

/// `{"span_id":…,"trace_id":…}`: names in order, as every record's canonical form needs.
impl Serialize for TraceParent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("TraceParent", 2)?;
        st.serialize_field("span_id", self.span_id())?;
        st.serialize_field("trace_id", self.trace_id())?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_version_00_header_is_read() {
        let t = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        // Optional white space around a field value is not part of it.
        assert_eq!(TraceParent::parse(format!(" {GOOD}\t").as_bytes()), Some(t));
        // Flags other than "sampled" are still a well-formed header.
        let unsampled = GOOD.replace("-01", "-00");
        assert!(TraceParent::parse(unsampled.as_bytes()).is_some());
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"span_id":"00f067aa0ba902b7","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#
        );
    }

    #[test]
    fn anything_malformed_is_ignored() {
        let bad = [
            "",
            "00",
            // Versions other than 00, including the forbidden ff.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Upper case, non-hex, wrong lengths, wrong separators, trailing data.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{0}",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b:?}");
        }
    }

    #[test]
    fn two_headers_count_as_none() {
        let mut h = HeaderMap::new();
        assert_eq!(TraceParent::from_headers(&h), None);
        h.append(&TRACEPARENT, GOOD.parse().unwrap());
        assert!(TraceParent::from_headers(&h).is_some());
        h.append(&TRACEPARENT, GOOD.parse().unwrap());
        assert_eq!(TraceParent::from_headers(&h), None);
    }

    #[test]
    fn trace_ids_are_recognised() {
        assert!(is_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(!is_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736"));
        assert!(!is_trace_id("00000000000000000000000000000000"));
        assert!(!is_trace_id("4bf92f3577b34da6"));
        assert!(!is_trace_id(GOOD));
    }
}
