//! The one place that turns a refusal or failure into an HTTP response: a JSON body naming
//! the reason and the decision id, and for 451 a `Link: rel="blocked-by"` (RFC 7725).

use super::body::ResponseBody;
use super::exchange::Exchange;
use crate::policy::decision::Reason;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;
use std::sync::Arc;

/// Names the decision on every response; named once (a custom name given as a string would
/// be copied for every response).
pub static DECISION_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-residency-decision");

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    decision_id: &'a str,
    dataset: Option<&'a str>,
    message: &'a str,
}

/// A response the proxy writes itself.
pub struct Local<'a> {
    pub status: u16,
    pub reason: Reason,
    pub decision_id: &'a str,
    pub dataset: Option<&'a str>,
    pub message: &'a str,
    pub policy_name: &'a str,
}

fn unreserved(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn local(l: Local<'_>, exchange: Option<Arc<Exchange>>) -> Response<ResponseBody> {
    let body = serde_json::to_vec(&ErrorBody {
        error: l.reason.as_str(),
        decision_id: l.decision_id,
        dataset: l.dataset,
        message: l.message,
    })
    .expect("error bodies serialise");
    if let Some(ex) = &exchange {
        ex.set_status(l.status);
    }
    let mut resp = Response::new(ResponseBody::local(Bytes::from(body), exchange));
    *resp.status_mut() =
        StatusCode::from_u16(l.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(l.decision_id) {
        h.insert(DECISION_HEADER.clone(), v);
    }
    if l.status == 451
        && let Ok(v) = HeaderValue::from_str(&format!(
            "<urn:residency-proxy:policy:{}>; rel=\"blocked-by\"",
            unreserved(l.policy_name)
        ))
    {
        h.insert(header::LINK, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_are_percent_encoded_in_the_link_urn() {
        assert_eq!(unreserved("payments-cn_v2.1~x"), "payments-cn_v2.1~x");
        assert_eq!(unreserved("a b/é"), "a%20b%2F%C3%A9");
    }
}
