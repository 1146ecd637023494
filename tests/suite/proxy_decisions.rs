//! Every reason code of SPEC section 3, reached through the real proxy over real sockets:
//! the HTTP answer (status, JSON body, `Link`, `X-Residency-Decision`), the decision record
//! and the outcome record, and what reached the storage servers.
//!
//! Loopback addresses stand in for countries (`[[networks]]`):
//! 127.0.0.2 home store (CN), 127.0.0.3 store abroad (US), 127.0.0.10 the first-party app
//! (CN), 127.0.0.20 a foreign credit bureau (US, third party), 127.0.0.30 a domestic partner
//! (CN, third party), 127.0.0.40 an anonymous caller in the US, 127.0.0.50 an address nothing
//! locates, 127.0.0.60 a trusted load balancer (CN).

use crate::support::body::{Generated, Trickle};
use crate::support::client::{self, Reply, empty, full, request};
use crate::support::proxy::{
    ABROAD_IP, APP, BUREAU, HOME_IP, PolicySpec, TestProxy, consent, payments_dataset,
};
use crate::support::upstream::{Reply as Serve, Upstream};
use http_body_util::BodyExt;
use residency_proxy::consent::ConsentRecord;
use serde_json::Value;
use std::time::Duration;

const PARTNER: &str = "127.0.0.30";
const ANON_US: &str = "127.0.0.40";
const NOWHERE: &str = "127.0.0.50";
const BALANCER: &str = "127.0.0.60";
const PURPOSE: (&str, &str) = ("X-Purpose", "credit_scoring");

/// Besides `payments` (consent needed abroad and for third parties).
const RECIPIENTS_AND_DATASETS: &str = r#"
[[recipients]]
id = 'partner-cn'
relation = 'third_party'
country = 'CN'
networks = ['127.0.0.30/32']

[[datasets]]
name = 'transactions'
match = { path_prefix = '/transactions/' }
upstream = 'cn-store'
category = 'user.financial.transactions'
subject = { path_segment = 2 }
cross_border = 'consent'
third_party = 'consent'

[[datasets]]
name = 'ledger'
match = { path_prefix = '/ledger/' }
upstream = 'cn-store'
category = 'user.financial'
subject = { path_segment = 2 }
cross_border = 'deny'
third_party = 'consent'

[[datasets]]
name = 'profiles'
match = { path_prefix = '/profiles/' }
upstream = 'cn-store'
category = 'user.contact'
subject = { path_segment = 2 }
cross_border = 'consent'
third_party = 'deny'

[[datasets]]
name = 'reports'
match = { path_prefix = '/reports/' }
upstream = 'cn-store'
category = 'user.financial'
subject = { header = 'X-Data-Subject' }
cross_border = 'consent'
third_party = 'consent'

[[datasets]]
name = 'catalog'
match = { path_prefix = '/catalog/' }
upstream = 'cn-store'
category = 'system.operations'
cross_border = 'allow'
third_party = 'allow'

[[datasets]]
name = 'backup'
match = { path_prefix = '/backup/' }
upstream = 'us-store'
category = 'user.financial'
subject = { path_segment = 2 }
cross_border = 'deny'
third_party = 'deny'

[[datasets]]
name = 'audited'
match = { path_prefix = '/audited/' }
upstream = 'us-store'
category = 'user.financial'
subject = { path_segment = 2 }
cross_border = 'deny'
third_party = 'deny'
mode = 'audit'

[[datasets]]
name = 'dead'
match = { path_prefix = '/dead/' }
upstream = 'dead-store'
category = 'system.operations'
cross_border = 'allow'
third_party = 'allow'
"#;

/// The consents of the main world, one per way a consent can fail (and one that works).
fn registry() -> Vec<ConsentRecord> {
    let now = jiff::Timestamp::now();
    let day = jiff::SignedDuration::from_hours(24);
    let bureau = "credit-bureau-us";
    vec![
        consent("c-ok", "u-ok", bureau),
        ConsentRecord {
            granted_at: now - day * 30,
            expires_at: now - day,
            ..consent("c-exp", "u-exp", bureau)
        },
        ConsentRecord {
            revoked_at: Some(now - jiff::SignedDuration::from_secs(10)),
            ..consent("c-rev", "u-rev", bureau)
        },
        ConsentRecord {
            method: "pre_ticked".into(),
            ..consent("c-pre", "u-pre", bureau)
        },
        ConsentRecord {
            categories: vec!["user.contact".into()],
            ..consent("c-cat", "u-cat", bureau)
        },
        ConsentRecord {
            destinations: vec!["DE".into()],
            ..consent("c-dest", "u-dest", bureau)
        },
    ]
}

/// The proxy, a store at home and a store abroad, as the module doc describes.
struct World {
    proxy: TestProxy,
    home: Upstream,
    abroad: Upstream,
}

impl World {
    async fn start() -> World {
        World::start_with(Serve::Ok, |s| s).await
    }

