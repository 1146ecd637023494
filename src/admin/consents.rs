//! The consent API on the admin listener (SPEC sections 4 and 6): grant, look up, list and
//! revoke consents in the registry. Every route needs the bearer token, reads included:
//! consents are personal data.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/consents` | 201 and the record (200 if exactly this grant was already recorded; an omitted `granted_at` means the recorded one, so a retry answers 200; a record as this API returns it, `revoked_at` included, answers 200 when sent back, and revokes a recorded grant it sets `revoked_at` on, with 200); 422 naming the field at fault; 409 if the id holds another grant |
//! | `GET /v1/consents?subject=S[&history=true]` | 200 `{"subject", "consents": [...]}` (or `"events"`) |
//! | `GET /v1/consents/{id}` | 200 and the record, 404 |
//! | `POST /v1/consents/{id}/revoke` | 200 and the record with `revoked_at`; body optional: `{"revoked_at", "evidence"}` |
//!
//! A write is applied to this proxy's index at once; other proxies sharing the store get it
//! through the store's change feed.

use super::{AdminResponse, AdminState, error, json, read_body};
use crate::consent::change::{self, Change, Filter, Outcome, Revocation, Written};
use crate::consent::record::{ConsentRecord, FieldError};
use crate::consent::registry::{Registry, RegistryError};
use crate::policy::country::Country;
use crate::policy::model::ConsentStore;
use crate::policy::model::Policy;
use http::{HeaderValue, Method, Request, StatusCode, header};
use hyper::body::Incoming;
use jiff::Timestamp;
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Who the registry records as the author of API writes: the admin token is one shared
/// secret, so the API is all that can be said about the caller.
pub const ACTOR: &str = "admin-api";

/// What a consent id keeps unescaped in a URL path: the unreserved characters (RFC 3986).
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The fields a consent sent to `POST /v1/consents` may carry: those of a record as the API and
/// `consent list` return it. `id`, `granted_at`, `revoked_at` and `evidence` are optional, and
/// a field sent as `null` is absent.
const FIELDS: [&str; 11] = [
    "id",
    "subject",
    "recipient",
    "purposes",
    "categories",
    "destinations",
    "method",
    "granted_at",
    "expires_at",
    "revoked_at",
    "evidence",
];

/// A request the API refuses, answered in one place ([`Refusal::respond`]).
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    /// The field at fault, for 422 and 409.
    field: Option<String>,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            field: None,
            message: message.into(),
        }
    }

    /// A record at fault: 422 naming the field.
    fn invalid(field: &str, message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_consent",
            field: Some(field.into()),
            message: format!("{field}: {}", message.into()),
        }
    }

    fn respond(self) -> AdminResponse {
        match self.field {
            Some(field) => json(
                self.status,
                &serde_json::json!({ "error": self.code, "field": field, "message": self.message }),
            ),
            None => error(self.status, self.code, self.message),
        }
    }
}

/// The registry refused the change: the request is at fault.
impl From<change::Refusal> for Refusal {
    fn from(e: change::Refusal) -> Refusal {
        match &e {
            change::Refusal::Invalid { source, .. } => {
                Refusal::invalid(source.field, &source.message)
            }
            change::Refusal::NotFound { .. } => {
                Refusal::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            change::Refusal::Conflict { field, .. } => Refusal {
                status: StatusCode::CONFLICT,
                code: "conflict",
                field: Some(field.to_string()),
                message: e.to_string(),
            },
        }
    }
}

/// The registry could not answer: the store is at fault.
impl From<RegistryError> for Refusal {
    fn from(e: RegistryError) -> Refusal {
        match &e {
            RegistryError::NotARegistry { .. } => {
                Refusal::new(StatusCode::NOT_IMPLEMENTED, "no_registry", e.to_string())
            }
            RegistryError::Sqlite(_)
            | RegistryError::Postgres(_)
            | RegistryError::Task(_)
            | RegistryError::Input(_) => {
                tracing::error!(error = %e, "consent API: the registry failed");
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
        }
    }
}

/// Serves a request under `/v1/consents`.
pub async fn handle(state: &AdminState, req: Request<Incoming>) -> AdminResponse {
    if !state.authorized(&req) {
        return unauthorized(state.has_token());
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/v1/consents").unwrap_or("");
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let allow = match segments.as_slice() {
        [] => "GET, POST",
        [_] => "GET",
        [_, "revoke"] => "POST",
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no admin endpoint {method} {path}"),
            );
        }
    };
    if !allow.split(", ").any(|m| m == method.as_str()) {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path} (allowed: {allow})"),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        return r;
    }
    let Some(registry) = &state.shared.registry else {
        let store = match &state.shared.snapshot.load().policy.consent.store {
            ConsentStore::File(p) => format!("file:{}", p.display()),
            _ => "not set".into(),
        };
        return Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "no_registry",
            format!(
                "consent.store is {store}: the consent API needs a registry (sqlite:PATH or postgres://…); a file: store is edited as a file"
            ),
        )
        .respond();
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let answer = match segments.as_slice() {
        [] if method == Method::POST => create(state, registry, req).await,
        [] => by_subject(registry, &query).await,
        [id] => match decode(id) {
            Ok(id) => by_id(registry, &id).await,
            Err(r) => Err(r),
        },
        [id, _] => match decode(id) {
            Ok(id) => revoke(state, registry, id, req).await,
            Err(r) => Err(r),
        },
        _ => unreachable!("routed above"),
    };
    answer.unwrap_or_else(Refusal::respond)
}

fn unauthorized(configured: bool) -> AdminResponse {
    let message = if configured {
        "the consent API needs the admin bearer token (Authorization: Bearer …)"
    } else {
        "no [admin].token_file is configured, so the consent API is closed"
    };
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"residency-proxy admin\""),
    );
    r
}

fn decode(segment: &str) -> Result<String, Refusal> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the consent id is not UTF-8 once percent-decoded",
            )
        })
}

/// The value of `key` in a query string (`+` and percent escapes decoded).
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| {
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// Parses a JSON body into a value, or refuses it (400).
fn parse_json(body: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not JSON: {e}"),
        )
    })
}

/// Takes `name` out of `m` as a `T`, naming the field when it has the wrong shape.
fn take<T: DeserializeOwned>(
    m: &mut Map<String, Value>,
    name: &str,
    shape: &str,
) -> Result<Option<T>, Refusal> {
    match m.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|_| Refusal::invalid(name, format!("must be {shape}"))),
    }
}

fn required<T>(v: Option<T>, name: &str) -> Result<T, Refusal> {
    v.ok_or_else(|| Refusal::invalid(name, "is required"))
}

/// A consent from a request body: `id` defaults to a fresh one and `granted_at` to now
/// ([`Change::Undated`]: the recorded time if the id is recorded). A record with `revoked_at`
/// is accepted as `consent import` accepts it, so that whatever the API lists can be sent
/// back: the grant and its revocation (only the revocation if the grant is recorded;
/// nothing if both are).
fn new_grant(body: Value, now: Timestamp) -> Result<Change, Refusal> {
    let Value::Object(mut m) = body else {
        return Err(Refusal::invalid(
            "body",
            "must be a JSON object (a consent record)",
        ));
    };
    if let Some(unknown) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Refusal::invalid(
            unknown,
            format!("is not a field of a consent ({})", FIELDS.join(", ")),
        ));
    }
    let text = "a string";
    let list = "a list of strings";
    let time = "an RFC 3339 time such as \"2027-01-01T00:00:00Z\"";
    let id: Option<String> = take(&mut m, "id", text)?;
    let granted_at: Option<Timestamp> = take(&mut m, "granted_at", time)?;
    let record = ConsentRecord {
        id: id.unwrap_or_else(|| format!("c-{}", crate::audit::id::new_id(now))),
        subject: required(take(&mut m, "subject", text)?, "subject")?,
        recipient: required(take(&mut m, "recipient", text)?, "recipient")?,
        purposes: required(take(&mut m, "purposes", list)?, "purposes")?,
        categories: required(take(&mut m, "categories", list)?, "categories")?,
        destinations: required(take(&mut m, "destinations", list)?, "destinations")?,
        method: required(take(&mut m, "method", text)?, "method")?,
        granted_at: granted_at.unwrap_or(now),
        expires_at: required(take(&mut m, "expires_at", time)?, "expires_at")?,
        revoked_at: take(&mut m, "revoked_at", time)?,
        evidence: take(&mut m, "evidence", text)?,
    };
    record
        .validate()
        .map_err(|FieldError { field, message }| Refusal::invalid(field, message))?;
    Ok(match granted_at {
        Some(_) => Change::Record(record),
        None => Change::Undated(record),
    })
}