    /// The main world, with `home` answering as `home_reply` and `tweak` applied last.
    async fn start_with(home_reply: Serve, tweak: impl FnOnce(PolicySpec) -> PolicySpec) -> World {
        let home = Upstream::start(HOME_IP, home_reply).await;
        let abroad = Upstream::start(ABROAD_IP, Serve::Ok).await;
        // A port nothing listens on: bound, then released, on an address no server uses.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.99:0").unwrap();
            l.local_addr().unwrap()
        };
        let spec = PolicySpec::new()
            .with_parties()
            .proxy("trusted_proxies = ['127.0.0.60/32']")
            .proxy("max_header_bytes = 4096")
            .proxy("max_body_bytes = 65536")
            .network("127.0.0.99/32", "CN")
            .network("127.0.0.30/32", "CN")
            .network("127.0.0.40/32", "US")
            .network("127.0.0.60/32", "CN")
            .network("203.0.113.0/24", "US")
            .upstream("cn-store", &home.url())
            .upstream("us-store", &abroad.url())
            .upstream("dead-store", &format!("http://{dead}"))
            .toml(&payments_dataset("cn-store", "consent", "consent"))
            .toml(RECIPIENTS_AND_DATASETS)
            .consents(registry());
        let proxy = tweak(spec).start().await;
        World {
            proxy,
            home,
            abroad,
        }
    }

    async fn get(&self, from: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
        client::get(from, self.proxy.addr, target, headers).await
    }

    async fn send(&self, from: &str, method: &str, target: &str, body: &'static str) -> Reply {
        let req = request(method, target).body(full(body)).unwrap();
        client::send(from, self.proxy.addr, req).await
    }

    /// Asserts a refusal: the answer, the records, and that no store saw a request.
    async fn refused(
        &self,
        reply: &Reply,
        status: u16,
        reason: &str,
        dataset: Option<&str>,
    ) -> Value {
        assert_eq!(reply.status, status, "{}", reply.text());
        let body = reply.json();
        let id = reply.decision_id();
        assert_eq!(body["error"], reason, "{body}");
        assert_eq!(body["decision_id"], id.as_str());
        assert_eq!(body["dataset"], json_opt(dataset));
        let message = body["message"].as_str().expect("a message");
        assert!(
            message.len() > 10 && message.ends_with('.'),
            "one human sentence: {message}"
        );
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let link = reply.header("link");
        if status == 451 {
            let link = link.expect("451 carries a Link header");
            assert!(
                link.contains("itest") && link.ends_with("; rel=\"blocked-by\""),
                "{link}"
            );
        } else {
            assert_eq!(link, None);
        }

        let rec = self.proxy.log.decision(&id);
        assert_eq!(rec["reason"], reason, "{rec}");
        assert_eq!(rec["status"], status, "{rec}");
        assert_eq!(rec["enforced"], true, "{rec}");
        assert_eq!(rec["dataset"], json_opt(dataset), "{rec}");
        let verdict = match status {
            451 | 404 => "deny",
            400 if reason == "ambiguous_path" => "deny",
            _ => "error",
        };
        assert_eq!(rec["decision"], verdict, "{rec}");
        let out = self.proxy.log.outcome(&id).await;
        assert_eq!(out["status"], status, "{out}");
        assert_eq!(out["bytes_out"], reply.body.len() as u64, "{out}");
        assert_eq!(out["upstream"], Value::Null, "{out}");

        assert_eq!(
            self.home.requests(),
            0,
            "a refused request reached the home store"
        );
        assert_eq!(
            self.abroad.requests(),
            0,
            "a refused request reached the store abroad"
        );
        rec
    }

    /// Asserts a forwarded request: `up` answered it, and the records say why and where.
    async fn forwarded(&self, reply: &Reply, reason: &str, up: &Upstream) -> Value {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("ok from {}", up.addr));
        let id = reply.decision_id();
        let rec = self.proxy.log.decision(&id);
        assert_eq!(rec["reason"], reason, "{rec}");
        assert_eq!(rec["status"], Value::Null, "{rec}");
        assert_eq!(rec["upstream"]["addr"], up.addr.to_string(), "{rec}");
        let out = self.proxy.log.outcome(&id).await;
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["upstream"], up.addr.to_string(), "{out}");
        assert_eq!(out["error"], Value::Null, "{out}");
        assert_eq!(out["complete"], true, "{out}");
        assert_eq!(out["bytes_out"], reply.body.len() as u64, "{out}");
        rec
    }
}