/// Refuses a new consent whose recipient or destination the policy in force does not know:
/// such a consent could never match a request, while the caller would believe consent was
/// in place. Only new grants through the API are checked: records already in a store stay
/// valid whatever a later policy says.
fn known_to_policy(policy: &Policy, r: &ConsentRecord) -> Result<(), Refusal> {
    if !policy.recipients.iter().any(|p| *p.id == r.recipient) {
        let known: Vec<&str> = policy.recipients.iter().map(|p| &*p.id).collect();
        return Err(Refusal::invalid(
            "recipient",
            format!(
                "{:?} is not a recipient of the policy ({})",
                r.recipient,
                known.join(", ")
            ),
        ));
    }
    // As `decide` reads a destination: a named jurisdiction, else a country code.
    let unknown = r.destinations.iter().find(|d| {
        !policy.jurisdictions.named.contains_key(d.as_str()) && Country::parse_shape(d).is_none()
    });
    if let Some(d) = unknown {
        return Err(Refusal::invalid(
            "destinations",
            format!("{d:?} is neither a country code nor a jurisdiction of the policy"),
        ));
    }
    Ok(())
}

/// Applies a written consent to this proxy's index and answers with it.
fn written(state: &AdminState, w: Written, created: StatusCode) -> AdminResponse {
    if let Err(e) = state.shared.consents.upsert(&w.record) {
        tracing::warn!(consent.id = %w.record.id, error = %e, "registry returned an invalid consent");
    }
    // Created only for a new consent: a revocation of one already recorded (a record sent
    // back with `revoked_at` set) answers 200, as `/revoke` does.
    let status = match w.outcome {
        Outcome::Granted | Outcome::GrantedRevoked => created,
        Outcome::Revoked | Outcome::Unchanged => StatusCode::OK,
    };
    let mut r = json(status, &w.record);
    if status == StatusCode::CREATED {
        let location = format!(
            "/v1/consents/{}",
            percent_encoding::utf8_percent_encode(&w.record.id, PATH_SEGMENT)
        );
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
    }
    r
}

async fn create(
    state: &AdminState,
    registry: &Registry,
    req: Request<Incoming>,
) -> Result<AdminResponse, Refusal> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return Ok(r),
    };
    let grant = new_grant(parse_json(&body)?, Timestamp::now())?;
    if let Change::Record(r) | Change::Undated(r) = &grant
        && let Err(refusal) = known_to_policy(&state.shared.snapshot.load().policy, r)
        // A consent already recorded stays valid whatever the policy now says, and sending
        // back what the API returned is answered as such (or 409 if it differs).
        && registry.get(&r.id).await?.is_none()
    {
        return Err(refusal);
    }
    let w = registry.grant(grant, ACTOR).await??;
    Ok(written(state, w, StatusCode::CREATED))
}

async fn revoke(
    state: &AdminState,
    registry: &Registry,
    id: String,
    req: Request<Incoming>,
) -> Result<AdminResponse, Refusal> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return Ok(r),
    };
    let mut m = if body.trim_ascii().is_empty() {
        Map::new()
    } else {
        match parse_json(&body)? {
            Value::Object(m) => m,
            _ => {
                return Err(Refusal::invalid(
                    "body",
                    "must be a JSON object ({\"revoked_at\", \"evidence\"})",
                ));
            }
        }
    };
    let at: Option<Timestamp> = take(&mut m, "revoked_at", "an RFC 3339 time")?;
    let evidence: Option<String> = take(&mut m, "evidence", "a string")?;
    if let Some(unknown) = m.keys().next() {
        return Err(Refusal::invalid(
            unknown,
            "is not a field of a revocation (revoked_at, evidence)",
        ));
    }
    let revocation = Revocation {
        consent_id: id,
        revoked_at: at.unwrap_or_else(Timestamp::now),
        evidence,
    };
    let w = registry.revoke(revocation, ACTOR).await??;
    Ok(written(state, w, StatusCode::OK))
}

async fn by_subject(registry: &Registry, query: &str) -> Result<AdminResponse, Refusal> {
    let Some(subject) = query_param(query, "subject").filter(|s| !s.is_empty()) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "subject_required",
            "list consents of one subject: GET /v1/consents?subject=…",
        ));
    };
    let history = matches!(
        query_param(query, "history").as_deref(),
        Some("" | "1" | "true")
    );
    let body = if history {
        let events = registry.history(Filter::Subject(&subject)).await?;
        serde_json::json!({ "subject": subject, "events": events })
    } else {
        let consents = registry.list(Filter::Subject(&subject)).await?;
        serde_json::json!({ "subject": subject, "consents": consents })
    };
    Ok(json(StatusCode::OK, &body))
}

async fn by_id(registry: &Registry, id: &str) -> Result<AdminResponse, Refusal> {
    match registry.get(id).await? {
        Some(r) => Ok(json(StatusCode::OK, &r)),
        None => Err(change::Refusal::NotFound { id: id.into() }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Value {
        serde_json::json!({
            "subject": "u1",
            "recipient": "credit-bureau-us",
            "purposes": ["credit_scoring"],
            "categories": ["user.financial"],
            "destinations": ["US"],
            "method": "explicit",
            "expires_at": "2030-01-01T00:00:00Z",
        })
    }

    #[test]
    fn defaults_fill_the_id_and_the_grant_time() {
        let now: Timestamp = "2026-05-01T00:00:00Z".parse().unwrap();
        let Change::Undated(r) = new_grant(body(), now).unwrap() else {
            panic!("a grant without granted_at is undated");
        };
        assert!(r.id.starts_with("c-") && r.id.len() > 20, "{}", r.id);
        assert_eq!(r.granted_at, now);
        let mut b = body();
        b["granted_at"] = "2026-04-01T00:00:00Z".into();
        assert!(matches!(new_grant(b, now).unwrap(), Change::Record(_)));
    }

    #[test]
    fn shape_errors_name_their_field() {
        let now = Timestamp::now();
        let cases: [(&str, Value); 5] = [
            ("purposes", serde_json::json!("credit_scoring")),
            ("expires_at", serde_json::json!("next year")),
            ("subject", Value::Null),
            ("scope", serde_json::json!("all")),
            ("revoked_at", serde_json::json!("yesterday")),
        ];
        for (field, value) in cases {
            let mut b = body();
            b.as_object_mut().unwrap().insert(field.into(), value);
            let r = new_grant(b, now)
                .err()
                .unwrap_or_else(|| panic!("{field} accepted"));
            assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(r.field.as_deref(), Some(field));
        }
    }

    #[test]
    fn a_field_sent_as_null_is_absent() {
        let now: Timestamp = "2026-05-01T00:00:00Z".parse().unwrap();
        let mut b = body();
        for field in ["id", "granted_at", "revoked_at", "evidence"] {
            b[field] = Value::Null;
        }
        let Change::Undated(r) = new_grant(b, now).unwrap() else {
            panic!("a null granted_at is an undated grant");
        };
        assert_eq!((r.revoked_at, r.evidence), (None, None));
        assert_eq!(r.granted_at, now);
    }

    #[test]
    fn a_record_as_returned_is_accepted_back_revoked_or_not() {
        let now = Timestamp::now();
        let mut r = crate::consent::record::sample("c1", "u1");
        for revoked in [None, Some("2026-06-01T00:00:00Z".parse().unwrap())] {
            r.revoked_at = revoked;
            let sent = serde_json::to_value(&r).unwrap();
            let Change::Record(back) = new_grant(sent, now).unwrap() else {
                panic!("a dated record");
            };
            assert_eq!(back, r);
        }
    }

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(
            query_param("history=1&subject=user%2042+x", "subject").as_deref(),
            Some("user 42 x")
        );
        assert_eq!(query_param("history", "history").as_deref(), Some(""));
        assert_eq!(query_param("a=b", "subject"), None);
    }
}