fn json_opt(s: Option<&str>) -> Value {
    s.map_or(Value::Null, |s| Value::String(s.into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_refused_before_anything_else() {
    let w = World::start().await;
    for target in [
        "/payments/%2e%2e/admin",
        "/payments/u1%2Fx",
        "/payments/u1%5cx",
        "/payments/u1/%00",
    ] {
        let r = w.get(APP, target, &[]).await;
        let rec = w.refused(&r, 400, "ambiguous_path", None).await;
        assert_eq!(rec["rule"], "request.path");
        // No normal form exists and no subject is known: the log keeps the first segment and
        // pseudonymises the rest, which might name a person.
        let logged = rec["request"]["path"].as_str().unwrap();
        assert!(logged.starts_with("/payments/hmac:"), "{logged}");
        assert!(!logged.contains("u1"), "{logged}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_forwarding_header_from_a_trusted_proxy_is_a_bad_request() {
    let w = World::start().await;
    let r = w
        .get(
            BALANCER,
            "/payments/u1/2026-01.json",
            &[("X-Forwarded-For", "203.0.113.9, not-an-address")],
        )
        .await;
    let rec = w.refused(&r, 400, "bad_request", None).await;
    assert_eq!(rec["rule"], "proxy.trusted_proxies");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("not-an-address")
    );
    // The same header from an untrusted peer is not read at all.
    let r = w
        .get(
            APP,
            "/payments/u1/2026-01.json",
            &[("X-Forwarded-For", "203.0.113.9, not-an-address")],
        )
        .await;
    let rec = w.forwarded(&r, "domestic", &w.home).await;
    assert_eq!(rec["client"]["ip"], APP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_matching_no_dataset_has_no_route() {
    let w = World::start().await;
    let r = w.get(APP, "/elsewhere/x", &[]).await;
    let rec = w.refused(&r, 404, "no_route", None).await;
    assert_eq!(rec["rule"], "policy.unmatched");
    assert_eq!(rec["client"]["country"], "CN");
    assert_eq!(rec["recipient"]["id"], "payments-app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_go_to_the_named_upstream_when_the_policy_allows() {
    let w = World::start_with(Serve::Ok, |s| {
        s.policy("unmatched = 'allow'")
            .policy("unmatched_upstream = 'cn-store'")
    })
    .await;
    let r = w.get(BUREAU, "/elsewhere/x", &[]).await;
    let rec = w.forwarded(&r, "unmatched_allowed", &w.home).await;
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["rule"], "policy.unmatched");
    assert_eq!(rec["dataset"], Value::Null);
    assert_eq!(w.home.last().target, "/elsewhere/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_upstream_is_refused_whatever_the_method() {
    let w = World::start().await;
    for (method, from) in [
        ("GET", APP),
        ("PUT", APP),
        ("DELETE", BUREAU),
        ("HEAD", APP),
    ] {
        let req = request(method, "/backup/u1/2026-01.json")
            .body(empty())
            .unwrap();
        let r = client::send(from, w.proxy.addr, req).await;
        if method == "HEAD" {
            // No body on a HEAD answer, but the same refusal and the same records.
            assert_eq!(r.status, 451);
            let rec = w.proxy.log.decision(&r.decision_id());
            assert_eq!(rec["reason"], "upstream_outside_jurisdiction");
            continue;
        }
        let rec = w
            .refused(&r, 451, "upstream_outside_jurisdiction", Some("backup"))
            .await;
        assert_eq!(rec["rule"], "datasets.backup.upstream");
        assert_eq!(rec["upstream"]["name"], "us-store");
        assert_eq!(rec["upstream"]["country"], "US");
        assert_eq!(rec["request"]["method"], method);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlocated_client_is_refused_when_unknown_locations_are_denied() {
    let w = World::start().await;
    let r = w
        .get(NOWHERE, "/payments/u-ok/2026-01.json", &[PURPOSE])
        .await;
    let rec = w
        .refused(&r, 451, "location_unknown", Some("payments"))
        .await;
    assert_eq!(rec["rule"], "policy.unknown_location");
    assert_eq!(rec["client"]["country"], Value::Null);
    assert_eq!(rec["client"]["source"], "none");
    assert_eq!(rec["client"]["ip"], NOWHERE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_border_and_third_party_denials() {
    let w = World::start().await;
    let r = w.get(BUREAU, "/ledger/u-ok/2026-01.json", &[PURPOSE]).await;
    let rec = w
        .refused(&r, 451, "cross_border_denied", Some("ledger"))
        .await;
    assert_eq!(rec["rule"], "datasets.ledger.cross_border");
    assert_eq!(rec["recipient"]["id"], "credit-bureau-us");
    assert_eq!(rec["recipient"]["country"], "US");
    assert_eq!(rec["client"]["country"], "US");
    assert_eq!(rec["upstream"]["name"], "cn-store");
    // Even a valid consent does not lift a `deny`.
    assert_eq!(rec["consent"], Value::Null);

    // Third parties are refused at home too.
    let r = w.get(PARTNER, "/profiles/u-ok/card.json", &[PURPOSE]).await;
    let rec = w
        .refused(&r, 451, "third_party_denied", Some("profiles"))
        .await;
    assert_eq!(rec["rule"], "datasets.profiles.third_party");
    assert_eq!(rec["recipient"]["id"], "partner-cn");
    assert_eq!(rec["recipient"]["relation"], "third_party");
    assert_eq!(rec["client"]["country"], "CN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_needs_a_subject_and_a_purpose() {
    let w = World::start().await;
    let r = w.get(BUREAU, "/reports/2026-q1.json", &[PURPOSE]).await;
    let rec = w
        .refused(&r, 451, "subject_unidentified", Some("reports"))
        .await;
    assert_eq!(rec["rule"], "datasets.reports.subject");
    assert_eq!(rec["subject"], Value::Null);

    let r = w.get(BUREAU, "/payments/u-ok/2026-01.json", &[]).await;
    let rec = w
        .refused(&r, 451, "purpose_missing", Some("payments"))
        .await;
    assert_eq!(rec["rule"], "consent.purpose_header");
    assert_eq!(rec["purpose"], Value::Null);
}

/// Each way a consent can fail, with the consent named in the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consent_failure_names_its_reason_and_consent() {
    let w = World::start().await;
    let cases: [(&str, &str, &str, Option<&str>); 8] = [
        ("u-none", "credit_scoring", "consent_missing", None),
        ("u-exp", "credit_scoring", "consent_expired", Some("c-exp")),
        ("u-rev", "credit_scoring", "consent_revoked", Some("c-rev")),
        (
            "u-pre",
            "credit_scoring",
            "consent_method_invalid",
            Some("c-pre"),
        ),
        ("u-ok", "marketing", "consent_scope_mismatch", Some("c-ok")),
        (
            "u-cat",
            "credit_scoring",
            "consent_scope_mismatch",
            Some("c-cat"),
        ),
        (
            "u-dest",
            "credit_scoring",
            "consent_scope_mismatch",
            Some("c-dest"),
        ),
        // A consent names its recipient: the anonymous caller holds none.
        ("u-ok", "credit_scoring", "consent_missing", None),
    ];
    for (i, (subject, purpose, reason, consent_id)) in cases.into_iter().enumerate() {
        let from = if i == 7 { ANON_US } else { BUREAU };
        let target = format!("/payments/{subject}/2026-01.json");
        let r = w.get(from, &target, &[("X-Purpose", purpose)]).await;
        let rec = w.refused(&r, 451, reason, Some("payments")).await;
        assert_eq!(rec["rule"], "datasets.payments.cross_border", "{rec}");
        assert_eq!(rec["purpose"], purpose);
        match consent_id {
            Some(c) => {
                assert_eq!(rec["consent"]["id"], c, "{rec}");
                assert_eq!(rec["consent"]["result"], reason, "{rec}");
                // The log says why the consent that existed did not count.
                let why = rec["consent"]["why"].as_str().unwrap_or_default();
                if c == "c-pre" {
                    assert_eq!(why, "collected as \"pre_ticked\"", "{rec}");
                } else {
                    assert!(!why.is_empty(), "{rec}");
                }
            }
            None => assert_eq!(rec["consent"], Value::Null, "{rec}"),
        }
        // Subjects are pseudonymised, in the subject field and in the logged path.
        let subj = rec["subject"].as_str().unwrap();
        assert!(subj.starts_with("hmac:"), "{rec}");
        assert!(!rec.to_string().contains(subject), "raw subject in {rec}");
        assert_eq!(
            rec["request"]["path"],
            format!("/payments/{subj}/2026-01.json")
        );
    }
    let r = w
        .get(BUREAU, "/payments/u-dest/2026-01.json", &[PURPOSE])
        .await;
    assert!(
        r.json()["message"].as_str().unwrap().contains("US"),
        "{}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_transfers_name_their_reason() {
    let w = World::start().await;
    // The first party at home.
    let r = w.get(APP, "/payments/u-ok/2026-01.json", &[]).await;
    let rec = w.forwarded(&r, "domestic", &w.home).await;
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["rule"], "datasets.payments.match");
    assert_eq!(rec["recipient"]["id"], "payments-app");
    assert_eq!(rec["recipient"]["relation"], "first_party");
    assert_eq!(rec["client"]["country"], "CN");
    assert_eq!(rec["client"]["source"], "override");
    assert_eq!(rec["upstream"]["name"], "cn-store");
    assert_eq!(rec["upstream"]["country"], "CN");
    assert_eq!(rec["consent"], Value::Null);

    // A valid explicit consent.
    let r = w
        .get(BUREAU, "/payments/u-ok/2026-01.json", &[PURPOSE])
        .await;
    let rec = w.forwarded(&r, "consented", &w.home).await;
    assert_eq!(rec["rule"], "datasets.payments.cross_border");
    assert_eq!(rec["consent"]["id"], "c-ok");
    assert_eq!(rec["consent"]["result"], "valid");
    assert_eq!(
        rec["consent"].get("why"),
        None,
        "a valid consent needs no why"
    );

    // A consent for `user.financial` covers `user.financial.transactions`.
    let r = w
        .get(BUREAU, "/transactions/u-ok/2026-01.json", &[PURPOSE])
        .await;
    let rec = w.forwarded(&r, "consented", &w.home).await;
    assert_eq!(rec["category"], "user.financial.transactions");
    assert_eq!(rec["consent"]["id"], "c-ok");

    // Data the policy lets leave.
    let r = w.get(BUREAU, "/catalog/rates.json", &[]).await;
    let rec = w.forwarded(&r, "cross_border_allowed", &w.home).await;
    assert_eq!(rec["rule"], "datasets.catalog.cross_border");

    // Writes carry nothing out; only the store's location counts.
    let r = w
        .send(BUREAU, "PUT", "/payments/u-none/2026-01.json", "{}")
        .await;
    let rec = w.forwarded(&r, "not_egress", &w.home).await;
    assert_eq!(rec["rule"], "datasets.payments.egress_methods");
    assert_eq!(w.home.last().method, "PUT");
    assert_eq!(w.home.requests(), 5);
    assert_eq!(w.abroad.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_granted_while_running_takes_effect() {
    let w = World::start().await;
    let target = "/payments/u-new/2026-01.json";
    let r = w.get(BUREAU, target, &[PURPOSE]).await;
    w.refused(&r, 451, "consent_missing", Some("payments"))
        .await;
    let mut all = registry();
    all.push(consent("c-new", "u-new", "credit-bureau-us"));
    w.proxy.set_consents(&all).await;
    let r = w.get(BUREAU, target, &[PURPOSE]).await;
    let rec = w.forwarded(&r, "consented", &w.home).await;
    assert_eq!(rec["consent"]["id"], "c-new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_logs_the_would_be_denial_and_forwards() {
    // Policy-wide.
    let w = World::start_with(Serve::Ok, |s| s.policy("mode = 'audit'")).await;
    let r = w
        .get(BUREAU, "/payments/u-none/2026-01.json", &[PURPOSE])
        .await;
    let rec = w.forwarded(&r, "consent_missing", &w.home).await;
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["enforced"], false);
    assert_eq!(rec["rule"], "datasets.payments.cross_border");
    assert_eq!(w.home.requests(), 1);

    // One dataset in audit mode inside an enforcing policy: its transfer rules are only
    // logged, but a foreign store stays refused (data never leaves through the proxy).
    let w = World::start().await;
    let r = w
        .get(BUREAU, "/audited/u-none/2026-01.json", &[PURPOSE])
        .await;
    assert_eq!(r.status, 451, "{}", r.text());
    let rec = w.proxy.log.decision(&r.decision_id());
    assert_eq!(rec["reason"], "upstream_outside_jurisdiction", "{rec}");
    assert_eq!(rec["enforced"], true, "{rec}");
    assert_eq!(rec["upstream"]["country"], "US");
    assert_eq!(w.abroad.requests(), 0);
}

/// A server-side copy (`PUT` with `x-amz-copy-source`) reads an object inside the store: the
/// read is decided as a `GET` of the source by the same client, so a domestic third party
/// cannot copy a dataset it may not read (`profiles`: third_party deny) into one it may
/// (`catalog`) and read it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_refused_unless_the_client_may_read_what_it_copies() {
    let w = World::start().await;
    let put_copy = |from: &'static str, headers: &[(&str, &str)]| {
        let mut b = request("PUT", "/catalog/x.json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        client::send(from, w.proxy.addr, b.body(empty()).unwrap())
    };
    for source in [
        "/profiles/u1/card.json",
        "profiles/u1/card.json?versionId=3",
    ] {
        let r = put_copy(PARTNER, &[("x-amz-copy-source", source)]).await;
        let rec = w
            .refused(&r, 451, "third_party_denied", Some("catalog"))
            .await;
        assert_eq!(rec["rule"], "datasets.profiles.third_party", "{rec}");
        assert!(
            r.json()["message"].as_str().unwrap().contains("profiles"),
            "{}",
            r.text()
        );
    }
    // The same operation on Alibaba OSS.
    let r = put_copy(PARTNER, &[("x-oss-copy-source", "/profiles/u1/card.json")]).await;
    w.refused(&r, 451, "third_party_denied", Some("catalog"))
        .await;
    // Two sources: which one the store reads is anybody's guess.
    let r = put_copy(
        PARTNER,
        &[
            ("x-amz-copy-source", "/catalog/a.json"),
            ("x-oss-copy-source", "/profiles/u1/card.json"),
        ],
    )
    .await;
    w.refused(&r, 400, "bad_request", Some("catalog")).await;
    // A source outside the home jurisdiction is not read either.
    let r = put_copy(APP, &[("x-amz-copy-source", "/backup/u1/r.json")]).await;
    w.refused(&r, 451, "upstream_outside_jurisdiction", Some("catalog"))
        .await;

    // What the client may read, it may copy.
    let r = put_copy(PARTNER, &[("x-amz-copy-source", "/catalog/a.json")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = put_copy(APP, &[("x-amz-copy-source", "/profiles/u1/card.json")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(w.home.requests(), 2);
    assert_eq!(
        w.home.last().headers["x-amz-copy-source"],
        "/profiles/u1/card.json"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_connections_is_a_502() {
    let w = World::start().await;
    let r = w.get(APP, "/dead/x", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let body = r.json();
    let id = r.decision_id();
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(body["decision_id"], id.as_str());
    assert!(body["message"].as_str().unwrap().ends_with('.'), "{body}");
    assert_eq!(body["dataset"], "dead");
    // The decision allowed the request; the failure came after it.
    let rec = w.proxy.log.decision(&id);
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["reason"], "domestic");
    let out = w.proxy.log.outcome(&id).await;
    assert_eq!(out["status"], 502);
    assert_eq!(out["error"], "upstream_unreachable");
    assert_eq!(out["upstream"], rec["upstream"]["addr"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_too_late_is_a_504() {
    let w = World::start_with(Serve::Delay(Duration::from_secs(5)), |s| {
        s.proxy("upstream_timeout = '300ms'")
    })
    .await;
    let started = std::time::Instant::now();
    let r = w.get(APP, "/payments/u1/2026-01.json", &[]).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the proxy waited for the upstream"
    );
    assert_eq!(r.status, 504, "{}", r.text());
    let body = r.json();
    let id = r.decision_id();
    assert_eq!(body["error"], "upstream_timeout");
    assert_eq!(body["dataset"], "payments");
    assert!(body["message"].as_str().unwrap().ends_with('.'), "{body}");
    let rec = w.proxy.log.decision(&id);
    assert_eq!(rec["decision"], "allow");
    let out = w.proxy.log.outcome(&id).await;
    assert_eq!(out["status"], 504);
    assert_eq!(out["error"], "upstream_timeout");
}

/// An upstream that sends its response head and then nothing more is cut off once
/// `idle_timeout` passes without a body byte; the exchange ends with `upstream_timeout`
/// instead of holding both connections open for as long as the store likes. A slow upstream
/// that keeps sending is never cut off, however long the whole body takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_sending_mid_body_is_cut_off() {
    let stalled = Serve::Trickle {
        chunks: 2,
        size: 100,
        every: Duration::from_secs(6),
    };
    let w = World::start_with(stalled, |s| s.proxy("idle_timeout = '1s'")).await;
    let resp = client::Conn::open(APP, w.proxy.addr)
        .await
        .response(
            request("GET", "/payments/u1/2026-01.json")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-residency-decision"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.into_body().collect().await;
    assert!(body.is_err(), "the stalled body ended normally");
    let out = w.proxy.log.outcome(&id).await;
    assert_eq!(out["error"], "upstream_timeout", "{out}");
    assert_eq!(out["complete"], false, "{out}");
    assert_eq!(out["bytes_out"], 0, "{out}");
    assert!(
        out["detail"].as_str().unwrap().contains("idle_timeout"),
        "{out}"
    );

    let slow = Serve::Trickle {
        chunks: 6,
        size: 100,
        every: Duration::from_millis(300),
    };
    let w = World::start_with(slow, |s| s.proxy("idle_timeout = '1s'")).await;
    let r = w.get(APP, "/payments/u1/2026-01.json", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 600, "the slow body was cut short");
    let out = w.proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(out["error"], Value::Null, "{out}");
    assert_eq!(out["complete"], true, "{out}");
}

/// A client that asks for a large object and stops reading is cut off once it has accepted
/// nothing for `idle_timeout`: its exchange ends (incomplete, in the outcome record) and the
/// connection is closed, instead of holding a connection slot and the upstream forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LEN: u64 = 256 << 20;
    let big = Serve::Stream {
        len: LEN,
        chunk: 64 << 10,
    };
    let w = World::start_with(big, |s| s.proxy("idle_timeout = '1s'")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{APP}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(w.proxy.addr).await.unwrap();
    tcp.write_all(
        format!(
            "GET /payments/u1/2026-01.json HTTP/1.1\r\nHost: {}\r\n\r\n",
            client::HOST
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read the head (and whatever body came with it), then stop reading.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the proxy closed before the head");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-residency-decision: "))
        .expect("a decision id")
        .trim()
        .to_uppercase();

    let out = w.proxy.log.outcome(&id).await;
    assert_eq!(out["complete"], false, "{out}");
    let sent = out["bytes_out"].as_u64().unwrap();
    assert!(sent < LEN, "{out}");
    // The proxy closed the connection: what is left is what was buffered, then the end.
    let mut rest = 0u64;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest += n as u64,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open");
    assert!(rest < LEN, "the whole object arrived after all");
}

/// A client connection on which nothing moves for `idle_timeout` is closed, freeing its slot:
/// one that sends part of the HTTP/2 preface and stops, and an HTTP/2 connection left open
/// without requests (HTTP/1.1 keep-alive waits are bounded by `header_read_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_which_nothing_moves_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start_with(Serve::Ok, |s| s.proxy("idle_timeout = '1s'")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{APP}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(w.proxy.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(8), tcp.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a half-sent preface kept its connection: {closed:?}"
    );

    let mut h2 = client::Conn::open_h2c(APP, w.proxy.addr).await;
    let get = || request("GET", "/catalog/a.json").body(empty()).unwrap();
    assert_eq!(h2.send(get()).await.status, 200);
    // Closed by the proxy once idle for a second (bounded at 10 s), and unusable after.
    crate::support::wait_until("the idle HTTP/2 connection to be closed", || h2.is_closed()).await;
    assert!(
        h2.try_send(get()).await.is_err(),
        "an idle HTTP/2 connection stayed open"
    );
}

/// A keep-alive connection waiting for its next request is parked (hyper's connection and
/// buffers let go, only the socket kept): a request after the wait, and two sent in one write
/// after another, are answered on the same connection, each with its records; a connection
/// left idle is still closed once `header_read_timeout` has passed, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_keep_alive_connection_serves_its_next_requests() {
    use tokio::io::AsyncWriteExt;
    let w = World::start_with(Serve::Ok, |s| s.proxy("header_read_timeout = '2s'")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{APP}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(w.proxy.addr).await.unwrap();
    let get = format!(
        "GET /payments/u1/2026-01.json HTTP/1.1\r\nHost: {}\r\n\r\n",
        client::HOST
    );
    let mut buffered = Vec::new();
    let mut ids = Vec::new();
    tcp.write_all(get.as_bytes()).await.unwrap();
    ids.push(read_response(&mut tcp, &mut buffered).await);
    for pipelined in [1, 2] {
        // The client waits, long enough for the connection to be parked (a quarter to half
        // a second of quiet).
        tokio::time::sleep(Duration::from_millis(800)).await;
        tcp.write_all(get.repeat(pipelined).as_bytes())
            .await
            .unwrap();
        for _ in 0..pipelined {
            ids.push(read_response(&mut tcp, &mut buffered).await);
        }
    }
    for id in &ids {
        let out = w.proxy.log.outcome(id).await;
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["complete"], true, "{out}");
    }
    assert_eq!(w.home.requests(), 4);
    // Left idle: closed after `header_read_timeout`, as an idle keep-alive connection is.
    let idle = std::time::Instant::now();
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut rest),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "an idle keep-alive connection stayed open: {closed:?}"
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before header_read_timeout",
        idle.elapsed()
    );
}

/// Reads one HTTP/1.1 response with a `Content-Length` from `tcp` (bytes past it stay in
/// `buffered` for the next), checks it is a 200 and returns its decision id.
async fn read_response(tcp: &mut tokio::net::TcpStream, buffered: &mut Vec<u8>) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the proxy closed the connection");
        buffered.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&buffered[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {head}"))
    };
    let len: usize = header("content-length:").parse().unwrap();
    let id = header("x-residency-decision:").to_uppercase();
    while buffered.len() < head_end + len {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the proxy closed the connection mid-body");
        buffered.extend_from_slice(&buf[..n]);
    }
    buffered.drain(..head_end + len);
    id
}

/// Regression: the upstream timeout ran from the first byte sent, so an upload that took
/// longer than `upstream_timeout` to send was cut off with a 504 although the store answered
/// at once. The timeout is how long the store may take to answer once it has the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_an_upstream_timeout() {
    let w = World::start_with(Serve::Ok, |s| s.proxy("upstream_timeout = '400ms'")).await;
    let req = request("PUT", "/payments/u1/2026-01.json")
        .body(Trickle::new(6, 1000, Duration::from_millis(200)).boxed())
        .unwrap();
    let r = client::send(APP, w.proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(w.home.last().body_len, 6000);
    let out = w.proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(out["error"], Value::Null, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_a_431() {
    let w = World::start().await;
    let big = "x".repeat(5000);
    let r = w
        .get(APP, "/payments/u1/2026-01.json", &[("X-Padding", &big)])
        .await;
    let rec = w.refused(&r, 431, "headers_too_large", None).await;
    assert_eq!(rec["rule"], "proxy.max_header_bytes");

    // Over HTTP/2 too: a head the HTTP/2 layer would have refused on its own, unlogged.
    let big = "x".repeat(10_000);
    let mut h2 = client::Conn::open_h2c(APP, w.proxy.addr).await;
    let req = request("GET", "/payments/u1/2026-01.json")
        .header("x-padding", &big)
        .body(empty())
        .unwrap();
    let r = h2.send(req).await;
    let rec = w.refused(&r, 431, "headers_too_large", None).await;
    assert_eq!(rec["rule"], "proxy.max_header_bytes");
}

/// Regression: heads that hyper itself refuses (more headers than `max_headers`, larger than
/// its read buffer, not HTTP) were answered but left no record in the decision log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_refused_before_the_pipeline_are_logged_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start().await;
    let mut b = request("GET", "/payments/u1/2026-01.json");
    for i in 0..150 {
        b = b.header(format!("x-h{i}"), "v");
    }
    let r = client::send(APP, w.proxy.addr, b.body(empty()).unwrap()).await;
    assert_eq!(r.status, 431);
    let huge = "x".repeat(64 * 1024);
    let r = w
        .get(APP, "/payments/u1/2026-01.json", &[("X-Huge", &huge)])
        .await;
    assert_eq!(r.status, 431);

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{PARTNER}:0").parse().unwrap())
        .unwrap();
    let mut stream = socket.connect(w.proxy.addr).await.unwrap();
    stream.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let mut found = Vec::new();
    crate::support::wait_until("three failure records", || {
        found = w
            .proxy
            .log
            .of_kind("decision")
            .into_iter()
            .filter(|r| r["decision"] == "error")
            .collect();
        found.len() == 3
    })
    .await;
    // Each is logged when its connection ends, so their order in the log is not fixed.
    let mut summary: Vec<(String, String, u64)> = found
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().unwrap().to_string(),
                r["client"]["ip"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    summary.sort();
    assert_eq!(
        summary,
        [
            ("bad_request".to_string(), PARTNER.to_string(), 400),
            ("headers_too_large".to_string(), APP.to_string(), 431),
            ("headers_too_large".to_string(), APP.to_string(), 431),
        ]
    );
    for rec in &found {
        let rule = if rec["reason"] == "bad_request" {
            "request.head"
        } else {
            "proxy.max_header_bytes"
        };
        assert_eq!(rec["rule"], rule, "{rec}");
        let out = w.proxy.log.outcome(rec["id"].as_str().unwrap()).await;
        assert_eq!(out["status"], rec["status"]);
    }
    assert_eq!(w.home.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_a_413() {
    let w = World::start().await;
    let body = vec![b'a'; 70_000];
    let req = request("PUT", "/payments/u1/2026-01.json")
        .body(full(body))
        .unwrap();
    let r = client::send(APP, w.proxy.addr, req).await;
    let rec = w.refused(&r, 413, "payload_too_large", None).await;
    assert_eq!(rec["rule"], "proxy.max_body_bytes");
}

/// Regression: the limit was only compared with `Content-Length`, so a chunked body of any
/// size went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_chunked_body_is_a_413_too() {
    let w = World::start().await;
    let req = request("PUT", "/payments/u1/2026-01.json")
        .body(Generated::chunked(200_000, 8192).boxed())
        .unwrap();
    // The proxy answers 413 while the client is still sending; like any server that stops
    // reading, its close may reset the connection before the client reads the answer. Either
    // way the request is logged and refused.
    let mut conn = client::Conn::open(APP, w.proxy.addr).await;
    if let Ok(r) = conn.try_send(req).await {
        assert_eq!(r.status, 413, "{}", r.text());
        assert_eq!(r.json()["error"], "payload_too_large");
    }
    let decision = w
        .proxy
        .log
        .of_kind("decision")
        .pop()
        .expect("a decision record");
    let id = decision["id"].as_str().unwrap().to_string();
    let out = w.proxy.log.outcome(&id).await;
    assert_eq!(out["status"], 413, "{out}");
    assert_eq!(out["error"], "payload_too_large", "{out}");
    // Whatever reached the store before the cut is an incomplete request, never a stored
    // object.
    let seen = w.home.last_seen();
    assert!(
        seen.as_ref().is_none_or(|s| s.body_len <= 65536),
        "the store received {:?} bytes",
        seen.map(|s| s.body_len)
    );
    // A chunked body within the limit still goes through whole.
    let req = request("PUT", "/payments/u1/2026-01.json")
        .body(Generated::chunked(60_000, 8192).boxed())
        .unwrap();
    let r = client::send(APP, w.proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(w.home.last().body_len, 60_000);
}

/// A dataset whose subject is a query parameter.
const SEARCH: &str = r#"
[[datasets]]
name = 'search'
match = { path_prefix = '/search/' }
upstream = 'cn-store'
category = 'user.financial'
subject = { query = 'uid' }
"#;

/// What the upstream could read differently from the proxy is refused or decided as the
/// upstream will see it (found by review: each of these was once forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_requests_the_upstream_could_read_otherwise_were_forwarded() {
    let w = World::start_with(Serve::Ok, |s| s.consents(registry()).toml(SEARCH)).await;
    let subject = ("X-Data-Subject", "u-ok");
    // The subject named twice, in a header or in the query (keys compare decoded).
    let r = w
        .get(
            BUREAU,
            "/reports/x.json",
            &[PURPOSE, subject, ("X-Data-Subject", "u-none")],
        )
        .await;
    w.refused(&r, 400, "bad_request", Some("reports")).await;
    for target in [
        "/search/q?uid=u-ok&uid=u-none",
        "/search/q?u%69d=u-none&uid=u-ok",
    ] {
        let r = w.get(BUREAU, target, &[PURPOSE]).await;
        w.refused(&r, 400, "bad_request", Some("search")).await;
    }
    // A header the Connection header names is gone before the decision, as it will be upstream.
    let r = w
        .get(
            BUREAU,
            "/reports/x.json",
            &[PURPOSE, subject, ("Connection", "x-data-subject")],
        )
        .await;
    w.refused(&r, 451, "subject_unidentified", Some("reports"))
        .await;
    // Host cannot be dropped or doubled.
    let r = w
        .get(
            BUREAU,
            "/payments/u-ok/x.json",
            &[PURPOSE, ("Connection", "host")],
        )
        .await;
    w.refused(&r, 400, "bad_request", None).await;
    let r = w
        .get(
            BUREAU,
            "/payments/u-ok/x.json",
            &[PURPOSE, ("Host", "other.example")],
        )
        .await;
    w.refused(&r, 400, "bad_request", None).await;
    // A Host that upstreams could split otherwise than the proxy (nginx and Go cut at the
    // colon and route `storage.test:x` to `storage.test`).
    for host in ["storage.test:x", "u@storage.test", "storage.test:99999"] {
        let mut req = request("GET", "/catalog/x.json").body(empty()).unwrap();
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static(host));
        let r = client::send(BUREAU, w.proxy.addr, req).await;
        w.refused(&r, 400, "bad_request", None).await;
    }
    // Methods: a standard one spelled in lower case is refused; an unknown one is egress.
    let req = request("get", "/payments/u-none/x.json")
        .header("x-purpose", "credit_scoring")
        .body(empty())
        .unwrap();
    let r = client::send(BUREAU, w.proxy.addr, req).await;
    w.refused(&r, 400, "bad_request", None).await;
    let req = request("FROB", "/payments/u-none/x.json")
        .header("x-purpose", "credit_scoring")
        .body(empty())
        .unwrap();
    let r = client::send(BUREAU, w.proxy.addr, req).await;
    w.refused(&r, 451, "consent_missing", Some("payments"))
        .await;
    // `/payments` (a bucket listing) belongs to the `/payments/` dataset.
    let r = w.get(BUREAU, "/payments", &[PURPOSE]).await;
    w.refused(&r, 451, "subject_unidentified", Some("payments"))
        .await;
}

/// Found by review: a subject named where the dataset says, but in a way the proxy refuses
/// to read (twice, or not UTF-8), reached the log raw, since the decision had no subject to
/// pseudonymise. Every such value is now pseudonymised; none reaches the log file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_subject_the_proxy_could_not_read_reached_the_log_raw() {
    let w = World::start_with(Serve::Ok, |s| s.toml(SEARCH)).await;
    let key =
        residency_proxy::audit::keys::SigningKey::load(&w.proxy.dir.path().join("log-signing.key"))
            .unwrap();
    let pseudo = residency_proxy::audit::Pseudonymizer::new(&key.pseudonym_key());
    let hidden = |raw: &str| pseudo.pseudonym(raw);

    // The query parameter twice, once with its key spelled encoded.
    let r = w
        .get(
            BUREAU,
            "/search/q?uid=alice-raw&x=1&u%69d=alice-raw",
            &[PURPOSE],
        )
        .await;
    let rec = w.refused(&r, 400, "bad_request", Some("search")).await;
    let ps = hidden("alice-raw");
    assert_eq!(
        rec["request"]["query"],
        format!("uid={ps}&x=1&u%69d={ps}").as_str(),
        "{rec}"
    );
    // A value that is not UTF-8 once decoded.
    let r = w.get(BUREAU, "/search/q?uid=dave-raw%FF", &[PURPOSE]).await;
    let rec = w
        .refused(&r, 451, "subject_unidentified", Some("search"))
        .await;
    assert_eq!(
        rec["request"]["query"],
        format!("uid={}", hidden("dave-raw%FF")).as_str(),
        "{rec}"
    );
    // The subject header twice.
    let r = w
        .get(
            BUREAU,
            "/reports/x.json",
            &[
                PURPOSE,
                ("X-Data-Subject", "bob-raw"),
                ("X-Data-Subject", "bob-raw"),
            ],
        )
        .await;
    let rec = w.refused(&r, 400, "bad_request", Some("reports")).await;
    assert_eq!(
        rec["request"]["headers"]["x-data-subject"],
        hidden("bob-raw").as_str(),
        "{rec}"
    );
    // A subject header that is not visible ASCII.
    let req = request("GET", "/reports/x.json")
        .header("x-purpose", "credit_scoring")
        .header(
            "x-data-subject",
            http::HeaderValue::from_bytes(b"carol-raw\xe9").unwrap(),
        )
        .body(empty())
        .unwrap();
    let r = client::send(BUREAU, w.proxy.addr, req).await;
    let rec = w
        .refused(&r, 451, "subject_unidentified", Some("reports"))
        .await;
    assert_eq!(
        rec["request"]["headers"]["x-data-subject"],
        hidden("carol-raw\u{fffd}").as_str(),
        "{rec}"
    );

    let log = std::fs::read_to_string(&w.proxy.log.path).unwrap();
    for raw in ["alice-raw", "dave-raw", "bob-raw", "carol-raw"] {
        assert!(!log.contains(raw), "{raw} reached the log:\n{log}");
    }
}

/// Regression: a third party seated in the US calling from an address at home was refused
/// `consent_scope_mismatch` unless its consent also named home. Destinations name countries
/// outside home (SPEC section 4): only the US is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_recipient_at_a_home_address_is_decided_by_its_foreign_destinations() {
    const OFFICE: &str = "127.0.0.70";
    let office = "credit-bureau-us-office";
    let w = World::start_with(Serve::Ok, |s| {
        s.network("127.0.0.70/32", "CN")
            .toml(&format!(
                "[[recipients]]\nid = '{office}'\nrelation = 'third_party'\ncountry = 'US'\nnetworks = ['127.0.0.70/32']\n"
            ))
            .consents(
                [
                    registry(),
                    vec![
                        consent("c-office", "u-office", office),
                        ConsentRecord {
                            destinations: vec!["DE".into()],
                            ..consent("c-office-de", "u-office-de", office)
                        },
                    ],
                ]
                .concat(),
            )
    })
    .await;

    let r = w
        .get(OFFICE, "/payments/u-office-de/2026-01.json", &[PURPOSE])
        .await;
    let rec = w
        .refused(&r, 451, "consent_scope_mismatch", Some("payments"))
        .await;
    assert_eq!(rec["consent"]["id"], "c-office-de", "{rec}");
    assert_eq!(rec["consent"]["why"], "destination US not granted", "{rec}");

    let r = w
        .get(OFFICE, "/payments/u-office/2026-01.json", &[PURPOSE])
        .await;
    let rec = w.forwarded(&r, "consented", &w.home).await;
    assert_eq!(rec["client"]["country"], "CN", "{rec}");
    assert_eq!(rec["recipient"]["country"], "US", "{rec}");
    assert_eq!(rec["consent"]["id"], "c-office", "{rec}");
}
